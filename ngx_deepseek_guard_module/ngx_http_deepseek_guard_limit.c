/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The admission decision: classify, charge every zone all or nothing,
 * queue places and their order, the expected wait, and the rejection.
 * It never touches the cache.
 */


#include "ngx_http_deepseek_guard_module.h"

#include <xxhash.h>

static ngx_int_t ngx_http_deepseek_guard_try(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t *blocked,
    uint64_t *wait_ms, ngx_uint_t *rc_kind);
static void ngx_http_deepseek_guard_refund(ngx_http_deepseek_guard_ctx_t *ctx,
    ngx_uint_t n);
static uint32_t ngx_http_deepseek_guard_ahead(
    ngx_http_deepseek_guard_zone_t *z, ngx_uint_t cls,
    ngx_rbtree_node_t *node);
static uint64_t ngx_http_deepseek_guard_estimate(
    ngx_http_deepseek_guard_zone_t *z, ngx_uint_t cls,
    ngx_rbtree_node_t *node, ngx_uint_t kind, uint64_t wait_ms,
    uint32_t *pahead);
static ngx_int_t ngx_http_deepseek_guard_enqueue(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    ngx_uint_t rc_kind, uint64_t wait_ms, uint64_t *retry_ms);
static void ngx_http_deepseek_guard_dequeue(
    ngx_http_deepseek_guard_ctx_t *ctx);
static void ngx_http_deepseek_guard_nomem(ngx_http_request_t *r,
    ngx_http_deepseek_guard_zone_t *z);
static void ngx_http_deepseek_guard_record_wait(
    ngx_http_deepseek_guard_ctx_t *ctx);
static void ngx_http_deepseek_guard_count_admitted(
    ngx_http_deepseek_guard_ctx_t *ctx);
static ngx_int_t ngx_http_deepseek_guard_render(ngx_conf_t *cf,
    ngx_http_deepseek_guard_zone_t *z, ngx_http_deepseek_guard_class_t *c,
    ngx_uint_t nclasses);

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


/* deepseek_guard_classify_keys: a binary search by XXH3-64, then bytes */

static ngx_uint_t
ngx_http_deepseek_guard_class_of_key(ngx_http_deepseek_guard_loc_conf_t *lcf,
    ngx_str_t *v)
{
    uint64_t                              h;
    ngx_uint_t                            lo, hi, mid, n;
    ngx_http_deepseek_guard_class_key_t  *k;

    h = XXH3_64bits(v->data, v->len);

    k = lcf->class_keys->keys.elts;
    n = lcf->class_keys->keys.nelts;

    lo = 0;
    hi = n;

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;

        if (k[mid].hash < h) {
            lo = mid + 1;

        } else {
            hi = mid;
        }
    }

    for ( /* void */ ; lo < n && k[lo].hash == h; lo++) {
        if (k[lo].key.len == v->len
            && ngx_memcmp(k[lo].key.data, v->data, v->len) == 0)
        {
            return k[lo].index;
        }
    }

    return lcf->default_index;
}


static ngx_uint_t
ngx_http_deepseek_guard_classify(ngx_http_request_t *r,
    ngx_http_deepseek_guard_loc_conf_t *lcf)
{
    ngx_str_t                             v;
    ngx_uint_t                            i;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    if (lcf->classify == NULL) {
        return lcf->default_index;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_deepseek_guard_module);

    if (mcf->classes.nelts == 1) {
        /* one class: whatever the value says, the answer is the same */
        return lcf->default_index;
    }

    if (ngx_http_deepseek_guard_value(r, lcf->classify, lcf->classify_index,
                                      &v)
        != NGX_OK
        || v.len == 0)
    {
        return lcf->default_index;
    }

    if (lcf->class_keys) {
        return ngx_http_deepseek_guard_class_of_key(lcf, &v);
    }

    c = mcf->classes.elts;

    for (i = 0; i < mcf->classes.nelts; i++) {
        /* the name as declared first: a byte compare is cheaper */
        if (c[i].name.len == v.len
            && (ngx_memcmp(c[i].name.data, v.data, v.len) == 0
                || ngx_strncasecmp(c[i].name.data, v.data, v.len) == 0))
        {
            return i;
        }
    }

    return lcf->default_index;
}


