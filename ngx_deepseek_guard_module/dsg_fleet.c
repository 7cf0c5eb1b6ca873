/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include <stddef.h>
#include <string.h>

#include "dsg_fleet.h"


typedef char  dsg_fleet_key_size_check_t
    [sizeof(dsg_fleet_key_t) <= 104 ? 1 : -1];


static int dsg_fleet_source(const dsg_limit_conf_t *c,
    const dsg_fleet_key_t *f, uint32_t tier, uint64_t credit_ms);


void
dsg_fleet_key_init(dsg_fleet_key_t *f)
{
    memset(f, 0, sizeof(dsg_fleet_key_t));
}


/*
 * The wallet a tier request spends: its own tier's, else the nearest lower
 * one's with a whole request in it, else its own on credit, as long as its
 * debt stays within credit_ms of the tier's fleet rate (one request at
 * least).  -1: none.
 */

static int
dsg_fleet_source(const dsg_limit_conf_t *c, const dsg_fleet_key_t *f,
    uint32_t tier, uint64_t credit_ms)
{
    uint32_t  t;
    uint64_t  credit;

    for (t = tier; t < c->ntiers; t++) {
        if (f->wallet[t] >= (int64_t) c->cost) {
            return (int) t;
        }
    }

    credit = c->gain[tier] * credit_ms;
    if (credit < c->cost) {
        credit = c->cost;
    }

    return (f->wallet[tier] - (int64_t) c->cost >= -(int64_t) credit)
           ? (int) tier : -1;
}


int
dsg_fleet_check(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    const dsg_limit_state_t *s, uint32_t cls, int fresh, uint64_t now_ms,
    uint64_t credit_ms, uint64_t *wait_ms)
{
    uint32_t  t, tier, use;
    uint64_t  w;

    if (wait_ms) {
        *wait_ms = 0;
    }

    if (cls >= c->nclasses) {
        return DSG_EINVAL;
    }

    tier = c->class_tier[cls];

    if (fresh) {
        if (f->demand[tier] < UINT32_MAX) {
            f->demand[tier]++;
        }

        f->seen_ms = now_ms;
    }

    if (c->n > 0 && dsg_fleet_source(c, f, tier, credit_ms) < 0) {
        if (wait_ms) {
            /* the fleet earns one request in cost / gain ms */
            w = (c->cost + c->gain[tier] - 1) / c->gain[tier];
            *wait_ms = w ? w : 1;
        }

        return DSG_RATE;
    }

    if (c->inflight > 0) {
        for (t = 0; t <= tier; t++) {

            /*
             * within what the fleet holds for us and, when other nodes
             * want more than they hold, within our fair share: a slot
             * above it is given back as soon as it is free
             */

            use = f->held[t];
            if (f->fair[t] && f->fair[t] < use) {
                use = f->fair[t];
            }

            if (s->inflight[t] >= use) {
                return (f->held[t] == 0 && f->fair[t] == 0) ? DSG_UNSPOKEN
                                                            : DSG_INFLIGHT;
            }
        }
    }

    return DSG_OK;
}


void
dsg_fleet_seen(const dsg_limit_conf_t *c, dsg_fleet_key_t *f, uint32_t cls,
    uint64_t now_ms)
{
    uint32_t  tier;

    if (cls >= c->nclasses) {
        return;
    }

    tier = c->class_tier[cls];

    if (f->demand[tier] < UINT32_MAX) {
        f->demand[tier]++;
    }

    f->seen_ms = now_ms;
}


void
dsg_fleet_charge(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    dsg_limit_state_t *s, uint32_t cls, uint64_t credit_ms)
{
    int       src;
    uint32_t  t, tier;

    if (cls >= c->nclasses) {
        return;
    }

    tier = c->class_tier[cls];

    if (c->n > 0) {
        src = dsg_fleet_source(c, f, tier, credit_ms);
        f->wallet[src < 0 ? tier : (uint32_t) src] -= (int64_t) c->cost;
    }

    if (c->inflight > 0) {
        for (t = 0; t <= tier; t++) {
            if (s->inflight[t] < UINT16_MAX) {
                s->inflight[t]++;
            }
        }
    }
}


void
dsg_fleet_refund(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    dsg_limit_state_t *s, uint32_t cls)
{
    uint32_t  t, tier;

    if (cls >= c->nclasses) {
        return;
    }

    tier = c->class_tier[cls];

    if (c->n > 0) {
        f->wallet[tier] += (int64_t) c->cost;
    }

    if (c->inflight > 0) {
        for (t = 0; t <= tier; t++) {
            if (s->inflight[t]) {
                s->inflight[t]--;
            }
        }
    }
}


