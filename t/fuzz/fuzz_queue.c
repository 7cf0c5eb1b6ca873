/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_queue, the cross-worker priority queue.
 *
 * The input is a layout (per class queue lengths, valid or not: only
 * dsg_queue_layout_init()'s answer is checked), a pool size and a program
 * of operations on a pool shared by a few keys: push (few keys, owners and
 * classes, also unknown classes; tickets from a monotonic counter, as the
 * caller's), remove of any live waiter (the head or not, ACTIVE, DORMANT
 * or READY) or of a free record, sleep, pickup by an owner, activate,
 * ahead_of_new, a dead owner's reaping, growing the pool.  Every answer
 * and, after every operation, every record, list and count is compared
 * with a naive model (an array per record) of the rules documented in
 * dsg_queue.h: per key, class first then ticket; the first waiter of a
 * key ACTIVE, later ones DORMANT; a removal that makes a DORMANT waiter
 * the head makes it READY, on the ready list, until its owner picks it up
 * or activates it; sleep turns an overtaken ACTIVE waiter DORMANT; free
 * and ready lists and their counts.  dsg_expected_wait_ms() is compared
 * with the 128-bit formula, dsg_ewma_update() with the definition of the
 * mean.
 */


#include <string.h>

#include "dsg_queue.h"
#include "fuzz.h"


typedef unsigned __int128  u128;


#define MAX_POOL  48                 /* records: keeps the model cheap */
#define NKEYS     4
#define NOWNERS   4

#define UNTOUCHED  0xa5a5a5a5u       /* the state of records not added */


typedef struct {
    uint32_t  state;                 /* DSG_WAITER_*; FREE: not queued */
    uint32_t  key;
    uint32_t  cls;
    uint32_t  pid;
    uint64_t  owner;
    uint64_t  ticket;
} m_waiter_t;


typedef struct {
    dsg_pool_t     pool;
    dsg_waitq_t    q[NKEYS];
    dsg_waiter_t  *w;                /* n records, an exact-size heap block */
    uint32_t       n;
    uint32_t       added;            /* w[0 .. added - 1] are in the pool */
    uint32_t       nlive;
    uint64_t       ticket;
    m_waiter_t     m[MAX_POOL];
} st_t;


static int
m_before(const m_waiter_t *a, const m_waiter_t *b)
{
    if (a->cls != b->cls) {
        return a->cls < b->cls;
    }

    return a->ticket < b->ticket;
}


/* the model's head of key, or -1 */

static int
m_head(const st_t *st, uint32_t key)
{
    int       h;
    uint32_t  i;

    h = -1;

    for (i = 0; i < st->added; i++) {
        if (st->m[i].state != DSG_WAITER_FREE && st->m[i].key == key
            && (h < 0 || m_before(&st->m[i], &st->m[h])))
        {
            h = (int) i;
        }
    }

    return h;
}


/* the record's index; it must be one of the pool's */

static uint32_t
m_index(const st_t *st, const dsg_waiter_t *w)
{
    FUZZ_ASSERT(w >= st->w && w < st->w + st->added);

    return (uint32_t) (w - st->w);
}


/* the sel-th live record (sel taken modulo their number), or -1 */

static int
m_live(const st_t *st, uint32_t sel)
{
    uint32_t  i;

    if (st->nlive == 0) {
        return -1;
    }

    sel %= st->nlive;

    for (i = 0; i < st->added; i++) {
        if (st->m[i].state != DSG_WAITER_FREE && sel-- == 0) {
            return (int) i;
        }
    }

    FUZZ_ASSERT(0);

    return -1;
}


static uint32_t
m_ahead_of_new(const st_t *st, uint32_t key, uint32_t cls)
{
    uint32_t  i, n;

    n = 0;

    for (i = 0; i < st->added; i++) {
        n += st->m[i].state != DSG_WAITER_FREE && st->m[i].key == key
             && st->m[i].cls <= cls;
    }

    return n;
}


/* everything the implementation holds is what the model says */

static void
check_all(const st_t *st)
{
    int                  h;
    uint8_t              seen[MAX_POOL];
    uint32_t             i, k, key, n, nready, total, sum;
    const dsg_waiter_t  *w, *prev;
    const m_waiter_t    *m;
    const dsg_waitq_t   *q;

    /* the records, one by one */

    nready = 0;

    for (i = 0; i < st->added; i++) {
        w = &st->w[i];
        m = &st->m[i];

        FUZZ_ASSERT(w->state == m->state);

        if (m->state == DSG_WAITER_FREE) {
            continue;
        }

        nready += m->state == DSG_WAITER_READY;

        FUZZ_ASSERT(w->key == &st->q[m->key]);
        FUZZ_ASSERT(w->data == (void *) (uintptr_t) m->ticket);
        FUZZ_ASSERT(w->cls == m->cls && w->ticket == m->ticket
                    && w->owner == m->owner && w->pid == m->pid);

        if (m->state != DSG_WAITER_READY) {
            FUZZ_ASSERT(w->rnext == NULL && w->rprev == NULL);
        }
    }

    /* records never added are never touched */

    for (i = st->added; i < st->n; i++) {
        FUZZ_ASSERT(st->w[i].state == (uint16_t) UNTOUCHED
                    && st->w[i].pid == UNTOUCHED);
    }

    /* the pool's counts */

    FUZZ_ASSERT(st->pool.size == st->added);
    FUZZ_ASSERT(st->pool.nfree == st->added - st->nlive);
    FUZZ_ASSERT(st->pool.nready == nready);

    /* the free list: exactly the free records */

    memset(seen, 0, sizeof(seen));
    n = 0;

    for (w = st->pool.free; w != NULL; w = w->next) {
        i = m_index(st, w);
        FUZZ_ASSERT(!seen[i]);
        FUZZ_ASSERT(st->m[i].state == DSG_WAITER_FREE);
        seen[i] = 1;
        n++;
    }

    FUZZ_ASSERT(n == st->pool.nfree);

    /* the ready list: exactly the READY records, well linked */

    memset(seen, 0, sizeof(seen));
    n = 0;
    prev = NULL;

    for (w = st->pool.ready; w != NULL; w = w->rnext) {
        i = m_index(st, w);
        FUZZ_ASSERT(!seen[i]);
        FUZZ_ASSERT(st->m[i].state == DSG_WAITER_READY);
        FUZZ_ASSERT(w->rprev == prev);
        seen[i] = 1;
        prev = w;
        n++;
    }

    FUZZ_ASSERT(n == nready);

    /* each key: per class, the model's waiters in ticket order */

    for (key = 0; key < NKEYS; key++) {
        q = &st->q[key];
        total = 0;
        sum = 0;

        for (k = 0; k < DSG_MAX_CLASSES; k++) {
            n = 0;
            prev = NULL;

            for (w = q->head[k]; w != NULL; w = w->next) {
                i = m_index(st, w);
                m = &st->m[i];

                FUZZ_ASSERT(m->state != DSG_WAITER_FREE);
                FUZZ_ASSERT(m->key == key && m->cls == k);
                FUZZ_ASSERT(w->prev == prev);
                FUZZ_ASSERT(prev == NULL || prev->ticket < w->ticket);

                prev = w;
                n++;
                FUZZ_ASSERT(n <= st->added);
            }

            FUZZ_ASSERT(q->tail[k] == prev);
            FUZZ_ASSERT(q->count[k] == n);

            /*
             * n distinct (strictly increasing tickets) waiters of the
             * model's (key, k), and the model has as many: the same set
             */

            sum += n;
            FUZZ_ASSERT(m_ahead_of_new(st, key, k) == sum);
            FUZZ_ASSERT(dsg_queue_ahead_of_new(q, k) == sum);
            total += n;
        }

        FUZZ_ASSERT(q->total == total);

        h = m_head(st, key);

        if (h < 0) {
            FUZZ_ASSERT(dsg_queue_head(q) == NULL);
            continue;
        }

        FUZZ_ASSERT(dsg_queue_head(q) == &st->w[h]);

        /* DORMANT: not the head */
        FUZZ_ASSERT(st->m[h].state != DSG_WAITER_DORMANT);
    }
}


/* removes w[i] (live) and checks the answer */

static void
op_remove(st_t *st, uint32_t i)
{
    int            head, h;
    uint32_t       key;
    dsg_waiter_t  *r;

    key = st->m[i].key;
    head = m_head(st, key);

    r = dsg_queue_remove(&st->pool, &st->q[key], &st->w[i]);

    st->m[i].state = DSG_WAITER_FREE;
    st->nlive--;

    /* a new head, DORMANT: READY and returned */

    h = m_head(st, key);

    if (head == (int) i && h >= 0 && st->m[h].state == DSG_WAITER_DORMANT) {
        FUZZ_ASSERT(r == &st->w[h]);
        st->m[h].state = DSG_WAITER_READY;

    } else {
        FUZZ_ASSERT(r == NULL);
    }
}


static void
op_push(st_t *st, uint32_t key, uint32_t cls, uint64_t owner)
{
    int            h;
    uint32_t       i;
    dsg_waiter_t  *w;
    m_waiter_t    *m;

    w = dsg_queue_push(&st->pool, &st->q[key], cls, st->ticket,
                       (uint32_t) owner + 1000, owner, &st->q[key],
                       (void *) (uintptr_t) st->ticket);

    if (cls >= DSG_MAX_CLASSES || st->nlive == st->added) {
        FUZZ_ASSERT(w == NULL);
        return;
    }

    FUZZ_ASSERT(w != NULL);

    i = m_index(st, w);
    m = &st->m[i];

    FUZZ_ASSERT(m->state == DSG_WAITER_FREE);

    m->key = key;
    m->cls = cls;
    m->ticket = st->ticket;
    m->owner = owner;
    m->pid = (uint32_t) owner + 1000;
    m->state = DSG_WAITER_DORMANT;       /* not FREE, for m_head() */
    st->nlive++;

    h = m_head(st, key);
    m->state = (h == (int) i) ? DSG_WAITER_ACTIVE : DSG_WAITER_DORMANT;

    FUZZ_ASSERT(w->state == m->state);
}


static void
op_pickup(st_t *st, uint64_t owner, uint32_t n)
{
    uint8_t        seen[MAX_POOL];
    uint32_t       i, j, got, want;
    dsg_waiter_t  *out[8];

    want = 0;

    for (i = 0; i < st->added; i++) {
        want += st->m[i].state == DSG_WAITER_READY
                && st->m[i].owner == owner;
    }

    if (want > n) {
        want = n;
    }

    memset(out, 0, sizeof(out));
    got = dsg_queue_pickup(&st->pool, owner, out, n);

    FUZZ_ASSERT(got == want);

    memset(seen, 0, sizeof(seen));

    for (j = 0; j < got; j++) {
        i = m_index(st, out[j]);
        FUZZ_ASSERT(!seen[i]);
        FUZZ_ASSERT(st->m[i].state == DSG_WAITER_READY
                    && st->m[i].owner == owner);
        seen[i] = 1;
        st->m[i].state = DSG_WAITER_ACTIVE;
    }

    /* nothing written past n */
    for (j = n; j < 8; j++) {
        FUZZ_ASSERT(out[j] == NULL);
    }
}


static void
check_layout(fz_t *f)
{
    int                 rc;
    uint8_t             nclasses, mode;
    uint32_t            k, qlen[DSG_MAX_CLASSES];
    uint64_t            sum, limit;
    dsg_queue_layout_t  l;

    nclasses = fz_u8(f) % (DSG_MAX_CLASSES + 2);
    mode = fz_u8(f);

    /* around the total's limit spread over 8 classes, or in one */

    limit = (mode & 2) ? DSG_QUEUE_MAX_SLOTS
                       : DSG_QUEUE_MAX_SLOTS / DSG_MAX_CLASSES;

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        qlen[k] = (mode & 4) ? fz_u8(f) : (uint32_t) fz_pick(f, limit);
    }

    sum = 0;

    if (!(mode & 1)) {
        for (k = 0; k < nclasses && k < DSG_MAX_CLASSES; k++) {
            sum += qlen[k];
        }
    }

    memset(&l, 0x5a, sizeof(l));
    rc = dsg_queue_layout_init(&l, (mode & 1) ? NULL : qlen, nclasses);

    if (nclasses == 0 || nclasses > DSG_MAX_CLASSES
        || sum > DSG_QUEUE_MAX_SLOTS)
    {
        FUZZ_ASSERT(rc == DSG_EINVAL);
        return;
    }

    FUZZ_ASSERT(rc == DSG_OK);
    FUZZ_ASSERT(l.nclasses == nclasses);
    FUZZ_ASSERT(l.total == sum);

    for (k = 0; k < nclasses; k++) {
        FUZZ_ASSERT(l.len[k] == ((mode & 1) ? 0 : qlen[k]));
    }
}