/*
 * Admission of a request that holds no capacity yet: its class, its key in
 * every zone, then all zones charged or none.  NGX_OK: admitted (or let
 * through by dry run); NGX_AGAIN: it took a queue place, the caller parks
 * it; NGX_DECLINED: refused by holds[*blocked], *retry_ms says when to
 * retry; NGX_ERROR.
 */

ngx_int_t
ngx_http_deepseek_guard_admit(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t *blocked,
    uint64_t *retry_ms)
{
    uint64_t                             wait_ms;
    ngx_int_t                            rc;
    ngx_str_t                            key;
    ngx_uint_t                           i, kind, nomem;
    ngx_shm_zone_t                     **zones;
    ngx_rbtree_node_t                   *node;
    ngx_http_deepseek_guard_hold_t      *h;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    ctx->cls = ngx_http_deepseek_guard_classify(r, lcf);

    zones = lcf->zones->elts;
    ctx->nholds = lcf->zones->nelts;
    ctx->holds = ngx_pcalloc(r->pool, ctx->nholds
                                     * sizeof(ngx_http_deepseek_guard_hold_t));
    if (ctx->holds == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < ctx->nholds; i++) {
        h = &ctx->holds[i];
        h->zone = zones[i]->data;
        z = h->zone;

        if (z->key_const) {
            ngx_memcpy(h->digest, z->key_digest, 16);
            continue;
        }

        if (ngx_http_deepseek_guard_value(r, &z->key, z->key_index, &key)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        if (key.len == 0) {
            /* empty key: not limited by this zone */
            h->zone = NULL;
            continue;
        }

        ngx_http_deepseek_guard_digest(z, &key, h->digest);
    }

    rc = ngx_http_deepseek_guard_try(r, ctx, blocked, &wait_ms, &kind);

    if (rc == NGX_OK) {
        ctx->decided = 1;
        ctx->status = NGX_HTTP_DSG_ADMITTED;
        ctx->admitted_at = ngx_current_msec;
        ngx_http_deepseek_guard_count_admitted(ctx);

        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "deepseek_guard: class %ui admitted, %ui zones",
                       ctx->cls, ctx->nholds);
        return NGX_OK;
    }

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    z = ctx->holds[*blocked].zone;

    if (lcf->dry_run) {
        ctx->decided = 1;
        ctx->status = NGX_HTTP_DSG_DRY_RUN;
        (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls].dry_run, 1);

        ngx_log_error(lcf->log_level, r->connection->log, 0,
                      "deepseek_guard: dry run, would reject by zone \"%V\"",
                      &z->shm_zone->shm.name);
        return NGX_OK;
    }

    *retry_ms = wait_ms;

    if (rc == NGX_BUSY) {
        /* the zone could not track the key: no memory */
        *retry_ms = 1000;
        return NGX_DECLINED;
    }

    if (ctx->reject_tokens == 2) {
        /* a reservation larger than the token bucket: never admissible */
        return NGX_DECLINED;
    }

    if (kind == DSG_UNSPOKEN) {
        /*
         * a fleet key new to this node holds no slot until the agent's
         * next sync: the request waits for it, queue or not, two
         * intervals at most (docs/fleet.md)
         */
        ctx->slot_zone = *blocked;
        ctx->enqueued = ngx_current_msec;
        ctx->deadline = ngx_current_msec + 2 * z->fleet->interval + 50;
        ctx->status = NGX_HTTP_DSG_QUEUED;
        return NGX_AGAIN;
    }

    if (z->status == NGX_HTTP_TOO_MANY_REQUESTS) {
        if (kind == DSG_INFLIGHT) {
            /*
             * a quota on concurrency: when will one of its slots free; the
             * key is looked up again, it may have gone since try()
             */
            ngx_shmtx_lock(&z->shpool->mutex);
            node = (ngx_rbtree_node_t *) ngx_http_deepseek_guard_lookup(z,
                                          ctx->holds[*blocked].digest, &nomem);
            if (node) {
                *retry_ms = ngx_http_deepseek_guard_estimate(z, ctx->cls,
                                                     node, kind, 0, NULL);
            }
            ngx_shmtx_unlock(&z->shpool->mutex);
        }

        return NGX_DECLINED;
    }

    rc = ngx_http_deepseek_guard_enqueue(r, ctx, *blocked, kind, wait_ms,
                                         retry_ms);
    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    return rc;
}


