/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_tokens: token budgets in nested tiers, settlement and
 * debt, the prompt estimator and its correction, the usage reader, the
 * SSE event counter.
 */


#include <stdlib.h>
#include <string.h>
#include <check.h>

#include "dsg_tokens.h"


#define CRIT  0
#define NORM  1
#define LOW   2

#define S(str)  (const unsigned char *) (str), sizeof(str) - 1


/* the zone's tiers: reserve (NULL: none) for nclasses classes */

static void
tiers(dsg_limit_conf_t *lc, const uint32_t *reserve, uint32_t nclasses)
{
    ck_assert_int_eq(dsg_limit_conf_init(lc, 0, 0, 0, 0, reserve, nclasses),
                     DSG_OK);
}


static void
conf_ok(dsg_tokens_conf_t *c, uint64_t n, uint64_t period_ms, uint64_t burst,
    const uint32_t *reserve, uint32_t nclasses)
{
    dsg_limit_conf_t  lc;

    tiers(&lc, reserve, nclasses);
    ck_assert_int_eq(dsg_tokens_conf_init(c, n, period_ms, burst, &lc),
                     DSG_OK);
}


/* check, and charge if admissible */

static int
take(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s, uint32_t cls,
    uint64_t tokens, uint64_t now, uint64_t *wait)
{
    int  rc;

    rc = dsg_tokens_check(c, s, cls, tokens, now, wait);

    if (rc == DSG_OK) {
        dsg_tokens_charge(c, s, dsg_tokens_record(c, cls), tokens);
    }

    return rc;
}


static void
assert_levels_sane(const dsg_tokens_conf_t *c, const dsg_tokens_state_t *s)
{
    uint32_t  t;

    for (t = 0; t < c->ntiers; t++) {
        ck_assert_int_le(s->level[t], c->capacity[t]);
        ck_assert_int_ge(s->level[t], -c->capacity[t]);
    }
}


static dsg_tokens_scan_t
scan_of(const unsigned char *p, size_t len)
{
    dsg_tokens_scan_t  sc;

    memset(&sc, 0, sizeof(sc));
    dsg_tokens_scan(p, len, &sc);

    return sc;
}


static int
usage_of(const char *text, uint64_t *prompt, uint64_t *completion)
{
    return dsg_tokens_usage((const unsigned char *) text, strlen(text),
                            prompt, completion);
}


/* conf */

START_TEST(test_state_size)
{
    ck_assert_uint_eq(sizeof(dsg_tokens_state_t), 40);
}
END_TEST


START_TEST(test_conf_units)
{
    dsg_tokens_conf_t  c;
    uint32_t           r[] = { 20, 0, 0 };

    /* 60000 tokens/m, burst 60000: one token a ms */
    conf_ok(&c, 60000, 60000, 60000, NULL, 1);

    ck_assert_uint_eq(c.ntiers, 1);
    ck_assert_uint_eq(c.unit, 6000000);
    ck_assert_uint_eq(c.gain[0], 6000000);
    ck_assert_int_eq(c.capacity[0], 60000LL * 6000000);

    /* critical reserves 20%: tier 1 has 80% of the rate and the burst */
    conf_ok(&c, 1000, 1000, 500, r, 3);

    ck_assert_uint_eq(c.ntiers, 2);
    ck_assert_uint_eq(c.nclasses, 3);
    ck_assert_uint_eq(c.share[0], 100);
    ck_assert_uint_eq(c.share[1], 80);
    ck_assert_uint_eq(c.class_tier[CRIT], 0);
    ck_assert_uint_eq(c.class_tier[NORM], 1);
    ck_assert_uint_eq(c.class_tier[LOW], 1);
    ck_assert_uint_eq(c.unit, 100000);
    ck_assert_uint_eq(c.gain[0], 100000);
    ck_assert_uint_eq(c.gain[1], 80000);
    ck_assert_int_eq(c.capacity[0], 500 * 100000LL);
    ck_assert_int_eq(c.capacity[1], 400 * 100000LL);

    ck_assert_uint_eq(dsg_tokens_record(&c, CRIT), 1);
    ck_assert_uint_eq(dsg_tokens_record(&c, LOW), 2);
    ck_assert_uint_eq(dsg_tokens_record(&c, 3), 0);
}
END_TEST


START_TEST(test_conf_errors)
{
    dsg_tokens_conf_t  c;
    dsg_limit_conf_t   lc, bad;

    tiers(&lc, NULL, 2);

    ck_assert_int_eq(dsg_tokens_conf_init(&c, 0, 1000, 1, &lc), DSG_EINVAL);
    ck_assert_int_eq(dsg_tokens_conf_init(&c, DSG_MAX_TOKENS + 1, 1000, 1,
                                          &lc), DSG_EINVAL);
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 0, 1, &lc), DSG_EINVAL);
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, DSG_MAX_PERIOD_MS + 1, 1,
                                          &lc), DSG_EINVAL);
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1000, 0, &lc), DSG_EINVAL);
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1000, DSG_MAX_TOKENS + 1,
                                          &lc), DSG_EINVAL);
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1000, 1, NULL), DSG_EINVAL);
    ck_assert_int_eq(dsg_tokens_conf_init(NULL, 1, 1000, 1, &lc), DSG_EINVAL);

    /* an lc that dsg_limit_conf_init() did not make */
    bad = lc;
    bad.ntiers = 0;
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1000, 1, &bad), DSG_EINVAL);

    bad = lc;
    bad.class_tier[1] = 1;
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1000, 1, &bad), DSG_EINVAL);

    bad = lc;
    bad.share[0] = 0;
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1000, 1, &bad), DSG_EINVAL);

    bad = lc;
    bad.nclasses = DSG_MAX_CLASSES + 1;
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1000, 1, &bad), DSG_EINVAL);

    /* every bound at once still fits in int64_t */
    ck_assert_int_eq(dsg_tokens_conf_init(&c, DSG_MAX_TOKENS,
                                          DSG_MAX_PERIOD_MS, DSG_MAX_TOKENS,
                                          &lc), DSG_OK);
    ck_assert_int_eq(c.capacity[0],
                     (int64_t) (DSG_MAX_TOKENS * DSG_MAX_PERIOD_MS * 100));

    /* a rate-less zone's tiers are enough */
    ck_assert_int_eq(dsg_tokens_conf_init(&c, 1, 1, 1, &lc), DSG_OK);
}
END_TEST


