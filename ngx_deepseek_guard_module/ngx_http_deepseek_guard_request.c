/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The request's life, top to bottom: its context, the access and
 * precontent handlers, the one decision (cache probe, admission, queue,
 * stale or reject), the pool cleanup, the log phase and the variables.
 */


#include "ngx_http_deepseek_guard_module.h"


#define NGX_HTTP_DSG_VAR_WAIT          0
#define NGX_HTTP_DSG_VAR_RETRY         1
#define NGX_HTTP_DSG_VAR_RESERVED      0
#define NGX_HTTP_DSG_VAR_USED          1
#define NGX_HTTP_DSG_VAR_CACHE_STATUS  0
#define NGX_HTTP_DSG_VAR_BODY_SHA      1

static ngx_http_deepseek_guard_ctx_t *ngx_http_deepseek_guard_get_ctx(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_decide(ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_queue_resume(ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_filled(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx);
static ngx_int_t ngx_http_deepseek_guard_refuse(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    uint64_t retry_ms);
static void ngx_http_deepseek_guard_cleanup(void *data);


static ngx_int_t ngx_http_deepseek_guard_status_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_class_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_num_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_zone_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_cache_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_tokens_var(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);


static ngx_http_deepseek_guard_ctx_t *
ngx_http_deepseek_guard_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t             *cln;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_deepseek_guard_module);
    if (ctx != NULL || !r->main->internal) {
        return ctx;
    }

    /*
     * an internal redirect (or a named location) wipes module contexts
     * but keeps the pool, and marks the request internal: find the
     * context through its cleanup, so nothing is charged twice
     */

    for (cln = r->main->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_deepseek_guard_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r->main, ctx, ngx_http_deepseek_guard_module);

            /* the cache's decision was for the location left behind */
            ngx_http_deepseek_guard_cache_drop(ctx);

            return ctx;
        }
    }

    return NULL;
}


static ngx_http_deepseek_guard_ctx_t *
ngx_http_deepseek_guard_create_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t             *cln;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    cln = ngx_pool_cleanup_add(r->main->pool,
                               sizeof(ngx_http_deepseek_guard_ctx_t));
    if (cln == NULL) {
        return NULL;
    }

    ctx = cln->data;
    ngx_memzero(ctx, sizeof(ngx_http_deepseek_guard_ctx_t));
    ctx->request = r->main;

    cln->handler = ngx_http_deepseek_guard_cleanup;

    ngx_http_set_ctx(r->main, ctx, ngx_http_deepseek_guard_module);

    return ctx;
}


/*
 * The access phase.  Where the cache may answer, the guard decides later,
 * at the start of the precontent phase: after every access module (auth,
 * allow/deny, satisfy any) has passed the request, so neither a cached
 * answer nor a body digest is ever given to a request that fails them.
 */

ngx_int_t
ngx_http_deepseek_guard_access_handler(ngx_http_request_t *r)
{
    if (ngx_http_deepseek_guard_cache_active(r)) {
        return NGX_DECLINED;
    }

    return ngx_http_deepseek_guard_decide(r);
}


/*
 * The request's decision, top to bottom: the cache probe (a fresh hit
 * costs no capacity), then admission, queueing or rejection.  NGX_DECLINED:
 * go on (admitted, or answered from the cache in precontent); NGX_AGAIN,
 * NGX_DONE: parked or finalized here.
 */

