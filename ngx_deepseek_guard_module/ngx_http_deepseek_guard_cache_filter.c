/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The cache inside a request, the cache part of ngx_http_upstream.c: the
 * probe before admission, coalescing waits, sending an entry, stale
 * answers, the capture filters and the key's digests.
 */


#include "ngx_http_deepseek_guard_module.h"
#include "ngx_http_deepseek_guard_cache.h"

#include <openssl/evp.h>
#include <xxhash.h>

#include "dsg_entry.h"
#include "dsg_http.h"
#include "dsg_json.h"
#include "dsg_store.h"

static void ngx_http_deepseek_guard_cache_missed(
    ngx_http_deepseek_guard_cache_ctx_t *cctx,
    ngx_http_deepseek_guard_loc_conf_t *lcf, ngx_int_t n);
static ngx_int_t ngx_http_deepseek_guard_cache_mark(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
static ngx_uint_t ngx_http_deepseek_guard_cache_loop(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
static void ngx_http_deepseek_guard_cache_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_cache_resume(ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_cache_key(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
static ngx_int_t ngx_http_deepseek_guard_cache_lookup(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
static void ngx_http_deepseek_guard_cache_unmap(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
static ngx_int_t ngx_http_deepseek_guard_cache_send(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
static ngx_int_t ngx_http_deepseek_guard_cache_status_header(
    ngx_http_request_t *r, ngx_http_deepseek_guard_cache_ctx_t *cctx);
static ngx_int_t ngx_http_deepseek_guard_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static void ngx_http_deepseek_guard_cache_cleanup(void *data);
static ngx_int_t ngx_http_deepseek_guard_body_sha(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);


/*
 * Request headers that name a client: a response to a request that sends
 * one may differ by client, so it is kept apart by the key
 */
static ngx_str_t  ngx_http_deepseek_guard_credential_headers[] = {
    ngx_string("Authorization"),
    ngx_string("Api-Key"),
    ngx_string("X-Api-Key"),
    ngx_string("Cookie"),
    ngx_null_string
};


/* the hex SHA-256 of nothing: the digest of no body and no credentials */
static u_char  ngx_http_deepseek_guard_empty_sha[] =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";


/* response headers never stored: hop-by-hop, or rebuilt on a hit */
static ngx_str_t  ngx_http_deepseek_guard_unstored_headers[] = {
    ngx_string("Connection"),
    ngx_string("Keep-Alive"),
    ngx_string("Proxy-Authenticate"),
    ngx_string("Proxy-Connection"),
    ngx_string("TE"),
    ngx_string("Trailer"),
    ngx_string("Transfer-Encoding"),
    ngx_string("Upgrade"),
    ngx_string("Content-Length"),
    ngx_string("Content-Type"),
    ngx_string("Date"),
    ngx_null_string
};


static ngx_str_t  ngx_http_deepseek_guard_cache_status_names[] = {
    ngx_null_string,
    ngx_string("MISS"),
    ngx_string("HIT"),
    ngx_string("EXPIRED"),
    ngx_string("STALE"),
    ngx_string("COALESCED"),
    ngx_string("BYPASS")
};


/*
 * proxy_pass's content handler: the cache acts only where the content
 * comes from an HTTP upstream it can capture.  Learned at configuration
 * from a location whose proxy_pass names an upstream, or from the first
 * answer of proxy_pass with variables.
 */
static ngx_http_handler_pt  ngx_http_deepseek_guard_proxy_handler;

static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


/*
 * Whether the cache acts on this request at all: a cache in a location
 * whose content is proxy_pass, with something it may store (a
 * deepseek_guard_cache_valid line), for a cached method.  Everywhere else
 * the request flows as in stock nginx: no body read ahead, no lookup, no
 * fill lock, and the guard admits in the access phase.
 */

ngx_uint_t
ngx_http_deepseek_guard_cache_active(ngx_http_request_t *r)
{
    ngx_http_upstream_conf_t            *ucf;
    ngx_http_core_loc_conf_t            *clcf;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (lcf->cache == NULL || lcf->cache_valid == NULL
        || !(r->method & lcf->methods))
    {
        return 0;
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (clcf->handler == NULL
        || clcf->handler != ngx_http_deepseek_guard_proxy_handler)
    {
        return 0;
    }

    /*
     * "proxy_request_buffering off" streams a body to the upstream as it
     * arrives: a request with a body passes by, not read ahead for a key
     */

    ucf = ngx_http_get_module_loc_conf(r, ngx_http_proxy_module);

    if (!ucf->request_buffering
        && (r->headers_in.content_length_n > 0 || r->headers_in.chunked))
    {
        return 0;
    }

    return 1;
}


/* the per-request cache state, created on first use */

static ngx_http_deepseek_guard_cache_ctx_t *
ngx_http_deepseek_guard_cache_ctx(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_pool_cleanup_t                   *cln;
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;

    if (ctx->cache) {
        return ctx->cache;
    }

    cln = ngx_pool_cleanup_add(r->main->pool,
                               sizeof(ngx_http_deepseek_guard_cache_ctx_t));
    if (cln == NULL) {
        return NULL;
    }

    cctx = cln->data;
    ngx_memzero(cctx, sizeof(ngx_http_deepseek_guard_cache_ctx_t));
    cctx->guard = ctx;
    cctx->lock = -1;
    cln->handler = ngx_http_deepseek_guard_cache_cleanup;

    ctx->cache = cctx;

    return cctx;
}


/*
 * Runs at the start of the precontent phase, after every access module,
 * before admission.  NGX_DECLINED: go on to admission (a miss, or not
 * cacheable); NGX_OK: answered from the cache, skip admission; NGX_DONE:
 * parked (reading the body, or waiting for the request that fills this
 * entry); an HTTP status on error.
 */

ngx_int_t
ngx_http_deepseek_guard_cache_access(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_int_t                             rc;
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;
    ngx_http_deepseek_guard_loc_conf_t   *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    /*
     * after an internal redirect (error_page, a named location, try_files'
     * fallback, X-Accel-Redirect) the request is not the one the client
     * sent to this location: its key would name another request's answer
     */

    if (r->internal || !ngx_http_deepseek_guard_cache_active(r)) {
        return NGX_DECLINED;
    }

    cctx = ngx_http_deepseek_guard_cache_ctx(r, ctx);
    if (cctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (cctx->looked_up) {
        return cctx->serve ? NGX_OK : NGX_DECLINED;
    }

    cctx->cache = lcf->cache;

    if (cctx->body == NGX_HTTP_DSG_BODY_NONE
        && (r->headers_in.content_length_n > 0 || r->headers_in.chunked))
    {
        cctx->body = NGX_HTTP_DSG_BODY_READING;

        rc = ngx_http_read_client_request_body(r,
                                 ngx_http_deepseek_guard_cache_body_handler);
        if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            return rc;
        }

        /* the body handler reruns the phases, now or once the body is in */

        ngx_http_finalize_request(r, NGX_DONE);
        return NGX_DONE;
    }

    if (cctx->body == NGX_HTTP_DSG_BODY_READING) {
        /* re-entered before the body handler ran: keep waiting */
        return NGX_DONE;
    }

    if (ngx_http_test_predicates(r, lcf->cache_bypass) == NGX_DECLINED) {

        /* the response is still stored: under this request's key */
        if (ngx_http_deepseek_guard_cache_key(r, cctx) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        cctx->looked_up = 1;
        cctx->bypass = 1;
        cctx->store = 1;
        cctx->status = NGX_HTTP_DSG_CACHE_BYPASS;
        (void) ngx_atomic_fetch_add(&lcf->cache->sh->bypass, 1);
        return NGX_DECLINED;
    }

    rc = ngx_http_deepseek_guard_cache_lookup(r, cctx);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (r->headers_in.range && !(rc == NGX_OK && cctx->ranges)) {
        /*
         * a part of an answer: nginx cuts it from a stored whole that
         * says it serves ranges; anything else asks the upstream, and its
         * answer (a 206, or a whole the range filter trims) is not stored
         */
        ngx_http_deepseek_guard_cache_unpin(cctx, r->connection->log);
        cctx->looked_up = 1;
        cctx->have_entry = 0;
        cctx->status = NGX_HTTP_DSG_CACHE_MISS;
        (void) ngx_atomic_fetch_add(&lcf->cache->sh->misses, 1);
        return NGX_DECLINED;
    }

    if (rc == NGX_OK) {
        /* fresh hit */
        cctx->looked_up = 1;
        cctx->serve = 1;

        ngx_http_deepseek_guard_cache_touch(cctx->cache, cctx->digest);

        if (cctx->waited) {
            cctx->status = NGX_HTTP_DSG_CACHE_COALESCED;
            (void) ngx_atomic_fetch_add(&lcf->cache->sh->coalesced, 1);

        } else {
            cctx->status = NGX_HTTP_DSG_CACHE_HIT;
            (void) ngx_atomic_fetch_add(&lcf->cache->sh->hits, 1);
        }

        return NGX_OK;
    }

    /*
     * A miss: wait for the request filling it, or fill it, but only once
     * admitted (ngx_http_deepseek_guard_cache_fill): a filler that waits
     * in the admission queue holds no lock, so requests for the same entry
     * are not kept waiting on it; they queue for admission themselves.
     */

    if (!cctx->lock_timed_out
        && ngx_http_deepseek_guard_cache_locked(cctx->cache, cctx->digest))
    {
        if (ngx_http_deepseek_guard_cache_loop(r, cctx)) {
            /*
             * the filler proxied this very request back into this nginx:
             * it waits for us, we must not wait for it
             */
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "deepseek_guard cache \"%V\": the request that "
                          "fills this entry proxied it here, not waiting",
                          &lcf->cache->name);
            cctx->fill = 2;
            ngx_http_deepseek_guard_cache_missed(cctx, lcf, 1);
            return NGX_DECLINED;
        }

        if (cctx->have_entry
            && (lcf->use_stale & NGX_HTTP_DSG_STALE_UPDATING))
        {
            cctx->looked_up = 1;
            cctx->serve = 1;
            cctx->status = NGX_HTTP_DSG_CACHE_STALE;
            (void) ngx_atomic_fetch_add(&lcf->cache->sh->stale, 1);
            return NGX_OK;
        }

        if (!cctx->waiting) {
            cctx->waiting = 1;
            cctx->waited = 1;
            cctx->wait_deadline = ngx_current_msec + lcf->lock_timeout;
            ngx_http_deepseek_guard_park(&ctx->park, r,
                                         ngx_http_deepseek_guard_cache_resume);
        }

        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "deepseek_guard cache: waiting for the filler");

        return NGX_DONE;
    }

    cctx->fill = 1;

    ngx_http_deepseek_guard_cache_missed(cctx, lcf, 1);

    return NGX_DECLINED;
}


/*
 * An admitted miss becomes the entry's filler: it takes the fill lock,
 * bounded by deepseek_guard_cache_lock_timeout, and will store the answer.
 * NGX_BUSY: another request began to fill the entry, or filled it, while
 * this one was being admitted; the caller gives the admission back and
 * asks the cache again.
 */

ngx_int_t
ngx_http_deepseek_guard_cache_filler(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_int_t                             rc;
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;
    ngx_http_deepseek_guard_loc_conf_t   *lcf;

    cctx = ctx->cache;

    if (cctx == NULL || !cctx->fill) {
        return NGX_OK;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (ctx->enqueued) {
        /*
         * it waited in the admission queue: the request for the same entry
         * that was admitted before it may have stored it meanwhile
         */

        rc = ngx_http_deepseek_guard_cache_lookup(r, cctx);

        if (rc == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (rc == NGX_OK) {
            ngx_http_deepseek_guard_cache_missed(cctx, lcf, -1);
            return NGX_BUSY;
        }
    }

    if (cctx->lock_timed_out || cctx->fill == 2) {
        rc = NGX_OK;

    } else {
        rc = ngx_http_deepseek_guard_cache_lock(r, cctx);
    }

    if (rc == NGX_BUSY) {
        ngx_http_deepseek_guard_cache_missed(cctx, lcf, -1);
        return NGX_BUSY;
    }

    cctx->fill = 0;
    cctx->looked_up = 1;
    cctx->store = 1;

    if (cctx->lock >= 0 && ngx_http_deepseek_guard_cache_mark(r, cctx)
                           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * A miss or an expired entry, counted when the cache is asked (a request
 * refused afterwards still logs it); n = -1 takes it back, for a request
 * that will ask again
 */

static void
ngx_http_deepseek_guard_cache_missed(ngx_http_deepseek_guard_cache_ctx_t *cctx,
    ngx_http_deepseek_guard_loc_conf_t *lcf, ngx_int_t n)
{
    if (n > 0 && cctx->status != 0) {
        return;
    }

    cctx->status = (n > 0) ? (cctx->have_entry ? NGX_HTTP_DSG_CACHE_EXPIRED
                                               : NGX_HTTP_DSG_CACHE_MISS)
                           : 0;

    (void) ngx_atomic_fetch_add(cctx->have_entry ? &lcf->cache->sh->expired
                                                 : &lcf->cache->sh->misses,
                                (ngx_atomic_int_t) n);
}


/*
 * A filler marks its request with the entry's digest: the proxied request
 * carries the mark, and should it come back into this nginx with the same
 * key (proxy_pass to a server of the same nginx), it knows not to wait
 * for the request that waits for it.
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_mark(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    u_char           *p;
    ngx_table_elt_t  *h;

    p = ngx_pnalloc(r->pool, 32);
    if (p == NULL) {
        return NGX_ERROR;
    }

    h = ngx_list_push(&r->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    ngx_str_set(&h->key, NGX_HTTP_DSG_FILL_HEADER);
    h->lowcase_key = (u_char *) NGX_HTTP_DSG_FILL_HEADER_LC;
    h->hash = ngx_hash_key(h->lowcase_key, h->key.len);
    h->value.data = p;
    h->value.len = ngx_hex_dump(p, cctx->digest, 16) - p;
#if (nginx_version >= 1023000)
    h->next = NULL;
#endif

    return NGX_OK;
}


static ngx_uint_t
ngx_http_deepseek_guard_cache_loop(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    u_char            hex[32];
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    (void) ngx_hex_dump(hex, cctx->digest, 16);

    part = &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_deepseek_guard_header_next(&part, &i)) != NULL) {
        if (h->key.len == sizeof(NGX_HTTP_DSG_FILL_HEADER) - 1
            && h->value.len == 32
            && ngx_http_deepseek_guard_name_eq(h->key.data,
                                          (u_char *) NGX_HTTP_DSG_FILL_HEADER,
                                          h->key.len)
            && ngx_strncmp(h->value.data, hex, 32) == 0)
        {
            return 1;
        }
    }

    return 0;
}


static void
ngx_http_deepseek_guard_cache_body_handler(ngx_http_request_t *r)
{
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    if (ctx && ctx->cache) {
        ctx->cache->body = NGX_HTTP_DSG_BODY_DONE;
    }

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


static void *
ngx_http_deepseek_guard_cache_alloc(void *pool, size_t n)
{
    return ngx_palloc(pool, n);
}


/* 1 if the header is one of the names, case-insensitively */

static ngx_uint_t
ngx_http_deepseek_guard_header_in(ngx_table_elt_t *h, ngx_str_t *names)
{
    for ( /* void */ ; names->len; names++) {
        if (h->key.len == names->len
            && ngx_http_deepseek_guard_name_eq(h->key.data, names->data,
                                               names->len))
        {
            return 1;
        }
    }

    return 0;
}


/*
 * The LMDB key of an entry: 32 bytes of XXH3-128 of the key string, under
 * two fixed seeds (the file outlives any configuration, so the seeds do
 * too).  An index, not an identity: the entry holds the whole key string
 * and a lookup compares it (ngx_http_deepseek_guard_cache_lookup), so two
 * keys with one digest only take turns in one record, they never answer
 * each other.  The key string's own digests of secrets and bodies stay
 * SHA-256.
 */

#define NGX_HTTP_DSG_DIGEST_SEED0  0x6473672d63616368ULL   /* "dsg-cach" */
#define NGX_HTTP_DSG_DIGEST_SEED1  0x652d6b65792d7632ULL   /* "e-key-v2" */

static void
ngx_http_deepseek_guard_key_digest(u_char *digest, u_char *key, size_t len)
{
    XXH128_hash_t  h;

    h = XXH3_128bits_withSeed(key, len, NGX_HTTP_DSG_DIGEST_SEED0);
    XXH128_canonicalFromHash((XXH128_canonical_t *) digest, h);

    h = XXH3_128bits_withSeed(key, len, NGX_HTTP_DSG_DIGEST_SEED1);
    XXH128_canonicalFromHash((XXH128_canonical_t *) (digest + 16), h);
}


/*
 * A SHA-256 context, initialized, for the digests of bodies, credentials
 * and Vary values.  With OpenSSL 3, EVP_sha256() makes every digest look
 * the algorithm up again (a property query under a lock, about 2,000
 * instructions); a worker fetches it once and keeps one context, which no
 * two digests share: each is begun and finished within one call.
 */

static EVP_MD_CTX  *ngx_http_deepseek_guard_sha_ctx;
#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
static EVP_MD      *ngx_http_deepseek_guard_sha_md;
#endif


static EVP_MD_CTX *
ngx_http_deepseek_guard_sha_begin(void)
{
    const EVP_MD  *md;

#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
    if (ngx_http_deepseek_guard_sha_md == NULL) {
        ngx_http_deepseek_guard_sha_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (ngx_http_deepseek_guard_sha_md == NULL) {
            return NULL;
        }
    }

    md = ngx_http_deepseek_guard_sha_md;
#else
    md = EVP_sha256();
#endif

    if (ngx_http_deepseek_guard_sha_ctx == NULL) {
        ngx_http_deepseek_guard_sha_ctx = EVP_MD_CTX_new();
        if (ngx_http_deepseek_guard_sha_ctx == NULL) {
            return NULL;
        }
    }

    if (EVP_DigestInit_ex(ngx_http_deepseek_guard_sha_ctx, md, NULL) != 1) {
        return NULL;
    }

    return ngx_http_deepseek_guard_sha_ctx;
}


/* at process exit: before nginx unloads the module and its pointers */

void
ngx_http_deepseek_guard_sha_free(void)
{
    EVP_MD_CTX_free(ngx_http_deepseek_guard_sha_ctx);
    ngx_http_deepseek_guard_sha_ctx = NULL;

#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
    EVP_MD_free(ngx_http_deepseek_guard_sha_md);
    ngx_http_deepseek_guard_sha_md = NULL;
#endif
}


/*
 * Computes the key and its digest, once.  The key is the configured one
 * after marks of what else the upstream's answer depends on: a request
 * that accepts gzip (a gzip answer is stored only under that mark, so a
 * client that did not ask for gzip never gets it), and one that has a
 * body.
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_key(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    u_char                              *p, *last;
    ngx_str_t                            key;
    ngx_uint_t                           i, body;
    ngx_list_part_t                     *part;
    ngx_table_elt_t                     *h;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    if (cctx->key.data) {
        return NGX_OK;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    part = &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_deepseek_guard_header_next(&part, &i)) != NULL) {
        if (ngx_http_deepseek_guard_header_in(h,
                                  ngx_http_deepseek_guard_credential_headers))
        {
            cctx->credentials = 1;

        } else if (h->key.len == sizeof("Accept-Encoding") - 1
                   && ngx_http_deepseek_guard_name_eq(h->key.data,
                                                (u_char *) "Accept-Encoding",
                                                h->key.len)
                   && dsg_http_accepts_gzip((char *) h->value.data,
                                            h->value.len))
        {
            cctx->gzip = 1;
        }
    }

    if (ngx_http_complex_value(r, lcf->cache_key, &key) != NGX_OK) {
        return NGX_ERROR;
    }

    /*
     * what the upstream sees besides the key: whether the client accepts
     * gzip, and whether the request has a body at all (an empty one still
     * sends "Content-Length: 0"); a prefix of fixed length, so no key can
     * pass for another with other marks
     */

    p = ngx_pnalloc(r->pool, sizeof("g0b0|") - 1 + key.len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    body = (r->headers_in.content_length || r->headers_in.chunked);

    /* "g%uib%ui|" of two flags, without ngx_sprintf()'s parsing */
    p[0] = 'g';
    p[1] = cctx->gzip ? '1' : '0';
    p[2] = 'b';
    p[3] = body ? '1' : '0';
    p[4] = '|';
    last = ngx_cpymem(p + 5, key.data, key.len);

    key.data = p;
    key.len = last - p;

    ngx_http_deepseek_guard_key_digest(cctx->digest, key.data, key.len);

    cctx->key = key;

    return NGX_OK;
}


/*
 * The hex SHA-256 of the request's values of the headers a Vary value
 * names, in the order it names them: equal for two requests the upstream
 * would answer alike.
 */

static ngx_int_t
ngx_http_deepseek_guard_vary_digest(ngx_http_request_t *r, u_char *vary,
    size_t len, u_char *hex)
{
    size_t            n, plen;
    ngx_uint_t        i, ok;
    const char       *p, *tok, *par;
    unsigned int      dlen;
    EVP_MD_CTX       *md;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;
    u_char            digest[32];

    md = ngx_http_deepseek_guard_sha_begin();
    ok = (md != NULL);

    p = (const char *) vary;

    while (ok && dsg_http_list_next(&p, (const char *) vary + len, &tok, &n,
                                    &par, &plen))
    {
        ok = (EVP_DigestUpdate(md, "\0", 1) == 1);

        part = &r->headers_in.headers.part;
        i = 0;

        while (ok && (h = ngx_http_deepseek_guard_header_next(&part, &i))
                  != NULL)
        {
            if (h->key.len == n
                && ngx_http_deepseek_guard_name_eq(h->key.data, (u_char *) tok,
                                                   n))
            {
                ok = (EVP_DigestUpdate(md, h->value.data, h->value.len)
                      == 1
                      && EVP_DigestUpdate(md, "\n", 1) == 1);
            }
        }
    }

    ok = ok && (EVP_DigestFinal_ex(md, digest, &dlen) == 1);

    if (!ok) {
        return NGX_ERROR;
    }

    ngx_hex_dump(hex, digest, 32);

    return NGX_OK;
}


/*
 * Reads what an entry's headers say of its reuse: whether it serves
 * ranges, and whether the request has the values its Vary names.
 * NGX_OK: it may answer this request; NGX_DECLINED: it may not.
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_usable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx, dsg_entry_t *e)
{
    u_char     *p, *last, *eol, *vary, *stored;
    size_t      len;
    u_char      hex[64];

    cctx->ranges = 0;
    vary = NULL;
    stored = NULL;
    len = 0;

    p = (u_char *) e->hdrs;
    last = p + e->hdrs_len;

    for ( /* void */ ; p < last; p = eol + 2) {
        eol = ngx_http_deepseek_guard_chr(p, last, '\r');
        if (eol == NULL) {
            eol = last;
        }

        if ((size_t) (eol - p) == sizeof(NGX_HTTP_DSG_VARY_LINE) - 1 + 64
            && ngx_strncmp(p, NGX_HTTP_DSG_VARY_LINE,
                           sizeof(NGX_HTTP_DSG_VARY_LINE) - 1) == 0)
        {
            stored = p + sizeof(NGX_HTTP_DSG_VARY_LINE) - 1;
            continue;
        }

        if (eol - p > 5
            && ngx_http_deepseek_guard_name_eq(p, (u_char *) "Vary:", 5))
        {
            /* the store joins every Vary line into one */
            vary = p + 5;
            len = eol - vary;
            continue;
        }

        if (eol - p >= 20
            && ngx_http_deepseek_guard_name_eq(p, (u_char *) "Accept-Ranges:",
                                               14)
            && ngx_strlcasestrn(p + 14, eol, (u_char *) "bytes", 5 - 1))
        {
            cctx->ranges = 1;
        }
    }

    if (vary == NULL) {
        return NGX_OK;
    }

    if (stored == NULL
        || ngx_http_deepseek_guard_vary_digest(r, vary, len, hex) != NGX_OK
        || ngx_memcmp(hex, stored, 64) != 0)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * Computes the key and its digest, then reads the entry.  NGX_OK: fresh;
 * NGX_DECLINED: none or expired (cctx->have_entry says which).
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_lookup(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    int               rc;
    size_t            len;
    u_char           *copy;
    uint8_t          *val;
    uint64_t          now;
    ngx_int_t         found;
    dsg_entry_t       e;
    const uint8_t    *data;
    dsg_store_pin_t  *pin;

    if (ngx_http_deepseek_guard_cache_key(r, cctx) != NGX_OK) {
        return NGX_ERROR;
    }

    /* asked again (after a wait): the entry found before is let go */
    ngx_http_deepseek_guard_cache_unpin(cctx, r->connection->log);

    cctx->have_entry = 0;

    if (cctx->cache->store == NULL) {
        return NGX_DECLINED;
    }

    /* read in place, pinned; a copy when no pin is free */

    rc = dsg_store_pin(cctx->cache->store, cctx->digest, &pin, &data, &len);

    if (rc == DSG_STORE_ELIMIT) {
        rc = dsg_store_get(cctx->cache->store, cctx->digest,
                           ngx_http_deepseek_guard_cache_alloc, r->pool,
                           &val, &len);
        data = val;
    }

    if (rc == DSG_STORE_NOTFOUND) {
        return NGX_DECLINED;
    }

    if (rc != DSG_STORE_OK) {
        ngx_http_deepseek_guard_cache_fault(cctx->cache, r->connection->log,
                                            NGX_LOG_ERR, "read failed", rc);
        return NGX_DECLINED;
    }

    cctx->pin = pin;
    found = NGX_DECLINED;

    rc = dsg_entry_decode(data, len, &e);
    if (rc != DSG_ENTRY_OK) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "deepseek_guard cache \"%V\": bad entry: %s",
                      &cctx->cache->name, dsg_entry_strerror(rc));
        goto done;
    }

    if (e.key_len != cctx->key.len
        || ngx_memcmp(e.key, cctx->key.data, e.key_len) != 0)
    {
        /* two keys, one digest: never answer another request's entry */
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "deepseek_guard cache \"%V\": key digest collision",
                      &cctx->cache->name);
        goto done;
    }

    now = ngx_http_deepseek_guard_now_ms();

    if (now >= e.stale_until_ms) {
        goto done;
    }

    if (ngx_http_deepseek_guard_cache_usable(r, cctx, &e) != NGX_OK) {
        /* another variant: a miss, and its answer replaces the entry */
        goto done;
    }

    cctx->entry = e;
    cctx->have_entry = 1;
    cctx->fresh = (now < e.expires_ms);

    /*
     * every fresh hit with a body is sent from the map: even at 1 KB the
     * copy (a pool block, memcpy) costs more than holding the read until
     * the body is out, which is at once unless the client is slow, and a
     * slow client's rest is copied out then (cache_unmap())
     */

    if (!cctx->fresh || e.body_len == 0) {
        found = cctx->fresh ? NGX_OK : NGX_DECLINED;
        goto done;
    }

    /* a fresh hit, sent now: from the map, pinned until it is out */

    return NGX_OK;

done:

    if (cctx->pin == NULL) {
        return found;
    }

    copy = NULL;

    if (cctx->have_entry) {
        /*
         * kept beyond this moment (a stale candidate) or small: a copy,
         * and the pin goes back at once
         */

        copy = ngx_pnalloc(r->pool, len);
        if (copy == NULL) {
            ngx_http_deepseek_guard_cache_unpin(cctx, r->connection->log);
            cctx->have_entry = 0;
            return NGX_ERROR;
        }

        ngx_memcpy(copy, data, len);
    }

    ngx_http_deepseek_guard_cache_unpin(cctx, r->connection->log);

    if (cctx->have_entry) {
        /* the same entry, its parts now in the copy */
        cctx->entry = e;
        cctx->entry.key = copy + (e.key - data);
        cctx->entry.hdrs = copy + (e.hdrs - data);
        cctx->entry.body = copy + (e.body - data);
    }

    return found;
}


/*
 * The park timer asks a request waiting for the filler of its entry:
 * NGX_AGAIN while the fill lock is held and the wait not over, else
 * NGX_OK, and the phases run again (a hit now, or this request fills).
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_resume(ngx_http_request_t *r)
{
    ngx_http_deepseek_guard_ctx_t        *ctx;
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);
    cctx = ctx->cache;

    if (ngx_http_deepseek_guard_cache_locked(cctx->cache, cctx->digest)) {

        if ((ngx_msec_int_t) (cctx->wait_deadline - ngx_current_msec) > 0) {
            return NGX_AGAIN;
        }

        /* waited long enough: go to the upstream on our own */
        cctx->lock_timed_out = 1;
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "deepseek_guard cache \"%V\": lock timeout, "
                      "going upstream", &cctx->cache->name);
    }

    cctx->waiting = 0;

    return NGX_OK;
}


/*
 * An internal redirect took the request to another location: the cache's
 * decision was for the one left behind.  Nothing is answered from it or
 * stored, and a waiter for this entry need not wait for this request.
 */

void
ngx_http_deepseek_guard_cache_drop(ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;

    cctx = ctx->cache;

    if (cctx == NULL || cctx->dropped) {
        return;
    }

    if (cctx->waiting) {
        ngx_http_deepseek_guard_unpark(&ctx->park);
        cctx->waiting = 0;
    }

    cctx->dropped = 1;
    cctx->looked_up = 1;
    cctx->have_entry = 0;
    cctx->serve = 0;
    cctx->store = 0;
    cctx->capture = 0;
    cctx->replacing = 0;

    if (cctx->cache) {
        ngx_http_deepseek_guard_cache_unlock(cctx);
    }
}


/* the guard would reject: answer with a stale entry if allowed */

ngx_int_t
ngx_http_deepseek_guard_cache_overload(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;
    ngx_http_deepseek_guard_loc_conf_t   *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (ctx->cache == NULL
        || !(lcf->use_stale & NGX_HTTP_DSG_STALE_OVERLOAD))
    {
        return NGX_DECLINED;
    }

    cctx = ctx->cache;

    if (!cctx->have_entry || r->header_sent) {
        return NGX_DECLINED;
    }

    cctx->status = NGX_HTTP_DSG_CACHE_STALE;
    cctx->store = 0;
    (void) ngx_atomic_fetch_add(&cctx->cache->sh->stale, 1);
    ngx_http_deepseek_guard_cache_unlock(cctx);

    ngx_http_discard_request_body(r);

    return ngx_http_deepseek_guard_cache_send(r, cctx);
}


/*
 * A hit (fresh, coalesced or stale while updating) is sent here, at the
 * start of the precontent phase, before the location's content handler
 * (proxy_pass) could run.  NGX_DECLINED: nothing to serve.
 */

ngx_int_t
ngx_http_deepseek_guard_cache_serve(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;

    cctx = ctx->cache;

    if (!cctx->serve || cctx->serving) {
        return NGX_DECLINED;
    }

    ngx_http_discard_request_body(r);

    return ngx_http_deepseek_guard_cache_send(r, cctx);
}


/*
 * Sets the response headers of the entry, as the upstream's came through
 * proxy: nginx's own filters (not_modified, range, gzip, charset) then
 * treat a hit as they treat the upstream's answer.  The body follows.
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_set_headers(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    u_char           *p, *last, *colon, *eol;
    ngx_str_t         name, value;
    ngx_table_elt_t  *h;

#define ngx_http_dsg_is(name, s)                                             \
    ((name).len == sizeof(s) - 1                                            \
     && ngx_http_deepseek_guard_name_eq((name).data, (u_char *) s,         \
                                        sizeof(s) - 1))

    r->headers_out.status = cctx->entry.status;
    r->allow_ranges = 0;
    r->headers_out.content_length_n = cctx->entry.body_len;
    r->headers_out.content_length = NULL;
    r->headers_out.content_type.len = 0;
    r->headers_out.content_type_len = 0;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.last_modified_time = -1;
    r->headers_out.last_modified = NULL;

    p = (u_char *) cctx->entry.hdrs;

    if (cctx->pin) {
        /* the headers outlive the pin: the log phase reads them */
        p = ngx_pnalloc(r->pool, cctx->entry.hdrs_len);
        if (p == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(p, cctx->entry.hdrs, cctx->entry.hdrs_len);
    }

    last = p + cctx->entry.hdrs_len;

    while (p < last) {
        eol = ngx_http_deepseek_guard_chr(p, last, '\r');
        if (eol == NULL) {
            eol = last;
        }

        colon = ngx_http_deepseek_guard_chr(p, eol, ':');

        if (colon) {
            name.data = p;
            name.len = colon - p;
            value.data = colon + 1;
            value.len = eol - value.data;

            while (value.len && value.data[0] == ' ') {
                value.data++;
                value.len--;
            }

            if (name.len == 0) {
                /* not a header: the store's own line */

            } else if (ngx_http_dsg_is(name, "Content-Type")) {
                r->headers_out.content_type = value;
                r->headers_out.content_type_len = value.len;

            } else if (ngx_http_dsg_is(name, "Accept-Ranges")) {
                /* the range filter says it again when it may cut ranges */
                r->allow_ranges = cctx->ranges;

            } else {
                h = ngx_list_push(&r->headers_out.headers);
                if (h == NULL) {
                    return NGX_ERROR;
                }

                h->hash = 1;
                h->key = name;
                h->value = value;
                h->lowcase_key = NULL;
#if (nginx_version >= 1023000)
                h->next = NULL;
#endif

                if (ngx_http_dsg_is(name, "Content-Encoding")) {
                    r->headers_out.content_encoding = h;

                } else if (ngx_http_dsg_is(name, "Last-Modified")) {
                    r->headers_out.last_modified = h;
                    r->headers_out.last_modified_time =
                                    ngx_parse_http_time(value.data, value.len);

                } else if (ngx_http_dsg_is(name, "ETag")) {
                    r->headers_out.etag = h;

                } else if (ngx_http_dsg_is(name, "Location")) {
                    r->headers_out.location = h;
                }
            }
        }

        p = eol + 2;
    }

#undef ngx_http_dsg_is

    return NGX_OK;
}


static ngx_buf_t *
ngx_http_deepseek_guard_cache_body_buf(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    ngx_buf_t  *b;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NULL;
    }

    b->pos = (u_char *) cctx->entry.body;
    b->last = b->pos + cctx->entry.body_len;
    b->memory = cctx->entry.body_len ? 1 : 0;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    return b;
}


static ngx_int_t
ngx_http_deepseek_guard_cache_send(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    cctx->serving = 1;

    ngx_http_clean_header(r);

    if (ngx_http_deepseek_guard_cache_set_headers(r, cctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b = ngx_http_deepseek_guard_cache_body_buf(r, cctx);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        ngx_http_deepseek_guard_cache_unpin(cctx, r->connection->log);
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    rc = ngx_http_output_filter(r, &out);

    if (cctx->pin) {
        ngx_http_deepseek_guard_cache_unmap(r, cctx);
    }

    return rc;
}


/*
 * A hit sent from the map (pinned): once the body filters are through, a
 * slow client must not hold the pin (LMDB cannot reuse pages freed while
 * it lasts).  When all that is left waits in the write filter (r->out,
 * nothing buffered by another filter, no HTTP/2 frames queued), the
 * unsent bytes are copied into the pool and the pin goes back at once;
 * otherwise (gzip, sub_filter, HTTP/2 flow control) the pin lasts until
 * the request ends.
 */

static void
ngx_http_deepseek_guard_cache_unmap(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    size_t        n;
    u_char       *p, *start, *end;
    ngx_buf_t    *b;
    ngx_uint_t    mask;
    ngx_chain_t  *cl;

    mask = NGX_HTTP_WRITE_BUFFERED;
#if (NGX_SSL)
    /* what OpenSSL is still to send is in its own buffer, a copy */
    mask |= NGX_SSL_BUFFERED;
#endif

    if (r->buffered || r->postponed || (r->connection->buffered & ~mask)) {
        return;
    }

    start = (u_char *) cctx->entry.body;
    end = start + cctx->entry.body_len;

    for (cl = r->out; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file || b->pos == NULL || b->pos < start || b->pos >= end) {
            continue;
        }

        n = b->last - b->pos;

        p = ngx_pnalloc(r->pool, n);
        if (p == NULL) {
            return;
        }

        ngx_memcpy(p, b->pos, n);

        b->start = p;
        b->pos = p;
        b->last = p + n;
        b->end = p + n;
    }

    ngx_http_deepseek_guard_cache_unpin(cctx, r->connection->log);
}


static ngx_int_t
ngx_http_deepseek_guard_cache_status_header(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    ngx_table_elt_t                     *h;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (lcf->status_header.len == 0 || cctx->status == 0) {
        return NGX_OK;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = lcf->status_header;
    h->value = ngx_http_deepseek_guard_cache_status_names[cctx->status];

    return NGX_OK;
}


/*
 * The TTL an upstream response allows, in ms; 0: do not store.  Whatever
 * the order of the header lines: Set-Cookie forbids storing, then
 * X-Accel-Expires wins, then Cache-Control no-store, private or max-age=0
 * forbid it, and s-maxage (a shared cache's own) or max-age sets the TTL
 * of a status with a valid line.  *shared: the response says any client
 * may have it (public, s-maxage or must-revalidate, RFC 9111 3.5).
 */

static uint64_t
ngx_http_deepseek_guard_cache_ttl(ngx_http_request_t *r,
    ngx_http_deepseek_guard_loc_conf_t *lcf, ngx_uint_t status,
    ngx_uint_t *shared)
{
    int64_t                           age;
    ngx_int_t                         n;
    ngx_uint_t                        i, found, xae;
    uint64_t                          ttl, xttl;
    dsg_http_cc_t                     cc;
    ngx_list_part_t                  *part;
    ngx_table_elt_t                  *h;
    ngx_http_deepseek_guard_valid_t  *v;

    ttl = 0;
    found = 0;
    *shared = 0;

    if (lcf->cache_valid) {
        v = lcf->cache_valid->elts;

        for (i = 0; i < lcf->cache_valid->nelts; i++) {
            if (v[i].status == status || v[i].status == 0) {
                ttl = v[i].valid;
                found = 1;
                break;
            }
        }
    }

    if (r->upstream == NULL) {
        return ttl;
    }

    xae = 0;
    xttl = 0;
    dsg_http_cc_init(&cc);

    part = &r->upstream->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_deepseek_guard_header_next(&part, &i)) != NULL) {
        if (h->hash == 0) {
            continue;
        }

        if (h->key.len == sizeof("Set-Cookie") - 1
            && ngx_http_deepseek_guard_name_eq(h->key.data,
                                               (u_char *) "Set-Cookie",
                                               h->key.len))
        {
            return 0;
        }

        if (h->key.len == sizeof("X-Accel-Expires") - 1
            && ngx_http_deepseek_guard_name_eq(h->key.data,
                                               (u_char *) "X-Accel-Expires",
                                               h->key.len))
        {
            xae = 1;
            xttl = 0;

            if (h->value.len && h->value.data[0] == '@') {
                n = ngx_atoi(h->value.data + 1, h->value.len - 1);
                if (n != NGX_ERROR && n > ngx_time()) {
                    xttl = (uint64_t) (n - ngx_time()) * 1000;
                }

                continue;
            }

            n = ngx_atoi(h->value.data, h->value.len);
            if (n != NGX_ERROR) {
                xttl = (uint64_t) n * 1000;
            }

            continue;
        }

        /*
         * no-cache only asks for revalidation, and every LLM event stream
         * carries it: only no-store and private forbid storing
         */

        if (h->key.len == sizeof("Cache-Control") - 1
            && ngx_http_deepseek_guard_name_eq(h->key.data,
                                               (u_char *) "Cache-Control",
                                               h->key.len))
        {
            dsg_http_cc_parse((char *) h->value.data, h->value.len, &cc);
        }
    }

    *shared = cc.public_ || cc.must_revalidate || cc.s_maxage >= 0;

    /* X-Accel-Expires wins over everything else */

    if (xae) {
        return xttl;
    }

    if (cc.no_store || cc.private_) {
        return 0;
    }

    age = (cc.s_maxage >= 0) ? cc.s_maxage : cc.max_age;

    if (age == 0) {
        return 0;
    }

    if (age > 0 && found) {
        ttl = (uint64_t) age * 1000;
    }

    return ttl;
}


/*
 * Whether the response in r->headers_out may be stored for this request,
 * past its TTL: NGX_OK, with the headers to store in cctx->hdrs;
 * NGX_DECLINED, not storable (the reason at debug level).
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_storable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx, ngx_uint_t shared)
{
    u_char                              *p;
    size_t                               len, vlen;
    ngx_uint_t                           i, nvary;
    ngx_str_t                            why;
    ngx_list_part_t                     *part;
    ngx_table_elt_t                     *h;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;
    u_char                              *vary;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (r->headers_out.status == NGX_HTTP_PARTIAL_CONTENT
        || r->headers_in.range)
    {
        /* a part: never a whole answer to another request */
        ngx_str_set(&why, "a range");
        goto no;
    }

    if (r->headers_out.status == NGX_HTTP_NOT_MODIFIED
        || r->headers_out.status == NGX_HTTP_PRECONDITION_FAILED)
    {
        /* the answer to this client's condition, not to the request */
        ngx_str_set(&why, "an answer to a condition");
        goto no;
    }

    if (cctx->credentials && !lcf->key_has_auth && !shared
        && lcf->credentials != NGX_HTTP_DSG_CRED_SHARED)
    {
        ngx_str_set(&why, "credentials the key does not name");
        goto no;
    }

    if (r->upstream
        && r->upstream->headers_in.content_length_n < 0
        && !r->upstream->headers_in.chunked
        && !r->header_only
        && !(r->headers_out.content_type.len >= 17
             && ngx_strncasecmp(r->headers_out.content_type.data,
                                (u_char *) "text/event-stream", 17) == 0))
    {
        /* ended by the connection's close: a cut looks like the end */
        ngx_str_set(&why, "a close-delimited body");
        goto no;
    }

    /* the headers to keep: their size first, then the bytes */

    len = sizeof("Content-Type: \r\n") - 1 + r->headers_out.content_type.len
          + sizeof(NGX_HTTP_DSG_VARY_LINE) - 1 + 64 + 2
          + sizeof("Vary: \r\n") - 1;
    vlen = 0;
    nvary = 0;

    part = &r->headers_out.headers.part;
    i = 0;

    while ((h = ngx_http_deepseek_guard_header_next(&part, &i)) != NULL) {
        if (h->hash == 0) {
            continue;
        }

        if (h->key.len == sizeof("Content-Encoding") - 1
            && ngx_http_deepseek_guard_name_eq(h->key.data,
                                               (u_char *) "Content-Encoding",
                                               h->key.len)
            && !(h->value.len == 8
                 && ngx_strncasecmp(h->value.data, (u_char *) "identity",
                                    8) == 0)
            && !(cctx->gzip && h->value.len == 4
                 && ngx_strncasecmp(h->value.data, (u_char *) "gzip", 4)
                    == 0))
        {
            /* only gzip, and only for a request that accepts it */
            ngx_str_set(&why, "an encoding");
            goto no;
        }

        if (h->key.len == sizeof("Vary") - 1
            && ngx_http_deepseek_guard_name_eq(h->key.data,
                                               (u_char *) "Vary", 4))
        {
            if (dsg_http_vary_star((char *) h->value.data, h->value.len))
            {
                ngx_str_set(&why, "Vary: *");
                goto no;
            }

            vlen += h->value.len + 2;
            nvary++;
            continue;
        }

        if (ngx_http_deepseek_guard_header_in(h,
                                    ngx_http_deepseek_guard_unstored_headers))
        {
            continue;
        }

        len += h->key.len + 2 + h->value.len + 2;
    }

    len += vlen;

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    cctx->hdrs.data = p;

    if (r->headers_out.content_type.len) {
        p = ngx_sprintf(p, "Content-Type: %V\r\n",
                        &r->headers_out.content_type);
    }

    vary = NULL;

    if (nvary) {
        /* every Vary line in one, and the request's values it names */
        p = ngx_cpymem(p, "Vary: ", sizeof("Vary: ") - 1);
        vary = p;
    }

    part = &r->headers_out.headers.part;
    i = 0;

    while ((h = ngx_http_deepseek_guard_header_next(&part, &i)) != NULL) {
        if (h->hash == 0
            || !(h->key.len == 4
                 && ngx_http_deepseek_guard_name_eq(h->key.data,
                                                    (u_char *) "Vary", 4)))
        {
            continue;
        }

        if (p != vary) {
            *p++ = ',';
            *p++ = ' ';
        }

        p = ngx_cpymem(p, h->value.data, h->value.len);
    }

    if (nvary) {
        vlen = p - vary;
        *p++ = '\r';
        *p++ = '\n';

        p = ngx_cpymem(p, NGX_HTTP_DSG_VARY_LINE,
                       sizeof(NGX_HTTP_DSG_VARY_LINE) - 1);

        if (ngx_http_deepseek_guard_vary_digest(r, vary, vlen, p) != NGX_OK) {
            return NGX_ERROR;
        }

        p += 64;
        *p++ = '\r';
        *p++ = '\n';
    }

    part = &r->headers_out.headers.part;
    i = 0;

    while ((h = ngx_http_deepseek_guard_header_next(&part, &i)) != NULL) {
        if (h->hash == 0
            || (h->key.len == 4
                && ngx_http_deepseek_guard_name_eq(h->key.data,
                                                   (u_char *) "Vary", 4))
            || ngx_http_deepseek_guard_header_in(h,
                                    ngx_http_deepseek_guard_unstored_headers))
        {
            continue;
        }

        p = ngx_sprintf(p, "%V: %V\r\n", &h->key, &h->value);
    }

    cctx->hdrs.len = p - cctx->hdrs.data;

    return NGX_OK;

no:

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "deepseek_guard cache: not stored: %V", &why);

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_deepseek_guard_header_filter(ngx_http_request_t *r)
{
    ngx_int_t                             rc;
    ngx_uint_t                            status, mask, shared;
    ngx_http_deepseek_guard_ctx_t        *ctx;
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;
    ngx_http_deepseek_guard_loc_conf_t   *lcf;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    if (ngx_http_deepseek_guard_proxy_handler == NULL && r->upstream
        && r->upstream->conf
           == ngx_http_get_module_loc_conf(r, ngx_http_proxy_module))
    {
        /* proxy's upstream settings are the first field of its conf */
        ngx_http_deepseek_guard_proxy_handler =
            ((ngx_http_core_loc_conf_t *)
             ngx_http_get_module_loc_conf(r, ngx_http_core_module))->handler;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    if (ctx == NULL || ctx->cache == NULL) {
        return ngx_http_next_header_filter(r);
    }

    cctx = ctx->cache;
    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (cctx->serving) {
        if (ngx_http_deepseek_guard_cache_status_header(r, cctx) != NGX_OK) {
            return NGX_ERROR;
        }

        return ngx_http_next_header_filter(r);
    }

    status = r->headers_out.status;

    /* the upstream failed or is busy: a stale entry may answer instead */

    if (cctx->have_entry && !cctx->fresh && lcf->use_stale) {
        switch (status) {
        case NGX_HTTP_INTERNAL_SERVER_ERROR:
            mask = NGX_HTTP_DSG_STALE_500;
            break;
        case NGX_HTTP_BAD_GATEWAY:
            mask = NGX_HTTP_DSG_STALE_502 | NGX_HTTP_DSG_STALE_ERROR;
            break;
        case NGX_HTTP_SERVICE_UNAVAILABLE:
            mask = NGX_HTTP_DSG_STALE_503;
            break;
        case NGX_HTTP_GATEWAY_TIME_OUT:
            mask = NGX_HTTP_DSG_STALE_504 | NGX_HTTP_DSG_STALE_TIMEOUT;
            break;
        case NGX_HTTP_TOO_MANY_REQUESTS:
            mask = NGX_HTTP_DSG_STALE_429;
            break;
        default:
            mask = 0;
        }

        if (lcf->use_stale & mask) {
            cctx->replacing = 1;
            cctx->serving = 1;
            cctx->store = 0;
            cctx->status = NGX_HTTP_DSG_CACHE_STALE;
            (void) ngx_atomic_fetch_add(&cctx->cache->sh->stale, 1);

            if (ngx_list_init(&r->headers_out.headers, r->pool, 8,
                              sizeof(ngx_table_elt_t))
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            /*
             * the upstream's status line ("503 Service Unavailable") would
             * go out instead of the entry's status, and nginx's own error
             * status (502, 504) would be logged as $status
             */
            ngx_str_null(&r->headers_out.status_line);
            r->err_status = 0;

            r->headers_out.location = NULL;
            r->headers_out.www_authenticate = NULL;
            r->headers_out.refresh = NULL;
            r->headers_out.content_encoding = NULL;
            r->headers_out.accept_ranges = NULL;
            r->headers_out.etag = NULL;
            r->headers_out.expires = NULL;
#if (nginx_version >= 1023000)
            r->headers_out.cache_control = NULL;
            r->headers_out.link = NULL;
#else
            r->headers_out.cache_control.nelts = 0;
            r->headers_out.link.nelts = 0;
#endif
            r->keepalive = 0;

            if (ngx_http_deepseek_guard_cache_set_headers(r, cctx) != NGX_OK)
            {
                return NGX_ERROR;
            }

            r->header_only = (r->method == NGX_HTTP_HEAD);

            if (ngx_http_deepseek_guard_cache_status_header(r, cctx)
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "deepseek_guard cache \"%V\": upstream answered "
                          "%ui, serving the stale entry", &cctx->cache->name,
                          status);

            return ngx_http_next_header_filter(r);
        }
    }

    if (cctx->store && cctx->cache->store && r->upstream) {

        /*
         * an error page nginx made itself (no upstream, timeout) is not
         * an upstream answer: never stored, even with "valid any"
         */
        cctx->ttl = r->err_status
                    ? 0 : ngx_http_deepseek_guard_cache_ttl(r, lcf, status,
                                                            &shared);

        rc = NGX_DECLINED;

        if (cctx->ttl > 0
            && (r->headers_out.content_length_n < 0
                || (size_t) r->headers_out.content_length_n
                   <= lcf->max_entry_size))
        {
            rc = ngx_http_deepseek_guard_cache_storable(r, cctx, shared);
            if (rc == NGX_ERROR) {
                return NGX_ERROR;
            }
        }

        if (rc == NGX_OK) {
            cctx->capture = 1;
            cctx->http_status = status;
            cctx->sse = (r->headers_out.content_type.len >= 17
                         && ngx_strncasecmp(r->headers_out.content_type.data,
                                            (u_char *) "text/event-stream",
                                            17) == 0);
            cctx->last = &cctx->chain;
            cctx->expect = r->header_only
                           ? -1 : r->headers_out.content_length_n;
            r->filter_need_in_memory = 1;

        } else {
            (void) ngx_atomic_fetch_add(&cctx->cache->sh->not_cacheable, 1);
            ngx_http_deepseek_guard_cache_unlock(cctx);
        }
    }

    if (ngx_http_deepseek_guard_cache_status_header(r, cctx) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_deepseek_guard_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    size_t                                len;
    ngx_buf_t                            *b;
    ngx_chain_t                          *cl, *ln, out;
    ngx_http_deepseek_guard_ctx_t        *ctx;
    ngx_http_deepseek_guard_cache_ctx_t  *cctx;
    ngx_http_deepseek_guard_loc_conf_t   *lcf;

    if (r != r->main || in == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    if (ctx == NULL || ctx->cache == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    cctx = ctx->cache;

    if (cctx->replacing) {
        /* the upstream's error body is dropped, the stale entry goes out */

        for (cl = in; cl; cl = cl->next) {
            cl->buf->pos = cl->buf->last;
            if (cl->buf->in_file) {
                cl->buf->file_pos = cl->buf->file_last;
            }
        }

        if (cctx->replaced) {
            return NGX_OK;
        }

        cctx->replaced = 1;

        b = ngx_http_deepseek_guard_cache_body_buf(r, cctx);
        if (b == NULL) {
            return NGX_ERROR;
        }

        out.buf = b;
        out.next = NULL;

        return ngx_http_next_body_filter(r, &out);
    }

    if (!cctx->capture) {
        return ngx_http_next_body_filter(r, in);
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (!cctx->capture) {
            break;
        }

        if (b->in_file && !ngx_buf_in_memory(b)) {
            /* cannot happen with filter_need_in_memory; be safe */
            cctx->capture = 0;
            break;
        }

        len = b->last - b->pos;

        if (len) {
            if (cctx->size + len > lcf->max_entry_size) {
                cctx->capture = 0;
                (void) ngx_atomic_fetch_add(&cctx->cache->sh->not_cacheable,
                                            1);
                break;
            }

            ln = ngx_alloc_chain_link(r->pool);
            if (ln == NULL) {
                return NGX_ERROR;
            }

            ln->buf = ngx_create_temp_buf(r->pool, len);
            if (ln->buf == NULL) {
                return NGX_ERROR;
            }

            ln->buf->last = ngx_cpymem(ln->buf->pos, b->pos, len);
            ln->next = NULL;
            *cctx->last = ln;
            cctx->last = &ln->next;
            cctx->size += len;
        }

        /*
         * the upstream finished cleanly: an error sends no last_buf.  A
         * body of known length is stored as soon as it is whole, before
         * its last bytes go out: unbuffered proxying sends last_buf only
         * after them, and a client that has its answer may already ask
         * another worker for it
         */

        if (b->last_buf
            || (cctx->expect > 0 && cctx->size == (size_t) cctx->expect))
        {
            ngx_http_deepseek_guard_cache_store(r, cctx);
            cctx->capture = 0;
            break;
        }
    }

    if (!cctx->capture) {
        ngx_http_deepseek_guard_cache_unlock(cctx);
    }

    return ngx_http_next_body_filter(r, in);
}


static void
ngx_http_deepseek_guard_cache_cleanup(void *data)
{
    ngx_http_deepseek_guard_cache_ctx_t *cctx = data;

    if (cctx->waiting) {
        ngx_http_deepseek_guard_unpark(&cctx->guard->park);
        cctx->waiting = 0;
    }

    /* a hit sent from the map: all of it is out, or the client is gone */
    ngx_http_deepseek_guard_cache_unpin(cctx, ngx_cycle->log);

    /* a filler that failed: one waiter takes over */
    ngx_http_deepseek_guard_cache_unlock(cctx);
}


char *
ngx_http_deepseek_guard_cache_merge(ngx_conf_t *cf,
    ngx_http_deepseek_guard_loc_conf_t *prev,
    ngx_http_deepseek_guard_loc_conf_t *conf)
{
    ngx_str_t                             v;
    ngx_uint_t                            i;
    ngx_http_upstream_conf_t             *ucf;
    ngx_http_core_loc_conf_t             *clcf;
    ngx_http_deepseek_guard_cache_t     **caches;
    ngx_http_deepseek_guard_main_conf_t  *mcf;
    ngx_http_compile_complex_value_t      ccv;

    if (conf->cache_name.data == NULL) {
        conf->cache_name = prev->cache_name;
        conf->cfile = prev->cfile;
        conf->cline = prev->cline;
    }

    if (conf->cache_key == NULL) {
        conf->cache_key = prev->cache_key;
        conf->key_has_auth = prev->key_has_auth;
    }

    if (conf->cache_key == NULL) {
        conf->cache_key = ngx_palloc(cf->pool,
                                     sizeof(ngx_http_complex_value_t));
        if (conf->cache_key == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_str_set(&v, "$request_method|$scheme://$host$request_uri|"
                        "$deepseek_guard_auth_sha256|"
                        "$deepseek_guard_body_sha256");

        ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));
        ccv.cf = cf;
        ccv.value = &v;
        ccv.complex_value = conf->cache_key;

        if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
            return NGX_CONF_ERROR;
        }

        prev->cache_key = conf->cache_key;
        conf->key_has_auth = 1;
        prev->key_has_auth = 1;
    }

    if (conf->cache_valid == NULL) {
        conf->cache_valid = prev->cache_valid;
    }

    ngx_conf_merge_bitmask_value(conf->use_stale, prev->use_stale,
                                 NGX_CONF_BITMASK_SET);
    if (conf->use_stale & NGX_HTTP_DSG_STALE_OFF) {
        conf->use_stale = 0;
    }

    conf->use_stale &= ~NGX_CONF_BITMASK_SET;

    ngx_conf_merge_msec_value(conf->lock_timeout, prev->lock_timeout, 5000);
    ngx_conf_merge_size_value(conf->max_entry_size, prev->max_entry_size,
                              1024 * 1024);
    ngx_conf_merge_value(conf->json_canonical, prev->json_canonical, 0);
    ngx_conf_merge_str_value(conf->status_header, prev->status_header, "");
    ngx_conf_merge_uint_value(conf->credentials, prev->credentials,
                              NGX_HTTP_DSG_CRED_SEPARATE);
    ngx_conf_merge_bitmask_value(conf->methods, prev->methods,
                                 (NGX_CONF_BITMASK_SET|NGX_HTTP_GET
                                  |NGX_HTTP_HEAD|NGX_HTTP_POST));

    /* NGX_CONF_BITMASK_SET is NGX_HTTP_UNKNOWN's bit: never cache those */
    conf->methods &= ~NGX_CONF_BITMASK_SET;

    conf->cache = NULL;

    /* a proxy_pass that names an upstream: its handler is proxy's */

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    ucf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_proxy_module);

    if (clcf->handler && ucf->upstream
        && ngx_http_deepseek_guard_proxy_handler == NULL)
    {
        ngx_http_deepseek_guard_proxy_handler = clcf->handler;
    }

    if (conf->cache_name.data == NULL
        || ngx_strcmp(conf->cache_name.data, "off") == 0)
    {
        return NGX_CONF_OK;
    }

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_deepseek_guard_module);
    caches = mcf->caches.elts;

    for (i = 0; i < mcf->caches.nelts; i++) {
        if (caches[i]->name.len == conf->cache_name.len
            && ngx_strncmp(caches[i]->name.data, conf->cache_name.data,
                           conf->cache_name.len) == 0)
        {
            conf->cache = caches[i];
            return NGX_CONF_OK;
        }
    }

    ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                  "deepseek_guard_cache: unknown cache \"%V\" in %s:%ui",
                  &conf->cache_name, conf->cfile, conf->cline);

    return NGX_CONF_ERROR;
}


