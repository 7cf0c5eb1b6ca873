/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Token budgets (deepseek_guard_zone ... tokens=N/m): the request's side.
 * Before admission the body is read and measured (the prompt estimate,
 * max_tokens); admission reserves the estimate plus the expected output
 * in the key's token bucket (limit.c); while the answer passes, its last
 * bytes are kept for the upstream's "usage" and an SSE stream's content
 * events are counted; when the request ends, the reservation is settled
 * against what the upstream used.  The x-ratelimit-* headers are added
 * here too.  docs/tokens.md tells the rules.
 */


#include "ngx_http_deepseek_guard_module.h"
#include "dsg_json.h"


/* the answer's last bytes kept for its "usage" object */
#define NGX_HTTP_DSG_TOKENS_TAIL  8192

/* an SSE event longer than this is passed on whole, usage or not */
#define NGX_HTTP_DSG_TOKENS_EVENT_MAX  (1024 * 1024)

#define NGX_HTTP_DSG_INCLUDE_USAGE  "\"stream_options\":{\"include_usage\":true}"

#define NGX_HTTP_DSG_TOKENS_NEW      0
#define NGX_HTTP_DSG_TOKENS_READING  1
#define NGX_HTTP_DSG_TOKENS_READY    2


typedef struct ngx_http_deepseek_guard_tokens_ctx_s {
    ngx_uint_t                   state;
    dsg_tokens_scan_t            scan;
    uint64_t                     max_out;    /* max_tokens, 0: none */
    uint64_t                     prompt;     /* estimate, corrected */
    uint64_t                     prompt_raw; /* estimate, uncorrected */
    uint64_t                     reserved;   /* in the first token zone */

    /* the answer */
    ngx_uint_t                   header;     /* its header went out */
    ngx_uint_t                   sse;
    dsg_tokens_sse_t             events;
    uint64_t                     delivered;  /* content events passed on */
    u_char                      *tail;
    size_t                       tail_len;

    /* deepseek_guard_tokens_stream_usage: the usage event is ours */
    ngx_uint_t                   strip;
    u_char                      *ev;         /* bytes of events not sent */
    size_t                       ev_len;
    size_t                       ev_size;
    ngx_chain_t                 *free;
    ngx_chain_t                 *busy;

    /* the settlement, once: finish() */
    ngx_uint_t                   finished;
    ngx_uint_t                   usage;      /* read from the answer */
    uint64_t                     used_prompt;
    uint64_t                     used;
} ngx_http_deepseek_guard_tokens_ctx_t;


static void ngx_http_deepseek_guard_tokens_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_tokens_measure(ngx_http_request_t *r,
    ngx_http_deepseek_guard_tokens_ctx_t *tc);