/*
 * A queued request's turn, asked by the park timer: NGX_OK, admitted and
 * out of the queue; NGX_AGAIN, keep waiting; NGX_DECLINED, out of the
 * queue and refused (its wait ran out, or a quota zone refuses it),
 * *retry_ms says when to retry.
 */

ngx_int_t
ngx_http_deepseek_guard_recheck(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t *blocked,
    uint64_t *retry_ms)
{
    uint64_t                         wait_ms;
    ngx_int_t                        rc;
    ngx_uint_t                       kind, late;
    ngx_http_deepseek_guard_zone_t  *z;

    rc = ngx_http_deepseek_guard_try(r, ctx, blocked, &wait_ms, &kind);

    if (rc == NGX_OK) {
        ngx_http_deepseek_guard_dequeue(ctx);
        ctx->decided = 1;
        ctx->status = NGX_HTTP_DSG_ADMITTED;
        ctx->admitted_at = ngx_current_msec;
        ctx->wait_ms = ngx_current_msec - ctx->enqueued;
        ngx_http_deepseek_guard_record_wait(ctx);
        ngx_http_deepseek_guard_count_admitted(ctx);

        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "deepseek_guard: class %ui admitted after %M ms",
                       ctx->cls, ctx->wait_ms);
        return NGX_OK;
    }

    late = ((ngx_msec_int_t) (ctx->deadline - ngx_current_msec) <= 0);

    if (ctx->waiter == NULL && rc == NGX_DECLINED) {
        /*
         * waiting for a fleet key's first sync, without a queue place:
         * once the fleet has answered, refused as any other request
         */
        if (kind == DSG_UNSPOKEN && !late) {
            return NGX_AGAIN;
        }

        late = 0;
        rc = NGX_BUSY;
    }

    /* NGX_BUSY: a key of another zone could not be allocated: refused now */

    if (!late && rc != NGX_BUSY
        && !(rc == NGX_DECLINED
             && ctx->holds[*blocked].zone->status
                == NGX_HTTP_TOO_MANY_REQUESTS))
    {
        return NGX_AGAIN;
    }

    z = ctx->holds[ctx->slot_zone].zone;

    if (late) {
        (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls].timeouts, 1);
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

    *retry_ms = wait_ms ? wait_ms : 1000;

    return NGX_DECLINED;
}


/*
 * The request's end: leaves the queue, gives back its in-flight leases.
 * Returns 1 if capacity was freed.
 */

ngx_uint_t
ngx_http_deepseek_guard_release(ngx_http_deepseek_guard_ctx_t *ctx)
{
    uint64_t                          dur;
    ngx_uint_t                        i, freed;
    ngx_http_deepseek_guard_hold_t   *h;
    ngx_http_deepseek_guard_zone_t   *z;
    ngx_http_deepseek_guard_lease_t  *lease;

    if (ctx->waiter) {
        /* the client went away while queued: no capacity consumed */
        ngx_http_deepseek_guard_dequeue(ctx);
    }

    /* what the upstream used, read before any lock is taken */
    ngx_http_deepseek_guard_tokens_finish(ctx);

    freed = 0;

    for (i = 0; i < ctx->nholds; i++) {
        h = &ctx->holds[i];
        z = h->zone;

        if (z == NULL || !h->charged) {
            continue;
        }

        lease = h->lease;
        dur = (uint64_t) (ngx_current_msec - lease->start) * 1000;

        ngx_shmtx_lock(&z->shpool->mutex);

        /* not if the reaper took it for a dead worker of the same pid */

        if (lease->pid == ngx_pid) {
            if (lease->treserved) {
                ngx_http_deepseek_guard_tokens_settle(ctx, z, lease, 0);
            }

            if (z->limit.inflight) {
                dsg_ewma_update(&z->sh->ewma_us, dur ? dur : 1);
            }

            ngx_http_deepseek_guard_lease_free(z, lease);
        }

        ngx_shmtx_unlock(&z->shpool->mutex);

        h->charged = 0;
        h->lease = NULL;
        freed = 1;
    }

    return freed;
}


