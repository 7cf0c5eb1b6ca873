/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_bucket: token buckets, reserved tiers, in-flight caps.
 */


#include <stdlib.h>
#include <string.h>
#include <check.h>

#include "dsg_bucket.h"


#define CRIT  0
#define NORM  1
#define LOW   2


static void
conf_ok(dsg_limit_conf_t *c, uint64_t n, uint64_t period_ms, uint64_t burst,
    uint32_t inflight, const uint32_t *reserve, uint32_t nclasses)
{
    int  rc;

    rc = dsg_limit_conf_init(c, n, period_ms, burst, inflight, reserve,
                             nclasses);
    ck_assert_int_eq(rc, DSG_OK);
}


/* check, and charge if admissible */

static int
try(const dsg_limit_conf_t *c, dsg_limit_state_t *s, uint32_t cls,
    uint64_t now)
{
    int  rc;

    rc = dsg_limit_check(c, s, cls, now, NULL);

    if (rc == DSG_OK) {
        dsg_limit_charge(c, s, cls);
    }

    return rc;
}


/* admitted count of one class, one attempt every step ms in [from, to) */

static uint64_t
flood(const dsg_limit_conf_t *c, dsg_limit_state_t *s, uint32_t cls,
    uint64_t from, uint64_t to, uint64_t step)
{
    uint64_t  t, n;

    n = 0;

    for (t = from; t < to; t += step) {
        if (try(c, s, cls, t) == DSG_OK) {
            n++;
        }
    }

    return n;
}


static void
assert_levels_sane(const dsg_limit_conf_t *c, const dsg_limit_state_t *s)
{
    uint32_t  t;

    for (t = 0; t < c->ntiers; t++) {
        ck_assert_uint_le(s->level[t], c->capacity[t]);
    }
}


START_TEST(test_state_size)
{
    ck_assert_uint_le(sizeof(dsg_limit_state_t), 56);
}
END_TEST


START_TEST(test_conf_units)
{
    dsg_limit_conf_t  c;

    /* 10r/s burst 5 */
    conf_ok(&c, 10, 1000, 5, 0, NULL, 3);

    ck_assert_uint_eq(c.ntiers, 1);
    ck_assert_uint_eq(c.share[0], 100);
    ck_assert_uint_eq(c.class_tier[0], 0);
    ck_assert_uint_eq(c.class_tier[2], 0);
    ck_assert_uint_eq(c.cost, 100000);
    ck_assert_uint_eq(c.gain[0], 1000);
    ck_assert_uint_eq(c.capacity[0], 6 * 100000 + 1000 - 1);
    ck_assert_uint_eq(c.cap[0], 0);

    /* 1r/m */
    conf_ok(&c, 1, 60000, 0, 0, NULL, 1);

    ck_assert_uint_eq(c.cost, 6000000);
    ck_assert_uint_eq(c.gain[0], 100);
    ck_assert_uint_eq(c.capacity[0], 6000000 + 99);
}
END_TEST


START_TEST(test_conf_tiers)
{
    dsg_limit_conf_t  c;
    uint32_t          r1[] = { 20, 0, 0 };
    uint32_t          r2[] = { 0, 20, 0 };
    uint32_t          r3[] = { 10, 10, 10, 0, 0, 0, 0, 0 };
    uint32_t          r4[] = { 10, 10, 10, 10, 0 };
    uint32_t          r5[] = { 0, 0, 0, 50 };

    /* critical reserves 20: normal and low share the 80% tier */
    conf_ok(&c, 10, 1000, 0, 10, r1, 3);

    ck_assert_uint_eq(c.ntiers, 2);
    ck_assert_uint_eq(c.share[0], 100);
    ck_assert_uint_eq(c.share[1], 80);
    ck_assert_uint_eq(c.class_tier[CRIT], 0);
    ck_assert_uint_eq(c.class_tier[NORM], 1);
    ck_assert_uint_eq(c.class_tier[LOW], 1);
    ck_assert_uint_eq(c.cap[0], 10);
    ck_assert_uint_eq(c.cap[1], 8);
    ck_assert_uint_eq(c.gain[1], 800);

    /* tier 1 burst 0.8 request: at least one request's worth */
    ck_assert_uint_eq(c.capacity[1], 100000 + 800 - 1);

    ck_assert_uint_eq(dsg_limit_class_tier(&c, NORM), 1);
    ck_assert_uint_eq(dsg_limit_class_tier(&c, 7), 1);
    ck_assert_uint_eq(dsg_limit_inflight_cap(&c, CRIT), 10);
    ck_assert_uint_eq(dsg_limit_inflight_cap(&c, LOW), 8);

    /* a reserve only affects the classes below */
    conf_ok(&c, 10, 1000, 0, 0, r2, 3);

    ck_assert_uint_eq(c.ntiers, 2);
    ck_assert_uint_eq(c.class_tier[0], 0);
    ck_assert_uint_eq(c.class_tier[1], 0);
    ck_assert_uint_eq(c.class_tier[2], 1);
    ck_assert_uint_eq(c.share[1], 80);

    /* four tiers, the maximum */
    conf_ok(&c, 10, 1000, 0, 0, r3, 8);

    ck_assert_uint_eq(c.ntiers, 4);
    ck_assert_uint_eq(c.share[1], 90);
    ck_assert_uint_eq(c.share[2], 80);
    ck_assert_uint_eq(c.share[3], 70);
    ck_assert_uint_eq(c.class_tier[7], 3);

    ck_assert_int_eq(dsg_limit_conf_init(&c, 10, 1000, 0, 0, r4, 5),
                     DSG_ETIERS);

    /* the last class's reserve changes no share but is counted */
    conf_ok(&c, 10, 1000, 0, 0, r5, 4);
    ck_assert_uint_eq(c.ntiers, 1);
}
END_TEST