/* buckets */

START_TEST(test_refill_exact)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint64_t            w;

    /* 60000 tokens/m: after spending all, 1000 are back after 1000 ms */
    conf_ok(&c, 60000, 60000, 60000, NULL, 1);
    dsg_tokens_state_init(&c, &s, 5000);

    ck_assert_int_eq(take(&c, &s, 0, 60000, 5000, &w), DSG_OK);
    ck_assert_uint_eq(w, 0);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 5000), 0);

    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1000, 5000, &w), DSG_RATE);
    ck_assert_uint_eq(w, 1000);

    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1000, 5999, &w), DSG_RATE);
    ck_assert_uint_eq(w, 1);

    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1000, 6000, &w), DSG_OK);
    ck_assert_uint_eq(w, 0);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 6000), 1000);

    /* 1001 still needs one more ms */
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1001, 6000, &w), DSG_RATE);
    ck_assert_uint_eq(w, 1);

    /* refill stops at the burst */
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 1000000), 60000);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 60000, 1000000, NULL),
                     DSG_OK);
    ck_assert_int_eq(s.level[0], c.capacity[0]);
}
END_TEST


START_TEST(test_wait_rounding)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint64_t            w, t;

    /* 7 tokens/s: a token every 142.857 ms, waits round up */
    conf_ok(&c, 7, 1000, 7, NULL, 1);
    dsg_tokens_state_init(&c, &s, 0);

    ck_assert_int_eq(take(&c, &s, 0, 7, 0, NULL), DSG_OK);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 143);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1, 142, &w), DSG_RATE);
    ck_assert_uint_eq(w, 1);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1, 143, &w), DSG_OK);

    /* the wait is exact: admitted at now + w, never at now + w - 1 */
    dsg_tokens_state_init(&c, &s, 0);
    ck_assert_int_eq(take(&c, &s, 0, 7, 0, NULL), DSG_OK);

    for (t = 0; t < 5000; t++) {
        if (dsg_tokens_check(&c, &s, 0, 3, t, &w) == DSG_RATE) {
            ck_assert_uint_gt(w, 0);
            continue;
        }

        /* 3 tokens: 428.57 ms */
        ck_assert_uint_eq(t, 429);
        break;
    }
}
END_TEST


START_TEST(test_toobig)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint64_t            w;
    uint32_t            r[] = { 20, 0 };

    conf_ok(&c, 10, 1000, 100, r, 2);
    dsg_tokens_state_init(&c, &s, 0);

    w = 7;
    ck_assert_int_eq(dsg_tokens_check(&c, &s, CRIT, 101, 0, &w), DSG_TOOBIG);
    ck_assert_uint_eq(w, 0);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, CRIT, 100, 0, &w), DSG_OK);

    /* class 1's bucket holds 80 */
    ck_assert_int_eq(dsg_tokens_check(&c, &s, NORM, 81, 0, &w), DSG_TOOBIG);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, NORM, 80, 0, &w), DSG_OK);

    /* no overflow in tokens * unit */
    ck_assert_int_eq(dsg_tokens_check(&c, &s, CRIT, UINT64_MAX, 0, &w),
                     DSG_TOOBIG);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, CRIT, UINT64_MAX / 100000 + 1,
                                      0, &w), DSG_TOOBIG);

    /* too big even on an empty bucket: not a wait */
    ck_assert_int_eq(take(&c, &s, CRIT, 100, 0, NULL), DSG_OK);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, CRIT, 101, 0, &w), DSG_TOOBIG);

    /* nothing is always admissible, even in debt */
    dsg_tokens_settle(&c, &s, 1, -1000, 0);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, CRIT, 0, 0, &w), DSG_OK);
    ck_assert_uint_eq(w, 0);

    ck_assert_int_eq(dsg_tokens_check(&c, &s, 2, 1, 0, &w), DSG_EINVAL);
    ck_assert_uint_eq(w, 0);
}
END_TEST


START_TEST(test_reserve)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint64_t            w;
    uint32_t            r[] = { 20, 0, 0 };

    /* critical reserves 20%: normal and low see 80 of the burst of 100 */
    conf_ok(&c, 10, 1000, 100, r, 3);
    dsg_tokens_state_init(&c, &s, 0);

    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, CRIT, 0), 100);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, NORM, 0), 80);

    ck_assert_int_eq(take(&c, &s, NORM, 50, 0, NULL), DSG_OK);
    ck_assert_int_eq(take(&c, &s, LOW, 30, 0, NULL), DSG_OK);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, LOW, 1, 0, &w), DSG_RATE);

    /* tier 1 refills at 8 tokens/s: one token in 125 ms */
    ck_assert_uint_eq(w, 125);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, NORM, 1, 0, NULL), DSG_RATE);

    /* the reserve is intact */
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, CRIT, 0), 20);
    ck_assert_int_eq(take(&c, &s, CRIT, 20, 0, NULL), DSG_OK);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, CRIT, 1, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 100);

    /* critical spending drains what lower classes see too */
    dsg_tokens_state_init(&c, &s, 0);
    ck_assert_int_eq(take(&c, &s, CRIT, 90, 0, NULL), DSG_OK);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, NORM, 0), 10);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, NORM, 11, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 100);
    ck_assert_int_eq(take(&c, &s, NORM, 10, 0, NULL), DSG_OK);
    assert_levels_sane(&c, &s);
}
END_TEST