/*
 * Gives an admission back as if it had not happened (tokens and in-flight
 * slots): the request will wait for another one that fills its cache
 * entry instead.  The request may ask for admission again later.
 */

void
ngx_http_deepseek_guard_unadmit(ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_uint_t                       i;
    ngx_http_deepseek_guard_zone_t  *z;

    for (i = 0; ctx->status == NGX_HTTP_DSG_ADMITTED && i < ctx->nholds; i++)
    {
        z = ctx->holds[i].zone;

        if (z != NULL && ctx->holds[i].charged) {
            (void) ngx_atomic_fetch_add(&z->sh->counters[ctx->cls].admitted,
                                        (ngx_atomic_int_t) -1);
        }
    }

    ngx_http_deepseek_guard_refund(ctx, ctx->nholds);

    ctx->decided = 0;
    ctx->status = 0;
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
    ngx_uint_t                           i, nomem, ahead, sleep, fleet;
    dsg_waitq_t                         *q;
    ngx_http_deepseek_guard_node_t      *node;
    ngx_http_deepseek_guard_hold_t      *h;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_lease_t     *lease;

    now = ngx_current_msec;

    *wait_ms = 0;
    *kind = DSG_OK;
    ctx->reject_tokens = 0;

    if (ctx->waiter) {
        /*
         * only the head of its key's queue may go: any other waiter goes
         * to sleep until it is the head (O(1), whatever the depth)
         */

        z = ctx->holds[ctx->slot_zone].zone;
        sleep = 0;

        ngx_shmtx_lock(&z->shpool->mutex);

        q = ((ngx_http_deepseek_guard_node_t *) ctx->waiter->key)->waiters;

        if (dsg_queue_head(q) != ctx->waiter) {
            (void) dsg_queue_sleep(q, ctx->waiter);
            sleep = (ctx->waiter->state == DSG_WAITER_DORMANT) ? 2 : 1;
        }

        ngx_shmtx_unlock(&z->shpool->mutex);

        if (sleep) {
            if (sleep == 2) {
                ngx_http_deepseek_guard_park_sleep(&ctx->park);
            }

            *blocked = ctx->slot_zone;
            *kind = DSG_INFLIGHT;
            return NGX_DECLINED;
        }
    }

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

        node = (ngx_http_deepseek_guard_node_t *) h->node;

        /*
         * a fleet zone admits against the node's fleet share, or, while
         * Redis cannot be reached, against its static share
         */

        fleet = (z->fleet && ngx_http_deepseek_guard_fleet_up(z->fleet));

        if (fleet) {
            rc = dsg_fleet_check(&z->limit,
                                 ngx_http_deepseek_guard_fleet_key(node),
                                 &node->state, ctx->cls, ctx->waiter == NULL,
                                 now, z->fleet->interval / z->fleet->nodes,
                                 wait_ms);

        } else {
            if (z->fleet && ctx->waiter == NULL) {
                dsg_fleet_seen(&z->limit,
                               ngx_http_deepseek_guard_fleet_key(node),
                               ctx->cls, now);
            }

            rc = dsg_limit_check(z->fleet ? &z->fallback : &z->limit,
                                 &node->state, ctx->cls, now, wait_ms);
        }

        if (rc == DSG_OK && z->status != NGX_HTTP_TOO_MANY_REQUESTS
            && ctx->waiter == NULL)
        {
            /* a newcomer never overtakes waiters of its class or above */
            ahead = ngx_http_deepseek_guard_ahead(z, ctx->cls, h->node);
            if (ahead) {
                rc = DSG_INFLIGHT;
            }
        }

        if (rc == DSG_OK && z->tokens) {
            /* the token budget: the request's reservation, all or nothing */
            h->treserve = ngx_http_deepseek_guard_tokens_reserve(ctx, z);
            rc = dsg_tokens_check(&z->tconf,
                                  ngx_http_deepseek_guard_tokens_state(node),
                                  ctx->cls, h->treserve, now, wait_ms);

            if (rc == DSG_TOOBIG) {
                ctx->reject_tokens = 2;
                *wait_ms = z->tokens_period;

            } else if (rc != DSG_OK) {
                ctx->reject_tokens = 1;
                rc = DSG_RATE;
            }
        }

        if (rc == DSG_OK) {
            /*
             * a lease takes a chunk of a key node's size: in a zone full
             * of keys, evicting one makes room for it
             */

            lease = ngx_http_deepseek_guard_lease_alloc(z,
                                 (ngx_http_deepseek_guard_node_t *) h->node,
                                 ctx->cls);
            if (lease == NULL) {
                ngx_shmtx_unlock(&z->shpool->mutex);
                goto nomem;
            }

            if (fleet) {
                dsg_fleet_charge(&z->limit,
                                 ngx_http_deepseek_guard_fleet_key(node),
                                 &node->state, ctx->cls,
                                 z->fleet->interval / z->fleet->nodes);
                lease->fleet = 1;

            } else {
                dsg_limit_charge(z->fleet ? &z->fallback : &z->limit,
                                 &node->state, ctx->cls);
            }

            if (z->tokens) {
                lease->trecord = dsg_tokens_record(&z->tconf,
                                                   (uint32_t) ctx->cls);
                lease->treserved = h->treserve;
                dsg_tokens_charge(&z->tconf,
                                  ngx_http_deepseek_guard_tokens_state(node),
                                  lease->trecord, h->treserve);
            }

            h->lease = lease;
            h->charged = 1;
        }

        if (rc != DSG_OK && ctx->waiter == NULL) {
            /* what enqueue() would estimate, while the lock is held */
            ctx->expected = ngx_http_deepseek_guard_estimate(z, ctx->cls,
                                                      h->node, rc, *wait_ms,
                                                      &ctx->ahead);
        }

        ngx_shmtx_unlock(&z->shpool->mutex);

        if (rc == DSG_OK && z->tokens) {
            (void) ngx_atomic_fetch_add(
                             &z->sh->counters[ctx->cls].tokens_reserved,
                             (ngx_atomic_int_t) h->treserve);
        }

        if (rc != DSG_OK) {
            *blocked = i;
            *kind = rc;
            ngx_http_deepseek_guard_refund(ctx, i);
            return NGX_DECLINED;
        }
    }

    return NGX_OK;