static ngx_int_t
ngx_http_deepseek_guard_decide(ngx_http_request_t *r)
{
    uint64_t                             retry_ms;
    ngx_int_t                            rc;
    ngx_uint_t                           blocked;
    ngx_http_deepseek_guard_ctx_t       *ctx;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if ((lcf->zones == NULL || lcf->zones->nelts == 0)
        && (lcf->cache == NULL || !ngx_http_deepseek_guard_cache_active(r)))
    {
        return NGX_DECLINED;
    }

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx != NULL && ctx->decided) {
        return NGX_DECLINED;
    }

    if (ctx == NULL) {
        ctx = ngx_http_deepseek_guard_create_ctx(r);
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

again:

    /* 1. the cache: a fresh hit costs no admission capacity */

    rc = lcf->cache ? ngx_http_deepseek_guard_cache_access(r, ctx)
                    : NGX_DECLINED;

    if (rc == NGX_OK) {
        ctx->decided = 1;
        ctx->status = NGX_HTTP_DSG_CACHED;
        return NGX_DECLINED;
    }

    if (rc != NGX_DECLINED) {
        /* parked for the body or for the filler, or an error */
        return rc;
    }

    if (lcf->zones == NULL || lcf->zones->nelts == 0) {
        ctx->decided = 1;

        /*
         * the lock was free a moment ago; another worker may have taken
         * it since: ask the cache again (a wait for that filler)
         */

        rc = ngx_http_deepseek_guard_filled(r, ctx);
        if (rc == NGX_AGAIN) {
            goto again;
        }

        return rc;
    }

    /* 2. admission in every zone; a token budget measures the body first */

    if (lcf->tokens) {
        rc = ngx_http_deepseek_guard_tokens_prepare(r, ctx);
        if (rc != NGX_OK) {
            return rc;
        }
    }

    rc = ngx_http_deepseek_guard_admit(r, ctx, &blocked, &retry_ms);

    switch (rc) {

    case NGX_OK:
        if (ctx->cache == NULL) {
            return NGX_DECLINED;
        }

        /* 5. admitted: a miss becomes the entry's filler */
        rc = ngx_http_deepseek_guard_filled(r, ctx);
        if (rc == NGX_AGAIN) {
            goto again;
        }

        return rc;

    case NGX_AGAIN:
        /* 3. a place in the queue: parked until its turn or its deadline */
        ngx_http_deepseek_guard_park(&ctx->park, r,
                                     ngx_http_deepseek_guard_queue_resume);
        ngx_http_deepseek_guard_park_deadline(&ctx->park,
                                       ctx->deadline - ngx_current_msec);
        return NGX_AGAIN;

    case NGX_DECLINED:
        /* 4. refused: a stale entry, or the rejection; the answer is ours */
        ngx_http_finalize_request(r,
                    ngx_http_deepseek_guard_refuse(r, ctx, blocked, retry_ms));
        return NGX_DONE;

    default:
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}


/*
 * An admitted request that missed the cache takes the entry's fill lock.
 * NGX_DECLINED: go on to the upstream; NGX_AGAIN: another request began
 * filling it meanwhile, the admission is given back and the cache asked
 * again (a hit by now, or a wait for that filler).
 */

static ngx_int_t
ngx_http_deepseek_guard_filled(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_int_t  rc;

    rc = ngx_http_deepseek_guard_cache_filler(r, ctx);

    if (rc == NGX_OK) {
        return NGX_DECLINED;
    }

    if (rc == NGX_BUSY) {
        ngx_http_deepseek_guard_unadmit(ctx);
        ngx_http_deepseek_guard_wake(0);
        return NGX_AGAIN;
    }

    return NGX_HTTP_INTERNAL_SERVER_ERROR;
}


/* the park timer asks a queued request whether its turn came */

static ngx_int_t
ngx_http_deepseek_guard_queue_resume(ngx_http_request_t *r)
{
    uint64_t                        retry_ms;
    ngx_int_t                       rc;
    ngx_uint_t                      blocked;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    rc = ngx_http_deepseek_guard_recheck(r, ctx, &blocked, &retry_ms);

    if (rc == NGX_OK) {
        /*
         * admitted, the phases go on; a miss that must give its admission
         * back (another request fills the entry) decides again there
         */
        rc = ngx_http_deepseek_guard_filled(r, ctx);

        if (rc == NGX_DECLINED || rc == NGX_AGAIN) {
            return NGX_OK;
        }

        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }

    if (rc != NGX_DECLINED) {
        /* NGX_AGAIN: still waiting */
        return rc;
    }

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    ngx_http_finalize_request(r,
                    ngx_http_deepseek_guard_refuse(r, ctx, blocked, retry_ms));

    return NGX_DONE;
}


/* refused by holds[blocked]: counted, then a stale entry or the rejection */

static ngx_int_t
ngx_http_deepseek_guard_refuse(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    uint64_t retry_ms)
{
    ngx_int_t  rc;

    ngx_http_deepseek_guard_refused(r, ctx, blocked, retry_ms);

    if (r->header_sent) {
        return NGX_ERROR;
    }

    rc = ngx_http_deepseek_guard_cache_overload(r, ctx);
    if (rc != NGX_DECLINED) {
        ctx->status = NGX_HTTP_DSG_STALE;
        return rc;
    }

    return ngx_http_deepseek_guard_reject(r, ctx, blocked);
}


/*
 * Where the cache may answer, the guard's decision runs here, after the
 * access phase (see the access handler); a hit is sent from here, before
 * the location's content handler (proxy_pass) could run.
 */

ngx_int_t
ngx_http_deepseek_guard_precontent_handler(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    if (!ngx_http_deepseek_guard_cache_active(r)) {
        return NGX_DECLINED;
    }

    rc = ngx_http_deepseek_guard_decide(r);

    if (rc != NGX_DECLINED) {
        return rc;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    if (ctx == NULL || ctx->cache == NULL) {
        return NGX_DECLINED;
    }

    rc = ngx_http_deepseek_guard_cache_serve(r, ctx);

    if (rc == NGX_DECLINED) {
        /* a miss: the content handler (proxy_pass) runs */
        return NGX_DECLINED;
    }

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


/*
 * The main request's pool cleanup: runs on every path that ends a request
 * (done, error, client abort, timeout; an internal redirect keeps the pool).
 */

static void
ngx_http_deepseek_guard_cleanup(void *data)
{
    ngx_http_deepseek_guard_ctx_t *ctx = data;

    ngx_http_deepseek_guard_unpark(&ctx->park);

    if (ngx_http_deepseek_guard_release(ctx)) {
        /* capacity freed here: this worker's parked requests try at once */
        ngx_http_deepseek_guard_wake(0);
    }
}


/* counts the response in every zone of the location: as $status is logged */

ngx_int_t
ngx_http_deepseek_guard_log_handler(ngx_http_request_t *r)
{
    ngx_uint_t                           i, status;
    ngx_shm_zone_t                     **zones;
    ngx_http_deepseek_guard_ctx_t       *ctx;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;
    ngx_http_deepseek_guard_counters_t  *cnt;

    if (r != r->main) {
        return NGX_OK;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (lcf->zones == NULL || lcf->zones->nelts == 0) {
        return NGX_OK;
    }

    /* the wait announced to a rejected client (not one answered stale) */

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx != NULL && ctx->status == NGX_HTTP_DSG_REJECTED
        && ctx->reject_zone != NULL && ctx->reject_zone->sh != NULL)
    {
        cnt = &ctx->reject_zone->sh->counters[ctx->cls];

        (void) ngx_atomic_fetch_add(&cnt->retry_count, 1);
        (void) ngx_atomic_fetch_add(&cnt->retry_sum_ms,
                                    (ngx_atomic_int_t) ctx->retry_ms);
        cnt->retry_last_ms = (ngx_atomic_uint_t) ctx->retry_ms;
    }

    status = r->err_status ? r->err_status : r->headers_out.status;

    if (status < 100 || status > 599) {
        return NGX_OK;
    }

    zones = lcf->zones->elts;

    for (i = 0; i < lcf->zones->nelts; i++) {
        z = zones[i]->data;

        if (z != NULL && z->sh != NULL) {
            (void) ngx_atomic_fetch_add(&z->sh->responses[status / 100 - 1],
                                        1);
        }
    }

    return NGX_OK;
}


static ngx_http_variable_t  ngx_http_deepseek_guard_vars[] = {

    { ngx_string("deepseek_guard_status"), NULL,
      ngx_http_deepseek_guard_status_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_class"), NULL,
      ngx_http_deepseek_guard_class_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_wait_ms"), NULL,
      ngx_http_deepseek_guard_num_variable, NGX_HTTP_DSG_VAR_WAIT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_retry_after_ms"), NULL,
      ngx_http_deepseek_guard_num_variable, NGX_HTTP_DSG_VAR_RETRY,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_zone"), NULL,
      ngx_http_deepseek_guard_zone_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_cache_status"), NULL,
      ngx_http_deepseek_guard_cache_variable, NGX_HTTP_DSG_VAR_CACHE_STATUS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_body_sha256"), NULL,
      ngx_http_deepseek_guard_cache_variable, NGX_HTTP_DSG_VAR_BODY_SHA,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_tokens_reserved"), NULL,
      ngx_http_deepseek_guard_tokens_var, NGX_HTTP_DSG_VAR_RESERVED,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_tokens_used"), NULL,
      ngx_http_deepseek_guard_tokens_var, NGX_HTTP_DSG_VAR_USED,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_auth_sha256"), NULL,
      ngx_http_deepseek_guard_auth_sha_variable, 0, 0, 0 },

      ngx_http_null_variable
};


static ngx_str_t  ngx_http_deepseek_guard_status_names[] = {
    ngx_null_string,
    ngx_string("ADMITTED"),
    ngx_string("QUEUED"),
    ngx_string("REJECTED"),
    ngx_string("DRY_RUN"),
    ngx_string("CACHED"),
    ngx_string("STALE")
};


ngx_int_t
ngx_http_deepseek_guard_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_deepseek_guard_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_status_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                      *s;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->status == 0
        || ctx->status > NGX_HTTP_DSG_STALE)
    {
        v->not_found = 1;
        return NGX_OK;
    }

    s = &ngx_http_deepseek_guard_status_names[ctx->status];

    /* admitted after a wait in the queue */
    if (ctx->status == NGX_HTTP_DSG_ADMITTED && ctx->wait_ms) {
        s = &ngx_http_deepseek_guard_status_names[NGX_HTTP_DSG_QUEUED];
    }

    v->len = s->len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = s->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_class_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_deepseek_guard_ctx_t        *ctx;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->holds == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_deepseek_guard_module);
    c = &((ngx_http_deepseek_guard_class_t *) mcf->classes.elts)[ctx->cls];

    v->len = c->name.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = c->name.data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_num_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                         *p;
    uint64_t                        n;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->status == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    if (data == NGX_HTTP_DSG_VAR_WAIT) {
        n = ctx->waiter ? ngx_current_msec - ctx->enqueued : ctx->wait_ms;

    } else {
        if (ctx->status != NGX_HTTP_DSG_REJECTED) {
            v->not_found = 1;
            return NGX_OK;
        }

        n = ctx->retry_ms;
    }

    p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_sprintf(p, "%uL", n) - p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_zone_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->reject_zone == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = ctx->reject_zone->shm_zone->shm.name.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = ctx->reject_zone->shm_zone->shm.name.data;

    return NGX_OK;
}


/* the cache's variables, with the context found again after a redirect */

static ngx_int_t
ngx_http_deepseek_guard_cache_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (data == NGX_HTTP_DSG_VAR_BODY_SHA) {
        return ngx_http_deepseek_guard_body_sha_variable(r, ctx, v);
    }

    return ngx_http_deepseek_guard_cache_status_variable(r, ctx, v);
}


static ngx_int_t
ngx_http_deepseek_guard_tokens_var(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    return ngx_http_deepseek_guard_tokens_variable(r,
                                   ngx_http_deepseek_guard_get_ctx(r), v, data);
}
