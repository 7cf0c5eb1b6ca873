/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include <stddef.h>
#include <string.h>

#include "dsg_queue.h"


static void dsg_ready_unlink(dsg_pool_t *p, dsg_waiter_t *w);


int
dsg_queue_layout_init(dsg_queue_layout_t *l, const uint32_t *qlen,
    uint32_t nclasses)
{
    uint32_t  k;
    uint64_t  total;

    if (l == NULL || nclasses == 0 || nclasses > DSG_MAX_CLASSES) {
        return DSG_EINVAL;
    }

    total = 0;

    if (qlen != NULL) {
        for (k = 0; k < nclasses; k++) {
            total += qlen[k];
        }
    }

    if (total > DSG_QUEUE_MAX_SLOTS) {
        return DSG_EINVAL;
    }

    memset(l, 0, sizeof(dsg_queue_layout_t));

    l->nclasses = nclasses;
    l->total = (uint32_t) total;

    for (k = 0; k < nclasses; k++) {
        l->len[k] = (qlen != NULL) ? qlen[k] : 0;
    }

    return DSG_OK;
}


void
dsg_pool_add(dsg_pool_t *p, dsg_waiter_t *w, uint32_t n)
{
    uint32_t  i;

    for (i = 0; i < n; i++) {
        memset(&w[i], 0, sizeof(dsg_waiter_t));
        w[i].state = DSG_WAITER_FREE;
        w[i].next = p->free;
        p->free = &w[i];
    }

    p->nfree += n;
    p->size += n;
}


dsg_waiter_t *
dsg_queue_push(dsg_pool_t *p, dsg_waitq_t *q, uint32_t cls, uint32_t ticket,
    uint32_t pid, uint32_t owner, void *key, void *data)
{
    dsg_waiter_t  *w;

    if (cls >= DSG_MAX_CLASSES || p->free == NULL) {
        return NULL;
    }

    w = p->free;
    p->free = w->next;
    p->nfree--;

    memset(w, 0, sizeof(dsg_waiter_t));
    w->key = key;
    w->data = data;
    w->owner = owner;
    w->ticket = ticket;
    w->pid = pid;
    w->cls = (uint16_t) cls;

    w->prev = q->tail[cls];

    if (q->tail[cls] != NULL) {
        q->tail[cls]->next = w;

    } else {
        q->head[cls] = w;
    }

    q->tail[cls] = w;
    q->count[cls]++;
    q->total++;

    w->state = (dsg_queue_head(q) == w) ? DSG_WAITER_ACTIVE
                                        : DSG_WAITER_DORMANT;

    return w;
}


dsg_waiter_t *
dsg_queue_remove(dsg_pool_t *p, dsg_waitq_t *q, dsg_waiter_t *w)
{
    uint32_t       cls;
    dsg_waiter_t  *h;

    if (w == NULL || w->state == DSG_WAITER_FREE) {
        return NULL;
    }

    cls = w->cls;

    if (w->state == DSG_WAITER_READY) {
        dsg_ready_unlink(p, w);
    }

    if (w->prev != NULL) {
        w->prev->next = w->next;

    } else {
        q->head[cls] = w->next;
    }

    if (w->next != NULL) {
        w->next->prev = w->prev;

    } else {
        q->tail[cls] = w->prev;
    }

    q->count[cls]--;
    q->total--;

    memset(w, 0, sizeof(dsg_waiter_t));
    w->state = DSG_WAITER_FREE;
    w->next = p->free;
    p->free = w;
    p->nfree++;

    h = dsg_queue_head(q);

    if (h == NULL || h->state != DSG_WAITER_DORMANT) {
        return NULL;
    }

    h->state = DSG_WAITER_READY;
    h->rprev = NULL;
    h->rnext = p->ready;

    if (p->ready != NULL) {
        p->ready->rprev = h;
    }

    p->ready = h;
    p->nready++;

    return h;
}


dsg_waiter_t *
dsg_queue_head(const dsg_waitq_t *q)
{
    uint32_t  k;

    if (q->total == 0) {
        return NULL;
    }

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        if (q->head[k] != NULL) {
            return q->head[k];
        }
    }

    return NULL;
}


int
dsg_queue_sleep(dsg_waitq_t *q, dsg_waiter_t *w)
{
    if (w->state != DSG_WAITER_ACTIVE || dsg_queue_head(q) == w) {
        return 0;
    }

    w->state = DSG_WAITER_DORMANT;

    return 1;
}


void
dsg_queue_activate(dsg_pool_t *p, dsg_waiter_t *w)
{
    if (w->state == DSG_WAITER_READY) {
        dsg_ready_unlink(p, w);
        w->state = DSG_WAITER_ACTIVE;
    }
}


uint32_t
dsg_queue_pickup(dsg_pool_t *p, uint32_t owner, dsg_waiter_t **out,
    uint32_t n)
{
    uint32_t       got;
    dsg_waiter_t  *w, *next;

    got = 0;

    for (w = p->ready; w != NULL && got < n; w = next) {
        next = w->rnext;

        if (w->owner == owner) {
            dsg_queue_activate(p, w);
            out[got++] = w;
        }
    }

    return got;
}


uint32_t
dsg_queue_ahead_of_new(const dsg_waitq_t *q, uint32_t cls)
{
    uint32_t  k, n;

    n = 0;

    for (k = 0; k <= cls && k < DSG_MAX_CLASSES; k++) {
        n += q->count[k];
    }

    return n;
}


static void
dsg_ready_unlink(dsg_pool_t *p, dsg_waiter_t *w)
{
    if (w->rprev != NULL) {
        w->rprev->rnext = w->rnext;

    } else {
        p->ready = w->rnext;
    }

    if (w->rnext != NULL) {
        w->rnext->rprev = w->rprev;
    }

    w->rnext = NULL;
    w->rprev = NULL;
    p->nready--;
}


uint64_t
dsg_expected_wait_ms(uint32_t ahead, uint64_t mean_service_ms,
    uint32_t capacity)
{
    uint64_t  n, q, r, cap;

    n = (uint64_t) ahead + 1;
    cap = (capacity > 0) ? capacity : 1;

    /*
     * ceil(n * mean / cap) without overflowing n * mean:
     * mean = q * cap + r, so n * mean / cap = n * q + n * r / cap,
     * and n * r < 2^32 * 2^32 fits
     */

    q = mean_service_ms / cap;
    r = mean_service_ms % cap;

    if (q > 0 && n > UINT64_MAX / q) {
        return UINT64_MAX;
    }

    q *= n;
    r *= n;

    if (q > UINT64_MAX - r / cap) {
        return UINT64_MAX;
    }

    q += r / cap;

    if (r % cap != 0) {
        if (q == UINT64_MAX) {
            return UINT64_MAX;
        }

        q++;
    }

    return q;
}


void
dsg_ewma_update(uint64_t *ewma_us, uint64_t sample_us)
{
    uint64_t  e, d;

    e = *ewma_us;

    if (e == 0) {
        *ewma_us = sample_us;
        return;
    }

    /* e += (sample - e) / 8, rounded half away from zero, no overflow */

    if (sample_us >= e) {
        d = sample_us - e;
        e += d / 8 + (d % 8 >= 4);

    } else {
        d = e - sample_us;
        e -= d / 8 + (d % 8 >= 4);
    }

    *ewma_us = (e > 0) ? e : 1;
}
