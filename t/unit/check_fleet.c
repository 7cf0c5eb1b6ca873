/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_fleet: a node's share of a fleet-wide key (the wallet,
 * its sources and its credit, the held slots), the plan of a sync and the
 * application of the fleet's answer, the fallback configuration, and a
 * fleet of simulated nodes against a model of the Redis script.
 */


#include <stdlib.h>
#include <string.h>
#include <check.h>

#include "dsg_fleet.h"
#include "../fuzz/fleet_model.h"


Suite *dsg_fleet_suite(void);


#define CRIT  0
#define NORM  1
#define LOW   2


/*
 * ck_assert*() reports every passed assertion to the runner: too slow
 * for the simulations, which check invariants every simulated ms
 */

#define t_assert(cond)                                                       \
    do {                                                                     \
        if (!(cond)) {                                                       \
            ck_abort_msg("Assertion '%s' failed", #cond);                    \
        }                                                                    \
    } while (0)


static void
conf_ok(dsg_limit_conf_t *c, uint64_t n, uint64_t period_ms, uint64_t burst,
    uint32_t inflight, const uint32_t *reserve, uint32_t nclasses)
{
    int  rc;

    rc = dsg_limit_conf_init(c, n, period_ms, burst, inflight, reserve,
                             nclasses);
    ck_assert_int_eq(rc, DSG_OK);
}


/* a fresh check, and a charge if admissible */

static int
t_try(const dsg_limit_conf_t *c, dsg_fleet_key_t *f, dsg_limit_state_t *s,
    uint32_t cls, uint64_t now)
{
    int  rc;

    rc = dsg_fleet_check(c, f, s, cls, 1, now, 0, NULL);

    if (rc == DSG_OK) {
        dsg_fleet_charge(c, f, s, cls, 0);
    }

    return rc;
}


static void
t_wallet(dsg_fleet_key_t *f, int64_t w0, int64_t w1, int64_t w2)
{
    f->wallet[0] = w0;
    f->wallet[1] = w1;
    f->wallet[2] = w2;
}


static void
t_assert_wallet(const dsg_fleet_key_t *f, int64_t w0, int64_t w1, int64_t w2)
{
    ck_assert_int_eq(f->wallet[0], w0);
    ck_assert_int_eq(f->wallet[1], w1);
    ck_assert_int_eq(f->wallet[2], w2);
}


static uint64_t
t_ceil(uint64_t a, uint64_t b)
{
    return (a + b - 1) / b;
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


START_TEST(test_key_init)
{
    uint32_t         t;
    dsg_fleet_key_t  f, zero;

    ck_assert_uint_le(sizeof(dsg_fleet_key_t), 104);

    memset(&zero, 0, sizeof(zero));
    memset(&f, 0xa5, sizeof(f));

    dsg_fleet_key_init(&f);

    ck_assert_mem_eq(&f, &zero, sizeof(f));

    for (t = 0; t < DSG_MAX_TIERS; t++) {
        ck_assert_int_eq(f.wallet[t], 0);
        ck_assert_uint_eq(f.held[t], 0);
        ck_assert_uint_eq(f.fair[t], 0);
        ck_assert_uint_eq(f.demand[t], 0);
        ck_assert_uint_eq(f.est[t], 0);
    }

    ck_assert_uint_eq(f.seen_ms, 0);
}
END_TEST


/*
 * An empty wallet: one request on credit, then DSG_RATE with the time the
 * fleet takes to earn one request; the next grant pays the debt first
 */

START_TEST(test_credit)
{
    int                rc;
    uint32_t           r[] = { 20, 0 };
    uint64_t           w;
    dsg_fleet_key_t    f;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;
    dsg_fleet_ask_t    a;
    dsg_fleet_grant_t  g;

    /* 3r/s: cost 100000, gain 300 units per ms */
    conf_ok(&c, 3, 1000, 0, 0, NULL, 1);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);

    w = 7;
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 0, 1, 1000, 0, &w), DSG_OK);
    ck_assert_uint_eq(w, 0);
    dsg_fleet_charge(&c, &f, &s, 0, 0);
    ck_assert_int_eq(f.wallet[0], -(int64_t) c.cost);

    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 0, 1, 1000, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, t_ceil(c.cost, c.gain[0]));
    ck_assert_uint_eq(w, 334);

    /* still in debt later, wait_ms may be NULL */
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 0, 0, 999999, 0, NULL),
                     DSG_RATE);
    ck_assert_int_eq(f.wallet[0], -(int64_t) c.cost);

    /* a grant of 2 requests: 1 pays the debt, 1 to spend */
    memset(&a, 0, sizeof(a));
    memset(&g, 0, sizeof(g));
    g.granted[0] = 2 * c.cost;
    dsg_fleet_apply(&c, &f, &a, &g);
    ck_assert_int_eq(f.wallet[0], (int64_t) c.cost);

    ck_assert_int_eq(t_try(&c, &f, &s, 0, 2000), DSG_OK);
    ck_assert_int_eq(f.wallet[0], 0);

    /* empty again, not in debt: credit again, once */
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 2000), DSG_OK);
    ck_assert_int_eq(f.wallet[0], -(int64_t) c.cost);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 2000), DSG_RATE);

    /* part of a request on hand: the credit goes below 0 by the rest */
    f.wallet[0] = (int64_t) c.cost / 2;
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 2000), DSG_OK);
    ck_assert_int_eq(f.wallet[0], -(int64_t) c.cost / 2);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 2000), DSG_RATE);

    /* one unit of debt is debt */
    f.wallet[0] = -1;
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 2000), DSG_RATE);
    ck_assert_int_eq(f.wallet[0], -1);

    /* the wait is the tier's: tier 1 earns 80%, 240 units per ms */
    conf_ok(&c, 3, 1000, 0, 0, r, 2);
    dsg_fleet_key_init(&f);
    f.wallet[1] = -1;
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 1, 1, 5, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 417);

    /* 1r/m: a minute */
    conf_ok(&c, 1, 60000, 0, 0, NULL, 1);
    dsg_fleet_key_init(&f);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 5), DSG_OK);
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 0, 1, 5, 0, &w), DSG_RATE);
    ck_assert_uint_eq(w, 60000);

    /* the highest rate: less than a ms, still at least 1 */
    conf_ok(&c, DSG_MAX_RATE, 1000, 0, 0, NULL, 1);
    dsg_fleet_key_init(&f);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 5), DSG_OK);
    rc = dsg_fleet_check(&c, &f, &s, 0, 1, 5, 0, &w);
    ck_assert_int_eq(rc, DSG_RATE);
    ck_assert_uint_eq(w, 1);

    /* no rate at all: never DSG_RATE, the wallet untouched */
    conf_ok(&c, 0, 0, 0, 0, NULL, 1);
    dsg_fleet_key_init(&f);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 5), DSG_OK);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 5), DSG_OK);
    ck_assert_int_eq(f.wallet[0], 0);
}
END_TEST


/*
 * Which wallet pays: the own tier's with a whole request, else the nearest
 * lower tier's (larger index) with a whole request, else the own tier's on
 * credit if not in debt; never a higher tier's
 */

