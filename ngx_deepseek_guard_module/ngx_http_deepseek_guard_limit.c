/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Admission control: zones in shared memory (rbtree + LRU of keys), the
 * access phase handler, the cross-worker priority queue, in-flight leases
 * and reject responses.
 *
 * Locking: every shared structure of a zone is guarded by the zone's slab
 * mutex only (nginx force-unlocks it when a worker dies).  Nothing logs,
 * allocates from the request pool or makes a system call while holding it.
 */


#include "ngx_http_deepseek_guard_module.h"
#include <ngx_md5.h>


#define NGX_HTTP_DSG_WAKE_MS      3
#define NGX_HTTP_DSG_REAP_MS      1000
#define NGX_HTTP_DSG_EVICT_TRIES  16


typedef struct {
    ngx_rbtree_node_t            node;       /* node.key: digest[0..7] */
    ngx_queue_t                  lru;
    u_char                       digest[6];  /* digest[8..13] */
    uint16_t                     holders;    /* leases on this key */
    dsg_limit_state_t            state;
} ngx_http_deepseek_guard_node_t;


/* one admitted request in one zone; survives its worker in shared memory */
typedef struct {
    ngx_queue_t                  queue;
    ngx_http_deepseek_guard_node_t  *node;
    ngx_pid_t                    pid;
    uint32_t                     cls;
    ngx_msec_t                   start;
} ngx_http_deepseek_guard_lease_t;


static ngx_int_t ngx_http_deepseek_guard_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_http_deepseek_guard_evict(ngx_http_deepseek_guard_zone_t *z,
    ngx_http_deepseek_guard_node_t *keep);
static ngx_http_deepseek_guard_node_t *ngx_http_deepseek_guard_lookup(
    ngx_http_deepseek_guard_zone_t *z, u_char *digest, ngx_uint_t *nomem);
static ngx_int_t ngx_http_deepseek_guard_try(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t *blocked,
    uint64_t *wait_ms, ngx_uint_t *rc_kind);
static void ngx_http_deepseek_guard_refund(ngx_http_deepseek_guard_ctx_t *ctx,
    ngx_uint_t n);
static ngx_int_t ngx_http_deepseek_guard_enqueue(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    ngx_uint_t rc_kind, uint64_t wait_ms, uint64_t *retry_ms);
static uint32_t ngx_http_deepseek_guard_ahead(
    ngx_http_deepseek_guard_zone_t *z, ngx_uint_t cls,
    ngx_rbtree_node_t *node);
static uint64_t ngx_http_deepseek_guard_estimate(
    ngx_http_deepseek_guard_zone_t *z, ngx_uint_t cls,
    ngx_rbtree_node_t *node, ngx_uint_t kind, uint64_t wait_ms,
    uint32_t *pahead);
static void ngx_http_deepseek_guard_dequeue(
    ngx_http_deepseek_guard_ctx_t *ctx);
static void ngx_http_deepseek_guard_wake_handler(ngx_event_t *ev);
static void ngx_http_deepseek_guard_reap_handler(ngx_event_t *ev);
static void ngx_http_deepseek_guard_schedule(ngx_msec_t delay);
static void ngx_http_deepseek_guard_cleanup(void *data);
static ngx_int_t ngx_http_deepseek_guard_reject(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    uint64_t retry_ms);
static void ngx_http_deepseek_guard_record_wait(
    ngx_http_deepseek_guard_ctx_t *ctx);
static void ngx_http_deepseek_guard_count_admitted(
    ngx_http_deepseek_guard_ctx_t *ctx);
static ngx_int_t ngx_http_deepseek_guard_render(ngx_conf_t *cf,
    ngx_http_deepseek_guard_zone_t *z, ngx_http_deepseek_guard_class_t *c,
    ngx_uint_t nclasses);


static ngx_queue_t   ngx_http_deepseek_guard_waiters;
static ngx_event_t   ngx_http_deepseek_guard_wake_ev;
static ngx_event_t   ngx_http_deepseek_guard_reap_ev;
static ngx_uint_t    ngx_http_deepseek_guard_nwaiters;
static ngx_array_t  *ngx_http_deepseek_guard_zones;

/* the names of a rejection's headers */
static ngx_str_t  ngx_http_deepseek_guard_retry_after =
    ngx_string("Retry-After");
static ngx_str_t  ngx_http_deepseek_guard_retry_after_ms =
    ngx_string("retry-after-ms");
static ngx_str_t  ngx_http_deepseek_guard_should_retry =
    ngx_string("x-should-retry");
static ngx_str_t  ngx_http_deepseek_guard_policy =
    ngx_string("RateLimit-Policy");
static ngx_str_t  ngx_http_deepseek_guard_ratelimit =
    ngx_string("RateLimit");

ngx_msec_t  ngx_http_deepseek_guard_wait_bounds[]
    = { 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 10000 };