START_TEST(test_round_trip)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s, before;
    uint32_t            r[] = { 10, 15, 0 }, cls, rec;
    uint64_t            tok;

    conf_ok(&c, 7, 60000, 1000, r, 3);
    ck_assert_uint_eq(c.ntiers, 3);

    for (cls = 0; cls < 3; cls++) {
        dsg_tokens_state_init(&c, &s, 0);
        ck_assert_int_eq(take(&c, &s, CRIT, 333, 0, NULL), DSG_OK);

        for (tok = 1; tok <= 500; tok += 37) {
            /* a charge, then a refund of all of it at the same time */
            rec = dsg_tokens_record(&c, cls);
            ck_assert_int_eq(dsg_tokens_check(&c, &s, cls, tok, 100, NULL),
                             DSG_OK);
            before = s;
            dsg_tokens_charge(&c, &s, rec, tok);
            ck_assert(memcmp(&s, &before, sizeof(s)) != 0);
            dsg_tokens_settle(&c, &s, rec, (int64_t) tok, 100);
            ck_assert(memcmp(&s, &before, sizeof(s)) == 0);

            /* an overrun, then its refund */
            dsg_tokens_settle(&c, &s, rec, -(int64_t) tok * 3, 100);
            dsg_tokens_settle(&c, &s, rec, (int64_t) tok * 3, 100);
            ck_assert(memcmp(&s, &before, sizeof(s)) == 0);

            /* a zero settlement changes nothing */
            dsg_tokens_settle(&c, &s, rec, 0, 100);
            ck_assert(memcmp(&s, &before, sizeof(s)) == 0);
        }
    }
}
END_TEST


START_TEST(test_settle)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint64_t            w;

    /* 60000 tokens/m, burst 1000 */
    conf_ok(&c, 60000, 60000, 1000, NULL, 1);
    dsg_tokens_state_init(&c, &s, 0);

    /* reserved 600, used 200: 400 back */
    ck_assert_int_eq(take(&c, &s, 0, 600, 0, NULL), DSG_OK);
    dsg_tokens_settle(&c, &s, 1, 400, 0);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 0), 800);

    /* a refund never fills past the burst */
    dsg_tokens_settle(&c, &s, 1, 5000, 0);
    ck_assert_int_eq(s.level[0], c.capacity[0]);
    dsg_tokens_settle(&c, &s, 1, INT64_MAX, 0);
    ck_assert_int_eq(s.level[0], c.capacity[0]);

    /* reserved 1000, used 1300: 300 of debt, paid back at 1 a ms */
    ck_assert_int_eq(take(&c, &s, 0, 1000, 0, NULL), DSG_OK);
    dsg_tokens_settle(&c, &s, 1, -300, 0);
    ck_assert_int_eq(s.level[0], -300 * (int64_t) c.unit);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 0), 0);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 301);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 0), 1300);

    /* settlement refills first: 100 ms later, 100 fewer in debt */
    dsg_tokens_settle(&c, &s, 1, 0, 100);
    ck_assert_int_eq(s.level[0], -200 * (int64_t) c.unit);
    ck_assert_uint_eq(s.last_ms, 100);
}
END_TEST


START_TEST(test_debt_floor)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint64_t            w;

    conf_ok(&c, 60000, 60000, 1000, NULL, 1);
    dsg_tokens_state_init(&c, &s, 0);

    /* a runaway answer: the debt stops at one bucket */
    ck_assert_int_eq(take(&c, &s, 0, 1000, 0, NULL), DSG_OK);
    dsg_tokens_settle(&c, &s, 1, -1000000, 0);
    ck_assert_int_eq(s.level[0], -c.capacity[0]);
    dsg_tokens_settle(&c, &s, 1, -1, 0);
    ck_assert_int_eq(s.level[0], -c.capacity[0]);
    dsg_tokens_settle(&c, &s, 1, INT64_MIN, 0);
    ck_assert_int_eq(s.level[0], -c.capacity[0]);

    /* a misused charge obeys the floor too */
    dsg_tokens_charge(&c, &s, 1, UINT64_MAX);
    ck_assert_int_eq(s.level[0], -c.capacity[0]);

    /* the longest wait: a full bucket after a bucket of debt */
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1000, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 2000);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1000, 1999, &w), DSG_RATE);
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 1000, 2000, &w), DSG_OK);

    /* debt in tier 1 is bounded by tier 1's own bucket */
    {
        uint32_t  r[] = { 50, 0 };

        conf_ok(&c, 60000, 60000, 1000, r, 2);
        dsg_tokens_state_init(&c, &s, 0);
        dsg_tokens_settle(&c, &s, 2, -5000, 0);
        ck_assert_int_eq(s.level[0], -c.capacity[0]);
        ck_assert_int_eq(s.level[1], -c.capacity[1]);
        assert_levels_sane(&c, &s);
    }
}
END_TEST


