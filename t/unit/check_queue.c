/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_queue: layout limits, the waiter pool, per-key order
 * (class, then ticket), the ACTIVE / DORMANT / READY state machine, the
 * ready list, several keys sharing one pool, wait estimates.
 */


#include <stdlib.h>
#include <string.h>
#include <check.h>

#include "dsg_queue.h"


Suite *dsg_queue_suite(void);


#define CRIT  0
#define NORM  1
#define LOW   2


/*
 * Check's ck_assert*() report every passed assertion to the runner (a
 * write), too slow for loops over 65535 waiters: these report only a
 * failure.
 */

#define t_assert(cond)                                                       \
    do {                                                                     \
        if (!(cond)) {                                                       \
            ck_abort_msg("Assertion '%s' failed", #cond);                    \
        }                                                                    \
    } while (0)


/* pushes a waiter of q whose key is q itself, pid owner + 100 */

static dsg_waiter_t *
t_push(dsg_pool_t *p, dsg_waitq_t *q, uint32_t cls, uint64_t ticket,
    uint64_t owner)
{
    return dsg_queue_push(p, q, cls, ticket, (uint32_t) owner + 100, owner,
                          q, NULL);
}


/*
 * q's class lists are well linked, in ticket order, counted, every waiter
 * of q is live and keyed to q; returns the number of waiters
 */

static uint32_t
t_check_q(const dsg_waitq_t *q)
{
    uint32_t       k, n, total;
    dsg_waiter_t  *w, *prev;

    total = 0;

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        n = 0;
        prev = NULL;

        for (w = q->head[k]; w != NULL; w = w->next) {
            t_assert(w->prev == prev);
            t_assert(w->cls == k);
            t_assert(w->key == q);
            t_assert(w->state == DSG_WAITER_DORMANT
                     || w->state == DSG_WAITER_READY
                     || w->state == DSG_WAITER_ACTIVE);

            if (prev != NULL) {
                t_assert(w->ticket > prev->ticket);
            }

            prev = w;
            n++;
            t_assert(n <= q->total);
        }

        t_assert(q->tail[k] == prev);
        t_assert(q->count[k] == n);
        total += n;
    }

    t_assert(q->total == total);

    return total;
}


/* the ready list is well linked, all READY, nready long; is w on it */

static int
t_on_ready(const dsg_pool_t *p, const dsg_waiter_t *w)
{
    int            found;
    uint32_t       n;
    dsg_waiter_t  *r, *prev;

    found = 0;
    n = 0;
    prev = NULL;

    for (r = p->ready; r != NULL; r = r->rnext) {
        t_assert(r->rprev == prev);
        t_assert(r->state == DSG_WAITER_READY);
        found |= (r == w);
        prev = r;
        n++;
        t_assert(n <= p->size);
    }

    t_assert(p->nready == n);

    return found;
}


/* the free list is nfree long, all FREE */

static void
t_check_free(const dsg_pool_t *p)
{
    uint32_t       n;
    dsg_waiter_t  *w;

    n = 0;

    for (w = p->free; w != NULL; w = w->next) {
        t_assert(w->state == DSG_WAITER_FREE);
        n++;
        t_assert(n <= p->size);
    }

    t_assert(p->nfree == n);
}


/* a small deterministic generator */

static uint32_t
t_rand(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;

    return *s;
}


START_TEST(test_layout)
{
    uint32_t            k, qlen[DSG_MAX_CLASSES + 1] = { 2, 0, 3 };
    dsg_queue_layout_t  l;

    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 3), DSG_OK);
    ck_assert_uint_eq(l.nclasses, 3);
    ck_assert_uint_eq(l.len[0], 2);
    ck_assert_uint_eq(l.len[1], 0);
    ck_assert_uint_eq(l.len[2], 3);
    ck_assert_uint_eq(l.total, 5);

    /* 1..DSG_MAX_CLASSES classes */
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 0), DSG_EINVAL);
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, DSG_MAX_CLASSES + 1),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, UINT32_MAX),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 1), DSG_OK);
    ck_assert_uint_eq(l.nclasses, 1);
    ck_assert_uint_eq(l.total, 2);
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, DSG_MAX_CLASSES),
                     DSG_OK);
    ck_assert_uint_eq(l.nclasses, DSG_MAX_CLASSES);
    ck_assert_uint_eq(l.total, 5);

    /* at most DSG_QUEUE_MAX_SLOTS places in all */
    ck_assert_uint_eq(DSG_QUEUE_MAX_SLOTS, 65535);
    qlen[0] = DSG_QUEUE_MAX_SLOTS - 2;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 3), DSG_EINVAL);
    qlen[0] = DSG_QUEUE_MAX_SLOTS - 3;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 3), DSG_OK);
    ck_assert_uint_eq(l.total, DSG_QUEUE_MAX_SLOTS);
    ck_assert_uint_eq(l.len[0], DSG_QUEUE_MAX_SLOTS - 3);

    qlen[0] = DSG_QUEUE_MAX_SLOTS;
    qlen[2] = 0;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 3), DSG_OK);
    ck_assert_uint_eq(l.total, 65535);
    qlen[0] = DSG_QUEUE_MAX_SLOTS + 1;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 1), DSG_EINVAL);

    /* spread over every class */
    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        qlen[k] = 8192;
    }

    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, DSG_MAX_CLASSES),
                     DSG_EINVAL);
    qlen[DSG_MAX_CLASSES - 1] = 8191;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, DSG_MAX_CLASSES),
                     DSG_OK);
    ck_assert_uint_eq(l.total, 65535);

    /* only the first nclasses count */
    qlen[DSG_MAX_CLASSES] = UINT32_MAX;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, DSG_MAX_CLASSES),
                     DSG_OK);

    /* no wrap of the total */
    qlen[0] = UINT32_MAX;
    qlen[1] = 2;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 2), DSG_EINVAL);

    /* no queues at all */
    ck_assert_int_eq(dsg_queue_layout_init(&l, NULL, 2), DSG_OK);
    ck_assert_uint_eq(l.nclasses, 2);
    ck_assert_uint_eq(l.len[0], 0);
    ck_assert_uint_eq(l.len[1], 0);
    ck_assert_uint_eq(l.total, 0);

    ck_assert_int_eq(dsg_queue_layout_init(NULL, qlen, 2), DSG_EINVAL);
}
END_TEST


