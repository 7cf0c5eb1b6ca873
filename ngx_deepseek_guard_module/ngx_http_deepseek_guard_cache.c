/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The cache engine, the ngx_http_file_cache.c analogue: the path and
 * keys zone, fill locks in shared memory, storing an entry, the sweep,
 * repair of a damaged file, and the worker's LMDB environment.
 */


#include "ngx_http_deepseek_guard_module.h"
#include "ngx_http_deepseek_guard_cache.h"

#include "dsg_entry.h"
#include "dsg_store.h"



/* hits remembered per worker for the eviction order, touched each second */
#define NGX_HTTP_DSG_TOUCH_MAX        256


static void ngx_http_deepseek_guard_cache_sweep(ngx_event_t *ev);
static void ngx_http_deepseek_guard_cache_repair(
    ngx_http_deepseek_guard_cache_t *cache, ngx_log_t *log, unsigned flags);
static ngx_int_t ngx_http_deepseek_guard_cache_init_zone(
    ngx_shm_zone_t *shm_zone, void *data);
static void ngx_http_deepseek_guard_cache_release(
    ngx_http_deepseek_guard_cache_t *cache, u_char *digest, ngx_int_t i);
static void ngx_http_deepseek_guard_cache_fault_err(
    ngx_http_deepseek_guard_cache_t *cache, ngx_log_t *log, ngx_uint_t level,
    const char *what, int rc, ngx_err_t err);
#if (NGX_THREADS)
static ngx_int_t ngx_http_deepseek_guard_cache_post(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx,
    ngx_http_deepseek_guard_fill_t *f, size_t size, uint64_t now);
static void ngx_http_deepseek_guard_cache_thread(void *data, ngx_log_t *log);
static int ngx_http_deepseek_guard_cache_copy(void *data, uint8_t *dst,
    size_t len);
static void ngx_http_deepseek_guard_cache_stored(ngx_event_t *ev);


/* a store handed to the thread pool: the entry, encoded, follows it */

typedef struct {
    ngx_http_deepseek_guard_cache_t  *cache;
    void                             *handle;   /* dsg_store_detach() */
    u_char                            digest[32];
    ngx_int_t                         lock;     /* the fill lock, -1 none */
    uint64_t                          expires_ms;
    uint64_t                          now;
    size_t                            size;
    int                               rc;
    int                               err;
    u_char                           *data;
} ngx_http_deepseek_guard_store_task_t;
#endif


ngx_conf_bitmask_t  ngx_http_deepseek_guard_use_stale_masks[] = {
    { ngx_string("off"), NGX_HTTP_DSG_STALE_OFF },
    { ngx_string("overload"), NGX_HTTP_DSG_STALE_OVERLOAD },
    { ngx_string("error"), NGX_HTTP_DSG_STALE_ERROR },
    { ngx_string("timeout"), NGX_HTTP_DSG_STALE_TIMEOUT },
    { ngx_string("http_500"), NGX_HTTP_DSG_STALE_500 },
    { ngx_string("http_502"), NGX_HTTP_DSG_STALE_502 },
    { ngx_string("http_503"), NGX_HTTP_DSG_STALE_503 },
    { ngx_string("http_504"), NGX_HTTP_DSG_STALE_504 },
    { ngx_string("http_429"), NGX_HTTP_DSG_STALE_429 },
    { ngx_string("updating"), NGX_HTTP_DSG_STALE_UPDATING },
    { ngx_null_string, 0 }
};


ngx_conf_enum_t  ngx_http_deepseek_guard_credentials_enum[] = {
    { ngx_string("separate"), NGX_HTTP_DSG_CRED_SEPARATE },
    { ngx_string("shared"), NGX_HTTP_DSG_CRED_SHARED },
    { ngx_null_string, 0 }
};


ngx_conf_bitmask_t  ngx_http_deepseek_guard_methods_masks[] = {
    { ngx_string("GET"), NGX_HTTP_GET },
    { ngx_string("HEAD"), NGX_HTTP_HEAD },
    { ngx_string("POST"), NGX_HTTP_POST },
    { ngx_null_string, 0 }
};
static ngx_event_t   ngx_http_deepseek_guard_cache_sweep_ev;
static ngx_array_t  *ngx_http_deepseek_guard_cache_list;


/*
 * A digest's fill lock lives in a window of NGX_HTTP_DSG_LOCK_PROBES slots
 * from the slot its digest names: a lookup reads the window only, O(1)
 * whatever the size of the table.  The slot and window size of a digest.
 */

static ngx_uint_t
ngx_http_deepseek_guard_lock_window(ngx_http_deepseek_guard_cache_t *cache,
    u_char *digest, ngx_uint_t *h)
{
    ngx_uint_t  n;

    n = cache->sh->nlocks;

    ngx_memcpy(h, digest, sizeof(ngx_uint_t));
    *h %= n;

    return ngx_min(n, NGX_HTTP_DSG_LOCK_PROBES);
}


/*
 * Takes the fill lock of the entry: NGX_OK, we fill it (or, with no free
 * slot in the window, fill without coalescing); NGX_BUSY, another live
 * request does.  A lock whose deadline passed is taken over.
 */