START_TEST(test_remaining_reset)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s, before;
    uint32_t            r[] = { 20, 0 };

    conf_ok(&c, 60000, 60000, 60000, NULL, 1);
    dsg_tokens_state_init(&c, &s, 0);

    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 0), 60000);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 0), 0);

    ck_assert_int_eq(take(&c, &s, 0, 30000, 0, NULL), DSG_OK);
    before = s;

    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 0), 30000);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 0), 30000);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 10000), 40000);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 10000), 20000);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 40000), 60000);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 40000), 0);

    /* neither modifies the state */
    ck_assert(memcmp(&s, &before, sizeof(s)) == 0);

    /* remaining is floored, reset rounded up: 7 tokens/s */
    conf_ok(&c, 7, 1000, 7, NULL, 1);
    dsg_tokens_state_init(&c, &s, 0);
    ck_assert_int_eq(take(&c, &s, 0, 7, 0, NULL), DSG_OK);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 142), 0);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 143), 1);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 0), 1000);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 1), 999);

    /* the class's own tiers: tier 1 refills slower */
    conf_ok(&c, 1000, 1000, 1000, r, 2);
    dsg_tokens_state_init(&c, &s, 0);
    ck_assert_int_eq(take(&c, &s, NORM, 800, 0, NULL), DSG_OK);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, CRIT, 0), 200);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, NORM, 0), 0);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, CRIT, 0), 800);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, NORM, 0), 1000);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 2, 0), 0);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 2, 0), 0);
}
END_TEST


START_TEST(test_record_after_reload)
{
    dsg_tokens_conf_t   c3, c1;
    dsg_tokens_state_t  s;
    uint32_t            r[] = { 10, 10, 0 }, rec;

    conf_ok(&c3, 1000, 1000, 1000, r, 3);
    ck_assert_uint_eq(c3.ntiers, 3);

    dsg_tokens_state_init(&c3, &s, 0);
    rec = dsg_tokens_record(&c3, LOW);
    ck_assert_uint_eq(rec, 3);
    ck_assert_int_eq(dsg_tokens_check(&c3, &s, LOW, 500, 0, NULL), DSG_OK);
    dsg_tokens_charge(&c3, &s, rec, 500);
    ck_assert_int_eq(s.level[0], 500 * (int64_t) c3.unit);
    ck_assert_int_eq(s.level[1], 400 * (int64_t) c3.unit);
    ck_assert_int_eq(s.level[2], 300 * (int64_t) c3.unit);

    /* a reload leaves one tier: the release touches tier 0 only */
    conf_ok(&c1, 1000, 1000, 1000, NULL, 3);
    dsg_tokens_settle(&c1, &s, rec, 200, 0);
    ck_assert_int_eq(s.level[0], 700 * (int64_t) c1.unit);
    ck_assert_int_eq(s.level[1], 400 * (int64_t) c3.unit);
    ck_assert_int_eq(s.level[2], 300 * (int64_t) c3.unit);

    /* an overrun too, and a record of nothing does nothing */
    dsg_tokens_settle(&c1, &s, rec, -100, 0);
    ck_assert_int_eq(s.level[0], 600 * (int64_t) c1.unit);
    dsg_tokens_settle(&c1, &s, 0, -100, 0);
    dsg_tokens_charge(&c1, &s, 0, 100);
    ck_assert_int_eq(s.level[0], 600 * (int64_t) c1.unit);

    /* a charge by an old record: the tiers gone are not touched either */
    dsg_tokens_charge(&c1, &s, rec, 100);
    ck_assert_int_eq(s.level[0], 500 * (int64_t) c1.unit);
    ck_assert_int_eq(s.level[1], 400 * (int64_t) c3.unit);
    ck_assert_int_eq(s.level[2], 300 * (int64_t) c3.unit);

    /* a record from a class of tier 0 settles tier 0 only */
    dsg_tokens_state_init(&c3, &s, 0);
    dsg_tokens_charge(&c3, &s, dsg_tokens_record(&c3, CRIT), 100);
    ck_assert_int_eq(s.level[0], 900 * (int64_t) c3.unit);
    ck_assert_int_eq(s.level[1], c3.capacity[1]);

    /* a smaller bucket after the reload: the refill clamps */
    conf_ok(&c1, 1000, 1000, 10, NULL, 1);
    ck_assert_uint_eq(dsg_tokens_remaining(&c1, &s, 0, 1), 10);
    dsg_tokens_settle(&c1, &s, 1, 0, 1);
    ck_assert_int_eq(s.level[0], c1.capacity[0]);
}
END_TEST


START_TEST(test_clock_backwards)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint64_t            w;

    conf_ok(&c, 60000, 60000, 1000, NULL, 1);
    dsg_tokens_state_init(&c, &s, 10000);
    ck_assert_int_eq(take(&c, &s, 0, 1000, 10000, NULL), DSG_OK);

    /* a worker 500 ms behind: no refill, the wait counts from its clock */
    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 10, 9500, &w), DSG_RATE);
    ck_assert_uint_eq(w, 510);
    ck_assert_uint_eq(s.last_ms, 10000);
    ck_assert_uint_eq(dsg_tokens_reset_ms(&c, &s, 0, 9500), 1500);
    ck_assert_uint_eq(dsg_tokens_remaining(&c, &s, 0, 9500), 0);

    ck_assert_int_eq(dsg_tokens_check(&c, &s, 0, 10, 10010, &w), DSG_OK);
    ck_assert_uint_eq(s.last_ms, 10010);
}
END_TEST