START_TEST(test_pool)
{
    int            i, j;
    dsg_pool_t     p;
    dsg_waitq_t    q;
    dsg_waiter_t   w[5], *x[5], *y;

    memset(&p, 0, sizeof(p));
    memset(&q, 0, sizeof(q));
    memset(w, 0xa5, sizeof(w));

    /* two batches; records outside the batches are left alone */

    dsg_pool_add(&p, w, 3);
    ck_assert_uint_eq(p.nfree, 3);
    ck_assert_uint_eq(p.size, 3);
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_ptr_null(p.ready);
    ck_assert_uint_eq(w[3].pid, 0xa5a5a5a5);
    t_check_free(&p);

    dsg_pool_add(&p, &w[3], 2);
    ck_assert_uint_eq(p.nfree, 5);
    ck_assert_uint_eq(p.size, 5);
    t_check_free(&p);

    dsg_pool_add(&p, w, 0);
    ck_assert_uint_eq(p.nfree, 5);
    ck_assert_uint_eq(p.size, 5);

    /* an unknown class takes nothing */
    ck_assert_ptr_null(t_push(&p, &q, DSG_MAX_CLASSES, 1, 1));
    ck_assert_ptr_null(t_push(&p, &q, UINT32_MAX, 1, 1));
    ck_assert_uint_eq(p.nfree, 5);
    ck_assert_uint_eq(q.total, 0);

    /* push until the pool is empty */

    for (i = 0; i < 5; i++) {
        x[i] = dsg_queue_push(&p, &q, (uint32_t) i % 3, 10 + i, 200 + i,
                              7000 + i, &q, &w[i]);
        ck_assert_ptr_nonnull(x[i]);
        ck_assert(x[i] >= &w[0] && x[i] <= &w[4]);

        for (j = 0; j < i; j++) {
            ck_assert_ptr_ne(x[i], x[j]);
        }

        ck_assert_uint_eq(x[i]->cls, (uint32_t) i % 3);
        ck_assert_uint_eq(x[i]->ticket, 10 + i);
        ck_assert_uint_eq(x[i]->pid, 200 + i);
        ck_assert_uint_eq(x[i]->owner, 7000 + i);
        ck_assert_ptr_eq(x[i]->key, &q);
        ck_assert_ptr_eq(x[i]->data, &w[i]);
        ck_assert_ptr_null(x[i]->rnext);
        ck_assert_ptr_null(x[i]->rprev);
        ck_assert_uint_eq(p.nfree, 4 - i);
        ck_assert_uint_eq(p.size, 5);
        ck_assert_uint_eq(t_check_q(&q), i + 1);
    }

    ck_assert_ptr_null(p.free);
    ck_assert_ptr_null(t_push(&p, &q, CRIT, 20, 1));
    ck_assert_ptr_null(t_push(&p, &q, LOW, 20, 1));
    ck_assert_uint_eq(p.nfree, 0);
    ck_assert_uint_eq(t_check_q(&q), 5);

    /* a removed record is free again, and the next one pushed */

    dsg_queue_remove(&p, &q, x[3]);
    ck_assert_uint_eq(x[3]->state, DSG_WAITER_FREE);
    ck_assert_uint_eq(p.nfree, 1);
    ck_assert_uint_eq(p.size, 5);
    ck_assert_uint_eq(t_check_q(&q), 4);
    t_check_free(&p);

    y = t_push(&p, &q, LOW, 21, 1);
    ck_assert_ptr_eq(y, x[3]);
    ck_assert_uint_eq(y->ticket, 21);
    ck_assert_uint_eq(y->cls, LOW);
    ck_assert_ptr_null(t_push(&p, &q, LOW, 22, 1));
    x[3] = y;

    /* removing everyone frees every record */

    for (i = 0; i < 5; i++) {
        dsg_queue_remove(&p, &q, x[i]);
        ck_assert_uint_eq(x[i]->state, DSG_WAITER_FREE);
        ck_assert_uint_eq(p.nfree, i + 1);
        ck_assert_uint_eq(t_check_q(&q), 4 - i);
        t_check_free(&p);
    }

    ck_assert_uint_eq(p.size, 5);
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_ptr_null(dsg_queue_head(&q));

    /* a record already free, or none: nothing happens */
    ck_assert_ptr_null(dsg_queue_remove(&p, &q, x[0]));
    ck_assert_ptr_null(dsg_queue_remove(&p, &q, NULL));
    ck_assert_uint_eq(p.nfree, 5);
    t_check_free(&p);

    /* and the pool serves 5 again */
    for (i = 0; i < 5; i++) {
        ck_assert_ptr_nonnull(t_push(&p, &q, NORM, 30 + i, 1));
    }

    ck_assert_ptr_null(t_push(&p, &q, NORM, 40, 1));
    ck_assert_uint_eq(t_check_q(&q), 5);
}
END_TEST