ngx_http_deepseek_guard_ctx_t *
ngx_http_deepseek_guard_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t             *cln;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_deepseek_guard_module);
    if (ctx != NULL) {
        return ctx;
    }

    /*
     * an internal redirect wipes module contexts but keeps the pool:
     * find the context through its cleanup, so nothing is charged twice
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
    ctx->slot = -1;

    cln->handler = ngx_http_deepseek_guard_cleanup;

    ngx_http_set_ctx(r->main, ctx, ngx_http_deepseek_guard_module);

    return ctx;
}


static ngx_uint_t
ngx_http_deepseek_guard_classify(ngx_http_request_t *r,
    ngx_http_deepseek_guard_loc_conf_t *lcf)
{
    ngx_str_t                             v;
    ngx_uint_t                            i;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    if (lcf->classify == NULL
        || ngx_http_complex_value(r, lcf->classify, &v) != NGX_OK
        || v.len == 0)
    {
        return lcf->default_index;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_deepseek_guard_module);
    c = mcf->classes.elts;

    for (i = 0; i < mcf->classes.nelts; i++) {
        if (c[i].name.len == v.len
            && ngx_strncasecmp(c[i].name.data, v.data, v.len) == 0)
        {
            return i;
        }
    }

    return lcf->default_index;
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

ngx_int_t
ngx_http_deepseek_guard_decide(ngx_http_request_t *r)
{
    uint64_t                             wait_ms, retry_ms;
    ngx_int_t                            rc;
    ngx_str_t                            key;
    ngx_md5_t                            md5;
    ngx_uint_t                           i, blocked, kind;
    ngx_shm_zone_t                     **zones;
    ngx_http_deepseek_guard_ctx_t       *ctx;
    ngx_http_deepseek_guard_hold_t      *h;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    if ((lcf->zones == NULL || lcf->zones->nelts == 0)
        && !ngx_http_deepseek_guard_cache_active(r))
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

    /* the cache first: a fresh hit costs no admission capacity */

    rc = ngx_http_deepseek_guard_cache_access(r, ctx);

    if (rc == NGX_OK) {
        ctx->decided = 1;
        ctx->status = NGX_HTTP_DSG_CACHED;
        return NGX_DECLINED;
    }

    if (rc != NGX_DECLINED) {
        return rc;
    }

    if (lcf->zones == NULL || lcf->zones->nelts == 0) {
        ctx->decided = 1;
        return NGX_DECLINED;
    }

    ctx->cls = ngx_http_deepseek_guard_classify(r, lcf);

    zones = lcf->zones->elts;
    ctx->nholds = lcf->zones->nelts;
    ctx->holds = ngx_pcalloc(r->pool, ctx->nholds
                                     * sizeof(ngx_http_deepseek_guard_hold_t));
    if (ctx->holds == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    for (i = 0; i < ctx->nholds; i++) {
        h = &ctx->holds[i];
        h->zone = zones[i]->data;
        z = h->zone;

        if (ngx_http_complex_value(r, &z->key, &key) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (key.len == 0) {
            /* empty key: not limited by this zone */
            h->zone = NULL;
            continue;
        }

        ngx_md5_init(&md5);
        ngx_md5_update(&md5, key.data, key.len);
        ngx_md5_final(h->digest, &md5);
    }

    rc = ngx_http_deepseek_guard_try(r, ctx, &blocked, &wait_ms, &kind);

    if (rc == NGX_OK) {
        ctx->decided = 1;
        ctx->status = NGX_HTTP_DSG_ADMITTED;
        ctx->admitted_at = ngx_current_msec;
        ngx_http_deepseek_guard_count_admitted(ctx);

        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "deepseek_guard: class %ui admitted, %ui zones",
                       ctx->cls, ctx->nholds);
        return NGX_DECLINED;
    }

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    z = ctx->holds[blocked].zone;

    if (lcf->dry_run) {
        ctx->decided = 1;
        ctx->status = NGX_HTTP_DSG_DRY_RUN;
        (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls].dry_run, 1);

        ngx_log_error(lcf->log_level, r->connection->log, 0,
                      "deepseek_guard: dry run, would reject by zone \"%V\"",
                      &z->shm_zone->shm.name);
        return NGX_DECLINED;
    }

    retry_ms = wait_ms;

    if (rc == NGX_BUSY) {
        /* the zone could not track the key: no memory */
        retry_ms = 1000;
        goto reject;
    }

    if (z->status == NGX_HTTP_TOO_MANY_REQUESTS) {
        if (kind == DSG_INFLIGHT) {
            /* a quota on concurrency: when will one of its slots free */
            ngx_shmtx_lock(&z->shpool->mutex);
            retry_ms = ngx_http_deepseek_guard_estimate(z, ctx->cls,
                                          ctx->holds[blocked].node, kind, 0,
                                          NULL);
            ngx_shmtx_unlock(&z->shpool->mutex);
        }

    } else {
        rc = ngx_http_deepseek_guard_enqueue(r, ctx, blocked, kind, wait_ms,
                                             &retry_ms);
        if (rc == NGX_AGAIN) {
            return NGX_AGAIN;
        }

        if (rc == NGX_ERROR) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

reject:

    /* the response is ours: finalize it, do not let the phases go on */

    ngx_http_finalize_request(r,
                  ngx_http_deepseek_guard_reject(r, ctx, blocked, retry_ms));

    return NGX_DONE;
}


/*
 * Checks every zone, charging as it goes; if one refuses, the zones already
 * charged are refunded: all or nothing.  NGX_OK: admitted in every zone;
 * NGX_DECLINED: refused by holds[*blocked] (*kind is DSG_RATE or
 * DSG_INFLIGHT, *wait_ms the bucket's wait); NGX_BUSY: no shared memory for
 * a new key.
 */

static ngx_int_t
ngx_http_deepseek_guard_try(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t *blocked,
    uint64_t *wait_ms, ngx_uint_t *kind)
{
    int                                  rc;
    uint64_t                             now;
    ngx_uint_t                           i, nomem, ahead;
    ngx_http_deepseek_guard_hold_t      *h;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_lease_t     *lease;

    now = ngx_current_msec;

    *wait_ms = 0;
    *kind = DSG_OK;

    for (i = 0; i < ctx->nholds; i++) {
        h = &ctx->holds[i];
        z = h->zone;

        if (z == NULL || h->charged) {
            continue;
        }

        nomem = 0;
        lease = NULL;

        ngx_shmtx_lock(&z->shpool->mutex);

        /*
         * looked up again on every try: an uncharged, unpinned key may have
         * been evicted meanwhile
         */

        h->node = (ngx_rbtree_node_t *)
                  ngx_http_deepseek_guard_lookup(z, h->digest, &nomem);
        if (h->node == NULL) {
            ngx_shmtx_unlock(&z->shpool->mutex);
            goto nomem;
        }

        rc = dsg_limit_check(&z->limit,
                             &((ngx_http_deepseek_guard_node_t *) h->node)
                                 ->state,
                             ctx->cls, now, wait_ms);

        if (rc == DSG_OK && z->status != NGX_HTTP_TOO_MANY_REQUESTS
            && ctx->slot == -1)
        {
            /* a newcomer never overtakes waiters of its class or above */
            ahead = ngx_http_deepseek_guard_ahead(z, ctx->cls, h->node);
            if (ahead) {
                rc = DSG_INFLIGHT;
            }
        }

        if (rc == DSG_OK && ctx->slot >= 0 && i == ctx->slot_zone
            && dsg_queue_ahead(&z->layout, z->slots, ctx->slot) > 0)
        {
            rc = DSG_INFLIGHT;
        }

        if (rc == DSG_OK) {
            /*
             * a lease takes a chunk of a key node's size: in a zone full
             * of keys, evicting one makes room for it
             */

            lease = ngx_slab_alloc_locked(z->shpool,
                                     sizeof(ngx_http_deepseek_guard_node_t));
            if (lease == NULL) {
                ngx_http_deepseek_guard_evict(z,
                                 (ngx_http_deepseek_guard_node_t *) h->node);

                lease = ngx_slab_alloc_locked(z->shpool,
                                     sizeof(ngx_http_deepseek_guard_node_t));
                if (lease == NULL) {
                    ngx_shmtx_unlock(&z->shpool->mutex);
                    goto nomem;
                }
            }

            dsg_limit_charge(&z->limit,
                             &((ngx_http_deepseek_guard_node_t *) h->node)
                                 ->state,
                             ctx->cls);

            lease->node = (ngx_http_deepseek_guard_node_t *) h->node;
            lease->node->holders++;
            lease->pid = ngx_pid;
            lease->cls = ctx->cls;
            lease->start = ngx_current_msec;
            ngx_queue_insert_tail(&z->sh->leases, &lease->queue);

            h->lease = lease;
            h->charged = 1;
            z->sh->counters[ctx->cls].inflight++;
        }

        ngx_shmtx_unlock(&z->shpool->mutex);

        if (rc != DSG_OK) {
            *blocked = i;
            *kind = rc;
            ngx_http_deepseek_guard_refund(ctx, i);
            return NGX_DECLINED;
        }
    }

    return NGX_OK;

nomem:

    ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                  "deepseek_guard: could not allocate a key in zone \"%V\"",
                  &z->shm_zone->shm.name);

    *blocked = i;
    *kind = DSG_INFLIGHT;
    ngx_http_deepseek_guard_refund(ctx, i);

    return NGX_BUSY;
}