START_TEST(test_source)
{
    int64_t            k, h;
    uint32_t           r3[] = { 10, 10, 0 };
    uint32_t           r2[] = { 20, 0, 0 };
    dsg_fleet_key_t    f;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    /* shares 100, 90, 80: class k is tier k */
    conf_ok(&c, 10, 1000, 0, 0, r3, 3);
    ck_assert_uint_eq(c.ntiers, 3);
    dsg_limit_state_init(&c, &s, 1000);
    k = (int64_t) c.cost;
    h = k / 2;

    dsg_fleet_key_init(&f);

    /* own tier first, though lower tiers have some */
    t_wallet(&f, k, k, k);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    t_assert_wallet(&f, 0, k, k);

    /* own tier short: the nearest lower tier */
    t_wallet(&f, h, k, k);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    t_assert_wallet(&f, h, 0, k);

    /* the nearest with a whole request */
    t_wallet(&f, 0, k - 1, 3 * k);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    t_assert_wallet(&f, 0, k - 1, 2 * k);

    /* none: own tier on credit, the others left alone */
    t_wallet(&f, h, h, k - 1);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    t_assert_wallet(&f, h - k, h, k - 1);

    /* none and own tier in debt: rate */
    t_wallet(&f, -1, h, k - 1);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_RATE);
    t_assert_wallet(&f, -1, h, k - 1);

    /* own tier in debt but a lower tier has a request: that one pays */
    t_wallet(&f, -k, 0, k);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    t_assert_wallet(&f, -k, 0, 0);

    /* a middle class spends its own, then the lower tier */
    t_wallet(&f, 5 * k, k, k);
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_OK);
    t_assert_wallet(&f, 5 * k, 0, k);
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_OK);
    t_assert_wallet(&f, 5 * k, 0, 0);

    /* then credit in its own tier, never tier 0's full wallet */
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_OK);
    t_assert_wallet(&f, 5 * k, -k, 0);
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_RATE);
    t_assert_wallet(&f, 5 * k, -k, 0);

    /* the lowest class only has its own wallet */
    t_wallet(&f, 5 * k, 5 * k, -k);
    ck_assert_int_eq(t_try(&c, &f, &s, LOW, 1000), DSG_RATE);
    t_assert_wallet(&f, 5 * k, 5 * k, -k);

    t_wallet(&f, 5 * k, 5 * k, 0);
    ck_assert_int_eq(t_try(&c, &f, &s, LOW, 1000), DSG_OK);
    t_assert_wallet(&f, 5 * k, 5 * k, -k);

    /* critical reserve 20: two tiers, tier 0 full, tier 1 in debt */
    conf_ok(&c, 10, 1000, 0, 0, r2, 3);
    ck_assert_uint_eq(c.ntiers, 2);
    dsg_fleet_key_init(&f);
    f.wallet[0] = 10 * k;
    f.wallet[1] = -k;

    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_RATE);
    ck_assert_int_eq(t_try(&c, &f, &s, LOW, 1000), DSG_RATE);
    ck_assert_int_eq(f.wallet[0], 10 * k);
    ck_assert_int_eq(f.wallet[1], -k);

    /* critical is fine */
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    ck_assert_int_eq(f.wallet[0], 9 * k);
    ck_assert_int_eq(f.wallet[1], -k);

    /* an invalid class: DSG_EINVAL, nothing charged */
    ck_assert_int_eq(t_try(&c, &f, &s, 3, 1000), DSG_EINVAL);
    dsg_fleet_charge(&c, &f, &s, 3, 0);
    dsg_fleet_refund(&c, &f, &s, 99);
    ck_assert_int_eq(f.wallet[0], 9 * k);
    ck_assert_int_eq(f.wallet[1], -k);
}
END_TEST


/* a fresh request counts in its tier's demand and in seen_ms, a retry not */

START_TEST(test_fresh)
{
    uint32_t           r[] = { 20, 0, 0 };
    uint64_t           w;
    dsg_fleet_key_t    f, before;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    conf_ok(&c, 10, 1000, 0, 4, r, 3);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);

    /* the fleet has not answered: DSG_UNSPOKEN, counted all the same */
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, LOW, 1, 1000, 0, NULL),
                     DSG_UNSPOKEN);
    ck_assert_uint_eq(f.demand[0], 0);
    ck_assert_uint_eq(f.demand[1], 1);
    ck_assert_uint_eq(f.seen_ms, 1000);

    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, NORM, 1, 1005, 0, NULL),
                     DSG_UNSPOKEN);
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, CRIT, 1, 1007, 0, NULL),
                     DSG_UNSPOKEN);
    ck_assert_uint_eq(f.demand[0], 1);
    ck_assert_uint_eq(f.demand[1], 2);
    ck_assert_uint_eq(f.seen_ms, 1007);

    /* a waiter trying again: nothing changes, whatever the answer */
    before = f;
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, LOW, 0, 2000, 0, NULL),
                     DSG_UNSPOKEN);
    ck_assert_mem_eq(&f, &before, sizeof(f));

    f.held[0] = 1;
    f.held[1] = 1;
    before = f;
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, LOW, 0, 2000, 0, NULL),
                     DSG_OK);
    ck_assert_mem_eq(&f, &before, sizeof(f));

    /* and DSG_RATE */
    f.wallet[0] = -1;
    before = f;
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, CRIT, 0, 2000, 0, &w),
                     DSG_RATE);
    ck_assert_mem_eq(&f, &before, sizeof(f));

    /* a fresh one is counted even when refused for the rate */
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, CRIT, 1, 2001, 0, &w),
                     DSG_RATE);
    ck_assert_uint_eq(f.demand[0], 2);
    ck_assert_uint_eq(f.demand[1], 2);
    ck_assert_uint_eq(f.seen_ms, 2001);

    /* an invalid class counts nothing */
    before = f;
    w = 5;
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 3, 1, 3000, 0, &w),
                     DSG_EINVAL);
    ck_assert_uint_eq(w, 0);
    ck_assert_mem_eq(&f, &before, sizeof(f));

    /* demand saturates */
    f.demand[1] = UINT32_MAX - 1;
    dsg_fleet_check(&c, &f, &s, NORM, 1, 3000, 0, NULL);
    ck_assert_uint_eq(f.demand[1], UINT32_MAX);
    dsg_fleet_check(&c, &f, &s, NORM, 1, 3000, 0, NULL);
    ck_assert_uint_eq(f.demand[1], UINT32_MAX);
}
END_TEST


/* dsg_fleet_seen(): demand and seen_ms only, by the class's tier */

START_TEST(test_seen)
{
    uint32_t           r[] = { 20, 0 };
    dsg_fleet_key_t    f, before;
    dsg_limit_conf_t   c;

    conf_ok(&c, 10, 1000, 0, 10, r, 2);
    dsg_fleet_key_init(&f);
    f.wallet[1] = 5;
    f.held[0] = 2;
    before = f;

    dsg_fleet_seen(&c, &f, 1, 4242);
    ck_assert_uint_eq(f.demand[1], 1);
    ck_assert_uint_eq(f.demand[0], 0);
    ck_assert_uint_eq(f.seen_ms, 4242);

    before.demand[1] = 1;
    before.seen_ms = 4242;
    ck_assert_mem_eq(&f, &before, sizeof(f));

    /* an unknown class: nothing */
    dsg_fleet_seen(&c, &f, 2, 9999);
    ck_assert_mem_eq(&f, &before, sizeof(f));
}
END_TEST