START_TEST(test_order)
{
    int            i;
    dsg_pool_t     p;
    dsg_waitq_t    q;
    dsg_waiter_t   w[16], *a, *b, *c, *d, *e, *f, *h, *r, *order[6];

    memset(&p, 0, sizeof(p));
    memset(&q, 0, sizeof(q));
    dsg_pool_add(&p, w, 16);

    ck_assert_ptr_null(dsg_queue_head(&q));

    /* arrival order differs from priority order */

    a = t_push(&p, &q, LOW, 1, 1);
    ck_assert_uint_eq(a->state, DSG_WAITER_ACTIVE);
    ck_assert_ptr_eq(dsg_queue_head(&q), a);
    ck_assert_int_eq(dsg_queue_sleep(&q, a), 0);
    ck_assert_uint_eq(a->state, DSG_WAITER_ACTIVE);

    /* a higher class arrives: the new head is ACTIVE, the old one may sleep */

    b = t_push(&p, &q, NORM, 2, 2);
    ck_assert_uint_eq(b->state, DSG_WAITER_ACTIVE);
    ck_assert_ptr_eq(dsg_queue_head(&q), b);
    ck_assert_uint_eq(a->state, DSG_WAITER_ACTIVE);
    ck_assert_int_eq(dsg_queue_sleep(&q, b), 0);
    ck_assert_uint_eq(b->state, DSG_WAITER_ACTIVE);
    ck_assert_int_eq(dsg_queue_sleep(&q, a), 1);
    ck_assert_uint_eq(a->state, DSG_WAITER_DORMANT);
    ck_assert_int_eq(dsg_queue_sleep(&q, a), 0);
    ck_assert_uint_eq(a->state, DSG_WAITER_DORMANT);

    c = t_push(&p, &q, LOW, 3, 1);
    d = t_push(&p, &q, NORM, 4, 2);
    ck_assert_uint_eq(c->state, DSG_WAITER_DORMANT);
    ck_assert_uint_eq(d->state, DSG_WAITER_DORMANT);
    ck_assert_ptr_eq(dsg_queue_head(&q), b);

    e = t_push(&p, &q, CRIT, 5, 3);
    ck_assert_uint_eq(e->state, DSG_WAITER_ACTIVE);
    ck_assert_ptr_eq(dsg_queue_head(&q), e);
    ck_assert_int_eq(dsg_queue_sleep(&q, e), 0);
    ck_assert_int_eq(dsg_queue_sleep(&q, b), 1);
    ck_assert_uint_eq(b->state, DSG_WAITER_DORMANT);

    f = t_push(&p, &q, CRIT, 6, 1);
    ck_assert_uint_eq(f->state, DSG_WAITER_DORMANT);
    ck_assert_int_eq(dsg_queue_sleep(&q, f), 0);

    /* per class FIFO lists */

    ck_assert_ptr_eq(q.head[CRIT], e);
    ck_assert_ptr_eq(e->next, f);
    ck_assert_ptr_eq(q.tail[CRIT], f);
    ck_assert_ptr_eq(q.head[NORM], b);
    ck_assert_ptr_eq(b->next, d);
    ck_assert_ptr_eq(q.tail[NORM], d);
    ck_assert_ptr_eq(q.head[LOW], a);
    ck_assert_ptr_eq(a->next, c);
    ck_assert_ptr_eq(q.tail[LOW], c);
    ck_assert_uint_eq(q.count[CRIT], 2);
    ck_assert_uint_eq(q.count[NORM], 2);
    ck_assert_uint_eq(q.count[LOW], 2);
    ck_assert_uint_eq(t_check_q(&q), 6);

    /* serving the head repeatedly: class first, then ticket */

    order[0] = e;
    order[1] = f;
    order[2] = b;
    order[3] = d;
    order[4] = a;
    order[5] = c;

    for (i = 0; i < 6; i++) {
        h = dsg_queue_head(&q);
        ck_assert_ptr_eq(h, order[i]);
        ck_assert_uint_eq(h->state, DSG_WAITER_ACTIVE);

        r = dsg_queue_remove(&p, &q, h);

        if (i == 5) {
            ck_assert_ptr_null(r);
            break;
        }

        /* the next one was DORMANT: it is READY now */
        ck_assert_ptr_eq(r, order[i + 1]);
        ck_assert_ptr_eq(dsg_queue_head(&q), r);
        ck_assert_uint_eq(r->state, DSG_WAITER_READY);
        ck_assert(t_on_ready(&p, r));
        ck_assert_uint_eq(p.nready, 1);

        dsg_queue_activate(&p, r);
        ck_assert_uint_eq(r->state, DSG_WAITER_ACTIVE);
        ck_assert_uint_eq(p.nready, 0);
        ck_assert_uint_eq(t_check_q(&q), 5 - i);
    }

    ck_assert_ptr_null(dsg_queue_head(&q));
    ck_assert_uint_eq(t_check_q(&q), 0);
    ck_assert_uint_eq(p.nfree, 16);
}
END_TEST


/* taking waiters out of the middle and the ends of a class */