nomem:

    ngx_http_deepseek_guard_nomem(r, z);

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

        if (lease->treserved) {
            ngx_http_deepseek_guard_tokens_settle(ctx, z, lease, 1);
        }

        if (lease->fleet) {
            dsg_fleet_refund(&z->limit,
                             ngx_http_deepseek_guard_fleet_key(lease->node),
                             &lease->node->state, lease->cls);

        } else {
            dsg_limit_refund(z->fleet ? &z->fallback : &z->limit,
                             &lease->node->state, lease->cls);
        }
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


/*
 * Waiters ahead of a new class cls request for this key: the counts of
 * its queue's classes, O(classes).  Under the zone's mutex.
 */

static uint32_t
ngx_http_deepseek_guard_ahead(ngx_http_deepseek_guard_zone_t *z,
    ngx_uint_t cls, ngx_rbtree_node_t *node)
{
    dsg_waitq_t  *q;

    q = ((ngx_http_deepseek_guard_node_t *) node)->waiters;

    return q ? dsg_queue_ahead_of_new(q, (uint32_t) cls) : 0;
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
 * Takes a queue place in the blocking zone, unless the class never queues,
 * its places are all taken, or the expected wait already exceeds its
 * timeout.  The key is looked up again under the same lock that queues on
 * it: between try() and here another worker may have evicted it.  The
 * place pins the key (state.queued) until it is left.  NGX_AGAIN: parked;
 * NGX_DECLINED: reject now, *retry_ms says when to retry.
 */

static ngx_int_t
ngx_http_deepseek_guard_enqueue(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    ngx_uint_t kind, uint64_t wait_ms, uint64_t *retry_ms)
{
    uint32_t                              ahead;
    uint64_t                              expected;
    ngx_uint_t                            nomem;
    dsg_waitq_t                          *q;
    dsg_waiter_t                         *w;
    ngx_http_deepseek_guard_node_t       *n;
    ngx_http_deepseek_guard_hold_t       *h;
    ngx_http_deepseek_guard_zone_t       *z;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_deepseek_guard_module);
    c = &((ngx_http_deepseek_guard_class_t *) mcf->classes.elts)[ctx->cls];

    h = &ctx->holds[blocked];
    z = h->zone;
    w = NULL;
    ahead = 0;
    expected = 0;
    nomem = 0;

    if (c->queue == 0 || ctx->expected > c->queue_timeout) {
        /*
         * refused on the estimate try() made under its lock a moment ago:
         * no second lock and lookup to learn the same
         */
        ahead = ctx->ahead;
        expected = ctx->expected;
        goto declined;
    }

    ngx_shmtx_lock(&z->shpool->mutex);

    n = ngx_http_deepseek_guard_lookup(z, h->digest, &nomem);
    h->node = (ngx_rbtree_node_t *) n;

    if (n == NULL) {
        goto done;
    }

    expected = ngx_http_deepseek_guard_estimate(z, ctx->cls, h->node, kind,
                                                wait_ms, &ahead);

    if (c->queue == 0 || expected > c->queue_timeout
        || z->sh->counters[ctx->cls].depth >= c->queue)
    {
        goto done;
    }

    q = n->waiters;

    if (q == NULL) {
        q = ngx_slab_calloc_locked(z->shpool, sizeof(dsg_waitq_t));

        if (q == NULL && ngx_http_deepseek_guard_spare_drop(z)) {
            q = ngx_slab_calloc_locked(z->shpool, sizeof(dsg_waitq_t));
        }

        if (q == NULL) {
            nomem = 1;
            goto done;
        }

        n->waiters = q;
    }

    w = dsg_queue_push(&z->sh->pool, q, (uint32_t) ctx->cls,
                       (uint32_t) ++z->sh->ticket, (uint32_t) ngx_pid,
                       ngx_http_deepseek_guard_owner, n, ctx);

    if (w == NULL) {
        /* every place of the pool is taken (a reload changed the sizes) */
        if (q->total == 0) {
            ngx_slab_free_locked(z->shpool, q);
            n->waiters = NULL;
        }

        goto done;
    }

    n->state.queued++;
    z->sh->counters[ctx->cls].queued++;
    z->sh->counters[ctx->cls].depth++;

done:

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (nomem) {
        ngx_http_deepseek_guard_nomem(r, z);
        *retry_ms = 1000;
        return NGX_DECLINED;
    }

declined:

    *retry_ms = expected ? expected : 1000;

    if (w == NULL) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "deepseek_guard: zone \"%V\" class \"%V\" not queued: "
                      "%uD ahead, expected wait %uL ms",
                      &z->shm_zone->shm.name, &c->name, ahead, expected);
        return NGX_DECLINED;
    }

    ctx->waiter = w;
    ctx->slot_zone = blocked;
    ctx->enqueued = ngx_current_msec;
    ctx->deadline = ngx_current_msec + c->queue_timeout;
    ctx->status = NGX_HTTP_DSG_QUEUED;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "deepseek_guard: zone \"%V\" class %ui queued, "
                   "expected %uL ms", &z->shm_zone->shm.name, ctx->cls,
                   expected);

    return NGX_AGAIN;
}