START_TEST(test_inflight)
{
    uint32_t           r[] = { 20, 0 };
    dsg_fleet_key_t    f, fb;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s, sb;
    uint32_t           cls;

    /* in-flight only, 10, critical reserves 20: caps 10 and 8 */
    conf_ok(&c, 0, 0, 0, 10, r, 2);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);

    /* nothing held, the fleet has not answered: never a slot on credit */
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_UNSPOKEN);
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_UNSPOKEN);
    ck_assert_uint_eq(s.inflight[0], 0);

    /* it answered: none for us (fair 1) */
    f.fair[0] = 1;
    f.fair[1] = 1;
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_INFLIGHT);
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_INFLIGHT);

    /* tier 0 answered, tier 1 not: by the first tier that blocks */
    f.held[0] = 1;
    f.fair[1] = 0;
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_UNSPOKEN);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_INFLIGHT);
    dsg_fleet_refund(&c, &f, &s, CRIT);
    ck_assert_uint_eq(s.inflight[0], 0);

    f.held[0] = 3;
    f.held[1] = 2;
    f.fair[0] = 10;                 /* nobody else wants more: the cap */
    f.fair[1] = 8;

    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_OK);
    ck_assert_uint_eq(s.inflight[0], 1);
    ck_assert_uint_eq(s.inflight[1], 1);
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_OK);
    ck_assert_uint_eq(s.inflight[0], 2);
    ck_assert_uint_eq(s.inflight[1], 2);

    /* tier 1 full */
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_INFLIGHT);

    /* tier 0 has one more, for critical only */
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_OK);
    ck_assert_uint_eq(s.inflight[0], 3);
    ck_assert_uint_eq(s.inflight[1], 2);
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_INFLIGHT);

    /* tier 0 full blocks tier 1 too, though tier 1 has room */
    f.held[1] = 5;
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_INFLIGHT);

    /* a held count below what is in flight (the fleet shrank it) */
    f.held[0] = 1;
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_INFLIGHT);
    f.held[0] = 4;

    /* tier 1 blocked, tier 0 not */
    f.held[1] = 2;
    ck_assert_int_eq(t_try(&c, &f, &s, NORM, 1000), DSG_INFLIGHT);
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, CRIT, 0, 1000, 0, NULL),
                     DSG_OK);

    /* the local zone's record releases a fleet charge */
    dsg_limit_release(&s, dsg_limit_record(&c, NORM));
    ck_assert_uint_eq(s.inflight[0], 2);
    ck_assert_uint_eq(s.inflight[1], 1);
    dsg_limit_release(&s, dsg_limit_record(&c, CRIT));
    ck_assert_uint_eq(s.inflight[0], 1);
    ck_assert_uint_eq(s.inflight[1], 1);

    /* refund: the slots of every tier t <= tier(cls) */
    dsg_fleet_refund(&c, &f, &s, NORM);
    ck_assert_uint_eq(s.inflight[0], 0);
    ck_assert_uint_eq(s.inflight[1], 0);
    dsg_fleet_refund(&c, &f, &s, NORM);
    ck_assert_uint_eq(s.inflight[0], 0);
    ck_assert_int_eq(f.wallet[0], 0);
    ck_assert_int_eq(f.wallet[1], 0);

    /* rate and slots: the rate is checked first */
    conf_ok(&c, 10, 1000, 0, 10, r, 2);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);
    f.wallet[0] = -1;
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_RATE);
    f.wallet[0] = 0;
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_UNSPOKEN);
    f.fair[0] = 3;
    ck_assert_int_eq(t_try(&c, &f, &s, CRIT, 1000), DSG_INFLIGHT);
    ck_assert_int_eq(f.wallet[0], 0);

    /* charge + refund from the own tier's wallet: the identity */
    f.held[0] = 4;
    f.held[1] = 3;
    s.inflight[0] = 2;
    s.inflight[1] = 1;

    for (cls = 0; cls < 2; cls++) {
        f.wallet[0] = 3 * (int64_t) c.cost + 17;
        f.wallet[1] = 2 * (int64_t) c.cost;

        ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, cls, 0, 1000, 0, NULL),
                         DSG_OK);
        fb = f;
        sb = s;

        dsg_fleet_charge(&c, &f, &s, cls, 0);
        ck_assert_int_eq(f.wallet[cls], fb.wallet[cls] - (int64_t) c.cost);
        ck_assert_uint_eq(s.inflight[0], sb.inflight[0] + 1);
        ck_assert_uint_eq(s.inflight[1], sb.inflight[1] + cls);

        dsg_fleet_refund(&c, &f, &s, cls);
        ck_assert_mem_eq(&f, &fb, sizeof(f));
        ck_assert_mem_eq(&s, &sb, sizeof(s));
    }

    /* on credit too */
    f.wallet[0] = 0;
    f.wallet[1] = 0;
    fb = f;
    sb = s;
    dsg_fleet_charge(&c, &f, &s, CRIT, 0);
    ck_assert_int_eq(f.wallet[0], -(int64_t) c.cost);
    dsg_fleet_refund(&c, &f, &s, CRIT);
    ck_assert_mem_eq(&f, &fb, sizeof(f));
    ck_assert_mem_eq(&s, &sb, sizeof(s));

    /* paid by a lower tier: the refund goes to the own tier's wallet */
    f.wallet[0] = 0;
    f.wallet[1] = (int64_t) c.cost;
    dsg_fleet_charge(&c, &f, &s, CRIT, 0);
    ck_assert_int_eq(f.wallet[0], 0);
    ck_assert_int_eq(f.wallet[1], 0);
    ck_assert_uint_eq(s.inflight[0], 3);
    dsg_fleet_refund(&c, &f, &s, CRIT);
    ck_assert_int_eq(f.wallet[0], (int64_t) c.cost);
    ck_assert_int_eq(f.wallet[1], 0);
    ck_assert_uint_eq(s.inflight[0], 2);

    /* no cap: the counters are not touched */
    conf_ok(&c, 10, 1000, 0, 0, NULL, 1);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, 1000), DSG_OK);
    ck_assert_uint_eq(s.inflight[0], 0);
    dsg_fleet_refund(&c, &f, &s, 0);
    ck_assert_int_eq(f.wallet[0], 0);
}
END_TEST


START_TEST(test_plan_idle)
{
    dsg_fleet_key_t    f, zero;
    dsg_fleet_ask_t    a, none;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    memset(&none, 0, sizeof(none));
    dsg_fleet_key_init(&zero);

    /* rate and slots */
    conf_ok(&c, 10, 1000, 5, 10, NULL, 2);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);

    memset(&a, 0xa5, sizeof(a));
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, 1000000, 100, &a), 0);
    ck_assert_mem_eq(&a, &none, sizeof(a));
    ck_assert_mem_eq(&f, &zero, sizeof(f));

    /* rate only, in-flight only */
    conf_ok(&c, 10, 1000, 5, 0, NULL, 1);
    memset(&a, 0xa5, sizeof(a));
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, 1000000, 100, &a), 0);
    ck_assert_mem_eq(&a, &none, sizeof(a));

    conf_ok(&c, 0, 0, 0, 3, NULL, 1);
    memset(&a, 0xa5, sizeof(a));
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, 1000000, 100, &a), 0);
    ck_assert_mem_eq(&a, &none, sizeof(a));
    ck_assert_mem_eq(&f, &zero, sizeof(f));
}
END_TEST


/*
 * The rate part of a sync: est = est - est / 4 + 4 * demand (x16), the
 * target (ceil(est / 8) + 1) * cost while the key is recent, 0 after
 * DSG_FLEET_LINGER intervals; below the target the difference is asked
 * for, above it given back
 */