/* undoes the charges of holds[0 .. n - 1] */

static void
ngx_http_deepseek_guard_refund(ngx_http_deepseek_guard_ctx_t *ctx,
    ngx_uint_t n)
{
    ngx_uint_t                        i;
    ngx_http_deepseek_guard_hold_t   *h;
    ngx_http_deepseek_guard_zone_t   *z;
    ngx_http_deepseek_guard_lease_t  *lease;

    for (i = 0; i < n; i++) {
        h = &ctx->holds[i];
        z = h->zone;

        if (z == NULL || !h->charged) {
            continue;
        }

        lease = h->lease;

        ngx_shmtx_lock(&z->shpool->mutex);

        dsg_limit_refund(&z->limit, &lease->node->state, lease->cls);
        lease->node->holders--;
        ngx_queue_remove(&lease->queue);
        if (z->sh->counters[lease->cls].inflight) {
            z->sh->counters[lease->cls].inflight--;
        }
        ngx_slab_free_locked(z->shpool, lease);

        ngx_shmtx_unlock(&z->shpool->mutex);

        h->lease = NULL;
        h->charged = 0;
    }
}


static ngx_http_deepseek_guard_node_t *
ngx_http_deepseek_guard_lookup(ngx_http_deepseek_guard_zone_t *z,
    u_char *digest, ngx_uint_t *nomem)
{
    size_t                           size;
    ngx_rbtree_key_t                 hash;
    ngx_rbtree_node_t               *node, *sentinel;
    ngx_http_deepseek_guard_node_t  *n;

    ngx_memcpy(&hash, digest, sizeof(ngx_rbtree_key_t));

    node = z->sh->rbtree.root;
    sentinel = z->sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash < node->key) {
            node = node->left;
            continue;
        }

        if (hash > node->key) {
            node = node->right;
            continue;
        }

        n = (ngx_http_deepseek_guard_node_t *) node;

        if (ngx_memcmp(n->digest, digest + 8, 6) == 0) {
            ngx_queue_remove(&n->lru);
            ngx_queue_insert_head(&z->sh->lru, &n->lru);
            return n;
        }

        node = (ngx_memcmp(digest + 8, n->digest, 6) < 0)
               ? node->left : node->right;
    }

    size = sizeof(ngx_http_deepseek_guard_node_t);

    n = ngx_slab_alloc_locked(z->shpool, size);

    if (n == NULL) {
        ngx_http_deepseek_guard_evict(z, NULL);

        n = ngx_slab_alloc_locked(z->shpool, size);
        if (n == NULL) {
            *nomem = 1;
            return NULL;
        }
    }

    ngx_memzero(n, size);
    n->node.key = hash;
    ngx_memcpy(n->digest, digest + 8, 6);
    dsg_limit_state_init(&z->limit, &n->state, ngx_current_msec);

    ngx_rbtree_insert(&z->sh->rbtree, &n->node);
    ngx_queue_insert_head(&z->sh->lru, &n->lru);
    z->sh->nodes++;

    return n;
}


/*
 * Frees the least recently used idle key (nothing in flight, queued or
 * leased), except "keep": under the zone's mutex.  Leases are allocated
 * with the size of a key node, so the chunk freed here serves either.
 */

static void
ngx_http_deepseek_guard_evict(ngx_http_deepseek_guard_zone_t *z,
    ngx_http_deepseek_guard_node_t *keep)
{
    ngx_uint_t                       tries;
    ngx_queue_t                     *q, *prev;
    ngx_http_deepseek_guard_node_t  *n;

    tries = 0;
    q = ngx_queue_last(&z->sh->lru);

    while (q != ngx_queue_sentinel(&z->sh->lru)
           && tries++ < NGX_HTTP_DSG_EVICT_TRIES)
    {
        prev = ngx_queue_prev(q);
        n = ngx_queue_data(q, ngx_http_deepseek_guard_node_t, lru);

        if (n != keep && n->holders == 0
            && dsg_limit_idle(&z->limit, &n->state))
        {
            ngx_queue_remove(&n->lru);
            ngx_rbtree_delete(&z->sh->rbtree, &n->node);
            ngx_slab_free_locked(z->shpool, n);
            z->sh->nodes--;
            z->sh->evicted++;
            return;
        }

        q = prev;
    }
}