ngx_int_t
ngx_http_deepseek_guard_cache_lock(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    ngx_int_t                            rc;
    ngx_uint_t                           i, h, n, free, w;
    ngx_http_deepseek_guard_lock_t      *lk;
    ngx_http_deepseek_guard_cache_t     *cache;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);
    cache = cctx->cache;
    n = cache->sh->nlocks;
    w = ngx_http_deepseek_guard_lock_window(cache, cctx->digest, &h);

    rc = NGX_OK;
    free = n;

    ngx_shmtx_lock(&cache->shpool->mutex);

    for (i = 0; i < w; i++) {
        lk = &cache->sh->locks[(h + i) % n];

        if (lk->pid == 0) {
            if (free == n) {
                free = (h + i) % n;
            }
            continue;
        }

        if (ngx_memcmp(lk->digest, cctx->digest, 32) != 0) {
            continue;
        }

        if (lk->pid == ngx_pid && (ngx_int_t) ((h + i) % n) == cctx->lock) {
            goto done;
        }

        if ((int64_t) (lk->deadline - ngx_current_msec) > 0) {
            rc = NGX_BUSY;
            goto done;
        }

        /* the filler is late: take it over */
        free = (h + i) % n;
        break;
    }

    if (free < n) {
        lk = &cache->sh->locks[free];
        ngx_memcpy(lk->digest, cctx->digest, 32);
        lk->pid = ngx_pid;
        lk->deadline = ngx_current_msec + lcf->lock_timeout;
        cctx->lock = free;
    }

    /* no free lock: fill without coalescing */

done:

    ngx_shmtx_unlock(&cache->shpool->mutex);

    return rc;
}


void
ngx_http_deepseek_guard_cache_unlock(ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    if (cctx->lock < 0) {
        return;
    }

    ngx_http_deepseek_guard_cache_release(cctx->cache, cctx->digest,
                                          cctx->lock);
    cctx->lock = -1;
}


/* frees fill lock i if this worker still holds it for digest */

static void
ngx_http_deepseek_guard_cache_release(ngx_http_deepseek_guard_cache_t *cache,
    u_char *digest, ngx_int_t i)
{
    ngx_http_deepseek_guard_lock_t  *lk;

    ngx_shmtx_lock(&cache->shpool->mutex);

    lk = &cache->sh->locks[i];

    if (lk->pid == ngx_pid && ngx_memcmp(lk->digest, digest, 32) == 0) {
        lk->pid = 0;
    }

    ngx_shmtx_unlock(&cache->shpool->mutex);

    /* a request of this worker waiting for the entry goes on at once */
    ngx_http_deepseek_guard_wake(0);
}


/* whether a live request holds the fill lock of digest */

ngx_uint_t
ngx_http_deepseek_guard_cache_locked(ngx_http_deepseek_guard_cache_t *cache,
    u_char *digest)
{
    ngx_uint_t                       i, n, h, w, busy;
    ngx_http_deepseek_guard_lock_t  *lk;

    busy = 0;
    n = cache->sh->nlocks;
    w = ngx_http_deepseek_guard_lock_window(cache, digest, &h);

    ngx_shmtx_lock(&cache->shpool->mutex);

    for (i = 0; i < w; i++) {
        lk = &cache->sh->locks[(h + i) % n];

        if (lk->pid != 0
            && ngx_memcmp(lk->digest, digest, 32) == 0
            && (int64_t) (lk->deadline - ngx_current_msec) > 0)
        {
            busy = 1;
            break;
        }
    }

    ngx_shmtx_unlock(&cache->shpool->mutex);

    return busy;
}


/* the reaper: the pids that hold fill locks */

void
ngx_http_deepseek_guard_cache_pids(ngx_http_deepseek_guard_cache_t *cache,
    ngx_array_t *pids)
{
    ngx_uint_t  i;

    ngx_shmtx_lock(&cache->shpool->mutex);

    for (i = 0; i < cache->sh->nlocks; i++) {
        if (cache->sh->locks[i].pid != 0) {
            (void) ngx_http_deepseek_guard_pid_add(pids,
                                                   cache->sh->locks[i].pid);
        }
    }

    ngx_shmtx_unlock(&cache->shpool->mutex);
}


/* the reaper: frees the fill locks of dead pids, their waiters take over */

void
ngx_http_deepseek_guard_cache_reap(ngx_http_deepseek_guard_cache_t *cache,
    ngx_array_t *dead, ngx_log_t *log)
{
    ngx_uint_t  i, reaped;

    reaped = 0;

    ngx_shmtx_lock(&cache->shpool->mutex);

    for (i = 0; i < cache->sh->nlocks; i++) {
        if (cache->sh->locks[i].pid != 0
            && ngx_http_deepseek_guard_pid_in(dead, cache->sh->locks[i].pid))
        {
            cache->sh->locks[i].pid = 0;
            reaped++;
        }
    }

    ngx_shmtx_unlock(&cache->shpool->mutex);

    if (reaped) {
        ngx_log_error(NGX_LOG_NOTICE, log, 0,
                      "deepseek_guard cache \"%V\": released %ui fill "
                      "lock(s) of dead workers", &cache->name, reaped);
    }
}