START_TEST(test_plan_rate)
{
    int                i;
    int64_t            k;
    uint64_t           t0;
    dsg_fleet_key_t    f;
    dsg_fleet_ask_t    a, none;
    dsg_fleet_grant_t  g;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    memset(&none, 0, sizeof(none));

    conf_ok(&c, 10, 1000, 5, 0, NULL, 1);
    k = (int64_t) c.cost;
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);
    t0 = 50000;

    /* 5 fresh requests: 1 on credit, 4 refused */
    ck_assert_int_eq(t_try(&c, &f, &s, 0, t0), DSG_OK);
    for (i = 0; i < 4; i++) {
        ck_assert_int_eq(t_try(&c, &f, &s, 0, t0), DSG_RATE);
    }

    ck_assert_uint_eq(f.demand[0], 5);
    ck_assert_int_eq(f.wallet[0], -k);

    /* est 20 (1.25 per sync): target (3 + 1) requests, plus the debt */
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, t0 + 100, 100, &a), 1);
    ck_assert_uint_eq(f.est[0], 20);
    ck_assert_uint_eq(f.demand[0], 0);
    ck_assert_uint_eq(a.want[0], 5 * (uint64_t) k);
    ck_assert_uint_eq(a.back[0], 0);
    ck_assert_uint_eq(a.claim[0], 0);
    ck_assert_uint_eq(a.wslots[0], 0);
    ck_assert_int_eq(f.wallet[0], -k);

    memset(&g, 0, sizeof(g));
    g.granted[0] = 5 * (uint64_t) k;
    dsg_fleet_apply(&c, &f, &a, &g);
    ck_assert_int_eq(f.wallet[0], 4 * k);

    /* est 15: target 3, one request back */
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, t0 + 200, 100, &a), 1);
    ck_assert_uint_eq(f.est[0], 15);
    ck_assert_uint_eq(a.want[0], 0);
    ck_assert_uint_eq(a.back[0], (uint64_t) k);
    ck_assert_int_eq(f.wallet[0], 3 * k);

    memset(&g, 0, sizeof(g));
    dsg_fleet_apply(&c, &f, &a, &g);
    ck_assert_int_eq(f.wallet[0], 3 * k);

    /* est 11 (the decay rounds up): target 3, nothing to say */
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, t0 + 300, 100, &a), 0);
    ck_assert_uint_eq(f.est[0], 11);
    ck_assert_mem_eq(&a, &none, sizeof(a));
    ck_assert_int_eq(f.wallet[0], 3 * k);

    /* est 8, still recent at exactly DSG_FLEET_LINGER intervals: target 2 */
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s,
                                    t0 + DSG_FLEET_LINGER * 100, 100, &a),
                     1);
    ck_assert_uint_eq(f.est[0], 8);
    ck_assert_uint_eq(a.back[0], (uint64_t) k);
    ck_assert_int_eq(f.wallet[0], 2 * k);

    /* one ms later: target 0, the whole wallet goes back */
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s,
                                    t0 + DSG_FLEET_LINGER * 100 + 1, 100,
                                    &a),
                     1);
    ck_assert_uint_eq(a.back[0], 2 * (uint64_t) k);
    ck_assert_uint_eq(a.want[0], 0);
    ck_assert_int_eq(f.wallet[0], 0);

    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, t0 + 100000, 100, &a), 0);
    ck_assert_mem_eq(&a, &none, sizeof(a));

    /* a retry on credit (not fresh): the debt is still asked for */
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 0, 0, t0 + 100001, 0, NULL),
                     DSG_OK);
    dsg_fleet_charge(&c, &f, &s, 0, 0);
    ck_assert_uint_eq(f.seen_ms, t0);
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, t0 + 100100, 100, &a), 1);
    ck_assert_uint_eq(a.want[0], (uint64_t) k);
    ck_assert_uint_eq(a.back[0], 0);

    /* the interval scales the linger */
    dsg_fleet_key_init(&f);
    ck_assert_int_eq(t_try(&c, &f, &s, 0, t0), DSG_OK);
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s,
                                    t0 + DSG_FLEET_LINGER * 1000, 1000, &a),
                     1);
    ck_assert_uint_eq(a.want[0], 2 * (uint64_t) k + (uint64_t) k);
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s,
                                    t0 + DSG_FLEET_LINGER * 1000 + 1, 1000,
                                    &a),
                     1);
    ck_assert_uint_eq(a.want[0], (uint64_t) k);
}
END_TEST


/* random demands and wallets against the formulas, every tier */

START_TEST(test_plan_formula)
{
    int                say, want_say;
    int64_t            w, target;
    uint32_t           r[] = { 10, 20, 0 };
    uint32_t           seed, i, t, est, d[DSG_MAX_TIERS];
    uint64_t           now;
    dsg_fleet_key_t    f, before;
    dsg_fleet_ask_t    a;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    conf_ok(&c, 7, 1000, 3, 0, r, 3);
    ck_assert_uint_eq(c.ntiers, 3);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);

    seed = 12345;
    now = 1000000;

    for (i = 0; i < 5000; i++) {
        now += 1 + t_rand(&seed) % 150;

        for (t = 0; t < c.ntiers; t++) {
            d[t] = (t_rand(&seed) % 4 == 0) ? t_rand(&seed) % 1000 : 0;
            f.demand[t] = d[t];
            f.wallet[t] = (int64_t) (t_rand(&seed) % (12 * c.cost))
                          - (int64_t) c.cost;
        }

        if (t_rand(&seed) % 8 == 0) {
            f.seen_ms = now - t_rand(&seed) % (3 * DSG_FLEET_LINGER * 100);
        }

        want_say = 0;
        before = f;

        say = dsg_fleet_plan(&c, &f, &s, now, 100, &a);

        for (t = 0; t < c.ntiers; t++) {
            est = before.est[t] - (before.est[t] + 3) / 4 + 4 * d[t];
            t_assert(f.est[t] == est);
            t_assert(f.demand[t] == 0);

            target = 0;
            if (now - before.seen_ms <= DSG_FLEET_LINGER * 100) {
                target = (int64_t) ((est + 7) / 8 + 1) * (int64_t) c.cost;
            }

            w = before.wallet[t];

            if (w < target) {
                t_assert(a.want[t] == (uint64_t) (target - w));
                t_assert(a.back[t] == 0);
                t_assert(f.wallet[t] == w);
                want_say = 1;

            } else if (w > target) {
                t_assert(a.want[t] == 0);
                t_assert(a.back[t] == (uint64_t) (w - target));
                t_assert(f.wallet[t] == target);
                want_say = 1;

            } else {
                t_assert(a.want[t] == 0 && a.back[t] == 0);
                t_assert(f.wallet[t] == w);
            }

            t_assert(a.claim[t] == 0 && a.wslots[t] == 0);
        }

        t_assert(say == want_say);
    }
}
END_TEST


/*
 * The slots part of a sync: claim = max(in flight, min(held, fair)), held
 * lowered to it; wslots = min(cap, in flight + queued + ahead + recent),
 * at least the claim; a shrink is said
 */