START_TEST(test_full)
{
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s;
    uint32_t            r[] = { 20, 0 };

    conf_ok(&c, 1000, 1000, 1000, r, 2);
    dsg_tokens_state_init(&c, &s, 0);
    ck_assert(dsg_tokens_full(&c, &s, 0));

    /* class 1 took 400: tier 1 refills 800/s, full after 500 ms */
    ck_assert_int_eq(take(&c, &s, NORM, 400, 0, NULL), DSG_OK);
    ck_assert(!dsg_tokens_full(&c, &s, 0));
    ck_assert(!dsg_tokens_full(&c, &s, 499));
    ck_assert(dsg_tokens_full(&c, &s, 500));
    ck_assert_uint_eq(s.last_ms, 0);

    /* in debt: full once the debt and the bucket are back */
    dsg_tokens_state_init(&c, &s, 0);
    dsg_tokens_settle(&c, &s, 1, -1500, 0);
    ck_assert(!dsg_tokens_full(&c, &s, 1499));
    ck_assert(dsg_tokens_full(&c, &s, 1500));
}
END_TEST


/* the estimator */

START_TEST(test_scan_ascii)
{
    dsg_tokens_scan_t  sc;

    sc = scan_of(S("{\"a\":\"hello\"}"));
    ck_assert_uint_eq(sc.ascii, 13);
    ck_assert_uint_eq(sc.nonascii, 0);

    /* an escape is the one character it stands for */
    sc = scan_of(S("a\\nb\\\\c\\\"d\\/"));
    ck_assert_uint_eq(sc.ascii, 8);
    ck_assert_uint_eq(sc.nonascii, 0);

    sc = scan_of(S("\\u0041\\u007f\\u0000"));
    ck_assert_uint_eq(sc.ascii, 3);
    ck_assert_uint_eq(sc.nonascii, 0);

    /* not JSON: the broken escape is one character, the rest counts */
    sc = scan_of(S("\\u12x"));
    ck_assert_uint_eq(sc.ascii, 2);
    ck_assert_uint_eq(sc.state, 0);

    sc = scan_of(S(""));
    ck_assert_uint_eq(sc.ascii + sc.nonascii, 0);
}
END_TEST


START_TEST(test_scan_utf8)
{
    dsg_tokens_scan_t  sc;

    /* "中文" 6 bytes, "é" 2, an emoji 4: one code point each */
    sc = scan_of(S("\xe4\xb8\xad\xe6\x96\x87"));
    ck_assert_uint_eq(sc.ascii, 0);
    ck_assert_uint_eq(sc.nonascii, 2);

    sc = scan_of(S("caf\xc3\xa9 \xf0\x9f\x98\x80!"));
    ck_assert_uint_eq(sc.ascii, 5);
    ck_assert_uint_eq(sc.nonascii, 2);
}
END_TEST


START_TEST(test_scan_uescape)
{
    dsg_tokens_scan_t  sc;

    /* "\u4e2d\u6587" is "中文"; "\u00e9" is é: not ASCII */
    sc = scan_of(S("\\u4e2d\\u6587\\u00E9"));
    ck_assert_uint_eq(sc.ascii, 0);
    ck_assert_uint_eq(sc.nonascii, 3);

    /* a surrogate pair is one code point */
    sc = scan_of(S("\\ud83d\\ude00"));
    ck_assert_uint_eq(sc.nonascii, 1);
    sc = scan_of(S("\\uD83D\\uDE00\\uD83D\\uDE01"));
    ck_assert_uint_eq(sc.nonascii, 2);

    /* lone halves count once each */
    sc = scan_of(S("\\ud83dx\\ude00"));
    ck_assert_uint_eq(sc.ascii, 1);
    ck_assert_uint_eq(sc.nonascii, 2);
    sc = scan_of(S("\\ud83d\\n\\ude00"));
    ck_assert_uint_eq(sc.ascii, 1);
    ck_assert_uint_eq(sc.nonascii, 2);
    sc = scan_of(S("\\ud83d\\u4e2d\\ude00"));
    ck_assert_uint_eq(sc.nonascii, 3);
    sc = scan_of(S("\\ud83d\xe4\xb8\xad\\ude00"));
    ck_assert_uint_eq(sc.nonascii, 3);
}
END_TEST


START_TEST(test_scan_split)
{
    dsg_tokens_scan_t  whole, part;
    size_t             i, j, len;

    static const char  in[] =
        "{\"m\":\"Hi \\u4e2d\\\\ \xe4\xb8\xad\xe6\x96\x87 \\ud83d\\ude00 "
        "caf\xc3\xa9\\n\\\"q\\\" \\u0041 \xf0\x9f\x98\x80 \\ud83d!\"}";

    len = sizeof(in) - 1;
    whole = scan_of((const unsigned char *) in, len);

    ck_assert_uint_eq(whole.state, 0);
    ck_assert_uint_eq(whole.nonascii, 7);

    /* two buffers, split anywhere */
    for (i = 0; i <= len; i++) {
        memset(&part, 0, sizeof(part));
        dsg_tokens_scan((const unsigned char *) in, i, &part);
        dsg_tokens_scan((const unsigned char *) in + i, len - i, &part);

        ck_assert_uint_eq(part.ascii, whole.ascii);
        ck_assert_uint_eq(part.nonascii, whole.nonascii);
    }

    /* three buffers */
    for (i = 0; i <= len; i++) {
        for (j = i; j <= len; j++) {
            memset(&part, 0, sizeof(part));
            dsg_tokens_scan((const unsigned char *) in, i, &part);
            dsg_tokens_scan((const unsigned char *) in + i, j - i, &part);
            dsg_tokens_scan((const unsigned char *) in + j, len - j, &part);

            ck_assert_uint_eq(part.ascii, whole.ascii);
            ck_assert_uint_eq(part.nonascii, whole.nonascii);
        }
    }

    /* one byte at a time */
    memset(&part, 0, sizeof(part));

    for (i = 0; i < len; i++) {
        dsg_tokens_scan((const unsigned char *) in + i, 1, &part);
    }

    ck_assert_uint_eq(part.ascii, whole.ascii);
    ck_assert_uint_eq(part.nonascii, whole.nonascii);
}
END_TEST