/*
 * A hit: remembered, and touched in the store (the eviction order) by the
 * worker's next sweep tick, in one write transaction for all its hits.
 * Beyond NGX_HTTP_DSG_TOUCH_MAX hits a second the rest are not recorded.
 */

void
ngx_http_deepseek_guard_cache_touch(ngx_http_deepseek_guard_cache_t *cache,
    u_char *digest)
{
    u_char  *last;

    if (cache->touched == NULL || cache->ntouched == NGX_HTTP_DSG_TOUCH_MAX) {
        return;
    }

    if (cache->ntouched) {
        last = cache->touched + (cache->ntouched - 1) * 32;

        if (ngx_memcmp(last, digest, 32) == 0) {
            return;
        }
    }

    ngx_memcpy(cache->touched + cache->ntouched * 32, digest, 32);
    cache->ntouched++;
}


static int
ngx_http_deepseek_guard_cache_fill(void *data, uint8_t *dst, size_t len)
{
    ngx_http_deepseek_guard_fill_t *f = data;

    int           n;
    uint8_t      *p, *last;
    ngx_chain_t  *cl;

    n = dsg_entry_encode_prefix(dst, len, f->entry);
    if (n < 0) {
        return -1;
    }

    p = dst + n;
    last = dst + len;

    for (cl = f->chain; cl; cl = cl->next) {
        if ((size_t) (last - p) < (size_t) (cl->buf->last - cl->buf->pos)) {
            return -1;
        }

        p = ngx_cpymem(p, cl->buf->pos, cl->buf->last - cl->buf->pos);
    }

    return p == last ? 0 : -1;
}


/* stores a complete response; runs once, when its last buffer passed */

void
ngx_http_deepseek_guard_cache_store(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx)
{
    int                                  rc;
    u_char                              *p, *s, tail[64];
    size_t                               size, n, tlen;
    uint64_t                             now;
    ngx_uint_t                           level;
    dsg_entry_t                          e;
    ngx_chain_t                         *cl;
    ngx_http_deepseek_guard_fill_t       f;
    ngx_http_deepseek_guard_cache_t     *cache;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    cache = cctx->cache;
    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if (cctx->sse) {
        /* an event stream is complete only with its terminal event */

        s = (u_char *) "data: [DONE]";

        /*
         * the last bytes of the body, whatever buffers they came in: a
         * read may end inside "data: [DONE]"
         */

        tlen = 0;

        for (cl = cctx->chain; cl; cl = cl->next) {
            n = cl->buf->last - cl->buf->pos;

            if (n >= sizeof(tail)) {
                ngx_memcpy(tail, cl->buf->last - sizeof(tail), sizeof(tail));
                tlen = sizeof(tail);
                continue;
            }

            if (tlen > sizeof(tail) - n) {
                ngx_memmove(tail, tail + tlen - (sizeof(tail) - n),
                            sizeof(tail) - n);
                tlen = sizeof(tail) - n;
            }

            ngx_memcpy(tail + tlen, cl->buf->pos, n);
            tlen += n;
        }

        p = tail + tlen;

        while (p > tail && (p[-1] == '\n' || p[-1] == '\r' || p[-1] == ' '))
        {
            p--;
        }

        n = (p - tail >= 12 && ngx_strncmp(p - 12, s, 12) == 0);

        if (!n) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "deepseek_guard cache \"%V\": event stream without "
                          "\"data: [DONE]\" not stored", &cache->name);
            (void) ngx_atomic_fetch_add(&cache->sh->not_cacheable, 1);
            return;
        }
    }

    if (!cctx->sse && cctx->expect >= 0
        && cctx->size != (size_t) cctx->expect)
    {
        /* the upstream said more (or less) than it sent */
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "deepseek_guard cache \"%V\": body of %uz bytes, "
                      "Content-Length %O: not stored", &cache->name,
                      cctx->size, cctx->expect);
        (void) ngx_atomic_fetch_add(&cache->sh->not_cacheable, 1);
        return;
    }

    now = ngx_http_deepseek_guard_now_ms();

    ngx_memzero(&e, sizeof(dsg_entry_t));
    e.flags = cctx->sse ? DSG_ENTRY_FLAG_SSE : 0;
    e.status = (uint16_t) cctx->http_status;
    e.created_ms = now;
    e.expires_ms = now + cctx->ttl;
    e.stale_until_ms = e.expires_ms + cache->inactive;
    e.key = cctx->key.data;
    e.key_len = cctx->key.len;
    e.hdrs = cctx->hdrs.data;
    e.hdrs_len = cctx->hdrs.len;
    e.body_len = cctx->size;

    size = dsg_entry_size(e.key_len, e.hdrs_len, e.body_len);
    if (size == 0) {
        return;
    }

    f.entry = &e;
    f.chain = cctx->chain;

#if (NGX_THREADS)
    if (cache->thread_pool && size >= cache->threads_min
        && ngx_http_deepseek_guard_cache_post(r, cctx, &f, size, now)
           == NGX_OK)
    {
        return;
    }