START_TEST(test_conf_errors)
{
    dsg_limit_conf_t  c;
    uint32_t          r100[] = { 60, 40, 0 };
    uint32_t          r101[] = { 60, 41, 0 };
    uint32_t          r99[] = { 60, 39, 0 };
    uint32_t          rwrap[] = { UINT32_MAX, 2, 0 };
    uint32_t          r80[] = { 80, 0 };

    ck_assert_int_eq(dsg_limit_conf_init(&c, 10, 1000, 0, 0, r101, 3),
                     DSG_ERESERVE);
    ck_assert_int_eq(dsg_limit_conf_init(&c, 10, 1000, 0, 0, r100, 3),
                     DSG_ERESERVE);
    ck_assert_int_eq(dsg_limit_conf_init(&c, 10, 1000, 0, 0, rwrap, 3),
                     DSG_ERESERVE);
    conf_ok(&c, 10, 1000, 0, 0, r99, 3);
    ck_assert_uint_eq(c.share[c.class_tier[2]], 1);

    ck_assert_int_eq(dsg_limit_conf_init(&c, 10, 1000, 0, 0, NULL, 0),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_limit_conf_init(&c, 10, 1000, 0, 0, NULL, 9),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_limit_conf_init(&c, 10, 0, 0, 0, NULL, 1),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_limit_conf_init(&c, DSG_MAX_RATE + 1, 1000, 0, 0,
                                         NULL, 1),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_limit_conf_init(&c, 1, 1000, DSG_MAX_BURST + 1, 0,
                                         NULL, 1),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_limit_conf_init(&c, 1, DSG_MAX_PERIOD_MS + 1, 0, 0,
                                         NULL, 1),
                     DSG_EINVAL);
    ck_assert_int_eq(dsg_limit_conf_init(&c, 1, 1000, 0,
                                         DSG_MAX_INFLIGHT + 1, NULL, 1),
                     DSG_EINVAL);

    /* inflight 3, 20% tier: cap 0 */
    ck_assert_int_eq(dsg_limit_conf_init(&c, 0, 0, 0, 3, r80, 2), DSG_ECAP);
    conf_ok(&c, 0, 0, 0, 5, r80, 2);
    ck_assert_uint_eq(c.cap[1], 1);

    /* no rate: period and burst are ignored */
    conf_ok(&c, 0, 0, 7, 4, NULL, 1);
    ck_assert_uint_eq(c.cost, 0);
    ck_assert_uint_eq(c.burst, 0);

    /* any positive period, e.g. 5r/10s */
    conf_ok(&c, 5, 10000, 0, 0, NULL, 1);
}
END_TEST


START_TEST(test_one_per_minute)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s, copy;
    uint64_t           t0, e, w;

    conf_ok(&c, 1, 60000, 0, 0, NULL, 1);

    t0 = 1234567;
    dsg_limit_state_init(&c, &s, t0);

    ck_assert_int_eq(try(&c, &s, 0, t0), DSG_OK);

    for (e = 0; e < 60000; e += 997) {
        copy = s;
        ck_assert_int_eq(dsg_limit_check(&c, &copy, 0, t0 + e, &w), DSG_RATE);
        ck_assert_uint_eq(w, 60000 - e);
    }

    copy = s;
    ck_assert_int_eq(dsg_limit_check(&c, &copy, 0, t0 + 59999, &w), DSG_RATE);
    ck_assert_uint_eq(w, 1);

    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, t0 + 60000, &w), DSG_OK);
    ck_assert_uint_eq(w, 0);
    dsg_limit_charge(&c, &s, 0);

    /* and again exactly one period later */
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, t0 + 60001, &w), DSG_RATE);
    ck_assert_uint_eq(w, 59999);
    ck_assert_int_eq(try(&c, &s, 0, t0 + 119999), DSG_RATE);
    ck_assert_int_eq(try(&c, &s, 0, t0 + 120000), DSG_OK);

    /* a long flood: exactly one per minute */
    ck_assert_uint_eq(flood(&c, &s, 0, t0 + 120001, t0 + 120001 + 3600000, 1),
                      60);
}
END_TEST