START_TEST(test_plan_slots)
{
    uint32_t           r[] = { 20, 0 };
    uint64_t           now;
    dsg_fleet_key_t    f;
    dsg_fleet_ask_t    a, none;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    memset(&none, 0, sizeof(none));
    now = 100000;

    conf_ok(&c, 0, 0, 0, 10, NULL, 1);
    dsg_limit_state_init(&c, &s, 1000);

    /* the fair share below held: shrink to it, said */
    dsg_fleet_key_init(&f);
    f.seen_ms = now;
    f.held[0] = 6;
    f.fair[0] = 4;
    s.inflight[0] = 2;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 4);
    ck_assert_uint_eq(f.held[0], 4);
    ck_assert_uint_eq(a.wslots[0], 4);           /* 2 wanted, the claim */
    ck_assert_uint_eq(a.want[0], 0);
    ck_assert_uint_eq(a.back[0], 0);

    /* never below what is in flight */
    f.held[0] = 6;
    f.fair[0] = 4;
    s.inflight[0] = 5;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 5);
    ck_assert_uint_eq(f.held[0], 5);
    ck_assert_uint_eq(a.wslots[0], 5 + 1);

    /* the fair share above held: held; wanted: in flight + queued + 1 */
    f.held[0] = 3;
    f.fair[0] = 8;
    f.seen_ms = now - 50;
    s.inflight[0] = 1;
    s.queued = 4;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 3);
    ck_assert_uint_eq(f.held[0], 3);
    ck_assert_uint_eq(a.wslots[0], 1 + 4 + 0 + 1);

    /* at most the cap */
    s.inflight[0] = 2;
    s.queued = 20;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.wslots[0], 10);
    ck_assert_uint_eq(a.claim[0], 3);

    /* ahead: the expected new requests, ceil(est / 16) after the update */
    s.inflight[0] = 0;
    s.queued = 0;
    f.held[0] = 1;
    f.est[0] = 40;                               /* 30 after the update */
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(f.est[0], 30);
    ck_assert_uint_eq(a.claim[0], 1);
    ck_assert_uint_eq(a.wslots[0], 0 + 0 + 2 + 1);

    /* not recent: no + 1, and only the slots in use are kept */
    f.est[0] = 0;
    f.held[0] = 3;
    f.seen_ms = now - DSG_FLEET_LINGER * 100 - 1;
    s.inflight[0] = 1;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 1);
    ck_assert_uint_eq(f.held[0], 1);
    ck_assert_uint_eq(a.wslots[0], 1);
    f.held[0] = 1;
    s.queued = 1;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 1);
    ck_assert_uint_eq(a.wslots[0], 2);
    s.queued = 0;

    /* a shrink to nothing is said once, then the key is quiet */
    dsg_fleet_key_init(&f);
    f.held[0] = 3;
    s.inflight[0] = 0;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 0);
    ck_assert_uint_eq(a.wslots[0], 0);
    ck_assert_uint_eq(f.held[0], 0);
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now + 100, 100, &a), 0);
    ck_assert_mem_eq(&a, &none, sizeof(a));

    /* a recent claim is said even if nothing is wanted: the fleet keeps it */
    f.held[0] = 2;
    f.fair[0] = 10;
    f.seen_ms = now + 150;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now + 200, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 2);
    ck_assert_uint_eq(a.wslots[0], 2);           /* 1 wanted, the claim */

    /* the same key gone quiet: the slots not in use go back, said once */
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s,
                                    now + 150 + DSG_FLEET_LINGER * 100 + 1,
                                    100, &a),
                     1);
    ck_assert_uint_eq(a.claim[0], 0);
    ck_assert_uint_eq(f.held[0], 0);
    f.est[0] = 0;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s,
                                    now + 150 + DSG_FLEET_LINGER * 100 + 101,
                                    100, &a),
                     0);

    /* queued waiters alone */
    dsg_fleet_key_init(&f);
    s.queued = 1;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 0);
    ck_assert_uint_eq(a.wslots[0], 1);
    s.queued = 0;

    /*
     * two tiers, caps 10 and 8: tier t counts the requests of every tier
     * u >= t in flight (in s) and ahead
     */
    conf_ok(&c, 0, 0, 0, 10, r, 2);
    dsg_fleet_key_init(&f);
    f.held[0] = 7;
    f.held[1] = 5;
    f.fair[0] = 5;
    f.fair[1] = 4;
    f.est[0] = 32;                               /* 24: ahead 2 */
    f.est[1] = 16;                               /* 12: ahead 1 */
    f.seen_ms = now;
    s.inflight[0] = 3;
    s.inflight[1] = 1;
    s.queued = 2;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.claim[0], 5);
    ck_assert_uint_eq(a.claim[1], 4);
    ck_assert_uint_eq(f.held[0], 5);
    ck_assert_uint_eq(f.held[1], 4);
    ck_assert_uint_eq(a.wslots[0], 3 + 2 + 3 + 1);
    ck_assert_uint_eq(a.wslots[1], 1 + 2 + 1 + 1);

    /* the tier's cap, not tier 0's */
    s.queued = 30;
    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, now, 100, &a), 1);
    ck_assert_uint_eq(a.wslots[0], 10);
    ck_assert_uint_eq(a.wslots[1], 8);
    s.queued = 0;
}
END_TEST


/* the fleet's answer: wallet += granted, held = max(held, claim), fair */

START_TEST(test_apply)
{
    int64_t            k;
    uint32_t           r[] = { 20, 0 };
    dsg_fleet_key_t    f, before;
    dsg_fleet_ask_t    a;
    dsg_fleet_grant_t  g;
    dsg_limit_conf_t   c;

    conf_ok(&c, 10, 1000, 0, 10, r, 2);
    k = (int64_t) c.cost;
    dsg_fleet_key_init(&f);

    memset(&a, 0, sizeof(a));
    memset(&g, 0, sizeof(g));

    f.wallet[0] = -k;
    f.wallet[1] = 2 * k;
    f.held[0] = 3;
    f.held[1] = 1;
    a.claim[0] = 3;
    a.claim[1] = 1;
    g.granted[0] = 5 * (uint64_t) k;
    g.granted[1] = 0;
    g.held[0] = 2;                               /* below the claim */
    g.held[1] = 4;
    g.fair[0] = 6;
    g.fair[1] = 5;

    dsg_fleet_apply(&c, &f, &a, &g);
    ck_assert_int_eq(f.wallet[0], 4 * k);
    ck_assert_int_eq(f.wallet[1], 2 * k);
    ck_assert_uint_eq(f.held[0], 3);
    ck_assert_uint_eq(f.held[1], 4);
    ck_assert_uint_eq(f.fair[0], 6);
    ck_assert_uint_eq(f.fair[1], 5);

    /* nothing granted, less held, fair 0 */
    memset(&g, 0, sizeof(g));
    a.claim[0] = 0;
    a.claim[1] = 0;
    dsg_fleet_apply(&c, &f, &a, &g);
    ck_assert_int_eq(f.wallet[0], 4 * k);
    ck_assert_uint_eq(f.held[0], 0);
    ck_assert_uint_eq(f.held[1], 0);
    ck_assert_uint_eq(f.fair[0], 0);

    /* only what the zone limits is applied */
    conf_ok(&c, 10, 1000, 0, 0, NULL, 1);
    g.granted[0] = (uint64_t) k;
    g.held[0] = 7;
    g.fair[0] = 7;
    before = f;
    dsg_fleet_apply(&c, &f, &a, &g);
    ck_assert_int_eq(f.wallet[0], 5 * k);
    ck_assert_uint_eq(f.held[0], before.held[0]);
    ck_assert_uint_eq(f.fair[0], before.fair[0]);

    conf_ok(&c, 0, 0, 0, 10, NULL, 1);
    before = f;
    dsg_fleet_apply(&c, &f, &a, &g);
    ck_assert_int_eq(f.wallet[0], before.wallet[0]);
    ck_assert_uint_eq(f.held[0], 7);
    ck_assert_uint_eq(f.fair[0], 7);
}
END_TEST


/*
 * A fleet: nodes with their dsg_fleet_key_t and dsg_limit_state_t, and a
 * model of the Redis script (ngx_http_deepseek_guard_fleet_lua, per key,
 * tiers nested as in dsg_bucket.h; no record or key expiry):
 *
 *   - levels refill by gain * elapsed up to capacity;
 *   - the node's back[i] goes to levels 0..i, clamped;
 *   - for i = 0..ntiers - 1: g = min(want[i], whole requests in
 *     min(level[0..i])), taken from levels 0..i;
 *   - slots, per tier: free = cap - the other nodes' held; if some other
 *     node holds less than it wants (starved) and this one wants some,
 *     fair = max(1, cap * ws / (ws + the others' wanted)), else fair =
 *     cap; G = max(claim, min(ws, free, fair)); the node's record becomes
 *     (G, ws).
 */

#define T_NODES     4
#define T_REQS      64


typedef dsg_model_redis_t  t_redis_t;


typedef struct {
    uint64_t  end;
    uint32_t  record;
} t_req_t;


typedef struct {
    dsg_fleet_key_t    f;
    dsg_limit_state_t  s;
    dsg_fleet_ask_t    a;
    dsg_fleet_grant_t  g;
    uint64_t           apply_at;                 /* 0: no sync pending */
    t_req_t            req[T_REQS];
    uint32_t           nreq;
    uint64_t           admitted[DSG_MAX_CLASSES];
} t_node_t;


typedef struct {
    uint32_t   nodes;
    uint64_t   ms;                     /* simulated time */
    uint64_t   interval;               /* sync, ms */
    uint64_t   latency;                /* from plan to apply, ms */
    uint32_t   per_ms;                 /* new requests per ms, round robin */
    uint32_t   active[T_NODES];        /* a node gets requests from then */
    uint32_t   classes[16];            /* a request's class: one of them */
    uint32_t   nmix;
    uint64_t   dur_min, dur_max;       /* request duration, ms */
} t_sim_t;


typedef struct {
    uint64_t   admitted[T_NODES][DSG_MAX_CLASSES];
    uint64_t   offered[DSG_MAX_CLASSES];
    uint64_t   total;
    uint64_t   busy;                   /* sum over ms of in flight, tier 0 */
    uint32_t   peak[DSG_MAX_TIERS];    /* of the fleet's in flight */
    uint64_t   syncs;
    uint64_t   redis_ms;               /* the script's last run */
} t_result_t;