#endif

    rc = dsg_store_put(cache->store, cctx->digest, e.expires_ms, now, size,
                       ngx_http_deepseek_guard_cache_fill, &f);

    if (rc == DSG_STORE_OK) {
        (void) ngx_atomic_fetch_add(&cache->sh->stores, 1);
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "deepseek_guard cache: stored %uz bytes for %uL ms",
                       size, cctx->ttl);

    } else {
        (void) ngx_atomic_fetch_add(&cache->sh->store_failures, 1);
        level = (rc == DSG_STORE_EFULL) ? NGX_LOG_WARN : NGX_LOG_ERR;

        ngx_http_deepseek_guard_cache_fault(cache, r->connection->log, level,
                                            "response not stored", rc);
    }

    (void) lcf;

    ngx_http_deepseek_guard_cache_unlock(cctx);
}


#if (NGX_THREADS)

/*
 * A store in the thread pool (deepseek_guard_cache_path threads=): the
 * entry is encoded here into memory of its own (the request may end
 * before the thread does), the thread writes it through a detached
 * handle of the worker's environment, and the fill lock passes from the
 * request to the task: coalesced waiters go on when the entry commits.
 * NGX_ERROR: not posted, store it here.
 */

static ngx_int_t
ngx_http_deepseek_guard_cache_post(ngx_http_request_t *r,
    ngx_http_deepseek_guard_cache_ctx_t *cctx,
    ngx_http_deepseek_guard_fill_t *f, size_t size, uint64_t now)
{
    ngx_thread_task_t                     *task;
    ngx_http_deepseek_guard_cache_t       *cache;
    ngx_http_deepseek_guard_store_task_t  *st;

    cache = cctx->cache;

    task = ngx_calloc(sizeof(ngx_thread_task_t)
                      + sizeof(ngx_http_deepseek_guard_store_task_t) + size,
                      r->connection->log);
    if (task == NULL) {
        return NGX_ERROR;
    }

    st = (ngx_http_deepseek_guard_store_task_t *) (task + 1);
    st->data = (u_char *) (st + 1);

    if (ngx_http_deepseek_guard_cache_fill(f, st->data, size) != 0) {
        ngx_free(task);
        return NGX_ERROR;
    }

    st->handle = dsg_store_detach(cache->store);
    if (st->handle == NULL) {
        ngx_free(task);
        return NGX_ERROR;
    }

    st->cache = cache;
    ngx_memcpy(st->digest, cctx->digest, 32);
    st->lock = cctx->lock;
    st->expires_ms = f->entry->expires_ms;
    st->now = now;
    st->size = size;

    task->ctx = st;
    task->handler = ngx_http_deepseek_guard_cache_thread;
    task->event.handler = ngx_http_deepseek_guard_cache_stored;
    task->event.data = task;
    task->event.log = ngx_cycle->log;

    if (ngx_thread_task_post(cache->thread_pool, task) != NGX_OK) {
        dsg_store_attach(cache->store, st->handle);
        ngx_free(task);
        return NGX_ERROR;
    }

    cache->pending++;
    cctx->lock = -1;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "deepseek_guard cache: store of %uz bytes posted, "
                   "task #%ui", size, task->id);

    return NGX_OK;
}


/* in a thread of the pool: nothing here may touch the worker's state */

static void
ngx_http_deepseek_guard_cache_thread(void *data, ngx_log_t *log)
{
    ngx_http_deepseek_guard_store_task_t *st = data;

    st->rc = dsg_store_put(st->handle, st->digest, st->expires_ms, st->now,
                           st->size, ngx_http_deepseek_guard_cache_copy, st);
    st->err = dsg_store_last_error(st->handle);

    dsg_store_detached_end(st->handle);
}


static int
ngx_http_deepseek_guard_cache_copy(void *data, uint8_t *dst, size_t len)
{
    ngx_http_deepseek_guard_store_task_t *st = data;

    if (len != st->size) {
        return -1;
    }

    ngx_memcpy(dst, st->data, len);

    return 0;
}


/* back on the event loop: count, release the fill lock, free */

static void
ngx_http_deepseek_guard_cache_stored(ngx_event_t *ev)
{
    unsigned                               flags;
    ngx_uint_t                             level;
    ngx_thread_task_t                     *task;
    ngx_http_deepseek_guard_cache_t       *cache;
    ngx_http_deepseek_guard_store_task_t  *st;

    task = ev->data;
    st = task->ctx;
    cache = st->cache;

    dsg_store_attach(cache->store, st->handle);
    cache->pending--;

    if (st->rc == DSG_STORE_OK) {
        (void) ngx_atomic_fetch_add(&cache->sh->stores, 1);
        (void) ngx_atomic_fetch_add(&cache->sh->thread_stores, 1);
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ev->log, 0,
                       "deepseek_guard cache: stored %uz bytes in a thread",
                       st->size);

    } else {
        (void) ngx_atomic_fetch_add(&cache->sh->store_failures, 1);
        level = (st->rc == DSG_STORE_EFULL) ? NGX_LOG_WARN : NGX_LOG_ERR;

        ngx_http_deepseek_guard_cache_fault_err(cache, ev->log, level,
                                      "response not stored", st->rc,
                                      (st->rc == DSG_STORE_EIO) ? st->err : 0);
    }

    if (st->lock >= 0) {
        ngx_http_deepseek_guard_cache_release(cache, st->digest, st->lock);
    }

    ngx_free(task);

    if (cache->pending == 0 && cache->repair
        && !dsg_store_pins(cache->store))
    {
        flags = cache->repair;
        cache->repair = 0;
        ngx_http_deepseek_guard_cache_repair(cache, ev->log, flags);
    }
}