static void
ngx_http_deepseek_guard_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t               **p;
    ngx_http_deepseek_guard_node_t   *n, *t;

    for ( ;; ) {

        if (node->key < temp->key) {
            p = &temp->left;

        } else if (node->key > temp->key) {
            p = &temp->right;

        } else {
            n = (ngx_http_deepseek_guard_node_t *) node;
            t = (ngx_http_deepseek_guard_node_t *) temp;

            p = (ngx_memcmp(n->digest, t->digest, 6) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


/*
 * Waiters ahead of a new class cls request for this key.  The depth gauges
 * say at once when nobody of cls or above waits, the common case, so the
 * slot array is scanned only when someone does.  Under the zone's mutex.
 */

static uint32_t
ngx_http_deepseek_guard_ahead(ngx_http_deepseek_guard_zone_t *z,
    ngx_uint_t cls, ngx_rbtree_node_t *node)
{
    ngx_uint_t  c, waiting;

    waiting = 0;

    for (c = 0; c <= cls; c++) {
        waiting += z->sh->counters[c].depth;
    }

    if (waiting == 0) {
        return 0;
    }

    return dsg_queue_ahead_of_new(&z->layout, z->slots, (uint32_t) cls,
                                  (uint64_t) (uintptr_t) node);
}


/*
 * How long, in ms, until the waiters ahead of a class cls request for this
 * key and the request itself are served: the bucket's wait plus one token
 * interval per waiter ahead, or, for the in-flight cap, the mean in-flight
 * duration per round of the class's cap.  Under the zone's mutex.
 */

static uint64_t
ngx_http_deepseek_guard_estimate(ngx_http_deepseek_guard_zone_t *z,
    ngx_uint_t cls, ngx_rbtree_node_t *node, ngx_uint_t kind,
    uint64_t wait_ms, uint32_t *pahead)
{
    uint32_t  ahead, cap;
    uint64_t  per, ewma_ms;

    ahead = ngx_http_deepseek_guard_ahead(z, cls, node);
    if (pahead) {
        *pahead = ahead;
    }

    if (kind == DSG_RATE || z->limit.inflight == 0) {
        per = z->rate ? (z->period + z->rate - 1) / z->rate : 1000;
        return wait_ms + ahead * per;
    }

    cap = dsg_limit_inflight_cap(&z->limit, (uint32_t) cls);
    ewma_ms = (z->sh->ewma_us + 999) / 1000;

    return dsg_expected_wait_ms(ahead, ewma_ms ? ewma_ms : 1000, cap);
}


/*
 * Takes a waiter slot in the blocking zone, unless the class never queues,
 * its queue is full, or the expected wait already exceeds its timeout.
 * NGX_AGAIN: parked; NGX_DECLINED: reject now, *retry_ms says when to retry.
 */

static ngx_int_t
ngx_http_deepseek_guard_enqueue(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    ngx_uint_t kind, uint64_t wait_ms, uint64_t *retry_ms)
{
    int                                   slot;
    uint32_t                              ahead;
    uint64_t                              expected;
    ngx_uint_t                            i;
    ngx_http_deepseek_guard_hold_t       *h;
    ngx_http_deepseek_guard_zone_t       *z;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_deepseek_guard_module);
    c = &((ngx_http_deepseek_guard_class_t *) mcf->classes.elts)[ctx->cls];

    h = &ctx->holds[blocked];
    z = h->zone;
    slot = -1;

    ngx_shmtx_lock(&z->shpool->mutex);

    expected = ngx_http_deepseek_guard_estimate(z, ctx->cls, h->node, kind,
                                                wait_ms, &ahead);

    if (c->queue > 0 && expected <= c->queue_timeout) {
        slot = dsg_queue_take(&z->layout, z->slots, ctx->cls, ngx_pid,
                              ++z->sh->ticket,
                              ngx_current_msec + c->queue_timeout,
                              (uint64_t) (uintptr_t) h->node);
    }

    if (slot >= 0) {
        /* pin the keys of every zone while waiting: never evicted */
        for (i = 0; i < ctx->nholds; i++) {
            if (ctx->holds[i].zone == z && ctx->holds[i].node) {
                ((ngx_http_deepseek_guard_node_t *) ctx->holds[i].node)
                    ->state.queued++;
            }
        }

        z->sh->counters[ctx->cls].queued++;
        z->sh->counters[ctx->cls].depth++;
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    *retry_ms = expected ? expected : 1000;

    if (slot < 0) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "deepseek_guard: zone \"%V\" class \"%V\" not queued: "
                      "%uD ahead, expected wait %uL ms",
                      &z->shm_zone->shm.name, &c->name, ahead, expected);
        return NGX_DECLINED;
    }

    ctx->slot = slot;
    ctx->slot_zone = blocked;
    ctx->enqueued = ngx_current_msec;
    ctx->deadline = ngx_current_msec + c->queue_timeout;
    ctx->status = NGX_HTTP_DSG_QUEUED;

    ngx_queue_insert_tail(&ngx_http_deepseek_guard_waiters, &ctx->wait_link);
    ngx_http_deepseek_guard_nwaiters++;

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    ngx_http_deepseek_guard_schedule(NGX_HTTP_DSG_WAKE_MS);

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "deepseek_guard: zone \"%V\" class %ui queued in slot %d, "
                   "expected %uL ms", &z->shm_zone->shm.name, ctx->cls,
                   slot, expected);

    return NGX_AGAIN;
}


/* leaves the queue: frees the slot and unpins the keys */

static void
ngx_http_deepseek_guard_dequeue(ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_uint_t                       i;
    ngx_http_deepseek_guard_zone_t  *z;
    ngx_http_deepseek_guard_node_t  *n;

    if (ctx->slot < 0) {
        return;
    }

    z = ctx->holds[ctx->slot_zone].zone;

    ngx_shmtx_lock(&z->shpool->mutex);

    if (z->slots[ctx->slot].pid == (uint32_t) ngx_pid) {
        dsg_queue_free(z->slots, ctx->slot);
    }

    for (i = 0; i < ctx->nholds; i++) {
        n = (ngx_http_deepseek_guard_node_t *) ctx->holds[i].node;
        if (ctx->holds[i].zone == z && n && n->state.queued) {
            n->state.queued--;
        }
    }

    if (z->sh->counters[ctx->cls].depth) {
        z->sh->counters[ctx->cls].depth--;
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    ctx->slot = -1;
    ngx_queue_remove(&ctx->wait_link);
    ngx_http_deepseek_guard_nwaiters--;
}


static void
ngx_http_deepseek_guard_schedule(ngx_msec_t delay)
{
    ngx_event_t  *ev;

    ev = &ngx_http_deepseek_guard_wake_ev;

    if (ev->timer_set && ev->timer.key <= ngx_current_msec + delay) {
        return;
    }

    if (ev->timer_set) {
        ngx_del_timer(ev);
    }

    ngx_add_timer(ev, delay);
}


/*
 * The worker's one queue timer: admits its waiters that are first in line
 * and have capacity, rejects those whose deadline passed.
 */

static void
ngx_http_deepseek_guard_wake_handler(ngx_event_t *ev)
{
    uint64_t                        wait_ms;
    ngx_int_t                       rc;
    ngx_uint_t                      blocked, kind;
    ngx_queue_t                    *q, *next;
    ngx_connection_t               *c;
    ngx_http_request_t             *r;
    ngx_http_deepseek_guard_ctx_t  *ctx;
    ngx_http_deepseek_guard_zone_t *z;

    for (q = ngx_queue_head(&ngx_http_deepseek_guard_waiters);
         q != ngx_queue_sentinel(&ngx_http_deepseek_guard_waiters);
         q = next)
    {
        next = ngx_queue_next(q);
        ctx = ngx_queue_data(q, ngx_http_deepseek_guard_ctx_t, wait_link);
        r = ctx->request;
        c = r->connection;

        rc = ngx_http_deepseek_guard_try(r, ctx, &blocked, &wait_ms, &kind);

        if (rc == NGX_OK) {
            ngx_http_deepseek_guard_dequeue(ctx);
            ctx->decided = 1;
            ctx->admitted_at = ngx_current_msec;
            ctx->wait_ms = ngx_current_msec - ctx->enqueued;
            ngx_http_deepseek_guard_record_wait(ctx);
            ngx_http_deepseek_guard_count_admitted(ctx);

            ngx_log_debug2(NGX_LOG_DEBUG_HTTP, c->log, 0,
                           "deepseek_guard: class %ui admitted after %M ms",
                           ctx->cls, ctx->wait_ms);

            r->read_event_handler = ngx_http_block_reading;
            r->write_event_handler = ngx_http_core_run_phases;
            ngx_http_core_run_phases(r);
            ngx_http_run_posted_requests(c);
            continue;
        }

        if ((ngx_msec_int_t) (ctx->deadline - ngx_current_msec) <= 0
            || (rc == NGX_DECLINED
                && ctx->holds[blocked].zone->status
                   == NGX_HTTP_TOO_MANY_REQUESTS))
        {
            z = ctx->holds[ctx->slot_zone].zone;

            if ((ngx_msec_int_t) (ctx->deadline - ngx_current_msec) <= 0) {
                (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls]
                                            .timeouts, 1);
            }

            if (kind == DSG_INFLIGHT) {
                ngx_shmtx_lock(&z->shpool->mutex);
                wait_ms = ngx_http_deepseek_guard_estimate(z, ctx->cls,
                                       ctx->holds[ctx->slot_zone].node,
                                       kind, 0, NULL);
                ngx_shmtx_unlock(&z->shpool->mutex);
            }

            ngx_http_deepseek_guard_dequeue(ctx);
            ctx->decided = 1;
            ctx->wait_ms = ngx_current_msec - ctx->enqueued;
            ngx_http_deepseek_guard_record_wait(ctx);

            r->read_event_handler = ngx_http_block_reading;
            r->write_event_handler = ngx_http_request_empty_handler;
            ngx_http_finalize_request(r,
                ngx_http_deepseek_guard_reject(r, ctx, blocked,
                                               wait_ms ? wait_ms : 1000));
            ngx_http_run_posted_requests(c);
            continue;
        }
    }

    if (ngx_http_deepseek_guard_nwaiters) {
        ngx_http_deepseek_guard_schedule(NGX_HTTP_DSG_WAKE_MS);
    }
}