START_TEST(test_estimate)
{
    dsg_tokens_scan_t  sc;

    memset(&sc, 0, sizeof(sc));
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE), 0);

    /* 4 ASCII bytes a token, rounded up, at least 1 */
    sc.ascii = 4;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE), 1);
    sc.ascii = 5;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE), 2);
    sc.ascii = 1;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE), 1);
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_MIN), 1);
    sc.ascii = 4000;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE), 1000);

    /* one token a code point */
    sc.ascii = 0;
    sc.nonascii = 3;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE), 3);

    /* 7 + 3 = 10 tokens, corrected */
    sc.ascii = 28;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 2000000), 20);
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 1500000), 15);
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 1550000), 16);
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 1500001), 16);
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 500000), 5);
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 0), 10);

    /* the fractions multiply exactly: 1.25 tokens * 1.6 = 2 */
    sc.ascii = 5;
    sc.nonascii = 0;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 1600000), 2);
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, 1600001), 3);

    /* large counts: no overflow */
    sc.ascii = 4000000000000ULL;
    ck_assert_uint_eq(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_MAX),
                      20000000000000ULL);
    sc.ascii = UINT64_MAX;
    sc.nonascii = UINT64_MAX;
    ck_assert_uint_ge(dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_MAX),
                      UINT64_MAX / 1000000);
}
END_TEST


START_TEST(test_correct)
{
    uint32_t  ratio;
    int       i;

    /* the first sample moves 1/8 of the way */
    ratio = DSG_TOKENS_RATIO_ONE;
    dsg_tokens_correct(&ratio, 100, 200);
    ck_assert_uint_eq(ratio, 1125000);

    /* converges: 40 samples of twice the estimate, within 2% of 2.0 */
    ratio = DSG_TOKENS_RATIO_ONE;

    for (i = 0; i < 40; i++) {
        dsg_tokens_correct(&ratio, 1000 + i, 2 * (1000 + i));
    }

    ck_assert_uint_ge(ratio, 1960000);
    ck_assert_uint_le(ratio, 2000000);

    for (i = 0; i < 200; i++) {
        dsg_tokens_correct(&ratio, 1000, 2000);
    }

    ck_assert_uint_eq(ratio, 2000000);

    /* and back down */
    for (i = 0; i < 60; i++) {
        dsg_tokens_correct(&ratio, 1000, 500);
    }

    ck_assert_uint_ge(ratio, 500000);
    ck_assert_uint_le(ratio, 510000);

    for (i = 0; i < 200; i++) {
        dsg_tokens_correct(&ratio, 1000, 500);
    }

    ck_assert_uint_eq(ratio, 500000);

    /* clamped both ways */
    for (i = 0; i < 200; i++) {
        dsg_tokens_correct(&ratio, 1, 1000000);
    }

    ck_assert_uint_eq(ratio, DSG_TOKENS_RATIO_MAX);

    dsg_tokens_correct(&ratio, 1, UINT64_MAX);
    ck_assert_uint_eq(ratio, DSG_TOKENS_RATIO_MAX);

    for (i = 0; i < 200; i++) {
        dsg_tokens_correct(&ratio, 1000, 0);
    }

    ck_assert_uint_eq(ratio, DSG_TOKENS_RATIO_MIN);

    /* no estimate: no sample */
    dsg_tokens_correct(&ratio, 0, 1000);
    ck_assert_uint_eq(ratio, DSG_TOKENS_RATIO_MIN);

    /* an uninitialised ratio is 1.0 */
    ratio = 0;
    dsg_tokens_correct(&ratio, 1000, 1000);
    ck_assert_uint_eq(ratio, DSG_TOKENS_RATIO_ONE);

    /* huge counts */
    ratio = DSG_TOKENS_RATIO_ONE;
    dsg_tokens_correct(&ratio, UINT64_MAX, UINT64_MAX / 2);
    ck_assert_uint_eq(ratio, 1000000 - 500000 / 8);
}
END_TEST


/* the usage reader */

START_TEST(test_usage_json)
{
    uint64_t  pr, co;

    static const char  answer[] =
        "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\","
        "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
        "\"content\":\"Hello!\"},\"finish_reason\":\"stop\"}],"
        "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,"
        "\"total_tokens\":21}}";

    static const char  pretty[] =
        "{\n  \"choices\": [],\n  \"usage\" :\n  {\n"
        "    \"total_tokens\": 3000000001,\n"
        "    \"completion_tokens\" : 1000000000 ,\n"
        "    \"prompt_tokens\":\t2000000001\n  }\n}\n";

    pr = co = 7;
    ck_assert_int_eq(usage_of(answer, &pr, &co), 0);
    ck_assert_uint_eq(pr, 9);
    ck_assert_uint_eq(co, 12);

    ck_assert_int_eq(usage_of(pretty, &pr, &co), 0);
    ck_assert_uint_eq(pr, 2000000001);
    ck_assert_uint_eq(co, 1000000000);

    /* DeepSeek's extra members */
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":5,"
                              "\"prompt_cache_hit_tokens\":0,"
                              "\"prompt_cache_miss_tokens\":5,"
                              "\"completion_tokens\":0}}", &pr, &co), 0);
    ck_assert_uint_eq(pr, 5);
    ck_assert_uint_eq(co, 0);
}
END_TEST