/* leaves the queue: frees the place, unpins the key, rouses the next */

static void
ngx_http_deepseek_guard_dequeue(ngx_http_deepseek_guard_ctx_t *ctx)
{
    ngx_http_deepseek_guard_ctx_t   *mine;
    ngx_http_deepseek_guard_zone_t  *z;

    if (ctx->waiter == NULL) {
        return;
    }

    z = ctx->holds[ctx->slot_zone].zone;
    mine = NULL;

    ngx_shmtx_lock(&z->shpool->mutex);

    /* not if the reaper took it for a dead worker of the same pid */

    if (ctx->waiter->state != DSG_WAITER_FREE
        && ctx->waiter->owner == ngx_http_deepseek_guard_owner
        && ctx->waiter->data == ctx)
    {
        ngx_http_deepseek_guard_dequeue_locked(z, ctx->waiter, &mine);
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    ctx->waiter = NULL;

    if (mine) {
        ngx_http_deepseek_guard_park_rouse(&mine->park);
    }
}


/*
 * The park timer's pickup: the waiters of this worker that became the head
 * of their key's queue while asleep are roused.  O(waiters on the ready
 * lists), and nothing at all while no zone has one.
 */

void
ngx_http_deepseek_guard_pickup(ngx_cycle_t *cycle)
{
    uint32_t                              k, got;
    ngx_uint_t                            i;
    dsg_waiter_t                         *w[32];
    ngx_shm_zone_t                      **zones;
    ngx_http_deepseek_guard_ctx_t        *ctx[32];
    ngx_http_deepseek_guard_zone_t       *z;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_deepseek_guard_module);
    if (mcf == NULL) {
        return;
    }

    zones = mcf->zones.elts;

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        while (z->sh->pool.nready) {
            ngx_shmtx_lock(&z->shpool->mutex);

            got = dsg_queue_pickup(&z->sh->pool,
                                   ngx_http_deepseek_guard_owner, w, 32);

            for (k = 0; k < got; k++) {
                /* owners are 32-bit: the pid makes a mix-up impossible */
                ctx[k] = (w[k]->pid == (uint32_t) ngx_pid) ? w[k]->data : NULL;
            }

            ngx_shmtx_unlock(&z->shpool->mutex);

            for (k = 0; k < got; k++) {
                if (ctx[k]) {
                    ngx_http_deepseek_guard_park_rouse(&ctx[k]->park);
                }
            }

            if (got < 32) {
                break;
            }
        }
    }
}