/*
 * The main request's pool cleanup: runs on every path that ends a request
 * (done, error, client abort, timeout; an internal redirect keeps the pool).
 */

static void
ngx_http_deepseek_guard_cleanup(void *data)
{
    ngx_http_deepseek_guard_ctx_t *ctx = data;

    uint64_t                          dur;
    ngx_uint_t                        i, wake;
    ngx_http_deepseek_guard_hold_t   *h;
    ngx_http_deepseek_guard_zone_t   *z;
    ngx_http_deepseek_guard_lease_t  *lease;

    if (ctx->slot >= 0) {
        /* the client went away while queued: no capacity consumed */
        ngx_http_deepseek_guard_dequeue(ctx);
    }

    wake = 0;

    for (i = 0; i < ctx->nholds; i++) {
        h = &ctx->holds[i];
        z = h->zone;

        if (z == NULL || !h->charged) {
            continue;
        }

        lease = h->lease;
        dur = (uint64_t) (ngx_current_msec - lease->start) * 1000;

        ngx_shmtx_lock(&z->shpool->mutex);

        if (lease->pid == ngx_pid) {
            dsg_limit_release(&z->limit, &lease->node->state, lease->cls);
            lease->node->holders--;
            if (z->sh->counters[lease->cls].inflight) {
                z->sh->counters[lease->cls].inflight--;
            }

            if (z->limit.inflight) {
                dsg_ewma_update(&z->sh->ewma_us, dur ? dur : 1);
            }

            ngx_queue_remove(&lease->queue);
            ngx_slab_free_locked(z->shpool, lease);
        }

        ngx_shmtx_unlock(&z->shpool->mutex);

        h->charged = 0;
        h->lease = NULL;
        wake = 1;
    }

    if (wake && ngx_http_deepseek_guard_nwaiters) {
        /* capacity freed here: let this worker's waiters try at once */
        ngx_http_deepseek_guard_schedule(0);
    }
}


/* frees the leases and waiter slots of workers that died (kill -9) */

static void
ngx_http_deepseek_guard_reap_handler(ngx_event_t *ev)
{
    ngx_pid_t                         pids[16], dead[16];
    ngx_uint_t                        i, j, k, npids, ndead;
    ngx_queue_t                      *q, *next;
    ngx_shm_zone_t                  **zones;
    ngx_http_deepseek_guard_zone_t   *z;
    ngx_http_deepseek_guard_lease_t  *lease;

    zones = ngx_http_deepseek_guard_zones->elts;

    for (k = 0; k < ngx_http_deepseek_guard_zones->nelts; k++) {
        z = zones[k]->data;
        npids = 0;

        ngx_shmtx_lock(&z->shpool->mutex);

        for (q = ngx_queue_head(&z->sh->leases);
             q != ngx_queue_sentinel(&z->sh->leases) && npids < 16;
             q = ngx_queue_next(q))
        {
            lease = ngx_queue_data(q, ngx_http_deepseek_guard_lease_t, queue);

            for (j = 0; j < npids; j++) {
                if (pids[j] == lease->pid) {
                    break;
                }
            }

            if (j == npids && lease->pid != ngx_pid) {
                pids[npids++] = lease->pid;
            }
        }

        for (i = 0; i < z->layout.total && npids < 16; i++) {
            if (z->slots[i].state == DSG_SLOT_FREE
                || z->slots[i].pid == (uint32_t) ngx_pid)
            {
                continue;
            }

            for (j = 0; j < npids; j++) {
                if (pids[j] == (ngx_pid_t) z->slots[i].pid) {
                    break;
                }
            }

            if (j == npids) {
                pids[npids++] = (ngx_pid_t) z->slots[i].pid;
            }
        }

        ngx_shmtx_unlock(&z->shpool->mutex);

        ndead = 0;

        for (j = 0; j < npids; j++) {
            if (kill(pids[j], 0) == -1 && ngx_errno == NGX_ESRCH) {
                dead[ndead++] = pids[j];
            }
        }

        if (ndead == 0) {
            continue;
        }

        ngx_shmtx_lock(&z->shpool->mutex);

        for (q = ngx_queue_head(&z->sh->leases);
             q != ngx_queue_sentinel(&z->sh->leases);
             q = next)
        {
            next = ngx_queue_next(q);
            lease = ngx_queue_data(q, ngx_http_deepseek_guard_lease_t, queue);

            for (j = 0; j < ndead; j++) {
                if (lease->pid == dead[j]) {
                    dsg_limit_release(&z->limit, &lease->node->state,
                                      lease->cls);
                    lease->node->holders--;
                    if (z->sh->counters[lease->cls].inflight) {
                        z->sh->counters[lease->cls].inflight--;
                    }
                    ngx_queue_remove(&lease->queue);
                    ngx_slab_free_locked(z->shpool, lease);
                    z->sh->reaped++;
                    break;
                }
            }
        }

        for (i = 0; i < z->layout.total; i++) {
            for (j = 0; j < ndead; j++) {
                if (z->slots[i].state != DSG_SLOT_FREE
                    && (ngx_pid_t) z->slots[i].pid == dead[j])
                {
                    if (z->sh->counters[z->slots[i].cls].depth) {
                        z->sh->counters[z->slots[i].cls].depth--;
                    }
                    ((ngx_http_deepseek_guard_node_t *) (uintptr_t)
                         z->slots[i].key)->state.queued--;
                    dsg_queue_free(z->slots, i);
                    z->sh->reaped++;
                }
            }
        }

        ngx_shmtx_unlock(&z->shpool->mutex);

        ngx_log_error(NGX_LOG_NOTICE, ev->log, 0,
                      "deepseek_guard: zone \"%V\": released the in-flight "
                      "slots and queue places of %ui dead worker(s)",
                      &z->shm_zone->shm.name, ndead);
    }

    ngx_add_timer(ev, NGX_HTTP_DSG_REAP_MS);
}