START_TEST(test_unlink)
{
    dsg_pool_t     p;
    dsg_waitq_t    q;
    dsg_waiter_t   w[8], *x, *y, *z, *lo;

    memset(&p, 0, sizeof(p));
    memset(&q, 0, sizeof(q));
    dsg_pool_add(&p, w, 8);

    x = t_push(&p, &q, NORM, 1, 1);
    y = t_push(&p, &q, NORM, 2, 1);
    z = t_push(&p, &q, NORM, 3, 1);
    lo = t_push(&p, &q, LOW, 4, 1);

    /* not the head: nobody promoted */
    ck_assert_ptr_null(dsg_queue_remove(&p, &q, y));
    ck_assert_ptr_eq(x->next, z);
    ck_assert_ptr_eq(z->prev, x);
    ck_assert_ptr_eq(dsg_queue_head(&q), x);
    ck_assert_uint_eq(t_check_q(&q), 3);

    ck_assert_ptr_null(dsg_queue_remove(&p, &q, z));
    ck_assert_ptr_eq(q.tail[NORM], x);
    ck_assert_ptr_null(x->next);
    ck_assert_uint_eq(t_check_q(&q), 2);
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_uint_eq(lo->state, DSG_WAITER_DORMANT);

    /* the last of its class: the next class's head is promoted */
    ck_assert_ptr_eq(dsg_queue_remove(&p, &q, x), lo);
    ck_assert_ptr_null(q.head[NORM]);
    ck_assert_ptr_null(q.tail[NORM]);
    ck_assert_uint_eq(q.count[NORM], 0);
    ck_assert_uint_eq(lo->state, DSG_WAITER_READY);
    ck_assert_uint_eq(t_check_q(&q), 1);

    ck_assert_ptr_null(dsg_queue_remove(&p, &q, lo));
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_ptr_null(p.ready);
    ck_assert_uint_eq(t_check_q(&q), 0);
    ck_assert_uint_eq(p.nfree, 8);
    t_check_free(&p);
}
END_TEST