#endif


/*
 * One worker a second (elected through the shared zone) removes expired
 * entries past their stale window and evicts beyond the high-water mark,
 * in one small write transaction, then refreshes the gauges.
 */

static void
ngx_http_deepseek_guard_cache_sweep(ngx_event_t *ev)
{
    int                                rc;
    unsigned                           expired, evicted;
    uint64_t                           now;
    ngx_uint_t                         i, mine;
    dsg_store_stat_t                   st;
    ngx_http_deepseek_guard_cache_t  **caches, *cache;

    caches = ngx_http_deepseek_guard_cache_list->elts;
    now = ngx_http_deepseek_guard_now_ms();

    for (i = 0; i < ngx_http_deepseek_guard_cache_list->nelts; i++) {
        cache = caches[i];

        if (cache->store == NULL) {
            continue;
        }

        /* another worker replaced a damaged file: share the new one */

        if (dsg_store_replaced(cache->store)) {
            ngx_http_deepseek_guard_cache_repair(cache, ev->log,
                                                 DSG_STORE_RECREATE);
            if (cache->store == NULL) {
                continue;
            }
        }

        /* this worker's hits of the last second: the eviction order */

        if (cache->ntouched) {
            rc = dsg_store_touch(cache->store, cache->touched,
                                      (unsigned) cache->ntouched, now);
            cache->ntouched = 0;

            if (rc != DSG_STORE_OK) {
                ngx_http_deepseek_guard_cache_fault(cache, ev->log,
                                                    NGX_LOG_ERR,
                                                    "touch failed", rc);
                if (cache->store == NULL) {
                    continue;
                }
            }
        }

        ngx_shmtx_lock(&cache->shpool->mutex);

        mine = (now - cache->sh->last_sweep >= NGX_HTTP_DSG_SWEEP_MS);
        if (mine) {
            cache->sh->last_sweep = now;
        }

        ngx_shmtx_unlock(&cache->shpool->mutex);

        if (!mine) {
            continue;
        }

        expired = 0;
        evicted = 0;

        rc = dsg_store_sweep(cache->store, now, cache->inactive,
                             NGX_HTTP_DSG_SWEEP_ITEMS, &expired, &evicted);
        if (rc != DSG_STORE_OK) {
            ngx_http_deepseek_guard_cache_fault(cache, ev->log, NGX_LOG_ERR,
                                                "sweep failed", rc);
            if (cache->store == NULL) {
                continue;
            }
        }

        (void) ngx_atomic_fetch_add(&cache->sh->expirations, expired);
        (void) ngx_atomic_fetch_add(&cache->sh->evictions, evicted);

        if (dsg_store_stat(cache->store, &st) == DSG_STORE_OK) {
            cache->sh->entries = st.entries;
            cache->sh->bytes = st.data_bytes;
            cache->sh->file_bytes = st.used_bytes;
            cache->sh->capacity = st.map_size;

            if (st.put_evicted > cache->put_evicted) {
                (void) ngx_atomic_fetch_add(&cache->sh->evictions,
                                        st.put_evicted - cache->put_evicted);
                cache->put_evicted = st.put_evicted;
            }
        }

        (void) dsg_store_sync(cache->store);
        (void) dsg_store_reader_check(cache->store, NULL);
    }

    ngx_add_timer(ev, NGX_HTTP_DSG_SWEEP_MS);
}


/*
 * A failed read, store or sweep: logged, with the errno behind a file
 * system error; a corrupt file is replaced at once
 */

void
ngx_http_deepseek_guard_cache_fault(ngx_http_deepseek_guard_cache_t *cache,
    ngx_log_t *log, ngx_uint_t level, const char *what, int rc)
{
    ngx_http_deepseek_guard_cache_fault_err(cache, log, level, what, rc,
                                (rc == DSG_STORE_EIO)
                                ? (ngx_err_t) dsg_store_last_error(cache->store)
                                : 0);
}


static void
ngx_http_deepseek_guard_cache_fault_err(ngx_http_deepseek_guard_cache_t *cache,
    ngx_log_t *log, ngx_uint_t level, const char *what, int rc, ngx_err_t err)
{
    ngx_log_error(level, log, err, "deepseek_guard cache \"%V\": %s: %s",
                  &cache->name, what, dsg_store_strerror(rc));

    if (rc == DSG_STORE_ECORRUPT) {
        ngx_http_deepseek_guard_cache_repair(cache, log, DSG_STORE_REPLACE);
    }
}


/*
 * The end of a hit sent from the map: the pin goes back, and a repair
 * deferred for it runs
 */