START_TEST(test_usage_sse)
{
    uint64_t  pr, co;

    static const char  stream[] =
        "data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],"
        "\"usage\":null}\n\n"
        "data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}],"
        "\"usage\":null}\n\n"
        "data: {\"id\":\"1\",\"choices\":[],"
        "\"usage\":{\"prompt_tokens\":17,\"completion_tokens\":2,"
        "\"total_tokens\":19}}\n\n"
        "data: [DONE]\n\n";

    static const char  twice[] =
        "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n"
        "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";

    ck_assert_int_eq(usage_of(stream, &pr, &co), 0);
    ck_assert_uint_eq(pr, 17);
    ck_assert_uint_eq(co, 2);

    /* the last one wins */
    ck_assert_int_eq(usage_of(twice, &pr, &co), 0);
    ck_assert_uint_eq(pr, 3);
    ck_assert_uint_eq(co, 4);

    /* null only: nothing */
    ck_assert_int_eq(usage_of("data: {\"choices\":[],\"usage\":null}\n\n"
                              "data: [DONE]\n\n", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\": null}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"choices\":[]}", &pr, &co), -1);
}
END_TEST


START_TEST(test_usage_nested)
{
    uint64_t  pr, co;

    /* the details objects hold names of their own: skipped whole */
    ck_assert_int_eq(usage_of(
        "{\"usage\":{\"prompt_tokens_details\":{\"prompt_tokens\":999,"
        "\"cached_tokens\":3,\"x\":[1,{\"completion_tokens\":9},\"}\"]},"
        "\"prompt_tokens\":10,"
        "\"completion_tokens_details\":{\"reasoning_tokens\":4,"
        "\"completion_tokens\":888},"
        "\"completion_tokens\":20,\"note\":\"a \\\"}\\\" b\\\\\","
        "\"ok\":true,\"nothing\":null,\"f\":1.5e3}}", &pr, &co), 0);
    ck_assert_uint_eq(pr, 10);
    ck_assert_uint_eq(co, 20);

    /* a member missing */
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":10,"
                              "\"completion_tokens_details\":"
                              "{\"completion_tokens\":3}}}", &pr, &co), -1);
}
END_TEST


START_TEST(test_usage_strings)
{
    uint64_t  pr, co;
    size_t    i, len, key;

    /* text about usage in a message is not a key */
    static const char  fake[] =
        "{\"choices\":[{\"message\":{\"content\":"
        "\"\\\"usage\\\":{\\\"prompt_tokens\\\":1,"
        "\\\"completion_tokens\\\":2}\"}}]}";

    /* a later chunk's content quoting it after the real one */
    static const char  later[] =
        "data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n"
        "data: {\"choices\":[{\"delta\":{\"content\":"
        "\"\\\"usage\\\": {\\\"prompt_tokens\\\":1,"
        "\\\"completion_tokens\\\":2} \\\\\"}}]}\n\n";

    /* a key that ends in usage, and one that holds it escaped */
    static const char  keys[] =
        "{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6},"
        "\"x\":{\"say \\\"usage\":{\"prompt_tokens\":1,"
        "\"completion_tokens\":2},"
        "\"my_usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},"
        "\"\\u0075sage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}}";

    /* an escaped backslash ends the string before the key */
    static const char  bs[] =
        "{\"a\":\"x\\\\\",\"usage\":{\"prompt_tokens\":7,"
        "\"completion_tokens\":8}}";

    ck_assert_int_eq(usage_of(fake, &pr, &co), -1);

    ck_assert_int_eq(usage_of(later, &pr, &co), 0);
    ck_assert_uint_eq(pr, 5);
    ck_assert_uint_eq(co, 6);

    ck_assert_int_eq(usage_of(keys, &pr, &co), 0);
    ck_assert_uint_eq(pr, 5);
    ck_assert_uint_eq(co, 6);

    ck_assert_int_eq(usage_of(bs, &pr, &co), 0);
    ck_assert_uint_eq(pr, 7);
    ck_assert_uint_eq(co, 8);

    /* a tail cut anywhere before the key, even inside a string, reads it */
    len = sizeof(later) - 1;
    key = strstr(later, "\"usage\"") - later;

    for (i = 0; i <= key; i++) {
        pr = co = 0;
        ck_assert_int_eq(dsg_tokens_usage((const unsigned char *) later + i,
                                          len - i, &pr, &co), 0);
        ck_assert_uint_eq(pr, 5);
        ck_assert_uint_eq(co, 6);
    }

    for (i = key + 1; i <= len; i++) {
        ck_assert_int_eq(dsg_tokens_usage((const unsigned char *) later + i,
                                          len - i, &pr, &co), -1);
    }
}
END_TEST


START_TEST(test_usage_truncated)
{
    uint64_t  pr, co;
    size_t    len, end, i;

    static const char  answer[] =
        "{\"choices\":[],\"usage\":{\"prompt_tokens\":123,"
        "\"prompt_tokens_details\":{\"cached_tokens\":0},"
        "\"completion_tokens\":45,\"s\":\"}\"}}";

    len = sizeof(answer) - 1;
    end = len - 1;               /* after the usage object's '}' */

    /* every cut before the object's end is truncated */
    for (i = 0; i < end; i++) {
        ck_assert_int_eq(dsg_tokens_usage((const unsigned char *) answer, i,
                                          &pr, &co), -1);
    }

    for (i = end; i <= len; i++) {
        pr = co = 0;
        ck_assert_int_eq(dsg_tokens_usage((const unsigned char *) answer, i,
                                          &pr, &co), 0);
        ck_assert_uint_eq(pr, 123);
        ck_assert_uint_eq(co, 45);
    }

    /* the last usage object decides, even when it is cut */
    ck_assert_int_eq(usage_of("data: {\"usage\":{\"prompt_tokens\":1,"
                              "\"completion_tokens\":2}}\n\n"
                              "data: {\"usage\":{\"prompt_tokens\":3,"
                              "\"completion_tok", &pr, &co), -1);

    /* malformed */
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":1 2,"
                              "\"completion_tokens\":2}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":1;"
                              "\"completion_tokens\":2}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{prompt_tokens:1,"
                              "completion_tokens:2}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":,"
                              "\"completion_tokens\":2}}", &pr, &co), -1);
}
END_TEST