static void
ngx_http_deepseek_guard_record_wait(ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_uint_t                           b;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_counters_t  *cnt;

    z = ctx->holds[ctx->slot_zone].zone;
    cnt = &z->sh->counters[ctx->cls];

    for (b = 0; b < NGX_HTTP_DSG_WAIT_BUCKETS; b++) {
        if (ctx->wait_ms <= ngx_http_deepseek_guard_wait_bounds[b]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&cnt->wait_bucket[b], 1);
    (void) ngx_atomic_fetch_add(&cnt->wait_count, 1);
    (void) ngx_atomic_fetch_add(&cnt->wait_sum_ms, ctx->wait_ms);
}


/* the admitted counter of every zone the request holds (metrics) */

static void
ngx_http_deepseek_guard_count_admitted(ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_uint_t                       i;
    ngx_http_deepseek_guard_zone_t  *z;

    for (i = 0; i < ctx->nholds; i++) {
        z = ctx->holds[i].zone;

        if (z != NULL) {
            (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls].admitted,
                                        1);
        }
    }
}


static ngx_int_t
ngx_http_deepseek_guard_add_header(ngx_http_request_t *r, ngx_str_t *name,
    u_char *value, size_t len)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = *name;
    h->value.data = value;
    h->value.len = len;

    return NGX_OK;
}


/*
 * Rejects with the blocking zone's status, Retry-After (delta-seconds, at
 * least 1), retry-after-ms, x-should-retry when the honest wait is beyond
 * what the OpenAI SDKs accept, optionally RateLimit headers, and a JSON
 * body in the OpenAI error shape.  Everything but the numbers was rendered
 * per zone at configuration time (ngx_http_deepseek_guard_render): here
 * the numbers go between the pieces, into one allocation.
 */