void
ngx_http_deepseek_guard_cache_unpin(ngx_http_deepseek_guard_cache_ctx_t *cctx,
    ngx_log_t *log)
{
    unsigned                          flags;
    ngx_http_deepseek_guard_cache_t  *cache;

    if (cctx->pin == NULL) {
        return;
    }

    cache = cctx->cache;

    dsg_store_unpin(cache->store, cctx->pin);
    cctx->pin = NULL;

    /* nothing may read the map through the entry any more */
    cctx->entry.key = NULL;
    cctx->entry.hdrs = NULL;
    cctx->entry.body = NULL;

    if (cache->repair && !cache->pending && !dsg_store_pins(cache->store)) {
        flags = cache->repair;
        cache->repair = 0;
        ngx_http_deepseek_guard_cache_repair(cache, log, flags);
    }
}


/*
 * A data file found corrupt while running (a read, a store or the sweep
 * failed with DSG_STORE_ECORRUPT) is replaced at once by the worker that
 * found it, under the directory's flock (held by another worker only
 * while it opens: milliseconds); the other workers see the new file on
 * their next sweep tick (dsg_store_replaced(), a stat() a second) and
 * reopen it rather than replacing it again.  If nothing can be opened,
 * the worker serves uncached, as at startup.
 */

static void
ngx_http_deepseek_guard_cache_repair(ngx_http_deepseek_guard_cache_t *cache,
    ngx_log_t *log, unsigned flags)
{
    int  rc, recreated;

    if (cache->pending || dsg_store_pins(cache->store)) {
        /*
         * a thread still writes through this environment, or a hit is
         * being sent from its map
         */
        cache->repair |= flags;
        return;
    }

    rc = dsg_store_reopen((dsg_store_t **) &cache->store, flags, &recreated);

    if (rc != DSG_STORE_OK) {
        cache->store = NULL;
        ngx_log_error(NGX_LOG_ALERT, log, 0,
                      "deepseek_guard cache \"%V\": cannot reopen \"%V\": "
                      "%s, serving uncached", &cache->name,
                      &cache->path->name, dsg_store_strerror(rc));
        return;
    }

    if (recreated) {
        (void) ngx_atomic_fetch_add(&cache->sh->recreated, 1);
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "deepseek_guard cache \"%V\": the data file in \"%V\" "
                      "was corrupt or incompatible and was recreated "
                      "while running", &cache->name, &cache->path->name);
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, log, 0,
                  "deepseek_guard cache \"%V\": reopened the data file in "
                  "\"%V\", replaced by another worker", &cache->name,
                  &cache->path->name);
}


ngx_int_t
ngx_http_deepseek_guard_cache_init_process(ngx_cycle_t *cycle)
{
    int                                   rc, recreated;
    ngx_uint_t                            i, readers;
    ngx_core_conf_t                      *ccf;
    ngx_http_deepseek_guard_cache_t     **caches, *cache;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_deepseek_guard_module);
    if (mcf == NULL || mcf->caches.nelts == 0) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    /*
     * a worker reads through one slot, and one more per pinned hit; old
     * and new workers overlap during a reload: room for both (a pin that
     * finds the table full falls back to a copy)
     */
    readers = ngx_max(126, 2 * (ngx_uint_t) ccf->worker_processes
                           * (DSG_STORE_PINS + 2) + 8);

    ngx_http_deepseek_guard_cache_list = &mcf->caches;
    caches = mcf->caches.elts;

    for (i = 0; i < mcf->caches.nelts; i++) {
        cache = caches[i];
        recreated = 0;

        rc = dsg_store_open((dsg_store_t **) &cache->store,
                            (char *) cache->path->name.data, cache->max_size,
                            (unsigned) readers, DSG_STORE_RECREATE,
                            &recreated);

        if (rc != DSG_STORE_OK) {
            cache->store = NULL;
            ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                          "deepseek_guard cache \"%V\": cannot open \"%V\": "
                          "%s, serving uncached", &cache->name,
                          &cache->path->name, dsg_store_strerror(rc));
            continue;
        }

        cache->touched = ngx_alloc(NGX_HTTP_DSG_TOUCH_MAX * 32, cycle->log);
        cache->ntouched = 0;

        if (recreated) {
            (void) ngx_atomic_fetch_add(&cache->sh->recreated, 1);
            ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                          "deepseek_guard cache \"%V\": the data file in "
                          "\"%V\" was corrupt or incompatible and was "
                          "recreated", &cache->name, &cache->path->name);
        }
    }

    ngx_http_deepseek_guard_cache_sweep_ev.handler =
                                      ngx_http_deepseek_guard_cache_sweep;
    ngx_http_deepseek_guard_cache_sweep_ev.log = cycle->log;
    ngx_http_deepseek_guard_cache_sweep_ev.data =
                                      &ngx_http_deepseek_guard_cache_sweep_ev;
    ngx_http_deepseek_guard_cache_sweep_ev.cancelable = 1;

    ngx_add_timer(&ngx_http_deepseek_guard_cache_sweep_ev, 10);

    return NGX_OK;
}