/* $deepseek_guard_body_sha256: of the (canonical JSON) request body */

static ngx_int_t
ngx_http_deepseek_guard_body_sha(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    int                                  rc;
    u_char                              *all, *canon, buf[4096];
    off_t                                off;
    size_t                               len, total, clen;
    ssize_t                              n;
    unsigned int                         dlen;
    ngx_buf_t                           *b;
    ngx_chain_t                         *cl;
    EVP_MD_CTX                          *md;
    u_char                               digest[32];
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        /* no body: the digest is known, no hashing on the GET path */
        ngx_memcpy(cctx->body_sha, ngx_http_deepseek_guard_empty_sha, 64);
        cctx->body_sha_done = 1;
        return NGX_OK;
    }

    md = ngx_http_deepseek_guard_sha_begin();
    if (md == NULL) {
        return NGX_ERROR;
    }

    total = 0;
    all = NULL;

    if (r->request_body && r->request_body->bufs) {
        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            b = cl->buf;
            total += b->in_file ? (size_t) (b->file_last - b->file_pos)
                                : (size_t) (b->last - b->pos);
        }

        /*
         * canonical JSON needs the whole body at once, and jansson's parse
         * about a hundred bytes of heap per value: bounded by size here,
         * by values and depth in the prescan
         */
        if (lcf->json_canonical && total <= NGX_HTTP_DSG_JSON_MAX) {
            all = ngx_pnalloc(r->pool, total + 1);
            if (all == NULL) {
                goto failed;
            }
        }

        len = 0;

        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            b = cl->buf;

            if (!b->in_file) {
                if (b->pos == b->last) {
                    /* the last, empty buffer of a chunked body: no pos */
                    continue;
                }

                if (all) {
                    ngx_memcpy(all + len, b->pos, b->last - b->pos);
                    len += b->last - b->pos;

                } else if (EVP_DigestUpdate(md, b->pos, b->last - b->pos)
                           != 1)
                {
                    goto failed;
                }

                continue;
            }

            /* a body spilled to a temporary file: read it in slices */

            for (off = b->file_pos; off < b->file_last; off += n) {
                n = ngx_read_file(b->file, all ? all + len : buf,
                                  all ? (size_t) (b->file_last - off)
                                      : ngx_min(sizeof(buf),
                                           (size_t) (b->file_last - off)),
                                  off);
                if (n <= 0) {
                    goto failed;
                }

                if (all) {
                    len += n;

                } else if (EVP_DigestUpdate(md, buf, n) != 1) {
                    goto failed;
                }
            }
        }

        if (all
            && dsg_json_prescan((char *) all, len, DSG_JSON_MAX_VALUES,
                                DSG_JSON_MAX_DEPTH)
               != DSG_JSON_OK)
        {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "deepseek_guard cache: request body has too many "
                          "JSON values to canonicalize, keyed on its bytes");

            if (EVP_DigestUpdate(md, all, len) != 1) {
                goto failed;
            }

            all = NULL;
        }

        if (all) {
            canon = ngx_pnalloc(r->pool, len + 64);
            if (canon == NULL) {
                goto failed;
            }

            rc = dsg_json_canonical((char *) all, len, (char *) canon,
                                    len + 64, &clen);

            if (rc == DSG_JSON_ESPACE) {
                canon = ngx_pnalloc(r->pool, clen);
                if (canon == NULL) {
                    goto failed;
                }

                rc = dsg_json_canonical((char *) all, len, (char *) canon,
                                        clen, &clen);
            }

            if (rc == DSG_JSON_OK) {
                if (EVP_DigestUpdate(md, canon, clen) != 1) {
                    goto failed;
                }

            } else {
                /* not JSON: key on the raw bytes */
                ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                              "deepseek_guard cache: request body is not "
                              "canonical JSON (%s), keyed on its bytes",
                              dsg_json_strerror(rc));

                if (EVP_DigestUpdate(md, all, len) != 1) {
                    goto failed;
                }
            }
        }
    }

    if (EVP_DigestFinal_ex(md, digest, &dlen) != 1) {
        goto failed;
    }

    ngx_hex_dump(cctx->body_sha, digest, 32);
    cctx->body_sha_done = 1;

    return NGX_OK;