/*
 * A key that could not be allocated: the request is refused at once, and
 * the zone says so at most once a second, with the count since the last
 * time, not once per request (a queued request would say it every tick).
 */

static void
ngx_http_deepseek_guard_nomem(ngx_http_request_t *r,
    ngx_http_deepseek_guard_zone_t *z)
{
    ngx_atomic_uint_t  n, told, sec, now;

    n = ngx_atomic_fetch_add(&z->sh->nomem, 1) + 1;
    now = (ngx_atomic_uint_t) ngx_time();
    sec = z->sh->nomem_sec;

    if (now <= sec || !ngx_atomic_cmp_set(&z->sh->nomem_sec, sec, now)) {
        return;
    }

    told = z->sh->nomem_told;
    z->sh->nomem_told = n;

    ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                  "deepseek_guard: could not allocate a key in zone \"%V\", "
                  "%uA time(s) since the last alert",
                  &z->shm_zone->shm.name, n - told);
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


/*
 * A refusal by holds[blocked]: counted in the zone and logged, whether a
 * stale entry or the rejection answers it
 */

void
ngx_http_deepseek_guard_refused(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    uint64_t retry_ms)
{
    ngx_uint_t                           status;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    z = ctx->holds[blocked].zone;
    status = (ctx->reject_tokens == 2) ? NGX_HTTP_TOO_MANY_REQUESTS
                                       : z->status;

    ctx->decided = 1;
    ctx->status = NGX_HTTP_DSG_REJECTED;
    ctx->reject_zone = z;

    if (retry_ms == 0) {
        retry_ms = 1;
    }

    ctx->retry_ms = retry_ms;

    if (ctx->reject_tokens) {
        (void) ngx_atomic_fetch_add(
                              &z->sh->counters[ctx->cls].tokens_rejected, 1);
    }

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
}