static void
t_redis_init(const dsg_limit_conf_t *c, t_redis_t *r, uint64_t now)
{
    dsg_model_init(c, r, now);
}


static void
t_redis_sync(const dsg_limit_conf_t *c, t_redis_t *r, uint32_t node,
    uint32_t nodes, uint64_t now, const dsg_fleet_ask_t *a,
    dsg_fleet_grant_t *g)
{
    dsg_model_sync(c, r, nodes, node, now, a, g);
}


/* the fleet's invariants, every simulated ms */

static void
t_fleet_check(const dsg_limit_conf_t *c, const t_redis_t *r,
    const t_node_t *nd, uint32_t nodes, t_result_t *res, int count)
{
    uint32_t  t, k, sum, rsum;

    for (t = 0; t < c->ntiers; t++) {
        sum = 0;
        rsum = 0;

        for (k = 0; k < nodes; k++) {
            if (c->n > 0) {
                /* at most one request of credit per node and tier */
                t_assert(nd[k].f.wallet[t] >= -(int64_t) c->cost);
            }

            if (c->inflight > 0) {
                t_assert(nd[k].s.inflight[t] <= nd[k].f.held[t]);
                t_assert(nd[k].f.held[t] <= r->h[k][t]);
            }

            sum += nd[k].s.inflight[t];
            rsum += r->h[k][t];
        }

        if (c->inflight > 0) {
            t_assert(sum <= c->cap[t]);
            t_assert(rsum <= c->cap[t]);

        } else {
            t_assert(sum == 0);
        }

        if (c->n > 0) {
            t_assert(r->level[t] <= c->capacity[t]);
        }

        if (sum > res->peak[t]) {
            res->peak[t] = sum;
        }

        if (t == 0 && count) {
            res->busy += sum;
        }
    }
}


static void
t_fleet_run(const dsg_limit_conf_t *c, const t_sim_t *sim, uint32_t seed,
    t_result_t *res)
{
    uint32_t     i, k, q, cls, node, rr;
    uint64_t     now, t0, phase;
    t_redis_t    r;
    t_node_t    *nd, *n;

    nd = calloc(T_NODES, sizeof(t_node_t));
    ck_assert_ptr_nonnull(nd);
    ck_assert_uint_le(sim->nodes, T_NODES);

    memset(res, 0, sizeof(t_result_t));

    t0 = 1000000;
    t_redis_init(c, &r, t0);

    for (k = 0; k < sim->nodes; k++) {
        dsg_fleet_key_init(&nd[k].f);
        dsg_limit_state_init(c, &nd[k].s, t0);
    }

    rr = 0;

    for (now = t0; now < t0 + sim->ms; now++) {

        for (k = 0; k < sim->nodes; k++) {
            n = &nd[k];

            /* requests that end */
            for (q = 0; q < n->nreq; /* void */) {
                if (n->req[q].end > now) {
                    q++;
                    continue;
                }

                dsg_limit_release(&n->s, n->req[q].record);
                n->req[q] = n->req[--n->nreq];
            }

            /* the answer of a sync */
            if (n->apply_at == now) {
                dsg_fleet_apply(c, &n->f, &n->a, &n->g);
                n->apply_at = 0;
            }

            /* a sync, the nodes' agents out of phase */
            phase = sim->interval * k / sim->nodes;

            if (n->apply_at == 0
                && (now - t0) % sim->interval == phase
                && dsg_fleet_plan(c, &n->f, &n->s, now, sim->interval,
                                  &n->a))
            {
                t_redis_sync(c, &r, k, sim->nodes, now, &n->a, &n->g);
                res->syncs++;
                res->redis_ms = now;

                if (sim->latency == 0) {
                    dsg_fleet_apply(c, &n->f, &n->a, &n->g);

                } else {
                    n->apply_at = now + sim->latency;
                }
            }
        }

        t_fleet_check(c, &r, nd, sim->nodes, res, 0);

        /* new requests, round robin over the active nodes */
        for (i = 0; i < sim->per_ms; i++) {
            node = rr++ % sim->nodes;

            if (now - t0 < sim->active[node]) {
                continue;
            }

            n = &nd[node];
            cls = sim->classes[t_rand(&seed) % sim->nmix];
            res->offered[cls]++;

            if (t_try(c, &n->f, &n->s, cls, now) != DSG_OK) {
                continue;
            }

            n->admitted[cls]++;
            res->admitted[node][cls]++;
            res->total++;

            if (c->inflight > 0) {
                t_assert(n->nreq < T_REQS);
                n->req[n->nreq].end = now + sim->dur_min
                                      + t_rand(&seed)
                                        % (sim->dur_max - sim->dur_min + 1);
                n->req[n->nreq].record = dsg_limit_record(c, cls);
                n->nreq++;
            }
        }

        t_fleet_check(c, &r, nd, sim->nodes, res, 1);
    }

    free(nd);
}


static void
t_sim_default(t_sim_t *sim)
{
    memset(sim, 0, sizeof(t_sim_t));

    sim->nodes = 3;
    sim->ms = 60000;
    sim->interval = 100;
    sim->latency = 0;
    sim->per_ms = 1;
    sim->classes[0] = 0;
    sim->nmix = 1;
    sim->dur_min = 1;
    sim->dur_max = 1;
}


/*
 * (a) rate: round-robin overload on 3 nodes for 60 s; the fleet admits at
 * most what its bucket gives (capacity + refill) plus one credit per node,
 * and at least 90% of the rate
 */

START_TEST(test_fleet_rate)
{
    static const struct {
        uint64_t  n, period, burst;
        uint32_t  per_ms;
        uint64_t  latency;
    } cases[] = {
        { 100, 1000, 10, 1, 0 },
        { 100, 1000, 10, 1, 7 },
        { 7, 1000, 1, 1, 0 },
        { 60, 60000, 0, 1, 3 },
        { 30, 60000, 5, 2, 0 },
        { 400, 1000, 40, 3, 5 }
    };

    uint32_t    i, k;
    uint64_t    rate, bound, max;
    t_sim_t     sim;
    t_result_t  res;
    dsg_limit_conf_t  c;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        conf_ok(&c, cases[i].n, cases[i].period, cases[i].burst, 0, NULL, 1);

        t_sim_default(&sim);
        sim.per_ms = cases[i].per_ms;
        sim.latency = cases[i].latency;

        t_fleet_run(&c, &sim, 7 + i, &res);

        /* the brief's bound: rate + burst + 1 + capacity slack + credits */
        rate = cases[i].n * sim.ms / cases[i].period;
        bound = rate + cases[i].burst + 1
                + t_ceil(c.gain[0], c.cost) + sim.nodes;

        /* exact: what the script could give out, plus the credits */
        max = (c.capacity[0] + (res.redis_ms - 1000000) * c.gain[0])
              / c.cost + sim.nodes;

        ck_assert_msg(res.total <= max && res.total <= bound
                      && res.total * 10 >= rate * 9,
                      "%llu r/%llu ms burst %llu: %llu admitted, rate %llu, "
                      "at most %llu",
                      (unsigned long long) cases[i].n,
                      (unsigned long long) cases[i].period,
                      (unsigned long long) cases[i].burst,
                      (unsigned long long) res.total,
                      (unsigned long long) rate,
                      (unsigned long long) max);

        /* every node got some */
        for (k = 0; k < sim.nodes; k++) {
            ck_assert_uint_gt(res.admitted[k][0], 0);
        }
    }
}
END_TEST


/*
 * (a) with reserves: normal requests of the 3 nodes never take more than
 * their 80% tier; critical ones get at least what they ask for up to the
 * 20% reserved for them, whatever normal ones do
 */