static void
check_math(fz_t *f)
{
    u128      n, q;
    uint32_t  ahead, cap;
    uint64_t  mean, e, s, r;

    ahead = (uint32_t) fz_pick(f, UINT32_MAX);
    mean = fz_pick(f, UINT64_MAX);
    cap = (uint32_t) fz_pick(f, 64);

    n = (u128) ahead + 1;
    q = (n * mean + (cap ? cap : 1) - 1) / (cap ? cap : 1);
    r = dsg_expected_wait_ms(ahead, mean, cap);

    FUZZ_ASSERT(r == (q > UINT64_MAX ? UINT64_MAX : (uint64_t) q));

    e = fz_pick(f, UINT64_MAX);
    s = fz_pick(f, UINT64_MAX);
    r = e;
    dsg_ewma_update(&r, s);

    if (e == 0) {
        FUZZ_ASSERT(r == s);
        return;
    }

    /* between the two, non-zero, within 1/2 of (7e + s) / 8 */

    FUZZ_ASSERT(r != 0);
    FUZZ_ASSERT(r >= (e < s ? e : s) || r == 1);
    FUZZ_ASSERT(r <= (e > s ? e : s));

    q = (u128) e * 7 + s;            /* 8 * the exact mean */
    FUZZ_ASSERT((u128) r * 8 + 4 >= q || r == 1);
    FUZZ_ASSERT((u128) r * 8 <= q + 4);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int            i, h;
    st_t           st;
    fz_t           f;
    uint8_t        op, b;
    uint32_t       k, cls, first;
    uint64_t       owner;
    unsigned       steps;

    f.p = data;
    f.n = size;

    check_layout(&f);

    memset(&st, 0, sizeof(st));

    st.n = 1 + fz_u8(&f) % MAX_POOL;
    first = fz_u8(&f) % (st.n + 1);

    /* tickets: monotonic from anywhere, without wrapping */

    st.ticket = fz_pick(&f, UINT32_MAX);

    if (st.ticket > UINT32_MAX - 65536) {
        st.ticket = UINT32_MAX - 65536;
    }

    /* an exact-size heap block: ASan flags any access past the pool */

    st.w = malloc(st.n * sizeof(dsg_waiter_t));
    FUZZ_ASSERT(st.w != NULL);
    memset(st.w, 0xa5, st.n * sizeof(dsg_waiter_t));

    dsg_pool_add(&st.pool, st.w, first);
    st.added = first;

    check_all(&st);

    for (steps = 0; steps < 1024 && !fz_empty(&f); steps++) {
        op = fz_u8(&f);

        switch (op & 7) {

        case 0: case 1: case 2:                          /* push */
            b = fz_u8(&f);

            if (b < 0xe0) {
                cls = b % 3;
            } else if (b < 0xfc) {
                cls = b % DSG_MAX_CLASSES;
            } else if (b < 0xff) {
                cls = DSG_MAX_CLASSES + (b & 3);         /* unknown */
            } else {
                cls = UINT32_MAX;
            }

            st.ticket += 1 + (op >> 7);
            op_push(&st, (op >> 3) & 3, cls, (op >> 5) & 3);
            break;

        case 3:                                          /* remove */
            b = fz_u8(&f);

            if (b == 0xff) {
                /* nothing to take: NULL, or a record already free */

                FUZZ_ASSERT(dsg_queue_remove(&st.pool, &st.q[0], NULL)
                            == NULL);

                for (k = 0; k < st.added; k++) {
                    if (st.m[k].state == DSG_WAITER_FREE) {
                        FUZZ_ASSERT(dsg_queue_remove(&st.pool,
                                        &st.q[(op >> 3) & 3], &st.w[k])
                                    == NULL);
                        break;
                    }
                }

                break;
            }

            i = m_live(&st, b);

            if (i >= 0) {
                op_remove(&st, (uint32_t) i);
            }

            break;

        case 4:                                          /* sleep */
            i = m_live(&st, fz_u8(&f));

            if (i < 0) {
                break;
            }

            h = m_head(&st, st.m[i].key);

            if (st.m[i].state == DSG_WAITER_ACTIVE && h != i) {
                FUZZ_ASSERT(dsg_queue_sleep(&st.q[st.m[i].key], &st.w[i])
                            == 1);
                st.m[i].state = DSG_WAITER_DORMANT;

            } else {
                FUZZ_ASSERT(dsg_queue_sleep(&st.q[st.m[i].key], &st.w[i])
                            == 0);
            }

            break;

        case 5:                                          /* pickup */
            op_pickup(&st, ((op >> 3) & 7) % (NOWNERS + 1),
                      fz_u8(&f) % 9);
            break;

        case 6:                                          /* activate */
            i = m_live(&st, fz_u8(&f));

            if (i < 0) {
                break;
            }

            dsg_queue_activate(&st.pool, &st.w[i]);

            if (st.m[i].state == DSG_WAITER_READY) {
                st.m[i].state = DSG_WAITER_ACTIVE;
            }

            break;

        default:
            switch ((op >> 3) & 3) {

            case 0:                                      /* a newcomer */
                k = (op >> 5) & 3;
                cls = (uint32_t) fz_pick(&f, DSG_MAX_CLASSES);
                FUZZ_ASSERT(dsg_queue_ahead_of_new(&st.q[k], cls)
                            == m_ahead_of_new(&st, k, cls));
                break;

            case 1:                                      /* a dead owner */
                owner = (op >> 5) & 3;

                for (k = 0; k < st.added; k++) {
                    if (st.m[k].state != DSG_WAITER_FREE
                        && st.m[k].owner == owner)
                    {
                        op_remove(&st, k);
                    }
                }

                /* none left (what their removal promoted: check_all()) */

                for (k = 0; k < st.added; k++) {
                    FUZZ_ASSERT(st.m[k].state == DSG_WAITER_FREE
                                || st.m[k].owner != owner);
                }

                break;

            case 2:                                      /* more records */
                if (st.added < st.n) {
                    b = fz_u8(&f);
                    k = 1 + b % (st.n - st.added);
                    dsg_pool_add(&st.pool, st.w + st.added, k);
                    st.added += k;
                }

                break;

            default:
                check_math(&f);
                break;
            }

            break;
        }

        check_all(&st);
    }

    free(st.w);

    return 0;
}