/*
 * Rejects with the blocking zone's status, Retry-After (delta-seconds, at
 * least 1), retry-after-ms, x-should-retry when the honest wait is beyond
 * what the OpenAI SDKs accept, optionally RateLimit headers, and a JSON
 * body in the OpenAI error shape.  Everything but the numbers was rendered
 * per zone at configuration time (ngx_http_deepseek_guard_render): here
 * the numbers go between the pieces, into one allocation.
 */

ngx_int_t
ngx_http_deepseek_guard_reject(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked)
{
    u_char                              *p, *body, *ms, *s, *v;
    size_t                               len, size, ms_len, s_len;
    uint32_t                             secs;
    ngx_str_t                           *head;
    ngx_uint_t                           status;
    uint64_t                             retry_ms;
    ngx_buf_t                           *b;
    ngx_int_t                            rc;
    ngx_chain_t                          out;
    ngx_http_deepseek_guard_zone_t      *z;
    ngx_http_deepseek_guard_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_deepseek_guard_module);

    z = ctx->holds[blocked].zone;
    retry_ms = ctx->retry_ms;
    secs = dsg_retry_after_s(retry_ms);

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    /* a token budget's refusal says so (type "tokens") */

    head = (ctx->reject_tokens == 2) ? &z->tbody_big
           : ctx->reject_tokens ? &z->tbody_head : &z->body_head;
    status = (ctx->reject_tokens == 2) ? NGX_HTTP_TOO_MANY_REQUESTS
                                       : z->status;

    /* the body, then the seconds, then the RateLimit value */

    size = head->len + NGX_INT64_LEN + z->body_tail.len + NGX_INT32_LEN;

    if (lcf->ratelimit_headers) {
        size += z->ratelimit.len + NGX_INT32_LEN;
    }

    body = ngx_pnalloc(r->pool, size);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ms = ngx_cpymem(body, head->data, head->len);
    p = ngx_http_deepseek_guard_uint(ms, retry_ms);
    ms_len = p - ms;

    if (ctx->reject_tokens) {
        p = ngx_cpymem(p, " ms\",\"type\":\"tokens\",\"code\":"
                       "\"rate_limit_exceeded\"}}\n",
                       sizeof(" ms\",\"type\":\"tokens\",\"code\":"
                              "\"rate_limit_exceeded\"}}\n") - 1);

    } else {
        p = ngx_cpymem(p, z->body_tail.data, z->body_tail.len);
    }

    len = p - body;

    s = p;
    p = ngx_http_deepseek_guard_uint(s, secs);
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

    if ((retry_ms > 60000 || ctx->reject_tokens == 2)
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

        if (z->rate == 0 && z->inflight == 0 && z->tokens == 0) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_zone \"%V\" has none of rate=, "
                          "tokens= and inflight= in %s:%ui",
                          &zones[i]->shm.name, z->file, z->line);
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

        if (z->tokens
            && dsg_tokens_conf_init(&z->tconf, z->tokens, z->tokens_period,
                                    z->tokens_burst, &z->limit)
               != DSG_OK)
        {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_zone \"%V\": invalid tokens= or "
                          "tokens_burst= in %s:%ui", &zones[i]->shm.name,
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

    if (z->tokens) {
        size = name->len + 2 * NGX_INT64_LEN + 256;

        p = ngx_pnalloc(cf->pool, size);
        if (p == NULL) {
            return NGX_ERROR;
        }

        last = p + size;
        z->tbody_head.data = p;
        p = ngx_slprintf(p, last, "{\"error\":{\"message\":\"Rate limit "
                         "reached for tokens (zone %V, %uL tokens per %uL "
                         "s), retry after ", name, z->tokens,
                         z->tokens_period / 1000);
        z->tbody_head.len = p - z->tbody_head.data;

        z->tbody_big.data = p;
        p = ngx_slprintf(p, last, "{\"error\":{\"message\":\"Request too "
                         "large for the token budget (zone %V): its "
                         "reservation exceeds the %uL tokens the bucket "
                         "holds; the bucket refills in ",
                         name, z->tokens_burst);
        z->tbody_big.len = p - z->tbody_big.data;
    }

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