START_TEST(test_burst)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s, copy;
    uint64_t           w, k;
    int                i;

    /* 10r/s burst 5 */
    conf_ok(&c, 10, 1000, 5, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);

    for (i = 0; i < 6; i++) {
        ck_assert_int_eq(try(&c, &s, 0, 0), DSG_OK);
    }

    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 100);

    /* an empty bucket: exactly one period, no rounding up */
    copy = s;
    copy.level[0] = 0;
    ck_assert_int_eq(dsg_limit_check(&c, &copy, 0, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 100);

    /* then one per period, exactly */

    for (k = 1; k <= 20; k++) {
        ck_assert_int_eq(try(&c, &s, 0, k * 100 - 1), DSG_RATE);
        ck_assert_int_eq(try(&c, &s, 0, k * 100), DSG_OK);
        ck_assert_int_eq(try(&c, &s, 0, k * 100), DSG_RATE);
    }

    /* idle long enough: the full burst again, not more */

    ck_assert_uint_eq(flood(&c, &s, 0, 1000000, 1000001, 1), 1);
    ck_assert_uint_eq(flood(&c, &s, 0, 2000000, 2000000 + 100, 1), 6);
    ck_assert_uint_eq(flood(&c, &s, 0, 3000000, 3000000 + 1, 1) +
                      flood(&c, &s, 0, 3000000, 3000000 + 1, 1) +
                      flood(&c, &s, 0, 3000000, 3000000 + 1, 1) +
                      flood(&c, &s, 0, 3000000, 3000000 + 1, 1) +
                      flood(&c, &s, 0, 3000000, 3000000 + 1, 1) +
                      flood(&c, &s, 0, 3000000, 3000000 + 1, 1) +
                      flood(&c, &s, 0, 3000000, 3000000 + 1, 1), 6);

    assert_levels_sane(&c, &s);
}
END_TEST


START_TEST(test_window)
{
    static const struct {
        uint64_t  n, period, burst, window;
    } cases[] = {
        { 10, 1000, 5, 10000 },
        { 1, 1000, 0, 10000 },
        { 7, 1000, 3, 10000 },
        { 333, 1000, 0, 10000 },
        { 3, 60000, 2, 600000 },
        { 1000, 1000, 0, 10000 },
        { 2500, 1000, 10, 10000 }
    };

    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint64_t           admitted, expect, i, j, t;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        conf_ok(&c, cases[i].n, cases[i].period, cases[i].burst, 0, NULL, 1);
        dsg_limit_state_init(&c, &s, 0);

        /* requests every 1 ms; 4 per ms to saturate rates above 1r/ms */

        admitted = 0;

        for (t = 0; t < cases[i].window; t++) {
            for (j = 0; j < 4; j++) {
                if (try(&c, &s, 0, t) == DSG_OK) {
                    admitted++;
                }
            }
        }

        expect = cases[i].n * cases[i].window / cases[i].period
                 + cases[i].burst + 1;

        ck_assert_msg(admitted + 1 >= expect && admitted <= expect + 1,
                      "%llu r/%llu ms burst %llu: %llu admitted, "
                      "%llu expected",
                      (unsigned long long) cases[i].n,
                      (unsigned long long) cases[i].period,
                      (unsigned long long) cases[i].burst,
                      (unsigned long long) admitted,
                      (unsigned long long) expect);

        assert_levels_sane(&c, &s);
    }
}
END_TEST


START_TEST(test_high_rate)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint64_t           admitted, t;
    int                i, n;

    /* 100000r/s burst 0: 100 per ms, never a 1 per ms plateau */
    conf_ok(&c, 100000, 1000, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);

    n = 0;

    for (i = 0; i < 50; i++) {
        if (try(&c, &s, 0, 0) == DSG_OK) {
            n++;
        }
    }

    ck_assert_int_gt(n, 1);
    ck_assert_int_eq(n, 50);

    admitted = n;

    for (t = 0; t < 1000; t++) {
        n = 0;

        for (i = 0; i < 300; i++) {
            if (try(&c, &s, 0, t) == DSG_OK) {
                n++;
            }
        }

        if (t > 0) {
            /* steady state: exactly the rate */
            ck_assert_int_eq(n, 100);
        }

        admitted += n;
    }

    ck_assert_uint_ge(admitted, 99000);
    ck_assert_uint_le(admitted, 101000);
}
END_TEST


START_TEST(test_huge_rate)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint64_t           n;

    /* 10^9 r/s: 10^6 per ms */
    conf_ok(&c, DSG_MAX_RATE, 1000, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 5);

    n = 0;
    while (try(&c, &s, 0, 5) == DSG_OK) {
        n++;
    }

    ck_assert_uint_eq(n, 1000000);

    n = 0;
    while (try(&c, &s, 0, 6) == DSG_OK) {
        n++;
    }

    ck_assert_uint_eq(n, 1000000);
}
END_TEST


