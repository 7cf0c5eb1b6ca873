/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_queue, the cross-worker priority queue decisions.
 *
 * The input is a layout (per class queue lengths, valid or not) and a
 * program of operations on the slot array: take, free, ahead,
 * ahead_of_new, head, depth, next_of_pid, reap, with few keys and pids
 * so that they collide, and arbitrary tickets (equal ones included).
 * Every answer is compared with a naive model that scans the whole array
 * with the documented rule (same key; a higher class first, then the
 * smaller ticket), so the range-limited scans of dsg_queue.c are checked
 * against the definition.  dsg_expected_wait_ms() is compared with the
 * 128-bit formula, dsg_ewma_update() with the definition of the mean.
 */


#include <string.h>

#include "dsg_queue.h"
#include "fuzz.h"


typedef unsigned __int128  u128;


#define MAX_LEN  24                  /* per class, keeps the array small */


static int
before(const dsg_slot_t *a, const dsg_slot_t *b)
{
    if (a->cls != b->cls) {
        return a->cls < b->cls;
    }

    return a->ticket < b->ticket;
}


static uint32_t
model_ahead(const dsg_queue_layout_t *l, const dsg_slot_t *slots, int idx)
{
    uint32_t  i, n;

    if (idx < 0 || (uint32_t) idx >= l->total
        || slots[idx].state != DSG_SLOT_WAITING)
    {
        return 0;
    }

    n = 0;

    for (i = 0; i < l->total; i++) {
        if ((int) i != idx && slots[i].state == DSG_SLOT_WAITING
            && slots[i].key == slots[idx].key
            && before(&slots[i], &slots[idx]))
        {
            n++;
        }
    }

    return n;
}