static ngx_int_t
ngx_http_deepseek_guard_reject(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    uint64_t retry_ms)
{
    u_char                              *p, *body, *ms, *s, *v;
    size_t                               len, size, ms_len, s_len;
    uint32_t                             secs;
    ngx_buf_t                           *b;
    ngx_int_t                            rc;
    ngx_uint_t                           status;
    ngx_chain_t                          out;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    z = ctx->holds[blocked].zone;
    status = z->status;

    ctx->decided = 1;
    ctx->status = NGX_HTTP_DSG_REJECTED;
    ctx->reject_zone = z;

    if (retry_ms == 0) {
        retry_ms = 1;
    }

    secs = dsg_retry_after_s(retry_ms);
    ctx->retry_ms = retry_ms;

    if (status == NGX_HTTP_TOO_MANY_REQUESTS) {
        (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls].rejected_429,
                                    1);
    } else if (status == NGX_HTTP_SERVICE_UNAVAILABLE) {
        (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls].rejected_503,
                                    1);
    } else {
        (void) ngx_atomic_fetch_add(
                                 &z->sh->counters[ctx->cls].rejected_other, 1);
    }

    /*
     * "deepseek_guard: zone "..." class "..." rejected with ..., retry
     * after ... ms": all but the ms is reject_log
     */

    ngx_log_error(lcf->log_level, r->connection->log, 0, "%V%uL ms",
                  &z->reject_log[ctx->cls], retry_ms);

    if (r->header_sent) {
        return NGX_ERROR;
    }

    /* the stale cache may answer instead */
    rc = ngx_http_deepseek_guard_cache_overload(r);
    if (rc != NGX_DECLINED) {
        ctx->status = NGX_HTTP_DSG_STALE;
        return rc;
    }

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    /* the body, then the seconds, then the RateLimit value */

    size = z->body_head.len + NGX_INT64_LEN + z->body_tail.len
           + NGX_INT32_LEN;

    if (lcf->ratelimit_headers) {
        size += z->ratelimit.len + NGX_INT32_LEN;
    }

    body = ngx_pnalloc(r->pool, size);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ms = ngx_cpymem(body, z->body_head.data, z->body_head.len);
    p = ngx_sprintf(ms, "%uL", retry_ms);
    ms_len = p - ms;
    p = ngx_cpymem(p, z->body_tail.data, z->body_tail.len);

    len = p - body;

    s = p;
    p = ngx_sprintf(s, "%uD", secs);
    s_len = p - s;

    if (ngx_http_deepseek_guard_add_header(r,
                                           &ngx_http_deepseek_guard_retry_after,
                                           s, s_len)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* retry-after-ms: the digits already in the body */

    if (ngx_http_deepseek_guard_add_header(r,
                                        &ngx_http_deepseek_guard_retry_after_ms,
                                        ms, ms_len)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (retry_ms > 60000
        && ngx_http_deepseek_guard_add_header(r,
                                          &ngx_http_deepseek_guard_should_retry,
                                          (u_char *) "false", 5)
           != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (lcf->ratelimit_headers) {
        if (ngx_http_deepseek_guard_add_header(r,
                                               &ngx_http_deepseek_guard_policy,
                                               z->policy.data, z->policy.len)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        v = p;
        p = ngx_cpymem(p, z->ratelimit.data, z->ratelimit.len);
        p = ngx_cpymem(p, s, s_len);

        if (ngx_http_deepseek_guard_add_header(r,
                                            &ngx_http_deepseek_guard_ratelimit,
                                            v, p - v)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = len;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->pos = body;
    b->last = body + len;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_http_deepseek_guard_limit_init_process(ngx_cycle_t *cycle)
{
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    ngx_queue_init(&ngx_http_deepseek_guard_waiters);
    ngx_http_deepseek_guard_nwaiters = 0;

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_deepseek_guard_module);
    if (mcf == NULL || mcf->zones.nelts == 0) {
        return NGX_OK;
    }

    ngx_http_deepseek_guard_zones = &mcf->zones;

    ngx_http_deepseek_guard_wake_ev.handler =
                                        ngx_http_deepseek_guard_wake_handler;
    ngx_http_deepseek_guard_wake_ev.log = cycle->log;
    ngx_http_deepseek_guard_wake_ev.data = &ngx_http_deepseek_guard_wake_ev;

    /*
     * not cancelable: a worker shutting down gracefully (reload) exits as
     * soon as only cancelable timers are left, and a parked request has no
     * timer of its own; the worker must stay until its waiters are
     * admitted or time out.  The timer is armed only while there are
     * waiters, so an idle worker still exits at once.
     */

    ngx_http_deepseek_guard_wake_ev.cancelable = 0;

    ngx_http_deepseek_guard_reap_ev.handler =
                                        ngx_http_deepseek_guard_reap_handler;
    ngx_http_deepseek_guard_reap_ev.log = cycle->log;
    ngx_http_deepseek_guard_reap_ev.data = &ngx_http_deepseek_guard_reap_ev;
    ngx_http_deepseek_guard_reap_ev.cancelable = 1;

    ngx_add_timer(&ngx_http_deepseek_guard_reap_ev, NGX_HTTP_DSG_REAP_MS);

    return NGX_OK;
}


ngx_int_t
ngx_http_deepseek_guard_limit_init_main(ngx_conf_t *cf,
    ngx_http_deepseek_guard_main_conf_t *mcf)
{
    int                               rc;
    uint32_t                          reserve[DSG_MAX_CLASSES];
    uint32_t                          qlen[DSG_MAX_CLASSES];
    ngx_uint_t                        i, k;
    ngx_shm_zone_t                  **zones;
    ngx_http_deepseek_guard_zone_t   *z;
    ngx_http_deepseek_guard_class_t  *c;

    c = mcf->classes.elts;

    for (k = 0; k < mcf->classes.nelts; k++) {
        reserve[k] = c[k].reserve;
        qlen[k] = c[k].queue;
    }

    zones = mcf->zones.elts;

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        if (z->rate == 0 && z->inflight == 0) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_zone \"%V\" has neither rate= nor "
                          "inflight= in %s:%ui", &zones[i]->shm.name,
                          z->file, z->line);
            return NGX_ERROR;
        }

        rc = dsg_limit_conf_init(&z->limit, z->rate, z->period, z->burst,
                                 z->inflight, reserve,
                                 (uint32_t) mcf->classes.nelts);

        switch (rc) {

        case DSG_OK:
            break;

        case DSG_ERESERVE:
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_class: reserved shares of all "
                          "classes add up to 100%% or more");
            return NGX_ERROR;

        case DSG_ETIERS:
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_class: at most %d distinct "
                          "reserved tiers are supported", DSG_MAX_TIERS);
            return NGX_ERROR;

        case DSG_ECAP:
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_zone \"%V\": inflight=%uD is too "
                          "small for the reserved shares: a class would get "
                          "no slot in %s:%ui", &zones[i]->shm.name,
                          z->inflight, z->file, z->line);
            return NGX_ERROR;

        default:
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_zone \"%V\": invalid rate, burst "
                          "or inflight in %s:%ui", &zones[i]->shm.name,
                          z->file, z->line);
            return NGX_ERROR;
        }

        if (dsg_queue_layout_init(&z->layout, qlen,
                                  (uint32_t) mcf->classes.nelts)
            != 0)
        {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_class: invalid queue sizes");
            return NGX_ERROR;
        }

        if (ngx_http_deepseek_guard_render(cf, z, c, mcf->classes.nelts)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * The constant parts of a zone's rejections, as the reject handler sends
 * and logs them: the JSON body before and after the wait in ms, the
 * RateLimit-Policy value, the RateLimit value before the seconds, and, by
 * class, the warning before the wait in ms.
 */

static ngx_int_t
ngx_http_deepseek_guard_render(ngx_conf_t *cf,
    ngx_http_deepseek_guard_zone_t *z, ngx_http_deepseek_guard_class_t *c,
    ngx_uint_t nclasses)
{
    u_char      *p, *last;
    size_t       size;
    ngx_str_t   *name;
    ngx_uint_t   k;

    name = &z->shm_zone->shm.name;

    /* room for the names and numbers, and 128 for the texts around them */

    size = name->len + 128;

    p = ngx_pnalloc(cf->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    last = p + size;
    z->body_head.data = p;

    if (z->status == NGX_HTTP_TOO_MANY_REQUESTS) {
        p = ngx_slprintf(p, last, "{\"error\":{\"message\":\"Rate limit "
                         "reached (zone %V), retry after ", name);
        ngx_str_set(&z->body_tail, " ms\",\"type\":\"requests\",\"code\":"
                    "\"rate_limit_exceeded\"}}\n");

    } else {
        p = ngx_slprintf(p, last, "{\"error\":{\"message\":\"Server is "
                         "overloaded (zone %V), retry after ", name);
        ngx_str_set(&z->body_tail, " ms\",\"type\":\"server_error\","
                    "\"code\":\"server_overloaded\"}}\n");
    }

    z->body_head.len = p - z->body_head.data;

    /* RateLimit-Policy, then RateLimit */

    size = 2 * name->len + 2 * NGX_INT64_LEN + 128;

    p = ngx_pnalloc(cf->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    last = p + size;
    z->policy.data = p;
    p = ngx_slprintf(p, last, "\"%V\";q=%uL;w=%uL", name,
                     z->rate ? z->rate + z->burst : (uint64_t) z->inflight,
                     z->rate ? z->period / 1000 : 1);
    z->policy.len = p - z->policy.data;

    z->ratelimit.data = p;
    p = ngx_slprintf(p, last, "\"%V\";r=0;t=", name);
    z->ratelimit.len = p - z->ratelimit.data;

    for (k = 0; k < nclasses; k++) {
        size = name->len + c[k].name.len + NGX_INT_T_LEN + 128;

        p = ngx_pnalloc(cf->pool, size);
        if (p == NULL) {
            return NGX_ERROR;
        }

        last = p + size;
        z->reject_log[k].data = p;
        p = ngx_slprintf(p, last, "deepseek_guard: zone \"%V\" class \"%V\" "
                         "rejected with %ui, retry after ", name, &c[k].name,
                         z->status);
        z->reject_log[k].len = p - z->reject_log[k].data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_deepseek_guard_zone_t  *oz = data;

    size_t                           len;
    ngx_http_deepseek_guard_zone_t  *z;

    z = shm_zone->data;

    if (oz) {
        if (z->key.value.len != oz->key.value.len
            || ngx_strncmp(z->key.value.data, oz->key.value.data,
                           z->key.value.len)
               != 0)
        {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "deepseek_guard_zone \"%V\" uses the \"%V\" key "
                          "while previously it used the \"%V\" key",
                          &shm_zone->shm.name, &z->key.value,
                          &oz->key.value);
            return NGX_ERROR;
        }

        z->sh = oz->sh;
        z->shpool = oz->shpool;

        goto slots;
    }

    z->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        z->sh = z->shpool->data;
        goto slots;
    }

    z->sh = ngx_slab_calloc(z->shpool, sizeof(ngx_http_deepseek_guard_shctx_t));
    if (z->sh == NULL) {
        return NGX_ERROR;
    }

    z->shpool->data = z->sh;

    ngx_rbtree_init(&z->sh->rbtree, &z->sh->sentinel,
                    ngx_http_deepseek_guard_rbtree_insert_value);
    ngx_queue_init(&z->sh->lru);
    ngx_queue_init(&z->sh->leases);

    len = sizeof(" in deepseek_guard_zone \"\"") + shm_zone->shm.name.len;

    z->shpool->log_ctx = ngx_slab_alloc(z->shpool, len);
    if (z->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(z->shpool->log_ctx, " in deepseek_guard_zone \"%V\"%Z",
                &shm_zone->shm.name);

    z->shpool->log_nomem = 0;

slots:

    /*
     * the waiter slots: kept across a reload when the queue layout did not
     * change; otherwise a new array (the old one stays allocated for the
     * old workers still finishing their requests)
     */

    ngx_shmtx_lock(&z->shpool->mutex);

    if (z->sh->slots == NULL || z->sh->nslots != z->layout.total) {
        z->sh->slots = ngx_slab_calloc_locked(z->shpool,
                                   (z->layout.total + 1) * sizeof(dsg_slot_t));
        z->sh->nslots = z->layout.total;
    }

    z->slots = z->sh->slots;

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (z->slots == NULL) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "deepseek_guard_zone \"%V\" is too small for its "
                      "queue slots", &shm_zone->shm.name);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * deepseek_guard_zone <name>:<size> key=<value> [rate=<N>r/s|r/m]
 *     [burst=<N>] [inflight=<N>] [status=<code>];
 */

char *
ngx_http_deepseek_guard_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    u_char                               *p;
    ssize_t                               size;
    ngx_int_t                             n;
    ngx_str_t                            *value, name, s;
    ngx_uint_t                            i;
    ngx_shm_zone_t                       *shm_zone, **pz;
    ngx_http_deepseek_guard_zone_t       *z;
    ngx_http_deepseek_guard_main_conf_t  *mcf;
    ngx_http_compile_complex_value_t      ccv;

    value = cf->args->elts;

    z = ngx_pcalloc(cf->pool, sizeof(ngx_http_deepseek_guard_zone_t));
    if (z == NULL) {
        return NGX_CONF_ERROR;
    }

    z->status = NGX_HTTP_SERVICE_UNAVAILABLE;
    z->period = 1000;
    z->file = cf->conf_file->file.name.data;
    z->line = cf->conf_file->line;

    name.len = 0;
    size = 0;

    for (i = 1; i < cf->args->nelts; i++) {

        if (i == 1) {
            p = (u_char *) ngx_strchr(value[i].data, ':');
            if (p == NULL || p == value[i].data) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone \"%V\", expected "
                                   "<name>:<size>", &value[i]);
                return NGX_CONF_ERROR;
            }

            name.data = value[i].data;
            name.len = p - value[i].data;

            if (ngx_http_deepseek_guard_check_name(cf, &name, "zone")
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            s.data = p + 1;
            s.len = value[i].data + value[i].len - s.data;

            size = ngx_parse_size(&s);
            if (size == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            if (size < (ssize_t) (8 * ngx_pagesize)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone \"%V\" is too small", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "key=", 4) == 0) {
            s.data = value[i].data + 4;
            s.len = value[i].len - 4;

            ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));
            ccv.cf = cf;
            ccv.value = &s;
            ccv.complex_value = &z->key;

            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "rate=", 5) == 0) {
            s.data = value[i].data + 5;
            s.len = value[i].len - 5;

            if (s.len > 4
                && ngx_strncmp(s.data + s.len - 4, "r/s", 3) == 0)
            {
                /* "r/s" must be the suffix: handled below */
            }

            p = s.data + s.len;

            if (s.len > 3 && ngx_strncmp(p - 3, "r/s", 3) == 0) {
                z->period = 1000;
                s.len -= 3;

            } else if (s.len > 3 && ngx_strncmp(p - 3, "r/m", 3) == 0) {
                z->period = 60000;
                s.len -= 3;

            } else {
                s.len = 0;
            }

            n = s.len ? ngx_atoi(s.data, s.len) : NGX_ERROR;
            if (n <= 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid rate \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            z->rate = (uint64_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "burst=", 6) == 0) {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (n == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid burst value \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            z->burst = (uint64_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "inflight=", 9) == 0) {
            n = ngx_atoi(value[i].data + 9, value[i].len - 9);
            if (n <= 0 || n > DSG_MAX_INFLIGHT) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid inflight value \"%V\"",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            z->inflight = (uint32_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "status=", 7) == 0) {
            n = ngx_atoi(value[i].data + 7, value[i].len - 7);
            if (n < 400 || n > 599) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid status \"%V\", must be between "
                                   "400 and 599", &value[i]);
                return NGX_CONF_ERROR;
            }

            z->status = (ngx_uint_t) n;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (z->key.value.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"key\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    shm_zone = ngx_shared_memory_add(cf, &name, size,
                                     &ngx_http_deepseek_guard_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    z->shm_zone = shm_zone;
    shm_zone->init = ngx_http_deepseek_guard_init_zone;
    shm_zone->data = z;

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_deepseek_guard_module);

    pz = ngx_array_push(&mcf->zones);
    if (pz == NULL) {
        return NGX_CONF_ERROR;
    }

    *pz = shm_zone;

    return NGX_CONF_OK;
}


/* deepseek_guard <zone>; (several allowed, all are checked) */

char *
ngx_http_deepseek_guard(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    ngx_str_t        *value;
    ngx_uint_t        i;
    ngx_shm_zone_t   *shm_zone, **pz;

    value = cf->args->elts;

    shm_zone = ngx_shared_memory_add(cf, &value[1], 0,
                                     &ngx_http_deepseek_guard_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (lcf->zones == NULL) {
        lcf->zones = ngx_array_create(cf->pool, 2, sizeof(ngx_shm_zone_t *));
        if (lcf->zones == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    pz = lcf->zones->elts;

    for (i = 0; i < lcf->zones->nelts; i++) {
        if (pz[i] == shm_zone) {
            return "is duplicate";
        }
    }

    pz = ngx_array_push(lcf->zones);
    if (pz == NULL) {
        return NGX_CONF_ERROR;
    }

    *pz = shm_zone;

    lcf->zfile = cf->conf_file->file.name.data;
    lcf->zline = cf->conf_file->line;

    return NGX_CONF_OK;
}