START_TEST(test_tiny_rate)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint64_t           w;

    /* 1 per day, the longest period */
    conf_ok(&c, 1, DSG_MAX_PERIOD_MS, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);

    ck_assert_int_eq(try(&c, &s, 0, 0), DSG_OK);
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 1, &w), DSG_RATE);
    ck_assert_uint_eq(w, DSG_MAX_PERIOD_MS - 1);
    ck_assert_int_eq(try(&c, &s, 0, DSG_MAX_PERIOD_MS - 1), DSG_RATE);
    ck_assert_int_eq(try(&c, &s, 0, DSG_MAX_PERIOD_MS), DSG_OK);

    /* 7r/m: not a whole number of ms per request, exact in the long run */
    conf_ok(&c, 7, 60000, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);

    ck_assert_uint_eq(flood(&c, &s, 0, 0, 3600000, 1), 7 * 60);
    ck_assert_int_eq(try(&c, &s, 0, 3600000), DSG_OK);
}
END_TEST


START_TEST(test_clock_backwards)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s, before;
    uint64_t           w;

    /* 10r/s burst 0 */
    conf_ok(&c, 10, 1000, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 10000);

    ck_assert_int_eq(try(&c, &s, 0, 10000), DSG_OK);

    before = s;

    /* a worker 1 s behind: no refill, last_ms kept, the wait counts it */
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 9000, &w), DSG_RATE);
    ck_assert_uint_eq(w, 1000 + 100);
    ck_assert_mem_eq(&s, &before, sizeof(s));

    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 10000 + 100);
    ck_assert_mem_eq(&s, &before, sizeof(s));

    ck_assert_int_eq(try(&c, &s, 0, 10099), DSG_RATE);
    ck_assert_uint_eq(s.last_ms, 10099);

    /* back again, then forward: refill from 10099, not from the past */
    ck_assert_int_eq(try(&c, &s, 0, 10050), DSG_RATE);
    ck_assert_uint_eq(s.last_ms, 10099);
    ck_assert_int_eq(try(&c, &s, 0, 10100), DSG_OK);
    ck_assert_uint_eq(s.level[0], 1000 - 1);

    /* a key made by a worker ahead of us: full, usable, no underflow */
    dsg_limit_state_init(&c, &s, 50000);
    ck_assert_int_eq(try(&c, &s, 0, 49000), DSG_OK);
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 49000, &w), DSG_RATE);
    ck_assert_uint_eq(w, 1000 + 100);
    ck_assert_uint_eq(s.last_ms, 50000);
    assert_levels_sane(&c, &s);

    /* at the far past: the wait saturates, never wraps */
    dsg_limit_state_init(&c, &s, UINT64_MAX);
    dsg_limit_charge(&c, &s, 0);
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, UINT64_MAX);
}
END_TEST


START_TEST(test_overflow)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    unsigned __int128  b;
    uint32_t           r[] = { 1, 0 };
    uint64_t           w;

    /* the largest values: every product still fits */
    conf_ok(&c, DSG_MAX_RATE, DSG_MAX_PERIOD_MS, DSG_MAX_BURST, 0, r, 2);

    b = (unsigned __int128) (DSG_MAX_BURST + 1) * DSG_MAX_PERIOD_MS * 100
        + (unsigned __int128) DSG_MAX_RATE * 100 - 1;
    ck_assert(c.capacity[0] == b);

    b = (unsigned __int128) (DSG_MAX_BURST + 1) * DSG_MAX_PERIOD_MS * 99
        + (unsigned __int128) DSG_MAX_RATE * 99 - 1;
    ck_assert(c.capacity[1] == b);

    /* a huge elapsed time: full, not wrapped */
    dsg_limit_state_init(&c, &s, 0);
    s.level[0] = 0;
    s.level[1] = 1;
    ck_assert_int_eq(try(&c, &s, 1, UINT64_MAX), DSG_OK);
    ck_assert_uint_eq(s.level[0], c.capacity[0] - c.cost);
    ck_assert_uint_eq(s.level[1], c.capacity[1] - c.cost);
    ck_assert_uint_eq(s.last_ms, UINT64_MAX);

    /* near the end of time, small steps */
    conf_ok(&c, DSG_MAX_RATE, 1000, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, UINT64_MAX - 10);
    s.level[0] = 0;

    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, UINT64_MAX - 10, &w),
                     DSG_RATE);
    ck_assert_uint_eq(w, 1);
    ck_assert_int_eq(try(&c, &s, 0, UINT64_MAX - 9), DSG_OK);
    ck_assert_uint_eq(s.level[0], c.gain[0] - c.cost);
    ck_assert_int_eq(try(&c, &s, 0, UINT64_MAX), DSG_OK);
    ck_assert_uint_eq(s.level[0], c.capacity[0] - c.cost);
    assert_levels_sane(&c, &s);
}
END_TEST