void
ngx_http_deepseek_guard_cache_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                         i;
    ngx_http_deepseek_guard_cache_t  **caches;

    if (ngx_http_deepseek_guard_cache_list == NULL) {
        return;
    }

    caches = ngx_http_deepseek_guard_cache_list->elts;

    for (i = 0; i < ngx_http_deepseek_guard_cache_list->nelts; i++) {
        if (caches[i]->store) {
            (void) dsg_store_sync(caches[i]->store);
            dsg_store_close(caches[i]->store);
            caches[i]->store = NULL;
        }

        if (caches[i]->touched) {
            ngx_free(caches[i]->touched);
            caches[i]->touched = NULL;
        }
    }
}


/* in the master, after the paths exist: the directory must be writable */

ngx_int_t
ngx_http_deepseek_guard_cache_init_module(ngx_cycle_t *cycle)
{
    u_char                               *name;
    ngx_fd_t                              fd;
    ngx_uint_t                            i;
    ngx_http_deepseek_guard_cache_t     **caches;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_deepseek_guard_module);
    if (mcf == NULL) {
        return NGX_OK;
    }

    caches = mcf->caches.elts;

    for (i = 0; i < mcf->caches.nelts; i++) {
        name = ngx_pnalloc(cycle->pool, caches[i]->path->name.len
                                        + sizeof("/.deepseek_guard_probe"));
        if (name == NULL) {
            return NGX_ERROR;
        }

        ngx_sprintf(name, "%V/.deepseek_guard_probe%Z",
                    &caches[i]->path->name);

        fd = ngx_open_file(name, NGX_FILE_WRONLY, NGX_FILE_CREATE_OR_OPEN,
                           NGX_FILE_DEFAULT_ACCESS);

        if (fd == NGX_INVALID_FILE) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "deepseek_guard_cache_path \"%V\" is not writable",
                          &caches[i]->path->name);
            return NGX_ERROR;
        }

        (void) ngx_close_file(fd);
        (void) ngx_delete_file(name);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_cache_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_deepseek_guard_cache_t  *ocache = data;

    size_t                            size, n;
    ngx_slab_pool_t                  *shpool;
    ngx_http_deepseek_guard_cache_t  *cache;

    cache = shm_zone->data;

    if (ocache) {
        cache->sh = ocache->sh;
        cache->shpool = ocache->shpool;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;
    cache->shpool = shpool;

    if (shm_zone->shm.exists) {
        cache->sh = shpool->data;
        return NGX_OK;
    }

    /*
     * the fill locks take about half of the zone, up to the most misses
     * that can coalesce at once: a larger table would only make the
     * dead-worker scan of every worker longer
     */

    size = shm_zone->shm.size / 2;
    n = (size - sizeof(ngx_http_deepseek_guard_cache_sh_t))
        / sizeof(ngx_http_deepseek_guard_lock_t) + 1;
    n = ngx_min(n, NGX_HTTP_DSG_LOCKS_MAX);

    cache->sh = ngx_slab_calloc(shpool,
                                sizeof(ngx_http_deepseek_guard_cache_sh_t)
                                + (n - 1)
                                  * sizeof(ngx_http_deepseek_guard_lock_t));
    if (cache->sh == NULL) {
        return NGX_ERROR;
    }

    cache->sh->nlocks = n;
    shpool->data = cache->sh;

    return NGX_OK;
}


/*
 * deepseek_guard_cache_path <dir> keys_zone=<name>:<size>
 *     [max_size=<size>] [inactive=<time>] [threads=<pool>]
 *     [threads_min=<size>];
 */