START_TEST(test_states)
{
    dsg_pool_t     p;
    dsg_waitq_t    qa, qb;
    dsg_waiter_t   w[16], *a1, *a2, *a3, *b1, *b2, *out[4];

    memset(&p, 0, sizeof(p));
    memset(&qa, 0, sizeof(qa));
    memset(&qb, 0, sizeof(qb));
    dsg_pool_add(&p, w, 16);

    /* the first waiter of a key is ACTIVE, the later ones DORMANT */

    a1 = t_push(&p, &qa, NORM, 1, 1);
    a2 = t_push(&p, &qa, NORM, 2, 2);
    a3 = t_push(&p, &qa, NORM, 3, 1);
    b1 = t_push(&p, &qb, NORM, 4, 2);
    b2 = t_push(&p, &qb, NORM, 5, 1);

    ck_assert_uint_eq(a1->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(a2->state, DSG_WAITER_DORMANT);
    ck_assert_uint_eq(a3->state, DSG_WAITER_DORMANT);
    ck_assert_uint_eq(b1->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(b2->state, DSG_WAITER_DORMANT);
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_ptr_null(p.ready);

    /* nothing READY: nothing to pick up, whoever asks */
    ck_assert_uint_eq(dsg_queue_pickup(&p, 1, out, 4), 0);
    ck_assert_uint_eq(dsg_queue_pickup(&p, 2, out, 4), 0);

    /* the head goes: the next, DORMANT, becomes READY and is returned */

    ck_assert_ptr_eq(dsg_queue_remove(&p, &qa, a1), a2);
    ck_assert_uint_eq(a2->state, DSG_WAITER_READY);
    ck_assert_uint_eq(a3->state, DSG_WAITER_DORMANT);
    ck_assert_ptr_eq(dsg_queue_head(&qa), a2);
    ck_assert_uint_eq(p.nready, 1);
    ck_assert(t_on_ready(&p, a2));

    /* a READY head is not ACTIVE: sleep does nothing to it */
    ck_assert_int_eq(dsg_queue_sleep(&qa, a2), 0);
    ck_assert_uint_eq(a2->state, DSG_WAITER_READY);

    ck_assert_ptr_eq(dsg_queue_remove(&p, &qb, b1), b2);
    ck_assert_uint_eq(b2->state, DSG_WAITER_READY);
    ck_assert_uint_eq(p.nready, 2);
    ck_assert(t_on_ready(&p, a2));
    ck_assert(t_on_ready(&p, b2));

    /* picking up: only the owner's; the other owner's stay READY */

    ck_assert_uint_eq(dsg_queue_pickup(&p, 3, out, 4), 0);
    ck_assert_uint_eq(dsg_queue_pickup(&p, 1, out, 0), 0);
    ck_assert_uint_eq(p.nready, 2);

    ck_assert_uint_eq(dsg_queue_pickup(&p, 1, out, 4), 1);
    ck_assert_ptr_eq(out[0], b2);
    ck_assert_uint_eq(b2->state, DSG_WAITER_ACTIVE);
    ck_assert(!t_on_ready(&p, b2));
    ck_assert_uint_eq(a2->state, DSG_WAITER_READY);
    ck_assert(t_on_ready(&p, a2));
    ck_assert_uint_eq(p.nready, 1);
    ck_assert_uint_eq(dsg_queue_pickup(&p, 1, out, 4), 0);

    /*
     * a READY waiter removed (its owner gave up, or died): off the ready
     * list; the next of its key becomes READY in its place
     */

    ck_assert_ptr_eq(dsg_queue_remove(&p, &qa, a2), a3);
    ck_assert_uint_eq(a2->state, DSG_WAITER_FREE);
    ck_assert(!t_on_ready(&p, a2));
    ck_assert(t_on_ready(&p, a3));
    ck_assert_uint_eq(a3->state, DSG_WAITER_READY);
    ck_assert_uint_eq(p.nready, 1);

    /* activate: READY to ACTIVE, off the list; nothing else changes */

    dsg_queue_activate(&p, a3);
    ck_assert_uint_eq(a3->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_ptr_null(p.ready);
    ck_assert(!t_on_ready(&p, a3));

    dsg_queue_activate(&p, a3);
    ck_assert_uint_eq(a3->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(p.nready, 0);

    a1 = t_push(&p, &qa, NORM, 6, 2);
    ck_assert_uint_eq(a1->state, DSG_WAITER_DORMANT);
    dsg_queue_activate(&p, a1);
    ck_assert_uint_eq(a1->state, DSG_WAITER_DORMANT);
    ck_assert_uint_eq(p.nready, 0);

    /* the last one of a key goes: nobody to promote */
    ck_assert_ptr_null(dsg_queue_remove(&p, &qb, b2));
    ck_assert_ptr_null(dsg_queue_head(&qb));
    ck_assert_uint_eq(p.nready, 0);

    ck_assert_uint_eq(t_check_q(&qa), 2);
    ck_assert_uint_eq(t_check_q(&qb), 0);
    ck_assert_uint_eq(p.nfree, 14);
    t_check_free(&p);
}
END_TEST


/* heads that lose and regain their place */

START_TEST(test_states_preempted)
{
    dsg_pool_t     p;
    dsg_waitq_t    q;
    dsg_waiter_t   w[8], *a, *b, *c, *hi, *out[2];

    memset(&p, 0, sizeof(p));
    memset(&q, 0, sizeof(q));
    dsg_pool_add(&p, w, 8);

    /* an ACTIVE head overtaken that never slept is the head again: ACTIVE */

    a = t_push(&p, &q, LOW, 1, 1);
    b = t_push(&p, &q, LOW, 2, 1);
    hi = t_push(&p, &q, CRIT, 3, 2);
    ck_assert_uint_eq(a->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(hi->state, DSG_WAITER_ACTIVE);

    ck_assert_ptr_null(dsg_queue_remove(&p, &q, hi));
    ck_assert_ptr_eq(dsg_queue_head(&q), a);
    ck_assert_uint_eq(a->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(p.nready, 0);

    /* one that slept is woken: READY */

    hi = t_push(&p, &q, CRIT, 4, 2);
    ck_assert_int_eq(dsg_queue_sleep(&q, a), 1);
    ck_assert_uint_eq(a->state, DSG_WAITER_DORMANT);
    ck_assert_ptr_eq(dsg_queue_remove(&p, &q, hi), a);
    ck_assert_uint_eq(a->state, DSG_WAITER_READY);
    ck_assert_uint_eq(p.nready, 1);

    /*
     * a READY head overtaken stays READY (its owner will find out); when
     * it is the head again it is not promoted twice
     */

    hi = t_push(&p, &q, CRIT, 5, 2);
    ck_assert_uint_eq(hi->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(a->state, DSG_WAITER_READY);
    ck_assert_int_eq(dsg_queue_sleep(&q, a), 0);
    ck_assert_ptr_null(dsg_queue_remove(&p, &q, hi));
    ck_assert_uint_eq(a->state, DSG_WAITER_READY);
    ck_assert_uint_eq(p.nready, 1);
    ck_assert(t_on_ready(&p, a));

    /* picked up while overtaken: ACTIVE, then it may sleep */

    hi = t_push(&p, &q, CRIT, 6, 2);
    ck_assert_uint_eq(dsg_queue_pickup(&p, 1, out, 2), 1);
    ck_assert_ptr_eq(out[0], a);
    ck_assert_uint_eq(a->state, DSG_WAITER_ACTIVE);
    ck_assert_int_eq(dsg_queue_sleep(&q, a), 1);
    ck_assert_uint_eq(a->state, DSG_WAITER_DORMANT);

    /* a READY waiter not the head removed: off the list, nobody promoted */

    ck_assert_ptr_eq(dsg_queue_remove(&p, &q, hi), a);
    hi = t_push(&p, &q, CRIT, 7, 2);
    ck_assert_uint_eq(a->state, DSG_WAITER_READY);
    ck_assert_ptr_null(dsg_queue_remove(&p, &q, a));
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_ptr_null(p.ready);
    ck_assert_uint_eq(b->state, DSG_WAITER_DORMANT);
    ck_assert_ptr_eq(dsg_queue_head(&q), hi);

    /* and the one behind it is woken when the head goes */
    ck_assert_ptr_eq(dsg_queue_remove(&p, &q, hi), b);
    ck_assert_uint_eq(b->state, DSG_WAITER_READY);

    c = t_push(&p, &q, LOW, 8, 1);
    ck_assert_uint_eq(c->state, DSG_WAITER_DORMANT);
    ck_assert_uint_eq(t_check_q(&q), 2);
    ck_assert(t_on_ready(&p, b));
    t_check_free(&p);
}
END_TEST


/* several owners with several READY waiters each */

START_TEST(test_ready_list)
{
    int            i, n;
    uint32_t       got;
    dsg_pool_t     p;
    dsg_waitq_t    q[6];
    dsg_waiter_t   w[24], *head[6], *next[6], *r, *out[8];

    memset(&p, 0, sizeof(p));
    memset(q, 0, sizeof(q));
    dsg_pool_add(&p, w, 24);

    /* key i: an ACTIVE head, then a DORMANT waiter of owner i % 2 */

    for (i = 0; i < 6; i++) {
        head[i] = t_push(&p, &q[i], NORM, 2 * i + 1, 9);
        next[i] = t_push(&p, &q[i], NORM, 2 * i + 2, i % 2);
    }

    for (i = 0; i < 6; i++) {
        ck_assert_ptr_eq(dsg_queue_remove(&p, &q[i], head[i]), next[i]);
        ck_assert_uint_eq(p.nready, i + 1);
    }

    for (i = 0; i < 6; i++) {
        ck_assert(t_on_ready(&p, next[i]));
    }

    /* the one in the middle of the list removed */

    r = p.ready->rnext->rnext;

    for (i = 0; i < 6 && next[i] != r; i++) {
        /* void */
    }

    ck_assert_int_lt(i, 6);
    ck_assert_ptr_null(dsg_queue_remove(&p, &q[i], r));
    next[i] = NULL;
    ck_assert_uint_eq(p.nready, 5);
    ck_assert(!t_on_ready(&p, r));

    /* owner 0 and owner 1 pick theirs up, at most n at a time */

    n = 0;

    for (i = 0; i < 6; i++) {
        n += (next[i] != NULL && i % 2 == 0);
    }

    got = dsg_queue_pickup(&p, 0, out, 1);
    ck_assert_uint_eq(got, 1);
    ck_assert_uint_eq(out[0]->owner, 0);
    ck_assert_uint_eq(out[0]->state, DSG_WAITER_ACTIVE);
    ck_assert_uint_eq(p.nready, 4);

    got = dsg_queue_pickup(&p, 0, out, 8);
    ck_assert_uint_eq(got, (uint32_t) n - 1);
    ck_assert_uint_eq(p.nready, 5 - (uint32_t) n);

    for (i = 0; i < 6; i++) {
        if (next[i] == NULL) {
            continue;
        }

        ck_assert_uint_eq(next[i]->state, (i % 2 == 0) ? DSG_WAITER_ACTIVE
                                                       : DSG_WAITER_READY);
        ck_assert_int_eq(t_on_ready(&p, next[i]), i % 2 != 0);
    }

    got = dsg_queue_pickup(&p, 1, out, 8);
    ck_assert_uint_eq(got, 5 - (uint32_t) n);

    for (i = 0; i < (int) got; i++) {
        ck_assert_uint_eq(out[i]->owner, 1);
        ck_assert_uint_eq(out[i]->state, DSG_WAITER_ACTIVE);
    }

    ck_assert_uint_eq(p.nready, 0);
    ck_assert_ptr_null(p.ready);

    for (i = 0; i < 6; i++) {
        ck_assert_uint_eq(t_check_q(&q[i]), next[i] != NULL);
    }

    t_check_free(&p);
}
END_TEST


START_TEST(test_ahead_of_new)
{
    dsg_pool_t     p;
    dsg_waitq_t    q;
    dsg_waiter_t   w[16], *x;

    memset(&p, 0, sizeof(p));
    memset(&q, 0, sizeof(q));
    dsg_pool_add(&p, w, 16);

    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, 0), 0);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, DSG_MAX_CLASSES - 1), 0);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, UINT32_MAX), 0);

    t_push(&p, &q, LOW, 1, 1);
    x = t_push(&p, &q, NORM, 2, 1);
    t_push(&p, &q, CRIT, 3, 1);
    t_push(&p, &q, NORM, 4, 1);
    t_push(&p, &q, DSG_MAX_CLASSES - 1, 5, 1);
    t_push(&p, &q, CRIT, 6, 1);
    t_push(&p, &q, NORM, 7, 1);

    /* everyone at its class or above */
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, CRIT), 2);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, NORM), 5);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, LOW), 6);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, 3), 6);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, DSG_MAX_CLASSES - 2), 6);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, DSG_MAX_CLASSES - 1), 7);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, DSG_MAX_CLASSES), 7);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, UINT32_MAX), 7);

    dsg_queue_remove(&p, &q, x);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, CRIT), 2);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, NORM), 4);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, UINT32_MAX), 6);

    /* the newcomer queues behind exactly that many */
    x = t_push(&p, &q, NORM, 8, 1);
    ck_assert_ptr_eq(q.tail[NORM], x);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, NORM), 5);
}
END_TEST


