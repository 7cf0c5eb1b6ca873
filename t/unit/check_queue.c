/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_queue: slot layout, ordering, reaping, wait estimates.
 */


#include <stdlib.h>
#include <string.h>
#include <check.h>

#include "dsg_queue.h"


#define CRIT  0
#define NORM  1
#define LOW   2

#define KEY_A  0x1000
#define KEY_B  0x2000


static dsg_queue_layout_t *
layout(dsg_queue_layout_t *l, uint32_t crit, uint32_t norm, uint32_t low)
{
    uint32_t  qlen[3];

    qlen[0] = crit;
    qlen[1] = norm;
    qlen[2] = low;

    ck_assert_int_eq(dsg_queue_layout_init(l, qlen, 3), DSG_OK);

    return l;
}


/* the glue's reaper: frees every waiting slot of a dead pid */

static uint32_t
t_reap(const dsg_queue_layout_t *l, dsg_slot_t *slots, uint32_t pid)
{
    uint32_t  i, n;

    n = 0;

    for (i = 0; i < l->total; i++) {
        if (slots[i].state != DSG_SLOT_FREE && slots[i].pid == pid) {
            dsg_queue_free(slots, i);
            n++;
        }
    }

    return n;
}


START_TEST(test_layout)
{
    dsg_queue_layout_t  l;
    uint32_t            qlen[DSG_MAX_CLASSES + 1] = { 2, 0, 3 };

    layout(&l, 2, 0, 3);

    ck_assert_uint_eq(l.nclasses, 3);
    ck_assert_uint_eq(l.total, 5);
    ck_assert_uint_eq(l.first[0], 0);
    ck_assert_uint_eq(l.len[0], 2);
    ck_assert_uint_eq(l.first[1], 2);
    ck_assert_uint_eq(l.len[1], 0);
    ck_assert_uint_eq(l.first[2], 2);
    ck_assert_uint_eq(l.len[2], 3);

    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 0), DSG_EINVAL);
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, DSG_MAX_CLASSES + 1),
                     DSG_EINVAL);

    qlen[0] = DSG_QUEUE_MAX_SLOTS;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 3), DSG_EINVAL);
    qlen[0] = DSG_QUEUE_MAX_SLOTS - 3;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 3), DSG_OK);
    ck_assert_uint_eq(l.total, DSG_QUEUE_MAX_SLOTS);

    /* no wrap of the total */
    qlen[0] = UINT32_MAX;
    qlen[1] = 2;
    ck_assert_int_eq(dsg_queue_layout_init(&l, qlen, 3), DSG_EINVAL);

    /* no queues at all */
    ck_assert_int_eq(dsg_queue_layout_init(&l, NULL, 2), DSG_OK);
    ck_assert_uint_eq(l.total, 0);
}
END_TEST


START_TEST(test_take_full)
{
    dsg_queue_layout_t  l;
    dsg_slot_t          slots[5];
    int                 i, a, b;

    layout(&l, 2, 0, 3);
    memset(slots, 0xff, sizeof(slots));
    dsg_queue_init(&l, slots);

    for (i = 0; i < 5; i++) {
        ck_assert_uint_eq(slots[i].state, DSG_SLOT_FREE);
    }

    a = dsg_queue_take(&l, slots, CRIT, 11, 1, 500, KEY_A);
    b = dsg_queue_take(&l, slots, CRIT, 12, 2, 600, KEY_B);
    ck_assert_int_eq(a, 0);
    ck_assert_int_eq(b, 1);
    ck_assert_int_eq(dsg_queue_take(&l, slots, CRIT, 13, 3, 700, KEY_A), -1);

    ck_assert_uint_eq(slots[b].pid, 12);
    ck_assert_uint_eq(slots[b].state, DSG_SLOT_WAITING);
    ck_assert_uint_eq(slots[b].cls, CRIT);
    ck_assert_uint_eq(slots[b].ticket, 2);
    ck_assert_uint_eq(slots[b].deadline_ms, 600);
    ck_assert_uint_eq(slots[b].key, KEY_B);

    /* a class without slots never queues, neither does an unknown class */
    ck_assert_int_eq(dsg_queue_take(&l, slots, NORM, 13, 4, 700, KEY_A), -1);
    ck_assert_int_eq(dsg_queue_take(&l, slots, 3, 13, 4, 700, KEY_A), -1);

    /* a full class does not spill into a lower one's range */
    for (i = 0; i < 3; i++) {
        ck_assert_int_eq(dsg_queue_take(&l, slots, LOW, 13, 5 + i, 700,
                                        KEY_A),
                         2 + i);
    }

    ck_assert_int_eq(dsg_queue_take(&l, slots, LOW, 13, 9, 700, KEY_A), -1);

    /* a freed slot is taken again */
    dsg_queue_free(slots, a);
    dsg_queue_free(slots, a);
    dsg_queue_free(slots, -1);
    ck_assert_uint_eq(slots[a].state, DSG_SLOT_FREE);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, CRIT), 1);
    ck_assert_int_eq(dsg_queue_take(&l, slots, CRIT, 14, 10, 800, KEY_A), a);
    ck_assert_uint_eq(slots[a].pid, 14);
    ck_assert_uint_eq(slots[a].ticket, 10);
}
END_TEST