START_TEST(test_inflight_reserve)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint32_t           r[] = { 20, 0, 0 };
    int                i;

    /* in-flight only: 10, critical reserves 20% */
    conf_ok(&c, 0, 0, 0, 10, r, 3);
    dsg_limit_state_init(&c, &s, 0);

    for (i = 0; i < 8; i++) {
        ck_assert_int_eq(try(&c, &s, i % 2 ? NORM : LOW, 0), DSG_OK);
    }

    ck_assert_int_eq(try(&c, &s, NORM, 0), DSG_INFLIGHT);
    ck_assert_int_eq(try(&c, &s, LOW, 0), DSG_INFLIGHT);

    /* critical keeps its 2 */
    ck_assert_int_eq(try(&c, &s, CRIT, 0), DSG_OK);
    ck_assert_int_eq(try(&c, &s, CRIT, 0), DSG_OK);
    ck_assert_int_eq(try(&c, &s, CRIT, 0), DSG_INFLIGHT);
    ck_assert_uint_eq(s.inflight[0], 10);
    ck_assert_uint_eq(s.inflight[1], 8);

    /* a normal one ends: one more normal, still no critical */
    dsg_limit_release(&s, dsg_limit_record(&c, NORM));
    ck_assert_int_eq(try(&c, &s, CRIT, 0), DSG_OK);
    ck_assert_int_eq(try(&c, &s, NORM, 0), DSG_INFLIGHT);
    dsg_limit_release(&s, dsg_limit_record(&c, CRIT));
    ck_assert_int_eq(try(&c, &s, NORM, 0), DSG_OK);
    ck_assert_int_eq(try(&c, &s, CRIT, 0), DSG_INFLIGHT);

    ck_assert(!dsg_limit_idle(&c, &s));

    /* everything ends */
    for (i = 0; i < 8; i++) {
        dsg_limit_release(&s, dsg_limit_record(&c, NORM));
    }
    for (i = 0; i < 2; i++) {
        dsg_limit_release(&s, dsg_limit_record(&c, CRIT));
    }

    ck_assert_uint_eq(s.inflight[0], 0);
    ck_assert_uint_eq(s.inflight[1], 0);
    ck_assert(dsg_limit_idle(&c, &s));

    /* normal idle: critical takes all 10, then normal gets nothing */
    for (i = 0; i < 10; i++) {
        ck_assert_int_eq(try(&c, &s, CRIT, 0), DSG_OK);
    }

    ck_assert_int_eq(try(&c, &s, CRIT, 0), DSG_INFLIGHT);
    ck_assert_int_eq(try(&c, &s, NORM, 0), DSG_INFLIGHT);
    ck_assert_uint_eq(s.inflight[1], 0);

    dsg_limit_release(&s, dsg_limit_record(&c, CRIT));
    ck_assert_int_eq(try(&c, &s, NORM, 0), DSG_OK);
}
END_TEST


START_TEST(test_inflight_tiers)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint32_t           r[] = { 10, 20, 30, 0 };
    uint32_t           k;
    int                i;

    /* shares 100, 90, 70, 40 of 20: caps 20, 18, 14, 8 */
    conf_ok(&c, 0, 0, 0, 20, r, 4);
    ck_assert_uint_eq(c.ntiers, 4);
    ck_assert_uint_eq(c.cap[1], 18);
    ck_assert_uint_eq(c.cap[2], 14);
    ck_assert_uint_eq(c.cap[3], 8);

    /* each class alone gets its tier's cap */
    for (k = 0; k < 4; k++) {
        dsg_limit_state_init(&c, &s, 0);

        for (i = 0; i < 30; i++) {
            if (try(&c, &s, k, 0) != DSG_OK) {
                break;
            }
        }

        ck_assert_int_eq(i, (int) c.cap[k]);
    }

    /* from the lowest up: each class adds its own reserve */
    dsg_limit_state_init(&c, &s, 0);

    for (k = 4; k-- > 0; ) {
        while (try(&c, &s, k, 0) == DSG_OK) {
            /* void */
        }
    }

    ck_assert_uint_eq(s.inflight[0], 20);
    ck_assert_uint_eq(s.inflight[1], 18);
    ck_assert_uint_eq(s.inflight[2], 14);
    ck_assert_uint_eq(s.inflight[3], 8);
}
END_TEST


START_TEST(test_rate_reserve)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint32_t           r[] = { 20, 0, 0 };
    uint64_t           t, crit, norm;
    int                order;

    /* 10r/s burst 0, critical reserves 20% */
    conf_ok(&c, 10, 1000, 0, 0, r, 3);

    /* a normal flood alone: 80% (8r/s) over 60 s, plus one burst */
    dsg_limit_state_init(&c, &s, 0);
    norm = flood(&c, &s, NORM, 0, 60000, 1);
    ck_assert_uint_ge(norm, 480 - 1);
    ck_assert_uint_le(norm, 480 + 2);

    /* critical still gets its 20% while normal floods */
    for (order = 0; order < 2; order++) {
        dsg_limit_state_init(&c, &s, 0);
        crit = 0;
        norm = 0;

        for (t = 0; t < 60000; t++) {
            if (order == 0 && t % 100 == 0 && try(&c, &s, CRIT, t) == DSG_OK) {
                crit++;
            }

            if (try(&c, &s, NORM, t) == DSG_OK) {
                norm++;
            }

            if (try(&c, &s, LOW, t) == DSG_OK) {
                norm++;
            }

            if (order == 1 && t % 100 == 0 && try(&c, &s, CRIT, t) == DSG_OK) {
                crit++;
            }
        }

        ck_assert_uint_ge(crit, 120 - 1);
        ck_assert_uint_le(norm, 480 + 2);
        ck_assert_uint_le(crit + norm, 600 + 2);
        ck_assert_uint_ge(crit + norm, 600 - 2);
    }

    /* critical alone may use 100% */
    dsg_limit_state_init(&c, &s, 0);
    crit = flood(&c, &s, CRIT, 0, 60000, 1);
    ck_assert_uint_ge(crit, 600 - 1);
    ck_assert_uint_le(crit, 600 + 2);

    /* and normal, its tier full, finds nothing left in tier 0 */
    ck_assert_int_eq(try(&c, &s, CRIT, 60000), DSG_OK);
    ck_assert_uint_eq(s.level[1], c.capacity[1]);
    ck_assert_int_eq(try(&c, &s, NORM, 60000), DSG_RATE);
}
END_TEST