/* several keys, each its own dsg_waitq_t, drawing on one pool */

START_TEST(test_keys)
{
    int            i, k;
    uint32_t       cls, n;
    uint64_t       ticket;
    dsg_pool_t     p;
    dsg_waitq_t    q[4];
    dsg_waiter_t   w[20], *h, *r, *prev;

    memset(&p, 0, sizeof(p));
    memset(q, 0, sizeof(q));
    dsg_pool_add(&p, w, 20);

    /* round robin over the keys, classes mixed */

    for (i = 0; i < 20; i++) {
        k = i % 4;
        cls = (uint32_t) (i * 7) % 3;
        h = dsg_queue_head(&q[k]);
        r = t_push(&p, &q[k], cls, 100 + i, (uint64_t) i % 3);
        ck_assert_ptr_nonnull(r);
        ck_assert_ptr_eq(r->key, &q[k]);

        if (h == NULL) {
            ck_assert_uint_eq(r->state, DSG_WAITER_ACTIVE);

        } else if (dsg_queue_head(&q[k]) == r) {
            ck_assert_uint_eq(r->state, DSG_WAITER_ACTIVE);
            ck_assert_int_eq(dsg_queue_sleep(&q[k], h), 1);

        } else {
            ck_assert_uint_eq(r->state, DSG_WAITER_DORMANT);
        }
    }

    for (k = 0; k < 4; k++) {
        ck_assert_uint_eq(t_check_q(&q[k]), 5);
    }

    /* the pool is shared: full for every key */

    for (k = 0; k < 4; k++) {
        ck_assert_ptr_null(t_push(&p, &q[k], CRIT, 200, 0));
    }

    /* one key emptied: the others do not move */

    while ((h = dsg_queue_head(&q[1])) != NULL) {
        r = dsg_queue_remove(&p, &q[1], h);

        if (r != NULL) {
            ck_assert_ptr_eq(r->key, &q[1]);
            ck_assert_ptr_eq(dsg_queue_head(&q[1]), r);
            dsg_queue_activate(&p, r);
        }
    }

    ck_assert_uint_eq(p.nfree, 5);
    ck_assert_uint_eq(p.nready, 0);
    ck_assert_uint_eq(t_check_q(&q[1]), 0);

    for (k = 0; k < 4; k++) {
        if (k != 1) {
            ck_assert_uint_eq(t_check_q(&q[k]), 5);
            ck_assert_uint_eq(dsg_queue_head(&q[k])->state,
                              DSG_WAITER_ACTIVE);
        }
    }

    /* its records serve another key */

    for (i = 0; i < 5; i++) {
        ck_assert_ptr_nonnull(t_push(&p, &q[2], LOW, 300 + i, 0));
    }

    ck_assert_ptr_null(t_push(&p, &q[2], LOW, 400, 0));
    ck_assert_uint_eq(t_check_q(&q[2]), 10);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q[2], LOW), 10);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&q[3], LOW), 5);

    /* every key drained in (class, ticket) order; wakes stay in their key */

    for (k = 0; k < 4; k++) {
        n = 0;
        prev = NULL;
        cls = 0;
        ticket = 0;

        while ((h = dsg_queue_head(&q[k])) != NULL) {
            ck_assert_uint_eq(h->state, DSG_WAITER_ACTIVE);

            if (prev != NULL) {
                ck_assert(h->cls > cls
                          || (h->cls == cls && h->ticket > ticket));
            }

            prev = h;
            cls = h->cls;
            ticket = h->ticket;

            r = dsg_queue_remove(&p, &q[k], h);
            n++;

            if (r != NULL) {
                ck_assert_ptr_eq(r->key, &q[k]);
                ck_assert_uint_eq(p.nready, 1);
                ck_assert_uint_eq(dsg_queue_pickup(&p, r->owner, &h, 1), 1);
                ck_assert_ptr_eq(h, r);
            }

            ck_assert_uint_eq(p.nready, 0);
        }

        ck_assert_uint_eq(n, (k == 1) ? 0 : (k == 2) ? 10 : 5);
    }

    ck_assert_uint_eq(p.nfree, 20);
    t_check_free(&p);
}
END_TEST