START_TEST(test_ordering)
{
    dsg_queue_layout_t  l;
    dsg_slot_t          slots[12];
    int                 low0, norm1, norm3, crit5, crit6, b_low, b_norm;

    layout(&l, 4, 4, 4);
    dsg_queue_init(&l, slots);

    /* arrival order (tickets) differs from priority order */
    low0 = dsg_queue_take(&l, slots, LOW, 1, 0, 0, KEY_A);
    norm1 = dsg_queue_take(&l, slots, NORM, 1, 1, 0, KEY_A);
    b_low = dsg_queue_take(&l, slots, LOW, 1, 2, 0, KEY_B);
    norm3 = dsg_queue_take(&l, slots, NORM, 2, 3, 0, KEY_A);
    b_norm = dsg_queue_take(&l, slots, NORM, 2, 4, 0, KEY_B);
    crit5 = dsg_queue_take(&l, slots, CRIT, 2, 5, 0, KEY_A);
    crit6 = dsg_queue_take(&l, slots, CRIT, 1, 6, 0, KEY_A);

    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, crit5), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, crit6), 1);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, norm1), 2);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, norm3), 3);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, low0), 4);
    ck_assert_int_eq(dsg_queue_head(&l, slots, KEY_A), crit5);

    /* another key is independent */
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, b_norm), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, b_low), 1);
    ck_assert_int_eq(dsg_queue_head(&l, slots, KEY_B), b_norm);
    ck_assert_int_eq(dsg_queue_head(&l, slots, 0x3000), -1);

    /* newcomers: everyone of the same key at its class or above */
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&l, slots, CRIT, KEY_A), 2);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&l, slots, NORM, KEY_A), 4);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&l, slots, LOW, KEY_A), 5);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&l, slots, CRIT, KEY_B), 0);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&l, slots, LOW, KEY_B), 2);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&l, slots, 7, KEY_B), 2);

    /* the head leaves: everyone moves up by one */
    dsg_queue_free(slots, crit5);
    ck_assert_int_eq(dsg_queue_head(&l, slots, KEY_A), crit6);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, crit6), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, norm1), 1);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, low0), 3);

    /* one in the middle leaves: only those behind move */
    dsg_queue_free(slots, norm1);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, crit6), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, norm3), 1);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, low0), 2);

    /* a free slot or a bad index has nobody ahead */
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, norm1), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, -1), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 12), 0);
}
END_TEST


/* FIFO within a class, whatever slot each waiter landed in */

START_TEST(test_fifo)
{
    dsg_queue_layout_t  l;
    dsg_slot_t          slots[8];
    int                 idx[8], i, j;
    uint64_t            ticket;

    layout(&l, 0, 8, 0);
    dsg_queue_init(&l, slots);

    ticket = 100;

    for (i = 0; i < 8; i++) {
        idx[i] = dsg_queue_take(&l, slots, NORM, 1, ticket++, 0, KEY_A);
    }

    /* free slots 5, 2, 6 and refill them: newcomers take the low slots */
    dsg_queue_free(slots, idx[5]);
    dsg_queue_free(slots, idx[2]);
    dsg_queue_free(slots, idx[6]);

    for (i = 0; i < 3; i++) {
        idx[i] = dsg_queue_take(&l, slots, NORM, 1, ticket++, 0, KEY_A);
    }

    ck_assert_int_eq(idx[0], 2);
    ck_assert_int_eq(idx[1], 5);
    ck_assert_int_eq(idx[2], 6);

    /* order: the old ones in slots 0, 1, 3, 4, 7, then the newcomers */
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 0), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 1), 1);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 3), 2);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 4), 3);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 7), 4);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 2), 5);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 5), 6);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 6), 7);
    ck_assert_uint_eq(dsg_queue_ahead_of_new(&l, slots, NORM, KEY_A), 8);

    /* serving the head repeatedly yields ticket order */
    ticket = 0;

    for (i = 0; i < 8; i++) {
        j = dsg_queue_head(&l, slots, KEY_A);
        ck_assert_int_ge(j, 0);
        ck_assert_uint_eq(dsg_queue_ahead(&l, slots, j), 0);
        ck_assert_uint_gt(slots[j].ticket, ticket);
        ticket = slots[j].ticket;
        dsg_queue_free(slots, j);
    }

    ck_assert_int_eq(dsg_queue_head(&l, slots, KEY_A), -1);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, NORM), 0);
}
END_TEST