START_TEST(test_fleet_reserve)
{
    uint32_t          r[] = { 20, 0 };
    uint32_t          k;
    uint64_t          crit, norm, rate, elapsed, want;
    t_sim_t           sim;
    t_result_t        res;
    dsg_limit_conf_t  c;

    /* 100r/s burst 10, critical reserves 20 */
    conf_ok(&c, 100, 1000, 10, 0, r, 2);
    rate = 100 * 60;

    /* normal alone: 80% */
    t_sim_default(&sim);
    sim.classes[0] = NORM;
    t_fleet_run(&c, &sim, 3, &res);

    norm = 0;
    for (k = 0; k < sim.nodes; k++) {
        norm += res.admitted[k][NORM];
    }

    elapsed = res.redis_ms - 1000000;
    ck_assert_uint_le(norm * c.cost, c.capacity[1] + elapsed * c.gain[1]
                                     + sim.nodes * c.cost);
    ck_assert_uint_ge(norm * 100, rate * 80 * 9 / 10);

    /* 1 request in 16 critical (62.5r/s), in 4 critical (250r/s) */
    for (want = 16; want >= 4; want /= 4) {
        t_sim_default(&sim);
        sim.classes[0] = CRIT;
        for (k = 1; k < want; k++) {
            sim.classes[k] = NORM;
        }
        sim.nmix = want;
        t_fleet_run(&c, &sim, 5, &res);

        crit = 0;
        norm = 0;
        for (k = 0; k < sim.nodes; k++) {
            crit += res.admitted[k][CRIT];
            norm += res.admitted[k][NORM];
        }

        elapsed = res.redis_ms - 1000000;
        ck_assert_uint_le(norm * c.cost, c.capacity[1] + elapsed * c.gain[1]
                                         + sim.nodes * c.cost);
        ck_assert_uint_le((crit + norm) * c.cost,
                          c.capacity[0] + elapsed * c.gain[0]
                          + 2 * sim.nodes * c.cost);
        ck_assert_uint_ge((crit + norm) * 10, rate * 9);

        /* the reserve: min(asked, 20%), 90% of it at least */
        ck_assert_uint_ge(crit * 10, (res.offered[CRIT] < rate / 5
                                      ? res.offered[CRIT] : rate / 5) * 9);
    }
}
END_TEST


/*
 * (b) in-flight: requests lasting 1..300 ms on 3 nodes, 1 new one per ms
 * (far more than the cap): the fleet's in flight never exceeds the cap of
 * any tier, the slots are used
 */

START_TEST(test_fleet_inflight)
{
    static const struct {
        uint64_t  n, burst;
        uint32_t  inflight, reserve, nodes;
        uint64_t  latency, dur_max;
    } cases[] = {
        { 0, 0, 10, 0, 3, 0, 300 },
        { 0, 0, 10, 0, 3, 5, 300 },
        { 0, 0, 3, 0, 3, 0, 50 },
        { 0, 0, 2, 0, 3, 2, 30 },
        { 0, 0, 12, 20, 3, 3, 300 },
        { 200, 20, 12, 20, 3, 3, 300 },
        { 0, 0, 40, 25, 4, 9, 200 }
    };

    uint32_t          i, r[2];
    t_sim_t           sim;
    t_result_t        res;
    dsg_limit_conf_t  c;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        r[0] = cases[i].reserve;
        r[1] = 0;
        conf_ok(&c, cases[i].n, 1000, cases[i].burst, cases[i].inflight,
                r, 2);

        t_sim_default(&sim);
        sim.nodes = cases[i].nodes;
        sim.latency = cases[i].latency;
        sim.dur_min = 1;
        sim.dur_max = cases[i].dur_max;
        sim.classes[0] = CRIT;
        sim.classes[1] = NORM;
        sim.classes[2] = NORM;
        sim.nmix = 3;

        t_fleet_run(&c, &sim, 11 + i, &res);

        ck_assert_uint_le(res.peak[0], c.cap[0]);
        ck_assert_uint_le(res.peak[1], c.cap[1]);

        /* the slots are used: 80% of the cap in flight on average */
        ck_assert_msg(res.busy * 5 >= (uint64_t) c.cap[0] * sim.ms * 4,
                      "case %u: cap %u, %llu in flight on average, "
                      "peak %u, %llu admitted",
                      i, c.cap[0],
                      (unsigned long long) (res.busy / sim.ms),
                      res.peak[0], (unsigned long long) res.total);
    }
}
END_TEST


START_TEST(test_fallback)
{
    uint32_t           r80[] = { 80, 0 };
    uint32_t           r20[] = { 20, 0, 0 };
    uint64_t           t, n;
    dsg_limit_conf_t   c, fb, c1;
    dsg_limit_state_t  s;

    /* 10r/s burst 9 inflight 10 on 3 nodes */
    conf_ok(&c, 10, 1000, 9, 10, r20, 3);
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, r20, 3), DSG_OK);
    ck_assert_uint_eq(fb.n, 10);
    ck_assert_uint_eq(fb.period_ms, 3000);
    ck_assert_uint_eq(fb.burst, 3);
    ck_assert_uint_eq(fb.inflight, 3);
    ck_assert_uint_eq(fb.nclasses, 3);
    ck_assert_uint_eq(fb.ntiers, c.ntiers);
    ck_assert_mem_eq(fb.class_tier, c.class_tier, sizeof(c.class_tier));
    ck_assert_mem_eq(fb.share, c.share, sizeof(c.share));

    /* the rate exactly divided: gain / cost is a third of the zone's */
    for (t = 0; t < c.ntiers; t++) {
        ck_assert_uint_eq(fb.gain[t] * c.cost * 3, c.gain[t] * fb.cost);
    }

    /* a local bucket of it: 10r/3s, 200 in a minute, plus the burst */
    dsg_limit_state_init(&fb, &s, 0);
    n = 0;
    for (t = 0; t <= 60000; t++) {
        if (dsg_limit_check(&fb, &s, 0, t, NULL) == DSG_OK) {
            dsg_limit_charge(&fb, &s, 0);
            dsg_limit_release(&s, dsg_limit_record(&fb, 0));
            n++;
        }
    }

    ck_assert_uint_eq(n, 200 + 3 + 1);

    /* a burst below nodes: 0; in flight below nodes: 1 */
    conf_ok(&c, 10, 1000, 2, 2, NULL, 1);
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, NULL, 5), DSG_OK);
    ck_assert_uint_eq(fb.burst, 0);
    ck_assert_uint_eq(fb.inflight, 1);
    ck_assert_uint_eq(fb.period_ms, 5000);

    /*
     * every tier must keep a slot: 10 with a 20% tier on 4 nodes is 2,
     * whose tier gets 0 (DSG_ECAP) up to 4; 5 is the least that works
     */
    conf_ok(&c, 0, 0, 0, 10, r80, 2);
    ck_assert_uint_eq(c.cap[1], 2);
    ck_assert_int_eq(dsg_limit_conf_init(&c1, 0, 0, 0, 4, r80, 2), DSG_ECAP);
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, r80, 4), DSG_OK);
    ck_assert_uint_eq(fb.inflight, 5);
    ck_assert_uint_eq(fb.cap[0], 5);
    ck_assert_uint_eq(fb.cap[1], 1);
    ck_assert_uint_eq(fb.n, 0);
    ck_assert_uint_eq(fb.period_ms, 0);

    /* ... but never above the zone's own cap */
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, r80, 100), DSG_OK);
    ck_assert_uint_eq(fb.inflight, 5);
    conf_ok(&c, 0, 0, 0, 5, r80, 2);
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, r80, 1000), DSG_OK);
    ck_assert_uint_eq(fb.inflight, 5);
    ck_assert_uint_eq(fb.cap[1], 1);

    /* no in-flight cap stays none */
    conf_ok(&c, 10, 1000, 0, 0, NULL, 1);
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, NULL, 7), DSG_OK);
    ck_assert_uint_eq(fb.inflight, 0);
    ck_assert_uint_eq(fb.cap[0], 0);
    ck_assert_uint_eq(fb.period_ms, 7000);

    /* one node: the zone itself */
    conf_ok(&c, 10, 1000, 9, 10, r20, 3);
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, r20, 1), DSG_OK);
    ck_assert_mem_eq(&fb, &c, sizeof(c));

    /* no node */
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, r20, 0), DSG_EINVAL);

    /* 60r/m on 1440 nodes: one request per day per node, the limit */
    conf_ok(&c, 60, 60000, 0, 0, NULL, 1);
    ck_assert_int_eq(dsg_fleet_fallback_conf(&fb, &c, NULL, 1440), DSG_OK);
    ck_assert_uint_eq(fb.period_ms, DSG_MAX_PERIOD_MS);
}
END_TEST