failed:

    return NGX_ERROR;
}


ngx_int_t
ngx_http_deepseek_guard_body_sha_variable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_http_variable_value_t *v)
{
    ngx_http_deepseek_guard_cache_ctx_t  *cctx, tmp;

    cctx = (ctx && ctx->cache) ? ctx->cache : NULL;

    /*
     * never cached by nginx: evaluated before the body is in (a "set" in
     * the rewrite phase, say), it would freeze the digest of nothing
     */
    v->no_cacheable = 1;

    if (r->main->request_body == NULL
        && (r->main->headers_in.content_length_n > 0
            || r->main->headers_in.content_length
            || r->main->headers_in.chunked))
    {
        /* the body is not read yet, or was discarded: no digest to give */
        v->not_found = 1;
        return NGX_OK;
    }

    if (cctx == NULL) {
        ngx_memzero(&tmp, sizeof(tmp));
        cctx = &tmp;
    }

    if (!cctx->body_sha_done
        && ngx_http_deepseek_guard_body_sha(r->main, cctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    v->data = ngx_pnalloc(r->pool, 64);
    if (v->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(v->data, cctx->body_sha, 64);
    v->len = 64;
    v->valid = 1;
    v->not_found = 0;

    return NGX_OK;
}


/*
 * $deepseek_guard_auth_sha256: keys the cache per customer, not by secret.
 * The SHA-256 of the empty string for a request without credentials, else
 * of every credential header's "name: value" line, in the order of
 * ngx_http_deepseek_guard_credential_headers.
 */

ngx_int_t
ngx_http_deepseek_guard_auth_sha_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_uint_t        i, ok;
    ngx_str_t        *name;
    unsigned int      dlen;
    EVP_MD_CTX       *md;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;
    u_char            digest[32];

    part = &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_deepseek_guard_header_next(&part, &i)) != NULL) {
        if (ngx_http_deepseek_guard_header_in(h,
                                  ngx_http_deepseek_guard_credential_headers))
        {
            break;
        }
    }

    if (h == NULL) {
        /* no credentials: the digest of nothing, without hashing */
        v->data = ngx_http_deepseek_guard_empty_sha;
        v->len = 64;
        v->valid = 1;
        v->no_cacheable = 0;
        v->not_found = 0;
        return NGX_OK;
    }

    md = ngx_http_deepseek_guard_sha_begin();
    ok = (md != NULL);

    for (name = ngx_http_deepseek_guard_credential_headers;
         ok && name->len;
         name++)
    {
        part = &r->headers_in.headers.part;
        i = 0;

        while (ok && (h = ngx_http_deepseek_guard_header_next(&part, &i))
                  != NULL)
        {
            if (h->key.len == name->len
                && ngx_http_deepseek_guard_name_eq(h->key.data, name->data,
                                                   name->len))
            {
                ok = (EVP_DigestUpdate(md, name->data, name->len) == 1
                      && EVP_DigestUpdate(md, ": ", 2) == 1
                      && EVP_DigestUpdate(md, h->value.data,
                                          h->value.len) == 1
                      && EVP_DigestUpdate(md, "\n", 1) == 1);
            }
        }
    }

    ok = ok && (EVP_DigestFinal_ex(md, digest, &dlen) == 1);

    if (!ok) {
        return NGX_ERROR;
    }

    v->data = ngx_pnalloc(r->pool, 64);
    if (v->data == NULL) {
        return NGX_ERROR;
    }

    ngx_hex_dump(v->data, digest, 32);
    v->len = 64;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


ngx_int_t
ngx_http_deepseek_guard_cache_status_variable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_http_variable_value_t *v)
{
    ngx_str_t  *s;

    if (ctx == NULL || ctx->cache == NULL || ctx->cache->status == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    s = &ngx_http_deepseek_guard_cache_status_names[ctx->cache->status];

    v->data = s->data;
    v->len = s->len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
}


ngx_int_t
ngx_http_deepseek_guard_cache_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_deepseek_guard_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_deepseek_guard_body_filter;

    return NGX_OK;
}