/*
 * The largest queue: DSG_QUEUE_MAX_SLOTS waiters of one key, random
 * classes; served head after head, they come out in (class, ticket)
 * order, each removal waking exactly the next one.
 */

START_TEST(test_large)
{
    uint32_t       i, k, n, cls, seed, count[DSG_MAX_CLASSES], sum;
    uint64_t       ticket;
    dsg_pool_t     p;
    dsg_waitq_t    q;
    dsg_waiter_t  *w, *h, *x, *r, *out;

    n = DSG_QUEUE_MAX_SLOTS;
    w = malloc(n * sizeof(dsg_waiter_t));
    ck_assert_ptr_nonnull(w);

    memset(&p, 0, sizeof(p));
    memset(&q, 0, sizeof(q));
    memset(count, 0, sizeof(count));
    dsg_pool_add(&p, w, n);
    ck_assert_uint_eq(p.nfree, n);

    seed = 2463534242u;

    for (i = 0; i < n; i++) {
        cls = t_rand(&seed) % DSG_MAX_CLASSES;
        h = dsg_queue_head(&q);
        x = t_push(&p, &q, cls, (uint64_t) i + 1, i % 4);
        t_assert(x != NULL);
        count[cls]++;

        /* one ACTIVE waiter at a time: an overtaken head sleeps */

        if (dsg_queue_head(&q) == x) {
            t_assert(x->state == DSG_WAITER_ACTIVE);

            if (h != NULL) {
                t_assert(dsg_queue_sleep(&q, h) == 1);
            }

        } else {
            t_assert(x->state == DSG_WAITER_DORMANT);
        }
    }

    ck_assert_ptr_null(t_push(&p, &q, CRIT, n + 1, 0));
    ck_assert_uint_eq(p.nfree, 0);
    ck_assert_uint_eq(t_check_q(&q), n);

    sum = 0;

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        ck_assert_uint_gt(count[k], 0);
        sum += count[k];
        ck_assert_uint_eq(dsg_queue_ahead_of_new(&q, k), sum);
    }

    cls = 0;
    ticket = 0;

    for (i = 0; i < n; i++) {
        h = dsg_queue_head(&q);
        t_assert(h != NULL);
        t_assert(h->state == DSG_WAITER_ACTIVE);
        t_assert(h->cls > cls || (h->cls == cls && h->ticket > ticket));

        cls = h->cls;
        ticket = h->ticket;
        count[cls]--;

        r = dsg_queue_remove(&p, &q, h);
        t_assert(p.nfree == i + 1);
        t_assert(q.total == n - 1 - i);

        if (i == n - 1) {
            t_assert(r == NULL);
            break;
        }

        t_assert(r != NULL);
        t_assert(dsg_queue_head(&q) == r);
        t_assert(r->state == DSG_WAITER_READY);
        t_assert(p.nready == 1);
        t_assert(p.ready == r);

        t_assert(dsg_queue_pickup(&p, r->owner, &out, 1) == 1);
        t_assert(out == r);
        t_assert(r->state == DSG_WAITER_ACTIVE);
        t_assert(p.nready == 0);

        if (i % 4096 == 0) {
            sum = 0;

            for (k = 0; k < DSG_MAX_CLASSES; k++) {
                sum += count[k];
                t_assert(q.count[k] == count[k]);
                t_assert(dsg_queue_ahead_of_new(&q, k) == sum);
            }
        }
    }

    ck_assert_ptr_null(dsg_queue_head(&q));
    ck_assert_uint_eq(t_check_q(&q), 0);
    ck_assert_uint_eq(p.nfree, n);
    ck_assert_uint_eq(p.size, n);
    t_check_free(&p);

    free(w);
}
END_TEST


