/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include <stddef.h>

#include "dsg_queue.h"


static int dsg_slot_before(const dsg_slot_t *a, const dsg_slot_t *b);


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

    *l = (dsg_queue_layout_t) { 0 };

    l->nclasses = nclasses;

    for (k = 0; k < nclasses; k++) {
        l->first[k] = l->total;
        l->len[k] = (qlen != NULL) ? qlen[k] : 0;
        l->total += l->len[k];
    }

    return DSG_OK;
}


void
dsg_queue_init(const dsg_queue_layout_t *l, dsg_slot_t *slots)
{
    uint32_t  i;

    for (i = 0; i < l->total; i++) {
        slots[i] = (dsg_slot_t) { 0 };
        slots[i].state = DSG_SLOT_FREE;
    }
}


int
dsg_queue_take(const dsg_queue_layout_t *l, dsg_slot_t *slots,
    uint32_t cls, uint32_t pid, uint64_t ticket, uint64_t deadline_ms,
    uint64_t key)
{
    uint32_t     i, end;
    dsg_slot_t  *s;

    if (cls >= l->nclasses) {
        return -1;
    }

    end = l->first[cls] + l->len[cls];

    for (i = l->first[cls]; i < end; i++) {
        s = &slots[i];

        if (s->state != DSG_SLOT_FREE) {
            continue;
        }

        s->pid = pid;
        s->state = DSG_SLOT_WAITING;
        s->cls = cls;
        s->pad = 0;
        s->ticket = ticket;
        s->deadline_ms = deadline_ms;
        s->key = key;

        return (int) i;
    }

    return -1;
}


void
dsg_queue_free(dsg_slot_t *slots, int idx)
{
    if (idx < 0) {
        return;
    }

    slots[idx].state = DSG_SLOT_FREE;
    slots[idx].pid = 0;
}


/* a goes before b: higher class, then smaller ticket */

static int
dsg_slot_before(const dsg_slot_t *a, const dsg_slot_t *b)
{
    if (a->cls != b->cls) {
        return a->cls < b->cls;
    }

    return a->ticket < b->ticket;
}


uint32_t
dsg_queue_ahead(const dsg_queue_layout_t *l, const dsg_slot_t *slots,
    int idx)
{
    uint32_t           i, end, n;
    const dsg_slot_t  *me, *s;

    if (idx < 0 || (uint32_t) idx >= l->total) {
        return 0;
    }

    me = &slots[idx];

    if (me->state != DSG_SLOT_WAITING || me->cls >= l->nclasses) {
        return 0;
    }

    /* only classes up to ours can be ahead */

    end = l->first[me->cls] + l->len[me->cls];
    n = 0;

    for (i = 0; i < end; i++) {
        s = &slots[i];

        if (i != (uint32_t) idx
            && s->state == DSG_SLOT_WAITING
            && s->key == me->key
            && dsg_slot_before(s, me))
        {
            n++;
        }
    }

    return n;
}


uint32_t
dsg_queue_ahead_of_new(const dsg_queue_layout_t *l,
    const dsg_slot_t *slots, uint32_t cls, uint64_t key)
{
    uint32_t           i, end, n;
    const dsg_slot_t  *s;

    if (cls >= l->nclasses) {
        cls = l->nclasses - 1;
    }

    end = l->first[cls] + l->len[cls];
    n = 0;

    for (i = 0; i < end; i++) {
        s = &slots[i];

        if (s->state == DSG_SLOT_WAITING && s->key == key && s->cls <= cls) {
            n++;
        }
    }

    return n;
}


int
dsg_queue_head(const dsg_queue_layout_t *l, const dsg_slot_t *slots,
    uint64_t key)
{
    int                head;
    uint32_t           i;
    const dsg_slot_t  *s;

    head = -1;

    for (i = 0; i < l->total; i++) {
        s = &slots[i];

        if (s->state != DSG_SLOT_WAITING || s->key != key) {
            continue;
        }

        if (head == -1 || dsg_slot_before(s, &slots[head])) {
            head = (int) i;
        }
    }

    return head;
}


uint32_t
dsg_queue_depth(const dsg_queue_layout_t *l, const dsg_slot_t *slots,
    uint32_t cls)
{
    uint32_t  i, end, n;

    if (cls >= l->nclasses) {
        return 0;
    }

    end = l->first[cls] + l->len[cls];
    n = 0;

    for (i = l->first[cls]; i < end; i++) {
        if (slots[i].state == DSG_SLOT_WAITING) {
            n++;
        }
    }

    return n;
}


int
dsg_queue_next_of_pid(const dsg_queue_layout_t *l,
    const dsg_slot_t *slots, uint32_t pid, int from)
{
    uint32_t  i;

    for (i = (from > 0) ? (uint32_t) from : 0; i < l->total; i++) {
        if (slots[i].state == DSG_SLOT_WAITING && slots[i].pid == pid) {
            return (int) i;
        }
    }

    return -1;
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
