/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * A guard zone's shared state, the limit_req analogue: the zone directive
 * and init_zone, the keys' rbtree and LRU list, in-flight leases and the
 * release of what dead workers held.
 *
 * Locking: every shared structure of a zone is guarded by the zone's slab
 * mutex only (nginx force-unlocks it when a worker dies).  Nothing logs,
 * allocates from the request pool or makes a system call while holding it.
 */


#include "ngx_http_deepseek_guard_module.h"

#include <xxhash.h>

#define NGX_HTTP_DSG_EVICT_TRIES  16

/*
 * freed leases a zone keeps for the next admissions instead of giving
 * them back to the slab allocator; any allocation that fails takes them
 * back first (ngx_http_deepseek_guard_spare_drop)
 */
#define NGX_HTTP_DSG_SPARE        8


static void ngx_http_deepseek_guard_evict(ngx_http_deepseek_guard_zone_t *z,
    ngx_http_deepseek_guard_node_t *keep);


static ngx_int_t ngx_http_deepseek_guard_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);



/*
 * A key's 128-bit digest: XXH3-128 seeded per zone (by the zone's name, so
 * every node of a fleet agrees), in its canonical (big-endian) byte order.
 * The node keeps bytes 0..11 (rbtree key and tail); a fleet sends those 12
 * to Redis.
 */

void
ngx_http_deepseek_guard_digest(ngx_http_deepseek_guard_zone_t *z,
    ngx_str_t *key, u_char *digest)
{
    XXH128_hash_t  h;

    h = XXH3_128bits_withSeed(key->data, key->len, z->seed);
    XXH128_canonicalFromHash((XXH128_canonical_t *) digest, h);
}


/* a node's digest tail (bytes 8..11) is the digest's: one word compared */

static ngx_inline ngx_uint_t
ngx_http_deepseek_guard_tail_eq(ngx_http_deepseek_guard_node_t *n,
    u_char *digest)
{
    uint32_t  a, b;

    ngx_memcpy(&a, n->digest, 4);
    ngx_memcpy(&b, digest + 8, 4);

    return a == b;
}


/* the key's node, or NULL; no allocation, the LRU order is kept */

ngx_http_deepseek_guard_node_t *
ngx_http_deepseek_guard_find(ngx_http_deepseek_guard_zone_t *z,
    u_char *digest)
{
    ngx_rbtree_key_t                 hash;
    ngx_rbtree_node_t               *node, *sentinel;
    ngx_http_deepseek_guard_node_t  *n;

    ngx_memcpy(&hash, digest, sizeof(ngx_rbtree_key_t));

    node = z->sh->rbtree.root;
    sentinel = z->sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash != node->key) {
            node = (hash < node->key) ? node->left : node->right;
            continue;
        }

        n = (ngx_http_deepseek_guard_node_t *) node;

        if (ngx_http_deepseek_guard_tail_eq(n, digest)) {
            return n;
        }

        node = (ngx_memcmp(digest + 8, n->digest, 4) < 0)
               ? node->left : node->right;
    }

    return NULL;
}


ngx_http_deepseek_guard_node_t *
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

        if (ngx_http_deepseek_guard_tail_eq(n, digest)) {
            if (ngx_queue_head(&z->sh->lru) != &n->lru) {
                ngx_queue_remove(&n->lru);
                ngx_queue_insert_head(&z->sh->lru, &n->lru);
            }

            return n;
        }

        node = (ngx_memcmp(digest + 8, n->digest, 4) < 0)
               ? node->left : node->right;
    }

    /* a fleet key's share follows its node */
    size = sizeof(ngx_http_deepseek_guard_node_t)
           + (z->fleet_on ? sizeof(dsg_fleet_key_t) : 0)
           + (z->tokens ? sizeof(dsg_tokens_state_t) : 0);

    n = ngx_slab_alloc_locked(z->shpool, size);

    if (n == NULL && ngx_http_deepseek_guard_spare_drop(z)) {
        n = ngx_slab_alloc_locked(z->shpool, size);
    }

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
    ngx_memcpy(n->digest, digest + 8, 4);
    /* a fleet key's own buckets serve only its static share */
    dsg_limit_state_init(z->fleet_on ? &z->fallback : &z->limit, &n->state,
                         ngx_current_msec);

    if (z->tokens) {
        dsg_tokens_state_init(&z->tconf,
                              ngx_http_deepseek_guard_tokens_state(n),
                              ngx_current_msec);
    }

    ngx_rbtree_insert(&z->sh->rbtree, &n->node);
    ngx_queue_insert_head(&z->sh->lru, &n->lru);
    z->sh->nodes++;

    return n;
}