START_TEST(test_rate_before_inflight)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint64_t           w;

    conf_ok(&c, 1, 1000, 0, 1, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);

    ck_assert_int_eq(try(&c, &s, 0, 0), DSG_OK);

    /* both exhausted: the rate answer, with its wait */
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 1, &w), DSG_RATE);
    ck_assert_uint_eq(w, 999);

    /* tokens back, slot still taken */
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 1000, &w), DSG_INFLIGHT);
    ck_assert_uint_eq(w, 0);

    dsg_limit_release(&s, dsg_limit_record(&c, 0));
    ck_assert_int_eq(dsg_limit_check(&c, &s, 0, 1000, &w), DSG_OK);
}
END_TEST


START_TEST(test_refund)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s, before;
    uint32_t           r[] = { 20, 30, 0 };
    uint32_t           k;

    conf_ok(&c, 10, 1000, 10, 10, r, 3);
    dsg_limit_state_init(&c, &s, 0);

    /* make the levels uneven and not full */
    ck_assert_int_eq(try(&c, &s, LOW, 0), DSG_OK);
    ck_assert_int_eq(try(&c, &s, NORM, 37), DSG_OK);
    ck_assert_int_eq(try(&c, &s, CRIT, 40), DSG_OK);

    for (k = 0; k < 3; k++) {
        ck_assert_int_eq(dsg_limit_check(&c, &s, k, 41, NULL), DSG_OK);
        before = s;

        dsg_limit_charge(&c, &s, k);
        ck_assert(memcmp(&s, &before, sizeof(s)) != 0);
        dsg_limit_refund(&c, &s, k);

        ck_assert_mem_eq(&s, &before, sizeof(s));
    }

    /* a refund never overfills nor underflows */
    dsg_limit_state_init(&c, &s, 0);
    before = s;
    dsg_limit_refund(&c, &s, LOW);
    ck_assert_mem_eq(&s, &before, sizeof(s));

    /* invalid class: nothing happens */
    dsg_limit_charge(&c, &s, 3);
    dsg_limit_refund(&c, &s, 99);
    dsg_limit_release(&s, dsg_limit_record(&c, 99));
    ck_assert_mem_eq(&s, &before, sizeof(s));
    ck_assert_int_eq(dsg_limit_check(&c, &s, 3, 0, NULL), DSG_EINVAL);
}
END_TEST


/*
 * A reload changes the configuration under requests still in flight: the
 * release goes by the record taken at the charge, so what was counted is
 * given back exactly, whatever the new configuration says.  The old
 * release by class gave back nothing for a class the new configuration
 * no longer has, and the wrong tiers when the reserves changed.
 */