int
dsg_fleet_plan(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    const dsg_limit_state_t *s, uint64_t now_ms, uint64_t interval_ms,
    dsg_fleet_ask_t *a)
{
    int       say;
    uint32_t  t, u, recent, claim, want, d;
    uint64_t  target, ahead;

    memset(a, 0, sizeof(dsg_fleet_ask_t));

    /* seen_ms may be a worker's clock a ms ahead of ours: recent too */
    recent = (f->seen_ms != 0
              && (now_ms <= f->seen_ms
                  || now_ms - f->seen_ms
                     <= (uint64_t) DSG_FLEET_LINGER * interval_ms));
    say = 0;

    /*
     * demand per sync, every tier first (a tier's slots count the lower
     * tiers' requests): est += (demand - est) / 4 in 1/16 requests,
     * rounded so that it decays to 0
     */

    for (t = 0; t < c->ntiers; t++) {
        d = (f->demand[t] > DSG_FLEET_MAX_DEMAND) ? DSG_FLEET_MAX_DEMAND
                                                  : f->demand[t];
        f->est[t] = f->est[t] - (f->est[t] + 3) / 4 + d * 4;
        f->demand[t] = 0;
    }

    for (t = 0; t < c->ntiers; t++) {

        if (c->n > 0) {
            /* on hand: twice the demand per sync, one request at least */
            target = recent ? ((uint64_t) f->est[t] + 7) / 8 + 1 : 0;
            target *= c->cost;

            if (f->wallet[t] < (int64_t) target) {
                a->want[t] = target - (uint64_t) f->wallet[t];

            } else if (f->wallet[t] > (int64_t) target) {
                a->back[t] = (uint64_t) f->wallet[t] - target;
                f->wallet[t] = (int64_t) target;
            }

            if (a->want[t] || a->back[t]) {
                say = 1;
            }
        }

        if (c->inflight > 0) {
            /* requests of tier t and of every lower tier are counted in t */
            ahead = 0;
            for (u = t; u < c->ntiers; u++) {
                ahead += ((uint64_t) f->est[u] + 15) / 16;
            }

            if (recent) {
                claim = f->held[t] < f->fair[t] ? f->held[t] : f->fair[t];
                ahead += (uint64_t) s->inflight[t] + s->queued + 1;

            } else {
                /* quiet: keep only what is in use */
                claim = 0;
                ahead = (uint64_t) s->inflight[t] + s->queued;
            }

            if (claim < s->inflight[t]) {
                claim = s->inflight[t];
            }

            want = (ahead > c->cap[t]) ? c->cap[t] : (uint32_t) ahead;

            if (want < claim) {
                want = claim;
            }

            /* a shrink is said once, then an idle key is quiet */
            if (claim || want || f->held[t] > claim) {
                say = 1;
            }

            f->held[t] = claim;
            a->claim[t] = claim;
            a->wslots[t] = want;
        }
    }

    return say;
}


void
dsg_fleet_apply(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    const dsg_fleet_ask_t *a, const dsg_fleet_grant_t *g)
{
    uint32_t  t;

    for (t = 0; t < c->ntiers; t++) {

        if (c->n > 0) {
            f->wallet[t] += (int64_t) g->granted[t];
        }

        if (c->inflight > 0) {
            /* the fleet never holds less than the claim for us */
            f->held[t] = g->held[t] > a->claim[t] ? g->held[t] : a->claim[t];
            f->fair[t] = g->fair[t];
        }
    }
}


int
dsg_fleet_fallback_conf(dsg_limit_conf_t *fb, const dsg_limit_conf_t *c,
    const uint32_t *reserve_pct, uint32_t nodes)
{
    int       rc;
    uint32_t  inflight;
    uint64_t  period;

    if (nodes == 0) {
        return DSG_EINVAL;
    }

    period = c->period_ms * nodes;
    inflight = c->inflight / nodes;

    if (c->inflight > 0 && inflight == 0) {
        inflight = 1;
    }

    for ( ;; ) {
        rc = dsg_limit_conf_init(fb, c->n, period, c->burst / nodes,
                                 inflight, reserve_pct, c->nclasses);

        /* a share too small for a reserved tier: one slot more */
        if (rc != DSG_ECAP || inflight >= c->inflight) {
            return rc;
        }

        inflight++;
    }
}