/*
 * Frees an idle key (nothing in flight, queued or leased), except "keep",
 * under the zone's mutex.  Among the least recently used ones it prefers
 * a key whose buckets have filled up again: evicting it loses nothing (a
 * new key starts full), while evicting one that spent its quota hands its
 * client a fresh one.  Only when none of them is full does the least
 * recently used idle key go, as limit_req's forced expiry does.  Leases are
 * allocated with the size of a key node, so the chunk freed here serves
 * either.
 */

static void
ngx_http_deepseek_guard_evict(ngx_http_deepseek_guard_zone_t *z,
    ngx_http_deepseek_guard_node_t *keep)
{
    ngx_uint_t                       tries;
    ngx_queue_t                     *q;
    ngx_http_deepseek_guard_node_t  *n, *idle;

    tries = 0;
    idle = NULL;

    for (q = ngx_queue_last(&z->sh->lru);
         q != ngx_queue_sentinel(&z->sh->lru)
         && tries++ < NGX_HTTP_DSG_EVICT_TRIES;
         q = ngx_queue_prev(q))
    {
        n = ngx_queue_data(q, ngx_http_deepseek_guard_node_t, lru);

        if (n == keep || n->holders != 0
            || !dsg_limit_idle(&z->limit, &n->state))
        {
            continue;
        }

        if (dsg_limit_full(&z->limit, &n->state, ngx_current_msec)
            && (z->tokens == 0
                || dsg_tokens_full(&z->tconf,
                                   ngx_http_deepseek_guard_tokens_state(n),
                                   ngx_current_msec)))
        {
            idle = n;
            break;
        }

        if (idle == NULL) {
            idle = n;
        }
    }

    if (idle == NULL) {
        return;
    }

    ngx_queue_remove(&idle->lru);
    ngx_rbtree_delete(&z->sh->rbtree, &idle->node);
    ngx_slab_free_locked(z->shpool, idle);
    z->sh->nodes--;
    z->sh->evicted++;
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

            p = (ngx_memcmp(n->digest, t->digest, 4) < 0)
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
 * A lease for an admitted request, under the zone's mutex.  It takes a
 * chunk of a key node's size: in a zone full of keys, evicting one makes
 * room for it.  NULL: no memory.
 */

ngx_http_deepseek_guard_lease_t *
ngx_http_deepseek_guard_lease_alloc(ngx_http_deepseek_guard_zone_t *z,
    ngx_http_deepseek_guard_node_t *node, ngx_uint_t cls)
{
    ngx_queue_t                      *q;
    ngx_http_deepseek_guard_lease_t  *lease;

    if (!ngx_queue_empty(&z->sh->spare)) {
        q = ngx_queue_head(&z->sh->spare);
        ngx_queue_remove(q);
        z->sh->nspare--;
        lease = ngx_queue_data(q, ngx_http_deepseek_guard_lease_t, queue);
        goto init;
    }

    lease = ngx_slab_alloc_locked(z->shpool,
                                  sizeof(ngx_http_deepseek_guard_node_t));
    if (lease == NULL) {
        ngx_http_deepseek_guard_evict(z, node);

        lease = ngx_slab_alloc_locked(z->shpool,
                                      sizeof(ngx_http_deepseek_guard_node_t));
        if (lease == NULL) {
            return NULL;
        }
    }

init:

    /* a chunk is not zeroed: it may have been a key node or a lease */
    lease->node = node;
    lease->pid = ngx_pid;
    lease->cls = (uint32_t) cls;
    lease->record = dsg_limit_record(&z->limit, (uint32_t) cls);
    lease->fleet = 0;
    lease->trecord = 0;
    lease->start = ngx_current_msec;
    lease->treserved = 0;
    ngx_queue_insert_tail(&z->sh->leases, &lease->queue);

    node->holders++;
    z->sh->counters[cls].inflight++;

    return lease;
}


/*
 * Frees a lease and gives back what it charged, under the zone's mutex: on
 * the request's own end, or for a worker that died holding it
 */

void
ngx_http_deepseek_guard_lease_free(ngx_http_deepseek_guard_zone_t *z,
    ngx_http_deepseek_guard_lease_t *lease)
{
    dsg_limit_release(&lease->node->state, lease->record);
    lease->node->holders--;

    if (z->sh->counters[lease->cls].inflight) {
        z->sh->counters[lease->cls].inflight--;
    }

    ngx_queue_remove(&lease->queue);

    if (z->sh->nspare < NGX_HTTP_DSG_SPARE) {
        ngx_queue_insert_head(&z->sh->spare, &lease->queue);
        z->sh->nspare++;
        return;
    }

    ngx_slab_free_locked(z->shpool, lease);
}


/*
 * Gives the kept leases back to the slab allocator, under the zone's
 * mutex, before an allocation is declared failed.  Returns how many.
 */

ngx_uint_t
ngx_http_deepseek_guard_spare_drop(ngx_http_deepseek_guard_zone_t *z)
{
    ngx_uint_t                        n;
    ngx_queue_t                      *q;
    ngx_http_deepseek_guard_lease_t  *lease;

    n = 0;

    while (!ngx_queue_empty(&z->sh->spare)) {
        q = ngx_queue_head(&z->sh->spare);
        ngx_queue_remove(q);
        lease = ngx_queue_data(q, ngx_http_deepseek_guard_lease_t, queue);
        ngx_slab_free_locked(z->shpool, lease);
        n++;
    }

    z->sh->nspare = 0;

    return n;
}


/*
 * Takes waiter w out of its key's queue, under the zone's mutex: admitted,
 * gone, or its worker dead.  The waiter that becomes the head is READY
 * for its owner's pickup; if it is this worker's and mine is not NULL, it
 * is made ACTIVE here and *mine says which request to rouse.
 */

void
ngx_http_deepseek_guard_dequeue_locked(ngx_http_deepseek_guard_zone_t *z,
    dsg_waiter_t *w, ngx_http_deepseek_guard_ctx_t **mine)
{
    dsg_waitq_t                     *q;
    dsg_waiter_t                    *next;
    ngx_http_deepseek_guard_node_t  *n;

    n = w->key;
    q = n->waiters;

    if (z->sh->counters[w->cls].depth) {
        z->sh->counters[w->cls].depth--;
    }

    if (n->state.queued) {
        n->state.queued--;
    }

    next = dsg_queue_remove(&z->sh->pool, q, w);

    if (next && mine && next->owner == ngx_http_deepseek_guard_owner
        && next->pid == (uint32_t) ngx_pid)
    {
        dsg_queue_activate(&z->sh->pool, next);
        *mine = next->data;
    }

    if (q->total == 0) {
        ngx_slab_free_locked(z->shpool, q);
        n->waiters = NULL;
    }
}


/* the reaper: the pids that hold leases or queue places in the zone */

void
ngx_http_deepseek_guard_zone_pids(ngx_http_deepseek_guard_zone_t *z,
    ngx_array_t *pids)
{
    ngx_uint_t                         i;
    ngx_queue_t                       *q;
    volatile dsg_waiter_t             *w;
    ngx_http_deepseek_guard_lease_t   *lease;
    ngx_http_deepseek_guard_places_t  *pl;

    ngx_shmtx_lock(&z->shpool->mutex);

    for (q = ngx_queue_head(&z->sh->leases);
         q != ngx_queue_sentinel(&z->sh->leases);
         q = ngx_queue_next(q))
    {
        lease = ngx_queue_data(q, ngx_http_deepseek_guard_lease_t, queue);
        (void) ngx_http_deepseek_guard_pid_add(pids, lease->pid);
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    /*
     * The queue places are read without the mutex: up to 65535 records
     * would hold it for a millisecond every second.  A pid read while its
     * record changes is at worst one that is checked for nothing (a live
     * worker) or seen a second later; the chunks are never freed, and
     * zone_reap() looks again under the mutex.
     */

    for (pl = z->sh->places; pl; pl = pl->next) {
        for (i = 0; i < pl->n; i++) {
            w = (volatile dsg_waiter_t *) &pl->waiters[i];

            if (w->state != DSG_WAITER_FREE) {
                (void) ngx_http_deepseek_guard_pid_add(pids,
                                                       (ngx_pid_t) w->pid);
            }
        }
    }
}


/* the reaper: frees the leases and queue places of dead pids */

void
ngx_http_deepseek_guard_zone_reap(ngx_http_deepseek_guard_zone_t *z,
    ngx_array_t *dead, ngx_log_t *log)
{
    uint64_t                           which;
    ngx_uint_t                         i, k, reaped, workers;
    ngx_queue_t                       *q, *next;
    dsg_waiter_t                      *w;
    ngx_http_deepseek_guard_lease_t   *lease;
    ngx_http_deepseek_guard_places_t  *pl;

    reaped = 0;
    which = 0;

    ngx_shmtx_lock(&z->shpool->mutex);

    for (q = ngx_queue_head(&z->sh->leases);
         q != ngx_queue_sentinel(&z->sh->leases);
         q = next)
    {
        next = ngx_queue_next(q);
        lease = ngx_queue_data(q, ngx_http_deepseek_guard_lease_t, queue);

        k = ngx_http_deepseek_guard_pid_in(dead, lease->pid);

        if (k) {
            ngx_http_deepseek_guard_lease_free(z, lease);
            which |= (uint64_t) 1 << ((k - 1) % 64);
            reaped++;
        }
    }

    for (pl = z->sh->places; pl; pl = pl->next) {
        for (i = 0; i < pl->n; i++) {
            w = &pl->waiters[i];

            if (w->state == DSG_WAITER_FREE) {
                continue;
            }

            k = ngx_http_deepseek_guard_pid_in(dead, (ngx_pid_t) w->pid);
            if (k == 0) {
                continue;
            }

            which |= (uint64_t) 1 << ((k - 1) % 64);

            /* the next head, if this worker's, is picked up next tick */
            ngx_http_deepseek_guard_dequeue_locked(z, w, NULL);
            reaped++;
        }
    }

    z->sh->reaped += reaped;

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (reaped == 0) {
        return;
    }

    for (workers = 0; which; which &= which - 1) {
        workers++;
    }

    ngx_log_error(NGX_LOG_NOTICE, log, 0,
                  "deepseek_guard: zone \"%V\": released the in-flight "
                  "slots and queue places of %ui dead worker(s)",
                  &z->shm_zone->shm.name, workers);
}


static ngx_int_t
ngx_http_deepseek_guard_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_deepseek_guard_zone_t  *oz = data;

    size_t                             len;
    ngx_int_t                          rc;
    ngx_uint_t                         n;
    ngx_http_deepseek_guard_zone_t    *z;
    ngx_http_deepseek_guard_places_t  *pl;

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

        if (z->fleet_on != oz->fleet_on) {
            /* a fleet key's node is larger: its keys cannot be kept */
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "deepseek_guard_zone \"%V\" is fleet=%s while "
                          "previously it was fleet=%s: give the zone "
                          "another name or size", &shm_zone->shm.name,
                          z->fleet_on ? "on" : "off",
                          oz->fleet_on ? "on" : "off");
            return NGX_ERROR;
        }

        if ((z->tokens == 0) != (oz->tokens == 0)) {
            /* a token budget's key node is larger: its keys cannot stay */
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "deepseek_guard_zone \"%V\" has %s tokens= while "
                          "previously it had %s: give the zone another "
                          "name or size", &shm_zone->shm.name,
                          z->tokens ? "a" : "no", oz->tokens ? "one" : "none");
            return NGX_ERROR;
        }

        z->sh = oz->sh;
        z->shpool = oz->shpool;

        goto places;
    }

    z->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        z->sh = z->shpool->data;
        goto places;
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
    ngx_queue_init(&z->sh->spare);

    len = sizeof(" in deepseek_guard_zone \"\"") + shm_zone->shm.name.len;

    z->shpool->log_ctx = ngx_slab_alloc(z->shpool, len);
    if (z->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(z->shpool->log_ctx, " in deepseek_guard_zone \"%V\"%Z",
                &shm_zone->shm.name);

    z->shpool->log_nomem = 0;

places:

    /*
     * The queue places: one pool per zone, shared by every generation of
     * workers.  A configuration with more places than the pool has adds a
     * chunk; a smaller one leaves the pool as it is (the class lengths
     * are counted against the depth gauges, by the configuration of the
     * worker that queues).  So waiters of old and new workers stay in one
     * order, the reaper sees them all, and reloads that go back and forth
     * between sizes do not take more memory than the largest one.
     */

    ngx_shmtx_lock(&z->shpool->mutex);

    rc = NGX_OK;

    /* a quota zone (429) never queues: no places */

    if (z->status != NGX_HTTP_TOO_MANY_REQUESTS
        && z->sh->pool.size < z->layout.total)
    {
        n = z->layout.total - z->sh->pool.size;

        /* the size of a key node: no slab page of its own for the header */
        pl = ngx_slab_alloc_locked(z->shpool,
                                   sizeof(ngx_http_deepseek_guard_node_t));
        if (pl) {
            pl->waiters = ngx_slab_alloc_locked(z->shpool,
                                                n * sizeof(dsg_waiter_t));
            if (pl->waiters == NULL) {
                ngx_slab_free_locked(z->shpool, pl);
                pl = NULL;
            }
        }

        if (pl == NULL) {
            rc = NGX_ERROR;

        } else {
            /* zeroed before it is linked: the reaper reads it unlocked */
            dsg_pool_add(&z->sh->pool, pl->waiters, (uint32_t) n);
            pl->n = n;
            pl->next = z->sh->places;
            ngx_memory_barrier();
            z->sh->places = pl;
        }
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (rc != NGX_OK) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "deepseek_guard_zone \"%V\" is too small for its "
                      "%uD queue places", &shm_zone->shm.name,
                      z->layout.total);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * deepseek_guard_zone <name>:<size> key=<value> [rate=<N>r/s|r/m]
 *     [burst=<N>] [inflight=<N>] [status=<code>] [fleet=on|off]
 *     [tokens=<N>/m|/s] [tokens_burst=<N>] [tokens_output=<N>];
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
    z->tokens_expect = NGX_HTTP_DSG_UNSET64;
    z->file = cf->conf_file->file.name.data;
    z->line = cf->conf_file->line;

    name.len = 0;
    size = 0;

    for (i = 1; i < cf->args->nelts; i++) {

        if (i == 1) {
            if (ngx_http_deepseek_guard_parse_zone(cf, &value[i], 0, "zone",
                                                   &name, &size)
                != NGX_CONF_OK)
            {
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

        if (ngx_strncmp(value[i].data, "tokens=", 7) == 0) {
            s.data = value[i].data + 7;
            s.len = value[i].len - 7;
            p = s.data + s.len;

            if (s.len > 2 && ngx_strncmp(p - 2, "/m", 2) == 0) {
                z->tokens_period = 60000;
                s.len -= 2;

            } else if (s.len > 2 && ngx_strncmp(p - 2, "/s", 2) == 0) {
                z->tokens_period = 1000;
                s.len -= 2;

            } else {
                s.len = 0;
            }

            n = s.len ? ngx_atoi(s.data, s.len) : NGX_ERROR;
            if (n <= 0 || (uint64_t) n > DSG_MAX_TOKENS) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid token budget \"%V\", expected "
                                   "tokens=<N>/m or tokens=<N>/s", &value[i]);
                return NGX_CONF_ERROR;
            }

            z->tokens = (uint64_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "tokens_burst=", 13) == 0) {
            n = ngx_atoi(value[i].data + 13, value[i].len - 13);
            if (n <= 0 || (uint64_t) n > DSG_MAX_TOKENS) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid tokens_burst value \"%V\"",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            z->tokens_burst = (uint64_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "tokens_output=", 14) == 0) {
            n = ngx_atoi(value[i].data + 14, value[i].len - 14);
            if (n < 0 || (uint64_t) n > DSG_MAX_TOKENS) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid tokens_output value \"%V\"",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            z->tokens_expect = (uint64_t) n;
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

        if (ngx_strcmp(value[i].data, "fleet=on") == 0) {
            z->fleet_on = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "fleet=off") == 0) {
            z->fleet_on = 0;
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

    if (z->tokens == 0
        && (z->tokens_burst || z->tokens_expect != NGX_HTTP_DSG_UNSET64))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "tokens_burst= and tokens_output= need tokens=");
        return NGX_CONF_ERROR;
    }

    if (z->tokens && z->fleet_on) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "tokens= is not supported in a fleet=on zone");
        return NGX_CONF_ERROR;
    }

    if (z->tokens) {
        if (z->tokens_burst == 0) {
            z->tokens_burst = z->tokens;
        }

        if (z->tokens_expect == NGX_HTTP_DSG_UNSET64) {
            z->tokens_expect = NGX_HTTP_DSG_TOKENS_OUTPUT;
        }
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

    z->seed = XXH3_64bits(name.data, name.len);

    z->key_index = ngx_http_deepseek_guard_lone_variable(cf, &z->key);

    if (z->key.lengths == NULL) {
        /* a constant key: its digest once, not on every request */
        z->key_const = 1;
        ngx_http_deepseek_guard_digest(z, &z->key.value, z->key_digest);
    }

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