static ngx_int_t ngx_http_deepseek_guard_tokens_header_filter(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_deepseek_guard_tokens_body_filter(
    ngx_http_request_t *r, ngx_chain_t *in);
static ngx_int_t ngx_http_deepseek_guard_tokens_headers(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx);
static ngx_int_t ngx_http_deepseek_guard_tokens_inject(ngx_http_request_t *r,
    u_char *body, size_t len, size_t at);
static ngx_int_t ngx_http_deepseek_guard_tokens_strip(ngx_http_request_t *r,
    ngx_http_deepseek_guard_tokens_ctx_t *tc, ngx_chain_t *in);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


static ngx_str_t  ngx_http_deepseek_guard_xrl[] = {
    ngx_string("x-ratelimit-limit-requests"),
    ngx_string("x-ratelimit-remaining-requests"),
    ngx_string("x-ratelimit-reset-requests"),
    ngx_string("x-ratelimit-limit-tokens"),
    ngx_string("x-ratelimit-remaining-tokens"),
    ngx_string("x-ratelimit-reset-tokens")
};


/* does a zone of the location carry a token budget */

static ngx_uint_t
ngx_http_deepseek_guard_tokens_active(ngx_http_deepseek_guard_loc_conf_t *lcf)
{
    ngx_uint_t                        i;
    ngx_shm_zone_t                  **zones;
    ngx_http_deepseek_guard_zone_t   *z;

    if (lcf->zones == NULL) {
        return 0;
    }

    zones = lcf->zones->elts;

    for (i = 0; i < lcf->zones->nelts; i++) {
        z = zones[i]->data;

        if (z->tokens) {
            return 1;
        }
    }

    return 0;
}


/*
 * Before admission, where a zone has a token budget: the body is read
 * (once; a cached location has read it already) and measured.  NGX_OK:
 * measured, go on; NGX_DONE: reading, the body handler reruns the phases;
 * an HTTP status on error.
 */

ngx_int_t
ngx_http_deepseek_guard_tokens_prepare(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_int_t                              rc;
    ngx_http_deepseek_guard_loc_conf_t    *lcf;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (!ngx_http_deepseek_guard_tokens_active(lcf)) {
        return NGX_OK;
    }

    tc = ctx->tokens;

    if (tc == NULL) {
        tc = ngx_pcalloc(r->main->pool,
                         sizeof(ngx_http_deepseek_guard_tokens_ctx_t));
        if (tc == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->tokens = tc;
    }

    if (tc->state == NGX_HTTP_DSG_TOKENS_READY) {
        return NGX_OK;
    }

    if (tc->state == NGX_HTTP_DSG_TOKENS_READING) {
        /* re-entered before the body handler ran: keep waiting */
        return NGX_DONE;
    }

    if (r->request_body == NULL
        && (r->headers_in.content_length_n > 0 || r->headers_in.chunked))
    {
        tc->state = NGX_HTTP_DSG_TOKENS_READING;

        rc = ngx_http_read_client_request_body(r,
                                 ngx_http_deepseek_guard_tokens_body_handler);
        if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            return rc;
        }

        /* the body handler reruns the phases, now or once the body is in */

        ngx_http_finalize_request(r, NGX_DONE);
        return NGX_DONE;
    }

    if (ngx_http_deepseek_guard_tokens_measure(r, tc) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    tc->state = NGX_HTTP_DSG_TOKENS_READY;

    return NGX_OK;
}


static void
ngx_http_deepseek_guard_tokens_body_handler(ngx_http_request_t *r)
{
    ngx_http_deepseek_guard_ctx_t         *ctx;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    if (ctx == NULL || ctx->tokens == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    tc = ctx->tokens;

    if (ngx_http_deepseek_guard_tokens_measure(r, tc) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    tc->state = NGX_HTTP_DSG_TOKENS_READY;

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


/*
 * The body's measure: the byte scan for the prompt estimate, and
 * max_tokens.  A body in several buffers or in a temporary file is put
 * together first (the file was just written: it is read from the page
 * cache).  max_tokens is read by a one-pass scan of the top level
 * (dsg_json_max_tokens), not a parse: no tree is built.
 */

static ngx_int_t
ngx_http_deepseek_guard_tokens_measure(ngx_http_request_t *r,
    ngx_http_deepseek_guard_tokens_ctx_t *tc)
{
    u_char                              *body, *p;
    off_t                                len;
    size_t                               at;
    ssize_t                              n;
    ngx_buf_t                           *b;
    ngx_chain_t                         *cl;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_OK;
    }

    cl = r->request_body->bufs;

    if (cl->next == NULL && !cl->buf->in_file) {
        body = cl->buf->pos;
        len = cl->buf->last - cl->buf->pos;

    } else {
        len = 0;

        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            len += ngx_buf_size(cl->buf);
        }

        body = ngx_pnalloc(r->pool, (size_t) len + 1);
        if (body == NULL) {
            return NGX_ERROR;
        }

        p = body;

        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            b = cl->buf;

            if (b->in_file) {
                n = ngx_read_file(b->file, p, (size_t) (b->file_last
                                                        - b->file_pos),
                                  b->file_pos);
                if (n != b->file_last - b->file_pos) {
                    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                                  "deepseek_guard: the request body's "
                                  "temporary file could not be read for "
                                  "its token estimate");
                    return NGX_ERROR;
                }

                p += n;

            } else {
                p = ngx_cpymem(p, b->pos, b->last - b->pos);
            }
        }
    }

    dsg_tokens_scan(body, (size_t) len, &tc->scan);

    /* an invalid body keeps 0: the upstream will refuse it anyway */
    (void) dsg_json_max_tokens((char *) body, (size_t) len, &tc->max_out);

    tc->prompt_raw = dsg_tokens_estimate(&tc->scan, DSG_TOKENS_RATIO_ONE);

    /*
     * a stream that did not ask for its usage is asked for it, and the
     * usage event is kept from the client (a body sent chunked is left
     * alone: the proxy passes it on as it reads it)
     */

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (lcf->stream_usage && !r->headers_in.chunked
        && dsg_json_stream_usage((char *) body, (size_t) len, &at)
           == DSG_JSON_OK
        && at != 0)
    {
        if (ngx_http_deepseek_guard_tokens_inject(r, body, (size_t) len, at)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        tc->strip = 1;
    }

    return NGX_OK;
}


/* the body with "stream_options":{"include_usage":true} after its '{' */

static ngx_int_t
ngx_http_deepseek_guard_tokens_inject(ngx_http_request_t *r, u_char *body,
    size_t len, size_t at)
{
    u_char       *p, *q;
    size_t        size;
    ngx_uint_t    empty;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    /* an empty object takes no comma */

    for (q = body + at; q < body + len; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\r' && *q != '\n') {
            break;
        }
    }

    empty = (q < body + len && *q == '}');

    size = len + sizeof(NGX_HTTP_DSG_INCLUDE_USAGE) - 1 + !empty;

    p = ngx_pnalloc(r->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b->start = p;
    b->pos = p;
    p = ngx_cpymem(p, body, at);
    p = ngx_cpymem(p, NGX_HTTP_DSG_INCLUDE_USAGE,
                   sizeof(NGX_HTTP_DSG_INCLUDE_USAGE) - 1);

    if (!empty) {
        *p++ = ',';
    }

    p = ngx_cpymem(p, body + at, len - at);

    b->last = p;
    b->end = p;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;

    cl->buf = b;
    cl->next = NULL;

    r->request_body->bufs = cl;
    r->request_body->buf = b;
    r->headers_in.content_length_n = (off_t) size;

    return NGX_OK;
}


/*
 * The reservation in zone z, under its mutex: the prompt estimate with the
 * zone's correction, plus the output the zone expects, capped by the
 * request's max_tokens
 */

uint64_t
ngx_http_deepseek_guard_tokens_reserve(ngx_http_deepseek_guard_ctx_t *ctx,
    ngx_http_deepseek_guard_zone_t *z)
{
    uint64_t                               out, prompt;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;

    tc = ctx->tokens;

    if (tc == NULL) {
        /* no body was measured (a subrequest's zone): the output only */
        return z->tokens_expect;
    }

    prompt = dsg_tokens_estimate(&tc->scan, z->sh->tokens_ratio);

    out = z->tokens_expect;

    if (tc->max_out && tc->max_out < out) {
        out = tc->max_out;
    }

    if (tc->reserved == 0) {
        tc->prompt = prompt;
        tc->reserved = prompt + out;
    }

    return prompt + out;
}


/*
 * What the request used, once, before the settlement's lock: the
 * upstream's usage when the answer carried it; nothing when the upstream
 * refused the request or never answered; for a stream without usage (cut,
 * or not asked for), the prompt estimate and the content events passed
 * to the client; for any other answer without usage, the reservation.
 */

void
ngx_http_deepseek_guard_tokens_finish(ngx_http_deepseek_guard_ctx_t *ctx)
{
    uint64_t                               prompt, completion;
    ngx_uint_t                             status;
    ngx_http_request_t                    *r;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;

    tc = ctx->tokens;

    if (tc == NULL || tc->finished) {
        return;
    }

    tc->finished = 1;

    r = ctx->request;
    status = r->headers_out.status;

    if (tc->tail_len
        && dsg_tokens_usage(tc->tail, tc->tail_len, &prompt, &completion) == 0)
    {
        tc->usage = 1;
        tc->used_prompt = prompt;
        tc->used = prompt + completion;
        return;
    }

    if (!tc->header || status < 200 || status >= 400) {
        tc->used = 0;
        return;
    }

    if (tc->sse) {
        tc->used = tc->prompt + tc->delivered;
        return;
    }

    tc->used = tc->reserved;
}


/*
 * Settles a lease's reservation, under zone z's mutex (no logging, no
 * allocation): refund, the request was not admitted after all (another
 * zone refused, or it waits for another filler); otherwise the difference
 * between the reservation and what finish() found is given back or taken.
 */

void
ngx_http_deepseek_guard_tokens_settle(ngx_http_deepseek_guard_ctx_t *ctx,
    ngx_http_deepseek_guard_zone_t *z, ngx_http_deepseek_guard_lease_t *lease,
    ngx_uint_t refund)
{
    int64_t                                delta;
    uint64_t                               used, est, pm;
    ngx_uint_t                             b;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;
    ngx_http_deepseek_guard_counters_t    *cnt;

    /* the estimate error histogram's bounds, permille */
    static const uint64_t  bounds[NGX_HTTP_DSG_EST_BUCKETS] = {
        500, 800, 900, 1100, 1250, 2000, 4000
    };

    tc = ctx->tokens;
    cnt = &z->sh->counters[lease->cls];

    if (refund) {
        used = 0;

    } else {
        used = (tc && tc->finished) ? tc->used : lease->treserved;
    }

    delta = (int64_t) lease->treserved - (int64_t) used;

    if (!refund) {
        (void) ngx_atomic_fetch_add(&cnt->tokens_used,
                                    (ngx_atomic_int_t) used);
    }

    if (delta > 0) {
        (void) ngx_atomic_fetch_add(&cnt->tokens_refunded,
                                    (ngx_atomic_int_t) delta);

    } else if (delta < 0) {
        (void) ngx_atomic_fetch_add(&cnt->tokens_charged,
                                    (ngx_atomic_int_t) -delta);
    }

    dsg_tokens_settle(&z->tconf, ngx_http_deepseek_guard_tokens_state(
                                                                 lease->node),
                      lease->trecord, delta, ngx_current_msec);

    lease->treserved = 0;

    if (refund || tc == NULL || !tc->usage || tc->prompt_raw == 0) {
        return;
    }

    /* the estimator learns from the upstream's own prompt count */

    est = dsg_tokens_estimate(&tc->scan, z->sh->tokens_ratio);
    pm = est ? tc->used_prompt * 1000 / est : 0;

    for (b = 0; b < NGX_HTTP_DSG_EST_BUCKETS && pm > bounds[b]; b++) {
        /* void */
    }

    (void) ngx_atomic_fetch_add(&z->sh->tokens_est[b], 1);
    (void) ngx_atomic_fetch_add(&z->sh->tokens_est_sum,
                                (ngx_atomic_int_t) pm);

    dsg_tokens_correct(&z->sh->tokens_ratio, tc->prompt_raw, tc->used_prompt);
}


/* the answer's header: is it a stream; the x-ratelimit-* headers */

static ngx_int_t
ngx_http_deepseek_guard_tokens_header_filter(ngx_http_request_t *r)
{
    ngx_http_deepseek_guard_ctx_t         *ctx;
    ngx_http_deepseek_guard_loc_conf_t    *lcf;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    if (ctx == NULL) {
        return ngx_http_next_header_filter(r);
    }

    tc = ctx->tokens;

    if (tc && tc->reserved) {
        tc->header = 1;
        tc->sse = (r->headers_out.content_type.len
                       >= sizeof("text/event-stream") - 1
                   && ngx_strncasecmp(r->headers_out.content_type.data,
                                      (u_char *) "text/event-stream",
                                      sizeof("text/event-stream") - 1)
                      == 0);
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (lcf->openai_headers && ctx->holds
        && ngx_http_deepseek_guard_tokens_headers(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


/* keeps the answer's last bytes and counts a stream's content events */

static ngx_int_t
ngx_http_deepseek_guard_tokens_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in)
{
    size_t                                 n, keep;
    ngx_buf_t                             *b;
    ngx_chain_t                           *cl;
    ngx_http_deepseek_guard_ctx_t         *ctx;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;

    if (r != r->main || in == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_deepseek_guard_module);

    if (ctx == NULL || ctx->tokens == NULL || !ctx->tokens->header) {
        return ngx_http_next_body_filter(r, in);
    }

    tc = ctx->tokens;

    if (tc->tail == NULL) {
        tc->tail = ngx_pnalloc(r->pool, NGX_HTTP_DSG_TOKENS_TAIL);
        if (tc->tail == NULL) {
            return NGX_ERROR;
        }
    }

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file || !ngx_buf_in_memory(b) || b->pos == b->last) {
            continue;
        }

        n = b->last - b->pos;

        if (tc->sse) {
            tc->delivered += dsg_tokens_sse(&tc->events, b->pos, n);
        }

        if (n >= NGX_HTTP_DSG_TOKENS_TAIL) {
            ngx_memcpy(tc->tail, b->last - NGX_HTTP_DSG_TOKENS_TAIL,
                       NGX_HTTP_DSG_TOKENS_TAIL);
            tc->tail_len = NGX_HTTP_DSG_TOKENS_TAIL;
            continue;
        }

        if (tc->tail_len + n > NGX_HTTP_DSG_TOKENS_TAIL) {
            keep = NGX_HTTP_DSG_TOKENS_TAIL - n;
            ngx_memmove(tc->tail, tc->tail + tc->tail_len - keep, keep);
            tc->tail_len = keep;
        }

        ngx_memcpy(tc->tail + tc->tail_len, b->pos, n);
        tc->tail_len += n;
    }

    if (tc->strip && tc->sse) {
        return ngx_http_deepseek_guard_tokens_strip(r, tc, in);
    }

    return ngx_http_next_body_filter(r, in);
}


/* the usage event: no choices, a usage object */

static ngx_uint_t
ngx_http_deepseek_guard_tokens_usage_event(u_char *p, u_char *last)
{
    return ngx_strlcasestrn(p, last, (u_char *) "\"choices\":[]",
                            sizeof("\"choices\":[]") - 2)
           != NULL
           && ngx_strlcasestrn(p, last, (u_char *) "\"usage\":{",
                               sizeof("\"usage\":{") - 2)
              != NULL;
}


/*
 * A stream asked for its usage on the client's behalf: its events are
 * passed on whole, as they complete, except the usage event the client
 * did not ask for.  An event longer than NGX_HTTP_DSG_TOKENS_EVENT_MAX,
 * or an answer in a file, ends the stripping: the rest goes as it is.
 */

static ngx_int_t
ngx_http_deepseek_guard_tokens_strip(ngx_http_request_t *r,
    ngx_http_deepseek_guard_tokens_ctx_t *tc, ngx_chain_t *in)
{
    u_char       *p, *e, *end, *nl, *copy, *start;
    size_t        n, size;
    ngx_int_t     rc;
    ngx_uint_t    last, flush, whole;
    ngx_buf_t    *b;
    ngx_chain_t  *cl, *out, **ll;

    last = 0;
    flush = 0;
    whole = 0;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        last |= b->last_buf | b->last_in_chain;
        flush |= b->flush;

        if (b->in_file) {
            whole = 1;
            break;
        }

        if (b->pos == b->last || !ngx_buf_in_memory(b)) {
            continue;
        }

        n = b->last - b->pos;

        if (tc->ev_len + n > NGX_HTTP_DSG_TOKENS_EVENT_MAX) {
            whole = 1;
            break;
        }

        if (tc->ev_len + n > tc->ev_size) {
            size = ngx_max(2 * tc->ev_size, tc->ev_len + n);
            size = ngx_max(size, 4096);

            p = ngx_pnalloc(r->pool, size);
            if (p == NULL) {
                return NGX_ERROR;
            }

            if (tc->ev_len) {
                ngx_memcpy(p, tc->ev, tc->ev_len);
            }

            tc->ev = p;
            tc->ev_size = size;
        }

        ngx_memcpy(tc->ev + tc->ev_len, b->pos, n);
        tc->ev_len += n;
        b->pos = b->last;
    }

    if (whole) {
        /* give up: what is held, then everything as it comes */
        tc->strip = 0;
        last = 1;
    }

    /* the complete events, the usage event left out */

    size = 0;
    copy = NULL;
    start = tc->ev;
    end = tc->ev + tc->ev_len;

    for (p = tc->ev; p < end; p = e) {
        nl = ngx_strlchr(p, end, '\n');

        for (e = NULL; nl && nl + 1 < end; nl = ngx_strlchr(nl + 1, end, '\n'))
        {
            if (nl[1] == '\n') {
                e = nl + 2;
                break;
            }

            if (nl[1] == '\r' && nl + 2 < end && nl[2] == '\n') {
                e = nl + 3;
                break;
            }
        }

        if (e == NULL) {
            break;
        }

        if (ngx_http_deepseek_guard_tokens_usage_event(p, e)) {
            /* keep what came before it, skip it */
            if (copy == NULL) {
                copy = ngx_pnalloc(r->pool, tc->ev_len);
                if (copy == NULL) {
                    return NGX_ERROR;
                }
            }

            ngx_memcpy(copy + size, start, p - start);
            size += p - start;
            start = e;
        }
    }

    if (last) {
        p = end;
    }

    /* start .. p goes out too; p .. end waits for the rest of its event */

    if (copy == NULL && p > start) {
        copy = ngx_pnalloc(r->pool, p - start);
        if (copy == NULL) {
            return NGX_ERROR;
        }
    }

    if (p > start) {
        ngx_memcpy(copy + size, start, p - start);
        size += p - start;
    }

    tc->ev_len = end - p;

    if (tc->ev_len) {
        ngx_memmove(tc->ev, p, tc->ev_len);
    }

    out = NULL;
    ll = &out;

    if (size || last || flush) {
        cl = ngx_chain_get_free_buf(r->pool, &tc->free);
        if (cl == NULL) {
            return NGX_ERROR;
        }

        b = cl->buf;
        ngx_memzero(b, sizeof(ngx_buf_t));
        b->tag = (ngx_buf_tag_t) &ngx_http_deepseek_guard_tokens_strip;
        b->start = copy;
        b->pos = copy;
        b->last = copy + size;
        b->end = b->last;
        b->memory = (size != 0);
        b->flush = flush || !last;
        b->last_buf = last && r == r->main;
        b->last_in_chain = last;

        *ll = cl;
        ll = &cl->next;
    }

    if (whole) {
        /* the buffers not taken, as they are */
        for (cl = in; cl; cl = cl->next) {
            b = cl->buf;

            if (b->pos == b->last && !b->in_file && !b->last_buf
                && !b->last_in_chain)
            {
                continue;
            }

            if (out) {
                out->buf->last_buf = 0;
                out->buf->last_in_chain = 0;
            }

            *ll = ngx_alloc_chain_link(r->pool);
            if (*ll == NULL) {
                return NGX_ERROR;
            }

            (*ll)->buf = b;
            ll = &(*ll)->next;
        }
    }

    *ll = NULL;

    if (out == NULL) {
        return NGX_OK;
    }

    rc = ngx_http_next_body_filter(r, out);

    ngx_chain_update_chains(r->pool, &tc->free, &tc->busy, &out,
                     (ngx_buf_tag_t) &ngx_http_deepseek_guard_tokens_strip);

    return rc;
}


/* a wait as OpenAI writes it: "20ms", "1.5s", "6m0s" */

static u_char *
ngx_http_deepseek_guard_tokens_duration(u_char *p, uint64_t ms)
{
    uint64_t  m;

    if (ms < 1000) {
        return ngx_sprintf(p, "%uLms", ms);
    }

    m = ms / 60000;
    ms %= 60000;

    if (m) {
        p = ngx_sprintf(p, "%uLm", m);
    }

    if (ms % 1000) {
        return ngx_sprintf(p, "%uL.%03uLs", ms / 1000, ms % 1000);
    }

    return ngx_sprintf(p, "%uLs", ms / 1000);
}


/*
 * x-ratelimit-{limit,remaining,reset}-{requests,tokens} of the key as it
 * stands now: the first zone of the location with a rate gives the
 * requests, the first with a token budget the tokens
 */

static ngx_int_t
ngx_http_deepseek_guard_tokens_headers(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx)
{
    u_char                           *p, *v[6];
    size_t                            len[6];
    uint64_t                          val[6], now;
    ngx_uint_t                        i, k, have[2];
    ngx_http_deepseek_guard_node_t   *node;
    ngx_http_deepseek_guard_hold_t   *h;
    ngx_http_deepseek_guard_zone_t   *z;

    have[0] = 0;
    have[1] = 0;
    now = ngx_current_msec;

    for (i = 0; i < ctx->nholds; i++) {
        h = &ctx->holds[i];
        z = h->zone;

        if (z == NULL
            || ((have[0] || z->rate == 0) && (have[1] || z->tokens == 0)))
        {
            continue;
        }

        ngx_shmtx_lock(&z->shpool->mutex);

        node = ngx_http_deepseek_guard_find(z, h->digest);

        if (!have[0] && z->rate) {
            have[0] = 1;
            val[0] = z->rate;
            val[1] = z->rate + z->burst;
            val[2] = 0;

            if (node) {
                val[1] = dsg_limit_remaining(&z->limit, &node->state,
                                             (uint32_t) ctx->cls, now,
                                             &val[2]);
            }
        }

        if (!have[1] && z->tokens) {
            have[1] = 1;
            val[3] = z->tokens;
            val[4] = z->tokens_burst;
            val[5] = 0;

            if (node) {
                val[4] = dsg_tokens_remaining(&z->tconf,
                             ngx_http_deepseek_guard_tokens_state(node),
                             (uint32_t) ctx->cls, now);
                val[5] = dsg_tokens_reset_ms(&z->tconf,
                             ngx_http_deepseek_guard_tokens_state(node),
                             (uint32_t) ctx->cls, now);
            }
        }

        ngx_shmtx_unlock(&z->shpool->mutex);
    }

    p = ngx_pnalloc(r->pool, 6 * (NGX_INT64_LEN + 16));
    if (p == NULL) {
        return NGX_ERROR;
    }

    for (k = 0; k < 6; k++) {
        if (!have[k / 3]) {
            continue;
        }

        v[k] = p;
        p = (k % 3 == 2) ? ngx_http_deepseek_guard_tokens_duration(p, val[k])
                         : ngx_sprintf(p, "%uL", val[k]);
        len[k] = p - v[k];

        if (ngx_http_deepseek_guard_add_header(r,
                                               &ngx_http_deepseek_guard_xrl[k],
                                               v[k], len[k])
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* $deepseek_guard_tokens_reserved (data 0), $deepseek_guard_tokens_used */

ngx_int_t
ngx_http_deepseek_guard_tokens_variable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    u_char                                *p;
    uint64_t                               n;
    ngx_http_deepseek_guard_tokens_ctx_t  *tc;

    tc = (ctx != NULL) ? ctx->tokens : NULL;

    if (tc == NULL || tc->reserved == 0
        || (ctx->status != NGX_HTTP_DSG_ADMITTED && data == 1))
    {
        v->not_found = 1;
        return NGX_OK;
    }

    if (data == 0) {
        n = tc->reserved;

    } else {
        ngx_http_deepseek_guard_tokens_finish(ctx);
        n = tc->used;
    }

    p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_sprintf(p, "%uL", n) - p;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}


ngx_int_t
ngx_http_deepseek_guard_tokens_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_deepseek_guard_tokens_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_deepseek_guard_tokens_body_filter;

    return NGX_OK;
}