START_TEST(test_usage_numbers)
{
    uint64_t  pr, co;

    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":9007199254740991,"
                              "\"completion_tokens\":0}}", &pr, &co), 0);
    ck_assert_uint_eq(pr, 9007199254740991ULL);
    ck_assert_uint_eq(co, 0);

    /* 2^53 and above, signs, fractions, exponents, strings, null */
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":9007199254740992,"
                              "\"completion_tokens\":0}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":1,"
                              "\"completion_tokens\":"
                              "184467440737095516160000}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":-1,"
                              "\"completion_tokens\":2}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":1.0,"
                              "\"completion_tokens\":2}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":1e3,"
                              "\"completion_tokens\":2}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":\"1\","
                              "\"completion_tokens\":2}}", &pr, &co), -1);
    ck_assert_int_eq(usage_of("{\"usage\":{\"prompt_tokens\":null,"
                              "\"completion_tokens\":2}}", &pr, &co), -1);
}
END_TEST


/* the SSE event counter */

START_TEST(test_sse_events)
{
    dsg_tokens_sse_t  ev;
    uint64_t          n;
    size_t            i, j, len;

    static const char  stream[] =
        ": keep-alive\n\n"
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\","
        "\"content\":\"\"}}]}\n\n"
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n"
        "data:{\"choices\":[{\"delta\":{\"content\":\"\\\"content\\\":"
        "\\\"x\"}}]}\r\n\r\n"
        "event: x\r\n"
        "data: {\"choices\": [{\"delta\": {\"content\" : \"lo\"}}]}\n\n"
        "data: {\"choices\":[{\"delta\":{\"content\":null,"
        "\"reasoning_content\":\"Hmm\"}}]}\n\n"
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\","
        "\"content\":\"\",\"x\":\"\\\"content\\\":\\\"y\"}}]}\n\n"
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,"
        "\"completion_tokens\":4}}\n\n"
        "datum: {\"content\":\"no\"}\n"
        " data: {\"content\":\"no\"}\n"
        "id: {\"content\":\"no\"}\n"
        "data: [DONE]\n\n";

    len = sizeof(stream) - 1;

    /* Hel, the quoted text, lo, Hmm */
    memset(&ev, 0, sizeof(ev));
    ck_assert_uint_eq(dsg_tokens_sse(&ev, (const unsigned char *) stream,
                                     len), 4);

    /* split anywhere, the same count */
    for (i = 0; i <= len; i++) {
        memset(&ev, 0, sizeof(ev));
        n = dsg_tokens_sse(&ev, (const unsigned char *) stream, i);
        n += dsg_tokens_sse(&ev, (const unsigned char *) stream + i, len - i);
        ck_assert_uint_eq(n, 4);
    }

    /* one byte at a time */
    memset(&ev, 0, sizeof(ev));
    n = 0;

    for (j = 0; j < len; j++) {
        n += dsg_tokens_sse(&ev, (const unsigned char *) stream + j, 1);
    }

    ck_assert_uint_eq(n, 4);

    /*
     * a partial match restarts at its 'c'; a shorter key is no match; a
     * line counts once
     */
    memset(&ev, 0, sizeof(ev));
    ck_assert_uint_eq(dsg_tokens_sse(&ev, S("data: {\"ccontent\":\"a\"}\n"
                                            "data: {\"contcontent\":\"b\"}\n"
                                            "data: {\"conten\":\"c\"}\n"
                                            "data: {\"reasoning_content\":"
                                            "\"d\",\"content\":\"e\"}\n")),
                      3);
}
END_TEST


Suite *
dsg_tokens_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_tokens");

    tc = tcase_create("conf");
    tcase_add_test(tc, test_state_size);
    tcase_add_test(tc, test_conf_units);
    tcase_add_test(tc, test_conf_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("bucket");
    tcase_add_test(tc, test_refill_exact);
    tcase_add_test(tc, test_wait_rounding);
    tcase_add_test(tc, test_toobig);
    tcase_add_test(tc, test_reserve);
    tcase_add_test(tc, test_clock_backwards);
    tcase_add_test(tc, test_full);
    tcase_add_test(tc, test_remaining_reset);
    suite_add_tcase(s, tc);

    tc = tcase_create("settle");
    tcase_add_test(tc, test_round_trip);
    tcase_add_test(tc, test_settle);
    tcase_add_test(tc, test_debt_floor);
    tcase_add_test(tc, test_record_after_reload);
    suite_add_tcase(s, tc);

    tc = tcase_create("estimator");
    tcase_add_test(tc, test_scan_ascii);
    tcase_add_test(tc, test_scan_utf8);
    tcase_add_test(tc, test_scan_uescape);
    tcase_add_test(tc, test_scan_split);
    tcase_add_test(tc, test_estimate);
    tcase_add_test(tc, test_correct);
    suite_add_tcase(s, tc);

    tc = tcase_create("usage");
    tcase_add_test(tc, test_usage_json);
    tcase_add_test(tc, test_usage_sse);
    tcase_add_test(tc, test_usage_nested);
    tcase_add_test(tc, test_usage_strings);
    tcase_add_test(tc, test_usage_truncated);
    tcase_add_test(tc, test_usage_numbers);
    tcase_add_test(tc, test_sse_events);
    suite_add_tcase(s, tc);

    return s;
}