START_TEST(test_release_by_record)
{
    uint32_t          r_low, r_norm, r_crit;
    dsg_limit_conf_t  a, b, none;
    dsg_limit_state_t s;
    uint32_t          res_a[3] = { 20, 10, 0 };
    uint32_t          res_b[2] = { 0, 0 };

    /* before: three classes, two reserves, three tiers, inflight=10 */
    ck_assert_int_eq(dsg_limit_conf_init(&a, 0, 0, 0, 10, res_a, 3), DSG_OK);
    ck_assert_uint_eq(a.ntiers, 3);
    dsg_limit_state_init(&a, &s, 0);

    ck_assert_int_eq(try(&a, &s, 2, 0), DSG_OK);
    r_low = dsg_limit_record(&a, 2);
    ck_assert_int_eq(try(&a, &s, 1, 0), DSG_OK);
    r_norm = dsg_limit_record(&a, 1);
    ck_assert_int_eq(try(&a, &s, 0, 0), DSG_OK);
    r_crit = dsg_limit_record(&a, 0);

    ck_assert_uint_eq(r_low, 3 | DSG_RECORD_INFLIGHT);
    ck_assert_uint_eq(r_norm, 2 | DSG_RECORD_INFLIGHT);
    ck_assert_uint_eq(r_crit, 1 | DSG_RECORD_INFLIGHT);
    ck_assert_uint_eq(s.inflight[0], 3);
    ck_assert_uint_eq(s.inflight[1], 2);
    ck_assert_uint_eq(s.inflight[2], 1);

    /* after: two classes, no reserves, one tier, inflight=2 */
    ck_assert_int_eq(dsg_limit_conf_init(&b, 0, 0, 0, 2, res_b, 2), DSG_OK);
    ck_assert_uint_eq(b.ntiers, 1);
    ck_assert_uint_eq(dsg_limit_record(&b, 2), 0);

    /* the class-2 request ends: its three tiers go back */
    dsg_limit_release(&s, r_low);
    ck_assert_uint_eq(s.inflight[0], 2);
    ck_assert_uint_eq(s.inflight[1], 1);
    ck_assert_uint_eq(s.inflight[2], 0);

    dsg_limit_release(&s, r_norm);
    dsg_limit_release(&s, r_crit);
    ck_assert_uint_eq(s.inflight[0], 0);
    ck_assert_uint_eq(s.inflight[1], 0);
    ck_assert(dsg_limit_idle(&b, &s));

    /* the new cap is whole: 2 at once, not 2 minus a leak */
    ck_assert_int_eq(try(&b, &s, 1, 0), DSG_OK);
    ck_assert_int_eq(try(&b, &s, 1, 0), DSG_OK);
    ck_assert_int_eq(try(&b, &s, 0, 0), DSG_INFLIGHT);

    /* a charge made without a cap gives back nothing once one is set */
    ck_assert_int_eq(dsg_limit_conf_init(&none, 10, 1000, 0, 0, NULL, 2),
                     DSG_OK);
    ck_assert_uint_eq(dsg_limit_record(&none, 1), 1);
    dsg_limit_release(&s, dsg_limit_record(&none, 1));
    ck_assert_uint_eq(s.inflight[0], 2);

    /* nonsense records change nothing */
    dsg_limit_release(&s, 0);
    dsg_limit_release(&s, 200 | DSG_RECORD_INFLIGHT);
    ck_assert_uint_eq(s.inflight[0], 2);
}
END_TEST


START_TEST(test_release)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint32_t           r[] = { 20, 0 };
    int                i;

    conf_ok(&c, 0, 0, 0, 10, r, 2);
    dsg_limit_state_init(&c, &s, 0);

    dsg_limit_release(&s, dsg_limit_record(&c, 1));
    ck_assert_uint_eq(s.inflight[0], 0);
    ck_assert_uint_eq(s.inflight[1], 0);

    for (i = 0; i < 3; i++) {
        ck_assert_int_eq(try(&c, &s, 1, 0), DSG_OK);
    }

    for (i = 0; i < 5; i++) {
        dsg_limit_release(&s, dsg_limit_record(&c, 1));
    }

    ck_assert_uint_eq(s.inflight[0], 0);
    ck_assert_uint_eq(s.inflight[1], 0);

    /* no cap: nothing counted, nothing to release */
    conf_ok(&c, 10, 1000, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);
    ck_assert_int_eq(try(&c, &s, 0, 0), DSG_OK);
    ck_assert_uint_eq(s.inflight[0], 0);
    dsg_limit_release(&s, dsg_limit_record(&c, 0));
    ck_assert_uint_eq(s.inflight[0], 0);
}
END_TEST


/* after *wait_ms the check passes, one ms earlier it does not */

START_TEST(test_wait_exact)
{
    static const uint64_t  rates[][3] = {
        { 1, 60000, 0 }, { 10, 1000, 0 }, { 10, 1000, 5 }, { 3, 1000, 1 },
        { 7, 60000, 2 }, { 1000, 1000, 0 }, { 333, 1000, 3 },
        { 100000, 1000, 0 }, { 13, 7000, 4 }
    };

    dsg_limit_conf_t   c;
    dsg_limit_state_t  s, copy;
    uint32_t           r[] = { 15, 25, 0, 0 };
    uint64_t           now, w, seed;
    uint32_t           i, k, cls, checked;

    seed = 42;
    checked = 0;

    for (i = 0; i < sizeof(rates) / sizeof(rates[0]); i++) {
        conf_ok(&c, rates[i][0], rates[i][1], rates[i][2], 0, r, 4);
        dsg_limit_state_init(&c, &s, 1000);
        now = 1000;

        for (k = 0; k < 3000; k++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            cls = (seed >> 33) % 4;
            now += (seed >> 40) % 5;

            if (dsg_limit_check(&c, &s, cls, now, &w) == DSG_OK) {
                ck_assert_uint_eq(w, 0);
                dsg_limit_charge(&c, &s, cls);
                continue;
            }

            ck_assert_uint_gt(w, 0);
            checked++;

            copy = s;
            ck_assert_int_eq(dsg_limit_check(&c, &copy, cls, now + w - 1,
                                             NULL),
                             DSG_RATE);

            copy = s;
            ck_assert_int_eq(dsg_limit_check(&c, &copy, cls, now + w, NULL),
                             DSG_OK);

            /* from an older clock too */
            if (now > 1000 + 50) {
                copy = s;
                ck_assert_int_eq(dsg_limit_check(&c, &copy, cls, now - 50, &w),
                                 DSG_RATE);
                ck_assert_int_eq(dsg_limit_check(&c, &copy, cls,
                                                 now - 50 + w - 1, NULL),
                                 DSG_RATE);
                ck_assert_int_eq(dsg_limit_check(&c, &copy, cls,
                                                 now - 50 + w, NULL),
                                 DSG_OK);
            }

            assert_levels_sane(&c, &s);
        }
    }

    ck_assert_uint_gt(checked, 1000);
}
END_TEST