START_TEST(test_expected_wait)
{
    unsigned __int128  x;

    ck_assert_uint_eq(dsg_expected_wait_ms(0, 100, 1), 100);
    ck_assert_uint_eq(dsg_expected_wait_ms(0, 100, 0), 100);
    ck_assert_uint_eq(dsg_expected_wait_ms(9, 100, 4), 250);
    ck_assert_uint_eq(dsg_expected_wait_ms(2, 10, 4), 8);
    ck_assert_uint_eq(dsg_expected_wait_ms(0, 1, 8), 1);
    ck_assert_uint_eq(dsg_expected_wait_ms(7, 1, 8), 1);
    ck_assert_uint_eq(dsg_expected_wait_ms(8, 1, 8), 2);
    ck_assert_uint_eq(dsg_expected_wait_ms(5, 0, 3), 0);

    /* large values: exact or saturated, never wrapped */
    ck_assert_uint_eq(dsg_expected_wait_ms(UINT32_MAX, UINT64_MAX, 1),
                      UINT64_MAX);
    ck_assert_uint_eq(dsg_expected_wait_ms(UINT32_MAX, UINT64_MAX,
                                           UINT32_MAX),
                      UINT64_MAX);

    x = ((unsigned __int128) 1000 * (UINT64_MAX / 1000) + 999) / 1000;
    ck_assert(dsg_expected_wait_ms(999, UINT64_MAX / 1000, 1000) == x);

    x = ((unsigned __int128) 0x100000000ULL * 0xfffffff0ULL
         + 0xfffffffeULL) / 0xffffffffULL;
    ck_assert(dsg_expected_wait_ms(UINT32_MAX, 0xfffffff0ULL, UINT32_MAX)
              == x);

    x = ((unsigned __int128) 12345 * 987654321987ULL + 6999) / 7000;
    ck_assert(dsg_expected_wait_ms(12344, 987654321987ULL, 7000) == x);
}
END_TEST


START_TEST(test_ewma)
{
    uint64_t  e;
    int       i;

    e = 0;
    dsg_ewma_update(&e, 800);
    ck_assert_uint_eq(e, 800);

    dsg_ewma_update(&e, 1600);
    ck_assert_uint_eq(e, 900);

    dsg_ewma_update(&e, 100);
    ck_assert_uint_eq(e, 800);

    dsg_ewma_update(&e, 800);
    ck_assert_uint_eq(e, 800);

    /* converges to a steady sample, from above and from below */
    for (i = 0; i < 200; i++) {
        dsg_ewma_update(&e, 50000);
    }

    ck_assert_uint_ge(e, 50000 - 4);
    ck_assert_uint_le(e, 50000);

    for (i = 0; i < 200; i++) {
        dsg_ewma_update(&e, 20);
    }

    ck_assert_uint_ge(e, 20);
    ck_assert_uint_le(e, 20 + 4);

    /* once set, it never returns to "unset" */
    for (i = 0; i < 200; i++) {
        dsg_ewma_update(&e, 0);
    }

    ck_assert_uint_ge(e, 1);
    ck_assert_uint_le(e, 4);

    /* huge values: no overflow */
    e = UINT64_MAX - 8;
    dsg_ewma_update(&e, UINT64_MAX);
    ck_assert_uint_eq(e, UINT64_MAX - 7);

    e = UINT64_MAX;
    dsg_ewma_update(&e, 0);
    ck_assert_uint_eq(e, UINT64_MAX - (UINT64_MAX / 8 + 1));

    /* the first sample may be 0: still "unset" */
    e = 0;
    dsg_ewma_update(&e, 0);
    ck_assert_uint_eq(e, 0);
    dsg_ewma_update(&e, 300);
    ck_assert_uint_eq(e, 300);
}
END_TEST


Suite *
dsg_queue_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_queue");

    tc = tcase_create("pool");
    tcase_add_test(tc, test_layout);
    tcase_add_test(tc, test_pool);
    tcase_add_test(tc, test_keys);
    suite_add_tcase(s, tc);

    tc = tcase_create("order");
    tcase_add_test(tc, test_order);
    tcase_add_test(tc, test_unlink);
    tcase_add_test(tc, test_ahead_of_new);
    tcase_add_test(tc, test_large);
    suite_add_tcase(s, tc);

    tc = tcase_create("states");
    tcase_add_test(tc, test_states);
    tcase_add_test(tc, test_states_preempted);
    tcase_add_test(tc, test_ready_list);
    suite_add_tcase(s, tc);

    tc = tcase_create("estimates");
    tcase_add_test(tc, test_expected_wait);
    tcase_add_test(tc, test_ewma);
    suite_add_tcase(s, tc);

    return s;
}