static void
check_layout(const dsg_queue_layout_t *l, const uint32_t *qlen)
{
    uint32_t  k, total;

    total = 0;

    for (k = 0; k < l->nclasses; k++) {
        FUZZ_ASSERT(l->first[k] == total);
        FUZZ_ASSERT(l->len[k] == (qlen ? qlen[k] : 0));
        total += l->len[k];
    }

    FUZZ_ASSERT(l->total == total);
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
    int                 rc, idx, head, i, from;
    fz_t                f;
    uint8_t             op;
    uint32_t            k, j, n, cls, nclasses, pid, qlen[DSG_MAX_CLASSES];
    uint64_t            key, ticket, big[DSG_MAX_CLASSES];
    unsigned            steps;
    dsg_slot_t         *slots, *s;
    dsg_queue_layout_t  l;

    f.p = data;
    f.n = size;

    nclasses = fz_u8(&f) % (DSG_MAX_CLASSES + 2);

    /* a layout too big to allocate: only the refusal is checked */

    op = fz_u8(&f);

    if (op == 0xff) {
        for (k = 0; k < DSG_MAX_CLASSES; k++) {
            big[k] = fz_pick(&f, DSG_QUEUE_MAX_SLOTS);
            qlen[k] = (uint32_t) big[k];
        }

        key = 0;                      /* the sum, in 64 bits */
        for (k = 0; k < nclasses && k < DSG_MAX_CLASSES; k++) {
            key += qlen[k];
        }

        rc = dsg_queue_layout_init(&l, qlen, nclasses);

        if (nclasses == 0 || nclasses > DSG_MAX_CLASSES
            || key > DSG_QUEUE_MAX_SLOTS)
        {
            FUZZ_ASSERT(rc == DSG_EINVAL);

        } else {
            FUZZ_ASSERT(rc == DSG_OK);
            check_layout(&l, qlen);
        }

        return 0;
    }

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        qlen[k] = fz_u8(&f) % (MAX_LEN + 1);
    }

    rc = dsg_queue_layout_init(&l, (op & 1) ? NULL : qlen, nclasses);

    if (nclasses == 0 || nclasses > DSG_MAX_CLASSES) {
        FUZZ_ASSERT(rc == DSG_EINVAL);
        return 0;
    }

    FUZZ_ASSERT(rc == DSG_OK);
    check_layout(&l, (op & 1) ? NULL : qlen);

    /* an exact-size heap array: ASan flags any access past the layout */

    slots = malloc((l.total ? l.total : 1) * sizeof(dsg_slot_t));
    FUZZ_ASSERT(slots != NULL);
    memset(slots, 0xa5, (l.total ? l.total : 1) * sizeof(dsg_slot_t));
    dsg_queue_init(&l, slots);

    for (k = 0; k < l.total; k++) {
        FUZZ_ASSERT(slots[k].state == DSG_SLOT_FREE);
    }

    ticket = 0;

    for (steps = 0; steps < 512 && !fz_empty(&f); steps++) {
        op = fz_u8(&f);
        cls = (op >> 4) % (nclasses + 1);    /* nclasses: invalid */
        key = (op >> 2) & 3;

        switch (op & 15) {

        case 0: case 1: case 2: case 3: case 4:          /* enqueue */
            pid = 1 + fz_u8(&f) % 4;

            if (op & 1) {
                ticket++;
            } else {
                ticket = fz_pick(&f, UINT64_MAX);    /* also duplicates */
            }

            /* the first free slot of the class's range, or -1 */

            idx = -1;

            if (cls < nclasses) {
                for (k = l.first[cls]; k < l.first[cls] + l.len[cls]; k++) {
                    if (slots[k].state == DSG_SLOT_FREE) {
                        idx = (int) k;
                        break;
                    }
                }
            }

            n = dsg_queue_ahead_of_new(&l, slots, cls, key);

            rc = dsg_queue_take(&l, slots, cls, pid, ticket, ticket ^ 7, key);
            FUZZ_ASSERT(rc == idx);

            if (rc >= 0) {
                s = &slots[rc];
                FUZZ_ASSERT(s->state == DSG_SLOT_WAITING && s->pid == pid
                            && s->cls == cls && s->ticket == ticket
                            && s->deadline_ms == (ticket ^ 7)
                            && s->key == key);

                /* with a fresh, largest ticket: exactly those were ahead */

                if ((op & 1) && ticket != 0) {
                    for (k = 0, j = 0; k < l.total; k++) {
                        j += slots[k].state == DSG_SLOT_WAITING
                             && slots[k].ticket >= ticket && (int) k != rc;
                    }

                    if (j == 0) {
                        FUZZ_ASSERT(dsg_queue_ahead(&l, slots, rc) == n);
                    }
                }
            }

            break;

        case 5: case 6:                                  /* dequeue */
            idx = (int) (fz_u8(&f) % (l.total + 1)) - 1;   /* -1: none */
            dsg_queue_free(slots, idx);

            if (idx >= 0) {
                FUZZ_ASSERT(slots[idx].state == DSG_SLOT_FREE);
                FUZZ_ASSERT(slots[idx].pid == 0);
            }

            break;

        case 7: case 8:                                  /* position */
            idx = (int) (fz_u8(&f) % (l.total + 2)) - 1;   /* out of range */
            FUZZ_ASSERT(dsg_queue_ahead(&l, slots, idx)
                        == model_ahead(&l, slots, idx));
            break;

        case 9:                                          /* a newcomer */
            n = 0;
            j = (cls < nclasses) ? cls : nclasses - 1;

            for (k = 0; k < l.total; k++) {
                n += slots[k].state == DSG_SLOT_WAITING
                     && slots[k].key == key && slots[k].cls <= j;
            }

            FUZZ_ASSERT(dsg_queue_ahead_of_new(&l, slots, cls, key) == n);
            break;

        case 10:                                         /* the head */
            head = dsg_queue_head(&l, slots, key);

            if (head < 0) {
                for (k = 0; k < l.total; k++) {
                    FUZZ_ASSERT(slots[k].state != DSG_SLOT_WAITING
                                || slots[k].key != key);
                }

                break;
            }

            FUZZ_ASSERT((uint32_t) head < l.total);
            FUZZ_ASSERT(slots[head].state == DSG_SLOT_WAITING
                        && slots[head].key == key);
            FUZZ_ASSERT(model_ahead(&l, slots, head) == 0);
            FUZZ_ASSERT(dsg_queue_ahead(&l, slots, head) == 0);

            /* the lowest index among the waiters nobody is ahead of */

            for (k = 0; k < (uint32_t) head; k++) {
                FUZZ_ASSERT(slots[k].state != DSG_SLOT_WAITING
                            || slots[k].key != key
                            || model_ahead(&l, slots, (int) k) != 0
                            || before(&slots[head], &slots[k]));
            }

            break;

        case 11:                                         /* depth */
            n = 0;

            if (cls < nclasses) {
                for (k = 0; k < l.total; k++) {
                    n += slots[k].state == DSG_SLOT_WAITING
                         && k >= l.first[cls]
                         && k < l.first[cls] + l.len[cls];
                }
            }

            FUZZ_ASSERT(dsg_queue_depth(&l, slots, cls) == n);
            break;

        case 12:                                         /* walk a pid */
            pid = fz_u8(&f) % 6;
            from = (int) (fz_u8(&f) % (l.total + 3)) - 2;
            i = dsg_queue_next_of_pid(&l, slots, pid, from);

            for (k = (from > 0) ? (uint32_t) from : 0; k < l.total; k++) {
                if (slots[k].state == DSG_SLOT_WAITING
                    && slots[k].pid == pid)
                {
                    break;
                }
            }

            FUZZ_ASSERT(i == ((k < l.total) ? (int) k : -1));
            break;

        case 13:                                         /* a dead worker */
            pid = fz_u8(&f) % 6;
            n = 0;

            for (k = 0; k < l.total; k++) {
                n += slots[k].state == DSG_SLOT_WAITING
                     && slots[k].pid == pid;
            }

            /* the glue's reaper: free each waiting slot of the pid */
            for (k = 0; k < l.total; k++) {
                if (slots[k].state != DSG_SLOT_FREE && slots[k].pid == pid) {
                    dsg_queue_free(slots, k);
                    n--;
                }
            }
            FUZZ_ASSERT(n == 0);
            FUZZ_ASSERT(dsg_queue_next_of_pid(&l, slots, pid, 0) == -1);
            break;

        default:
            check_math(&f);
            break;
        }

        /* every slot is free or waiting, in its own class's range */

        for (k = 0; k < l.total; k++) {
            FUZZ_ASSERT(slots[k].state == DSG_SLOT_FREE
                        || slots[k].state == DSG_SLOT_WAITING);

            if (slots[k].state == DSG_SLOT_WAITING) {
                j = slots[k].cls;
                FUZZ_ASSERT(j < nclasses && k >= l.first[j]
                            && k < l.first[j] + l.len[j]);
            }
        }
    }

    free(slots);

    return 0;
}