START_TEST(test_idle_full)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    conf_ok(&c, 10, 1000, 0, 2, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);

    ck_assert(dsg_limit_idle(&c, &s));
    ck_assert(dsg_limit_full(&c, &s, 0));

    ck_assert_int_eq(try(&c, &s, 0, 0), DSG_OK);
    ck_assert(!dsg_limit_idle(&c, &s));
    ck_assert(!dsg_limit_full(&c, &s, 1000000));

    dsg_limit_release(&s, dsg_limit_record(&c, 0));
    ck_assert(dsg_limit_idle(&c, &s));

    /* level 999 of 100999: full after exactly 100 ms */
    ck_assert(!dsg_limit_full(&c, &s, 99));
    ck_assert(dsg_limit_full(&c, &s, 100));
    ck_assert(!dsg_limit_full(&c, &s, 0));
    ck_assert_uint_eq(s.last_ms, 0);

    s.queued = 1;
    ck_assert(!dsg_limit_idle(&c, &s));
    ck_assert(!dsg_limit_full(&c, &s, 100000));
    s.queued = 0;

    /* 3r/s: level 299 of 100299, full after 333.3 ms, i.e. at 334 */
    conf_ok(&c, 3, 1000, 0, 0, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);
    ck_assert_int_eq(try(&c, &s, 0, 0), DSG_OK);
    ck_assert(!dsg_limit_full(&c, &s, 333));
    ck_assert(dsg_limit_full(&c, &s, 334));

    /* no rate: idle is enough */
    conf_ok(&c, 0, 0, 0, 2, NULL, 1);
    dsg_limit_state_init(&c, &s, 0);
    ck_assert(dsg_limit_full(&c, &s, 0));
}
END_TEST


START_TEST(test_no_limit)
{
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    uint64_t           w;
    int                i;

    conf_ok(&c, 0, 0, 0, 0, NULL, 2);
    dsg_limit_state_init(&c, &s, 0);

    for (i = 0; i < 100000; i++) {
        w = 7;
        ck_assert_int_eq(dsg_limit_check(&c, &s, i % 2, 5, &w), DSG_OK);
        ck_assert_uint_eq(w, 0);
        dsg_limit_charge(&c, &s, i % 2);
    }

    ck_assert(dsg_limit_idle(&c, &s));
}
END_TEST


START_TEST(test_retry_after)
{
    ck_assert_uint_eq(dsg_retry_after_s(0), 1);
    ck_assert_uint_eq(dsg_retry_after_s(1), 1);
    ck_assert_uint_eq(dsg_retry_after_s(999), 1);
    ck_assert_uint_eq(dsg_retry_after_s(1000), 1);
    ck_assert_uint_eq(dsg_retry_after_s(1001), 2);
    ck_assert_uint_eq(dsg_retry_after_s(59999), 60);
    ck_assert_uint_eq(dsg_retry_after_s(60000), 60);
    ck_assert_uint_eq(dsg_retry_after_s(4294967295000ULL), UINT32_MAX);
    ck_assert_uint_eq(dsg_retry_after_s(4294967295001ULL), UINT32_MAX);
    ck_assert_uint_eq(dsg_retry_after_s(UINT64_MAX), UINT32_MAX);
}
END_TEST


Suite *
dsg_bucket_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_bucket");

    tc = tcase_create("conf");
    tcase_add_test(tc, test_state_size);
    tcase_add_test(tc, test_conf_units);
    tcase_add_test(tc, test_conf_tiers);
    tcase_add_test(tc, test_conf_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("rate");
    tcase_add_test(tc, test_one_per_minute);
    tcase_add_test(tc, test_burst);
    tcase_add_test(tc, test_window);
    tcase_add_test(tc, test_high_rate);
    tcase_add_test(tc, test_huge_rate);
    tcase_add_test(tc, test_tiny_rate);
    tcase_add_test(tc, test_clock_backwards);
    tcase_add_test(tc, test_overflow);
    tcase_add_test(tc, test_wait_exact);
    suite_add_tcase(s, tc);

    tc = tcase_create("reserve");
    tcase_add_test(tc, test_inflight_reserve);
    tcase_add_test(tc, test_inflight_tiers);
    tcase_add_test(tc, test_rate_reserve);
    tcase_add_test(tc, test_rate_before_inflight);
    suite_add_tcase(s, tc);

    tc = tcase_create("lifecycle");
    tcase_add_test(tc, test_refund);
    tcase_add_test(tc, test_release);
    tcase_add_test(tc, test_release_by_record);
    tcase_add_test(tc, test_idle_full);
    tcase_add_test(tc, test_no_limit);
    tcase_add_test(tc, test_retry_after);
    suite_add_tcase(s, tc);

    return s;
}