/*
 * Regressions: each of these failed against the first dsg_fleet.c (found
 * by this suite's fleet simulation and edge cases), and passes since the
 * fix named in its comment.
 */


/*
 * A node that took the slots first keeps them for as long as it keeps
 * them busy: dsg_fleet_check() admits up to held, not up to the fair
 * share, so the in-flight count is back at held at every plan and the
 * claim max(inflight, min(held, fair)) never shrinks.  Cap 12, node 0
 * alone for 10 s, then nodes 1 and 2: each should get about 4 slots.
 */

START_TEST(test_bug_fair_share)
{
    uint32_t          k;
    t_sim_t           sim;
    t_result_t        res;
    dsg_limit_conf_t  c;

    conf_ok(&c, 0, 0, 0, 12, NULL, 1);

    t_sim_default(&sim);
    sim.per_ms = 3;
    sim.active[1] = 10000;
    sim.active[2] = 10000;
    sim.dur_min = 100;
    sim.dur_max = 100;
    t_fleet_run(&c, &sim, 99, &res);

    /* 4 slots of 100 ms requests for 50 s: 2000; half of it at least */
    for (k = 1; k < 3; k++) {
        ck_assert_uint_ge(res.admitted[k][0], 1000);
    }
}
END_TEST


/*
 * wslots[0] counts the lower tiers' expected requests with est[u] of the
 * previous sync (est[u] for u > t is updated later in the same loop): 10
 * new normal requests ask 4 slots of tier 1 but 1 of tier 0, which every
 * normal request also needs
 */

START_TEST(test_bug_nested_wslots)
{
    int                i;
    uint32_t           r[] = { 20, 0 };
    dsg_fleet_key_t    f;
    dsg_fleet_ask_t    a;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    conf_ok(&c, 0, 0, 0, 10, r, 2);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);

    for (i = 0; i < 10; i++) {
        dsg_fleet_check(&c, &f, &s, NORM, 1, 1000, 0, NULL);
    }

    ck_assert_int_eq(dsg_fleet_plan(&c, &f, &s, 1100, 100, &a), 1);
    ck_assert_uint_eq(a.wslots[1], 4);
    ck_assert_uint_ge(a.wslots[0], a.wslots[1]);
}
END_TEST


/*
 * An idle key is never quiet: est never decays below 3 (3 - 3 / 4 == 3),
 * so ahead = ceil(3 / 16) = 1 slot forever; and the claim only shrinks to
 * the fair share, which is the whole cap when nobody starves: the key is
 * synced every interval and keeps its slots forever
 */

START_TEST(test_bug_idle_quiet)
{
    int                say;
    uint64_t           now;
    t_redis_t          r;
    dsg_fleet_key_t    f;
    dsg_fleet_ask_t    a;
    dsg_fleet_grant_t  g;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    conf_ok(&c, 0, 0, 0, 4, NULL, 1);
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);
    t_redis_init(&c, &r, 1000);

    /* one request, long ago, never admitted */
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 0, 1, 1000, 0, NULL),
                     DSG_UNSPOKEN);

    say = 0;

    for (now = 1100; now <= 601000; now += 100) {
        say = dsg_fleet_plan(&c, &f, &s, now, 100, &a);

        if (say) {
            t_redis_sync(&c, &r, 0, 1, now, &a, &g);
            dsg_fleet_apply(&c, &f, &a, &g);
        }
    }

    ck_assert_uint_eq(f.held[0], 0);
    ck_assert_int_eq(say, 0);
}
END_TEST


/*
 * A request seen by a worker whose clock is 1 ms ahead of the agent's:
 * now_ms - seen_ms wraps, the busy key is taken for idle, its whole
 * wallet goes back and nothing is asked for
 */

START_TEST(test_bug_clock_skew)
{
    int64_t            k;
    dsg_fleet_key_t    f;
    dsg_fleet_ask_t    a;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    conf_ok(&c, 10, 1000, 0, 0, NULL, 1);
    k = (int64_t) c.cost;
    dsg_fleet_key_init(&f);
    dsg_limit_state_init(&c, &s, 1000);

    f.est[0] = 16;
    f.wallet[0] = 3 * k;
    ck_assert_int_eq(dsg_fleet_check(&c, &f, &s, 0, 1, 5001, 0, NULL), DSG_OK);

    /* est 16: target (2 + 1) requests, what is on hand */
    dsg_fleet_plan(&c, &f, &s, 5000, 100, &a);
    ck_assert_uint_eq(a.back[0], 0);
    ck_assert_int_eq(f.wallet[0], 3 * k);
}
END_TEST


/*
 * The demand clamp compares with UINT32_MAX / 4 but adds 4 * demand: for
 * demand in (2^28, 2^30] est wraps; and (est + 15) / 16 wraps for est
 * above UINT32_MAX - 15
 */

START_TEST(test_bug_est_wrap)
{
    uint64_t           now;
    dsg_fleet_key_t    f;
    dsg_fleet_ask_t    a;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s;

    conf_ok(&c, 0, 0, 0, 10, NULL, 1);
    dsg_limit_state_init(&c, &s, 1000);
    now = 100000;

    /* a demand beyond DSG_FLEET_MAX_DEMAND counts as that: no wrap */
    dsg_fleet_key_init(&f);
    f.est[0] = 3221225472u;
    f.demand[0] = 1u << 29;
    dsg_fleet_plan(&c, &f, &s, now, 100, &a);
    ck_assert_uint_eq(f.est[0], 3221225472u - 805306368u
                                + 4 * (uint32_t) DSG_FLEET_MAX_DEMAND);

    /* 2^30 - 1 new requests: at least the cap is wanted */
    dsg_fleet_key_init(&f);
    f.demand[0] = UINT32_MAX / 4;
    f.seen_ms = now;
    dsg_fleet_plan(&c, &f, &s, now, 100, &a);
    ck_assert_uint_eq(a.wslots[0], 10);
}
END_TEST



Suite *
dsg_fleet_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_fleet");

    tc = tcase_create("node");
    tcase_add_test(tc, test_key_init);
    tcase_add_test(tc, test_credit);
    tcase_add_test(tc, test_source);
    tcase_add_test(tc, test_fresh);
    tcase_add_test(tc, test_seen);
    tcase_add_test(tc, test_inflight);
    suite_add_tcase(s, tc);

    tc = tcase_create("sync");
    tcase_add_test(tc, test_plan_idle);
    tcase_add_test(tc, test_plan_rate);
    tcase_add_test(tc, test_plan_formula);
    tcase_add_test(tc, test_plan_slots);
    tcase_add_test(tc, test_apply);
    tcase_add_test(tc, test_fallback);
    suite_add_tcase(s, tc);

    tc = tcase_create("fleet");
    tcase_add_test(tc, test_fleet_rate);
    tcase_add_test(tc, test_fleet_reserve);
    tcase_add_test(tc, test_fleet_inflight);
    suite_add_tcase(s, tc);

    tc = tcase_create("regressions");
    tcase_add_test(tc, test_bug_fair_share);
    tcase_add_test(tc, test_bug_nested_wslots);
    tcase_add_test(tc, test_bug_idle_quiet);
    tcase_add_test(tc, test_bug_clock_skew);
    tcase_add_test(tc, test_bug_est_wrap);
    suite_add_tcase(s, tc);

    return s;
}
