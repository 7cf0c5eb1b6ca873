/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Between the cache engine (ngx_http_deepseek_guard_cache.c) and the cache
 * inside a request (ngx_http_deepseek_guard_cache_filter.c).
 */


#ifndef NGX_HTTP_DEEPSEEK_GUARD_CACHE_H
#define NGX_HTTP_DEEPSEEK_GUARD_CACHE_H


#include "ngx_http_deepseek_guard_module.h"
#include "dsg_entry.h"


#define NGX_HTTP_DSG_CACHE_MISS       1
#define NGX_HTTP_DSG_CACHE_HIT        2
#define NGX_HTTP_DSG_CACHE_EXPIRED    3
#define NGX_HTTP_DSG_CACHE_STALE      4
#define NGX_HTTP_DSG_CACHE_COALESCED  5
#define NGX_HTTP_DSG_CACHE_BYPASS     6

/* bit 0 is NGX_CONF_BITMASK_SET, which the merge clears */
#define NGX_HTTP_DSG_STALE_OVERLOAD   0x0002
#define NGX_HTTP_DSG_STALE_ERROR      0x0004
#define NGX_HTTP_DSG_STALE_TIMEOUT    0x0008
#define NGX_HTTP_DSG_STALE_500        0x0010
#define NGX_HTTP_DSG_STALE_502        0x0020
#define NGX_HTTP_DSG_STALE_503        0x0040
#define NGX_HTTP_DSG_STALE_504        0x0080
#define NGX_HTTP_DSG_STALE_429        0x0100
#define NGX_HTTP_DSG_STALE_UPDATING   0x0200
#define NGX_HTTP_DSG_STALE_OFF        0x8000

#define NGX_HTTP_DSG_SWEEP_MS         1000
#define NGX_HTTP_DSG_SWEEP_ITEMS      256
#define NGX_HTTP_DSG_JSON_MAX         (1024 * 1024)

/* deepseek_guard_cache_path threads_min= default: entries this large and
 * up are stored by the thread pool */
#define NGX_HTTP_DSG_THREADS_MIN      (64 * 1024)


/* fill locks: probed in a window of so many slots from the digest's */
#define NGX_HTTP_DSG_LOCK_PROBES      16
#define NGX_HTTP_DSG_LOCKS_MAX        16384

/* the mark of a filler's proxied request, its entry's digest */
#define NGX_HTTP_DSG_FILL_HEADER      "X-Deepseek-Guard-Fill"
#define NGX_HTTP_DSG_FILL_HEADER_LC   "x-deepseek-guard-fill"

/* an entry's line that is no header: the request's values Vary names */
#define NGX_HTTP_DSG_VARY_LINE        ":vary:"

#define NGX_HTTP_DSG_BODY_NONE        0
#define NGX_HTTP_DSG_BODY_READING     1
#define NGX_HTTP_DSG_BODY_DONE        2


typedef struct {
    ngx_uint_t                   status;
    ngx_msec_t                   valid;
} ngx_http_deepseek_guard_valid_t;


typedef struct ngx_http_deepseek_guard_cache_ctx_s {
    ngx_http_deepseek_guard_ctx_t  *guard;
    ngx_http_deepseek_guard_cache_t  *cache;

    ngx_uint_t                   status;       /* NGX_HTTP_DSG_CACHE_* */
    ngx_uint_t                   body;         /* NGX_HTTP_DSG_BODY_* */
    ngx_uint_t                   looked_up;
    ngx_uint_t                   waited;
    ngx_uint_t                   lock_timed_out;
    ngx_uint_t                   fill;      /* 1: fill once admitted; 2: no lock */
    ngx_uint_t                   bypass;
    ngx_uint_t                   dropped;      /* internal redirect */

    /* what the request carries */
    ngx_uint_t                   credentials;  /* a credential header */
    ngx_uint_t                   gzip;         /* Accept-Encoding: gzip */

    ngx_str_t                    key;
    u_char                       digest[32];
    u_char                       body_sha[64];
    ngx_uint_t                   body_sha_done;

    /* the entry found: fresh (serve), or expired (stale candidate) */
    dsg_entry_t                  entry;
    ngx_uint_t                   have_entry;
    ngx_uint_t                   fresh;
    ngx_uint_t                   serve;        /* answer from entry */
    ngx_uint_t                   serving;      /* our answer is going out */
    ngx_uint_t                   ranges;       /* entry: Accept-Ranges */
    void                        *pin;          /* entry in the map, or NULL */

    /* filling */
    ngx_int_t                    lock;         /* index, -1 none */
    ngx_uint_t                   store;        /* may store the response */
    ngx_uint_t                   capture;      /* capturing the body */
    ngx_uint_t                   replacing;    /* stale replaces upstream */
    ngx_uint_t                   replaced;
    ngx_uint_t                   sse;
    ngx_uint_t                   http_status;
    uint64_t                     ttl;
    ngx_str_t                    hdrs;         /* the headers to store */
    ngx_chain_t                 *chain;
    ngx_chain_t                **last;
    size_t                       size;
    off_t                        expect;       /* Content-Length, -1 */

    /* coalescing: parked (ctx->park) until the filler is done */
    ngx_uint_t                   waiting;
    ngx_msec_t                   wait_deadline;
} ngx_http_deepseek_guard_cache_ctx_t;


typedef struct {
    dsg_entry_t                 *entry;
    ngx_chain_t                 *chain;
} ngx_http_deepseek_guard_fill_t;


/* ngx_http_deepseek_guard_cache.c: the engine */
ngx_int_t ngx_http_deepseek_guard_cache_lock(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
void ngx_http_deepseek_guard_cache_unlock(
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
ngx_uint_t ngx_http_deepseek_guard_cache_locked(
    ngx_http_deepseek_guard_cache_t *cache, u_char *digest);
void ngx_http_deepseek_guard_cache_store(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx);
void ngx_http_deepseek_guard_cache_fault(ngx_http_deepseek_guard_cache_t *cache,
    ngx_log_t *log, ngx_uint_t level, const char *what, int rc);
void ngx_http_deepseek_guard_cache_touch(
    ngx_http_deepseek_guard_cache_t *cache, u_char *digest);
void ngx_http_deepseek_guard_cache_unpin(
    ngx_http_deepseek_guard_cache_ctx_t *cctx, ngx_log_t *log);


#endif /* NGX_HTTP_DEEPSEEK_GUARD_CACHE_H */