char *
ngx_http_deepseek_guard_cache_path(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_deepseek_guard_main_conf_t *mcf = conf;

    ssize_t                            size, n;
    ngx_int_t                          t;
    ngx_str_t                         *value, s, name;
    ngx_uint_t                         i;
    ngx_http_deepseek_guard_cache_t   *cache, **pc;

    value = cf->args->elts;

    cache = ngx_pcalloc(cf->pool, sizeof(ngx_http_deepseek_guard_cache_t));
    if (cache == NULL) {
        return NGX_CONF_ERROR;
    }

    cache->path = ngx_pcalloc(cf->pool, sizeof(ngx_path_t));
    if (cache->path == NULL) {
        return NGX_CONF_ERROR;
    }

    cache->path->name = value[1];

    if (cache->path->name.data[cache->path->name.len - 1] == '/') {
        cache->path->name.len--;
    }

    if (ngx_conf_full_name(cf->cycle, &cache->path->name, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    cache->path->conf_file = cf->conf_file->file.name.data;
    cache->path->line = cf->conf_file->line;
    cache->max_size = 256 * 1024 * 1024;
    cache->inactive = 600000;
    cache->threads_min = NGX_HTTP_DSG_THREADS_MIN;
    cache->file = cf->conf_file->file.name.data;
    cache->line = cf->conf_file->line;

    name.len = 0;
    size = 0;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "keys_zone=", 10) == 0) {
            if (ngx_http_deepseek_guard_parse_zone(cf, &value[i], 10,
                                                   "keys zone", &name, &size)
                != NGX_CONF_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "max_size=", 9) == 0) {
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            t = ngx_parse_offset(&s);
            if (t == NGX_ERROR || t < 64 * 1024) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid max_size \"%V\", at least 64k",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            cache->max_size = (uint64_t) t;
            continue;
        }

        if (ngx_strncmp(value[i].data, "inactive=", 9) == 0) {
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            t = ngx_parse_time(&s, 0);
            if (t == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid inactive value \"%V\"",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            cache->inactive = (ngx_msec_t) t;
            continue;
        }

        if (ngx_strncmp(value[i].data, "threads=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            if (s.len == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid parameter \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

#if (NGX_THREADS)
            /* as "aio threads=": an undeclared pool other than "default"
             * fails at the end of the configuration, naming this line */
            cache->thread_pool = ngx_thread_pool_add(cf, &s);
            if (cache->thread_pool == NULL) {
                return NGX_CONF_ERROR;
            }

            continue;
#else
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"threads=\" needs nginx built with "
                               "--with-threads");
            return NGX_CONF_ERROR;
#endif
        }

        if (ngx_strncmp(value[i].data, "threads_min=", 12) == 0) {
            s.data = value[i].data + 12;
            s.len = value[i].len - 12;

            n = ngx_parse_size(&s);
            if (n == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid threads_min \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            cache->threads_min = (size_t) n;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"keys_zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    pc = mcf->caches.elts;
    for (i = 0; i < mcf->caches.nelts; i++) {
        if (pc[i]->path->name.len == cache->path->name.len
            && ngx_strcmp(pc[i]->path->name.data, cache->path->name.data)
               == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "cache path \"%V\" is used by another cache",
                               &cache->path->name);
            return NGX_CONF_ERROR;
        }
    }

    cache->name = name;

    cache->shm_zone = ngx_shared_memory_add(cf, &name, size,
                                            &ngx_http_deepseek_guard_module);
    if (cache->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (cache->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    cache->shm_zone->init = ngx_http_deepseek_guard_cache_init_zone;
    cache->shm_zone->data = cache;

    /* nginx creates the directory and hands it to the worker user */
    if (ngx_add_path(cf, &cache->path) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    pc = ngx_array_push(&mcf->caches);
    if (pc == NULL) {
        return NGX_CONF_ERROR;
    }

    *pc = cache;

    return NGX_CONF_OK;
}


/* deepseek_guard_cache <name> | off; */

char *
ngx_http_deepseek_guard_cache(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    ngx_str_t  *value;

    if (lcf->cache_name.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    lcf->cache_name = value[1];
    lcf->cfile = cf->conf_file->file.name.data;
    lcf->cline = cf->conf_file->line;

    return NGX_CONF_OK;
}


/*
 * deepseek_guard_cache_key string;  A key that names
 * $deepseek_guard_auth_sha256 keeps the answers of different credentials
 * apart; with any other, an answer to a request with credentials is
 * stored only when the upstream or the operator says it may be shared.
 */

char *
ngx_http_deepseek_guard_cache_key_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    char       *rv;
    ngx_str_t  *value;

    rv = ngx_http_set_complex_value_slot(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    value = cf->args->elts;

    lcf->key_has_auth = (ngx_strlcasestrn(value[1].data,
                               value[1].data + value[1].len,
                               (u_char *) "deepseek_guard_auth_sha256",
                               sizeof("deepseek_guard_auth_sha256") - 2)
                         != NULL);

    return NGX_CONF_OK;
}


/* deepseek_guard_cache_valid [code ...|any] <time>; */

char *
ngx_http_deepseek_guard_cache_valid(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    ngx_int_t                         n, valid;
    ngx_str_t                        *value;
    ngx_uint_t                        i, last;
    ngx_http_deepseek_guard_valid_t  *v;

    value = cf->args->elts;
    last = cf->args->nelts - 1;

    valid = ngx_parse_time(&value[last], 0);
    if (valid == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid time value \"%V\"", &value[last]);
        return NGX_CONF_ERROR;
    }

    if (lcf->cache_valid == NULL) {
        lcf->cache_valid = ngx_array_create(cf->pool, 4,
                                     sizeof(ngx_http_deepseek_guard_valid_t));
        if (lcf->cache_valid == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    if (last == 1) {
        /* like proxy_cache_valid: 200 only when no code is given */
        v = ngx_array_push(lcf->cache_valid);
        if (v == NULL) {
            return NGX_CONF_ERROR;
        }

        v->status = 200;
        v->valid = (ngx_msec_t) valid;
        return NGX_CONF_OK;
    }

    for (i = 1; i < last; i++) {

        if (ngx_strcmp(value[i].data, "any") == 0) {
            n = 0;

        } else {
            n = ngx_atoi(value[i].data, value[i].len);
            if (n < 100 || n > 599) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid status \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }
        }

        v = ngx_array_push(lcf->cache_valid);
        if (v == NULL) {
            return NGX_CONF_ERROR;
        }

        v->status = (ngx_uint_t) n;
        v->valid = (ngx_msec_t) valid;
    }

    return NGX_CONF_OK;
}