START_TEST(test_depth)
{
    dsg_queue_layout_t  l;
    dsg_slot_t          slots[9];
    int                 i, a;

    layout(&l, 2, 3, 4);
    dsg_queue_init(&l, slots);

    ck_assert_uint_eq(dsg_queue_depth(&l, slots, CRIT), 0);

    for (i = 0; i < 3; i++) {
        dsg_queue_take(&l, slots, LOW, 1, i, 0, i % 2 ? KEY_A : KEY_B);
    }

    a = dsg_queue_take(&l, slots, NORM, 1, 9, 0, KEY_A);

    ck_assert_uint_eq(dsg_queue_depth(&l, slots, CRIT), 0);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, NORM), 1);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, LOW), 3);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, 5), 0);

    dsg_queue_free(slots, a);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, NORM), 0);
}
END_TEST


START_TEST(test_reap)
{
    dsg_queue_layout_t  l;
    dsg_slot_t          slots[9];
    int                 i, n;

    layout(&l, 2, 3, 4);
    dsg_queue_init(&l, slots);

    dsg_queue_take(&l, slots, CRIT, 100, 1, 0, KEY_A);
    dsg_queue_take(&l, slots, CRIT, 200, 2, 0, KEY_A);
    dsg_queue_take(&l, slots, NORM, 100, 3, 0, KEY_B);
    dsg_queue_take(&l, slots, LOW, 100, 4, 0, KEY_A);
    dsg_queue_take(&l, slots, LOW, 200, 5, 0, KEY_A);

    /* a free slot that once belonged to 100 is not visited */
    i = dsg_queue_take(&l, slots, LOW, 100, 6, 0, KEY_A);
    dsg_queue_free(slots, i);

    /* visiting before freeing */
    n = 0;
    for (i = dsg_queue_next_of_pid(&l, slots, 100, 0);
         i != -1;
         i = dsg_queue_next_of_pid(&l, slots, 100, i + 1))
    {
        ck_assert_uint_eq(slots[i].pid, 100);
        n++;
    }

    ck_assert_int_eq(n, 3);
    ck_assert_int_eq(dsg_queue_next_of_pid(&l, slots, 100, 9), -1);
    ck_assert_int_eq(dsg_queue_next_of_pid(&l, slots, 100, -5), 0);

    ck_assert_uint_eq(t_reap(&l, slots, 100), 3);
    ck_assert_uint_eq(t_reap(&l, slots, 100), 0);
    ck_assert_uint_eq(t_reap(&l, slots, 300), 0);

    ck_assert_uint_eq(dsg_queue_depth(&l, slots, CRIT), 1);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, NORM), 0);
    ck_assert_uint_eq(dsg_queue_depth(&l, slots, LOW), 1);
    ck_assert_int_eq(dsg_queue_head(&l, slots, KEY_A), 1);
    ck_assert_int_eq(dsg_queue_head(&l, slots, KEY_B), -1);

    /* the survivors' positions follow */
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots, 1), 0);
    ck_assert_uint_eq(dsg_queue_ahead(&l, slots,
                          dsg_queue_next_of_pid(&l, slots, 200, 2)), 1);

    ck_assert_uint_eq(t_reap(&l, slots, 200), 2);

    for (i = 0; i < 9; i++) {
        ck_assert_uint_eq(slots[i].state, DSG_SLOT_FREE);
    }
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

    tc = tcase_create("slots");
    tcase_add_test(tc, test_layout);
    tcase_add_test(tc, test_take_full);
    tcase_add_test(tc, test_depth);
    tcase_add_test(tc, test_reap);
    suite_add_tcase(s, tc);

    tc = tcase_create("order");
    tcase_add_test(tc, test_ordering);
    tcase_add_test(tc, test_fifo);
    suite_add_tcase(s, tc);

    tc = tcase_create("estimates");
    tcase_add_test(tc, test_expected_wait);
    tcase_add_test(tc, test_ewma);
    suite_add_tcase(s, tc);

    return s;
}
