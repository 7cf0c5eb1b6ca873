/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_fleet, a node's share of a fleet-wide key.
 *
 * The input is a zone configuration (any that dsg_limit_conf_init()
 * accepts: the others are fuzz_bucket's), 1..4 nodes, a sync interval,
 * then a program over one key: time passes, a request comes to a node
 * (fresh or a waiter trying again, an invalid class, a refund right after
 * the charge), a request ends, a node syncs (dsg_fleet_plan(), a model of
 * the Redis script, dsg_fleet_apply() at once or later), waiters come and
 * go, the fallback configuration for some number of nodes.  Checked:
 *
 *  - dsg_fleet_check() returns exactly the documented code: the wallet
 *    rule (own tier with a whole request, else the nearest lower tier
 *    with one, else the own tier on credit unless in debt), then the slot
 *    rule (in flight < held in every tier t <= tier, DSG_UNSPOKEN when
 *    the fleet never answered; within the fair share when one is
 *    known), the exact wait_ms; a fresh request counts
 *    in demand and seen_ms, nothing else changes;
 *  - a charge takes cost from exactly that wallet and one slot in every
 *    tier t <= tier; a refund right after it is the identity when the
 *    own tier paid;
 *  - the ledger of each node: the sum of its wallets is what was granted,
 *    less what was given back and what was spent, to the unit; no wallet
 *    below -cost (one credit);
 *  - the fleet never admits more requests of the tiers >= i than the
 *    script's bucket i gave out (capacity + refill) plus one credit per
 *    node and tier;
 *  - in flight <= held on every node; the sum over the nodes never above
 *    the cap of any tier, nor the script's records;
 *  - dsg_fleet_plan(): the EWMA (decaying to 0), the target, want and
 *    back, the claim (recent: max(in flight, min(held, fair)); quiet: in
 *    flight) and held lowered to it, wslots by the documented formula,
 *    the return value;
 *  - dsg_fleet_apply(): wallet += granted, held = max(held, claim), fair
 *    (also for an answer below the claim);
 *  - dsg_fleet_fallback_conf(): the rate divided exactly, the burst, the
 *    least in-flight cap >= max(1, inflight / nodes) that every tier
 *    keeps a slot of, the same classes.
 *
 * build.sh links each target with its own core file only: dsg_fleet.c
 * builds on dsg_bucket.c, compiled here with this file.
 */


#include <string.h>

#include "dsg_fleet.h"
#include "fuzz.h"
#include "fleet_model.h"

#include "dsg_bucket.c"


typedef unsigned __int128  u128;
typedef __int128           i128;


#define NODES      4
#define REQS       512                  /* the most steps of a program */


/* the Redis script's state for the key (see t/unit/check_fleet.c) */
typedef dsg_model_redis_t  redis_t;


typedef struct {
    dsg_fleet_key_t    f;
    dsg_limit_state_t  s;
    dsg_fleet_ask_t    a;
    dsg_fleet_grant_t  g;
    int                pending;              /* a planned sync to apply */
    uint32_t           record[REQS];         /* requests in flight */
    uint32_t           nreq;
    u128               granted, back;        /* units, over all tiers */
    i128               spent;                /* units charged - refunded */
} node_t;


typedef struct {
    dsg_limit_conf_t   c;
    uint32_t           reserve[DSG_MAX_CLASSES];
    uint32_t           nodes;
    uint64_t           interval;
    uint64_t           start;
    uint64_t           now;
    redis_t            r;
    node_t             nd[NODES];
    uint64_t           admitted[DSG_MAX_TIERS];  /* net, by tier of class */
} fleet_t;


static void
redis_sync(fleet_t *fl, uint32_t node, const dsg_fleet_ask_t *a,
    dsg_fleet_grant_t *g)
{
    dsg_model_sync(&fl->c, &fl->r, fl->nodes, node, fl->now, a, g);
}


static void
check_fleet(const fleet_t *fl)
{
    u128                     budget;
    i128                     wallets;
    uint32_t                 t, k, sum, rsum;
    uint64_t                 adm;
    const node_t            *n;
    const dsg_limit_conf_t  *c;

    c = &fl->c;

    for (k = 0; k < fl->nodes; k++) {
        n = &fl->nd[k];
        wallets = 0;

        for (t = 0; t < DSG_MAX_TIERS; t++) {
            if (t >= c->ntiers || c->n == 0) {
                FUZZ_ASSERT(n->f.wallet[t] == 0);
            }

            if (t >= c->ntiers || c->inflight == 0) {
                FUZZ_ASSERT(n->f.held[t] == 0 && n->f.fair[t] == 0);
                FUZZ_ASSERT(n->s.inflight[t] == 0);
            }

            FUZZ_ASSERT(n->f.wallet[t] >= -(int64_t) c->cost);
            wallets += n->f.wallet[t];
        }

        /* the ledger, to the unit */
        FUZZ_ASSERT(wallets == (i128) n->granted - (i128) n->back
                               - n->spent);
    }

    for (t = 0; t < c->ntiers; t++) {
        sum = 0;
        rsum = 0;

        for (k = 0; k < fl->nodes; k++) {
            n = &fl->nd[k];

            if (c->inflight > 0) {
                FUZZ_ASSERT(n->s.inflight[t] <= n->f.held[t]);
                FUZZ_ASSERT(n->f.held[t] <= fl->r.h[k][t]);
            }

            sum += n->s.inflight[t];
            rsum += fl->r.h[k][t];
        }

        if (c->inflight > 0) {
            FUZZ_ASSERT(sum <= c->cap[t]);
            FUZZ_ASSERT(rsum <= c->cap[t]);
        }

        if (c->n == 0) {
            continue;
        }

        FUZZ_ASSERT(fl->r.level[t] <= c->capacity[t]);

        /* requests of tiers >= t only spend grants of tiers >= t */
        adm = 0;
        for (k = t; k < c->ntiers; k++) {
            adm += fl->admitted[k];
        }

        budget = (u128) c->capacity[t]
                 + (u128) (fl->r.last_ms - fl->start) * c->gain[t]
                 + (u128) fl->nodes * (c->ntiers - t) * c->cost;
        FUZZ_ASSERT((u128) adm * c->cost <= budget);
    }
}


/* the documented answer of dsg_fleet_check(), credit 0, before it runs */

static int
model_check(const dsg_limit_conf_t *c, const dsg_fleet_key_t *f,
    const dsg_limit_state_t *s, uint32_t cls, uint64_t *wait, int *src)
{
    uint32_t  t, tier, use;
    uint64_t  w;

    *wait = 0;
    *src = -1;

    if (cls >= c->nclasses) {
        return DSG_EINVAL;
    }

    tier = c->class_tier[cls];

    if (c->n > 0) {
        for (t = tier; t < c->ntiers; t++) {
            if (f->wallet[t] >= (int64_t) c->cost) {
                *src = (int) t;
                break;
            }
        }

        if (*src < 0 && f->wallet[tier] >= 0) {
            *src = (int) tier;
        }

        if (*src < 0) {
            w = c->cost / c->gain[tier] + (c->cost % c->gain[tier] != 0);
            *wait = w ? w : 1;
            return DSG_RATE;
        }
    }

    if (c->inflight > 0) {
        for (t = 0; t <= tier; t++) {
            /* within held, and within the fair share when there is one */
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


static void
op_request(fleet_t *fl, uint32_t k, uint8_t b)
{
    int                      rc, mrc, src, fresh;
    uint32_t                 t, cls, tier;
    uint64_t                 w, mw;
    node_t                  *n;
    dsg_fleet_key_t          f0, f1;
    dsg_limit_state_t        s0;
    const dsg_limit_conf_t  *c;

    c = &fl->c;
    n = &fl->nd[k];
    cls = b % (c->nclasses + 1);                 /* nclasses: invalid */
    fresh = (b & 0x80) != 0;

    f0 = n->f;
    s0 = n->s;
    mrc = model_check(c, &n->f, &n->s, cls, &mw, &src);

    w = 12345;
    rc = dsg_fleet_check(c, &n->f, &n->s, cls, fresh, fl->now, 0, &w);
    FUZZ_ASSERT(rc == mrc);
    FUZZ_ASSERT(w == mw);
    FUZZ_ASSERT(rc != DSG_RATE || w >= 1);
    FUZZ_ASSERT(memcmp(&n->s, &s0, sizeof(s0)) == 0);

    /* only demand and seen_ms change, for a fresh valid request */
    f1 = f0;
    if (fresh && cls < c->nclasses) {
        tier = c->class_tier[cls];
        if (f1.demand[tier] < UINT32_MAX) {
            f1.demand[tier]++;
        }
        f1.seen_ms = fl->now;
    }

    FUZZ_ASSERT(memcmp(&n->f, &f1, sizeof(f1)) == 0);

    if (rc != DSG_OK) {
        /* a charge of an invalid class does nothing */
        if (rc == DSG_EINVAL) {
            dsg_fleet_charge(c, &n->f, &n->s, cls, 0);
            dsg_fleet_refund(c, &n->f, &n->s, cls);
            FUZZ_ASSERT(memcmp(&n->f, &f1, sizeof(f1)) == 0);
            FUZZ_ASSERT(memcmp(&n->s, &s0, sizeof(s0)) == 0);
        }

        return;
    }

    tier = c->class_tier[cls];
    f0 = n->f;

    dsg_fleet_charge(c, &n->f, &n->s, cls, 0);

    f1 = f0;
    if (c->n > 0) {
        FUZZ_ASSERT(src >= (int) tier);
        f1.wallet[src] -= (int64_t) c->cost;
    }

    FUZZ_ASSERT(memcmp(&n->f, &f1, sizeof(f1)) == 0);

    for (t = 0; t < DSG_MAX_TIERS; t++) {
        FUZZ_ASSERT(n->s.inflight[t]
                    == s0.inflight[t] + (c->inflight > 0 && t <= tier));
    }

    if (b & 0x40) {
        /* admitted here, refused by another zone */
        dsg_fleet_refund(c, &n->f, &n->s, cls);
        FUZZ_ASSERT(memcmp(&n->s, &s0, sizeof(s0)) == 0);

        f1 = f0;
        if (c->n > 0) {
            f1.wallet[src] -= (int64_t) c->cost;
            f1.wallet[tier] += (int64_t) c->cost;
        }

        FUZZ_ASSERT(memcmp(&n->f, &f1, sizeof(f1)) == 0);

        if (src == (int) tier || c->n == 0) {
            FUZZ_ASSERT(memcmp(&n->f, &f0, sizeof(f0)) == 0);
        }

        return;
    }

    if (c->n > 0) {
        n->spent += c->cost;
    }

    fl->admitted[tier]++;

    if (c->inflight > 0) {
        FUZZ_ASSERT(n->nreq < REQS);
        n->record[n->nreq++] = dsg_limit_record(c, cls);
    }
}


static void
op_release(fleet_t *fl, uint32_t k, uint8_t b)
{
    uint32_t  i;
    node_t   *n;

    n = &fl->nd[k];

    if (n->nreq == 0) {
        return;
    }

    i = b % n->nreq;
    dsg_limit_release(&n->s, n->record[i]);
    n->record[i] = n->record[--n->nreq];
}


static void
apply(fleet_t *fl, uint32_t k)
{
    uint32_t                 t;
    node_t                  *n;
    dsg_fleet_key_t          f0, f1;
    const dsg_limit_conf_t  *c;

    c = &fl->c;
    n = &fl->nd[k];

    if (!n->pending) {
        return;
    }

    f0 = n->f;
    dsg_fleet_apply(c, &n->f, &n->a, &n->g);
    n->pending = 0;

    f1 = f0;

    for (t = 0; t < c->ntiers; t++) {
        if (c->n > 0) {
            f1.wallet[t] += (int64_t) n->g.granted[t];
            n->granted += n->g.granted[t];
        }

        if (c->inflight > 0) {
            f1.held[t] = n->g.held[t] > n->a.claim[t] ? n->g.held[t]
                                                      : n->a.claim[t];
            f1.fair[t] = n->g.fair[t];
        }
    }

    FUZZ_ASSERT(memcmp(&n->f, &f1, sizeof(f1)) == 0);
}


static void
op_sync(fleet_t *fl, uint32_t k, uint8_t b)
{
    int                      say, want_say, recent;
    uint32_t                 t, u, claim, lo, hi, est;
    uint64_t                 target;
    int64_t                  w;
    node_t                  *n;
    dsg_fleet_key_t          f0;
    dsg_fleet_ask_t         *a;
    const dsg_limit_conf_t  *c;

    c = &fl->c;
    n = &fl->nd[k];
    a = &n->a;

    apply(fl, k);

    f0 = n->f;
    memset(a, 0x5a, sizeof(dsg_fleet_ask_t));

    say = dsg_fleet_plan(c, &n->f, &n->s, fl->now, fl->interval, a);

    recent = f0.seen_ms != 0
             && (fl->now <= f0.seen_ms
                 || fl->now - f0.seen_ms
                    <= (uint64_t) DSG_FLEET_LINGER * fl->interval);
    want_say = 0;

    for (t = 0; t < DSG_MAX_TIERS; t++) {

        if (t >= c->ntiers) {
            FUZZ_ASSERT(a->want[t] == 0 && a->back[t] == 0);
            FUZZ_ASSERT(a->claim[t] == 0 && a->wslots[t] == 0);
            FUZZ_ASSERT(n->f.est[t] == f0.est[t]);
            continue;
        }

        /* demands in a fuzz run are far below the clamp */
        est = f0.est[t] - (f0.est[t] + 3) / 4 + 4 * f0.demand[t];
        FUZZ_ASSERT(n->f.est[t] == est);
        FUZZ_ASSERT(n->f.demand[t] == 0);

        if (c->n > 0) {
            target = recent ? ((uint64_t) est + 7) / 8 + 1 : 0;
            target *= c->cost;
            w = f0.wallet[t];

            if (w < (int64_t) target) {
                FUZZ_ASSERT(a->want[t] == (uint64_t) ((int64_t) target - w));
                FUZZ_ASSERT(a->back[t] == 0);
                FUZZ_ASSERT(n->f.wallet[t] == w);
                want_say = 1;

            } else if (w > (int64_t) target) {
                FUZZ_ASSERT(a->want[t] == 0);
                FUZZ_ASSERT(a->back[t] == (uint64_t) (w - (int64_t) target));
                FUZZ_ASSERT(n->f.wallet[t] == (int64_t) target);
                n->back += a->back[t];
                want_say = 1;

            } else {
                FUZZ_ASSERT(a->want[t] == 0 && a->back[t] == 0);
                FUZZ_ASSERT(n->f.wallet[t] == w);
            }

        } else {
            FUZZ_ASSERT(a->want[t] == 0 && a->back[t] == 0);
        }

        if (c->inflight == 0) {
            FUZZ_ASSERT(a->claim[t] == 0 && a->wslots[t] == 0);
            continue;
        }

        /* recent: the fair share at most; quiet: the slots in use */
        claim = 0;
        if (recent) {
            claim = f0.held[t] < f0.fair[t] ? f0.held[t] : f0.fair[t];
        }

        if (claim < n->s.inflight[t]) {
            claim = n->s.inflight[t];
        }

        FUZZ_ASSERT(a->claim[t] == claim);
        FUZZ_ASSERT(n->f.held[t] == claim);

        /*
         * wanted: in flight + queued, and if recent + 1 + ahead, at most
         * the cap, at least the claim; ahead counts the expected requests
         * of the tiers u >= t, by the estimates after this update
         */
        lo = n->s.inflight[t] + n->s.queued;

        if (recent) {
            lo += 1;

            for (u = t; u < c->ntiers; u++) {
                est = f0.est[u] - (f0.est[u] + 3) / 4 + 4 * f0.demand[u];
                lo += (est + 15) / 16;
            }
        }

        hi = lo;
        lo = lo < c->cap[t] ? lo : c->cap[t];
        hi = hi < c->cap[t] ? hi : c->cap[t];
        lo = lo > claim ? lo : claim;
        hi = hi > claim ? hi : claim;

        FUZZ_ASSERT(a->wslots[t] >= lo && a->wslots[t] <= hi);

        if (claim || a->wslots[t] || f0.held[t] > claim) {
            want_say = 1;
        }
    }

    FUZZ_ASSERT(say == want_say);

    /* fields a sync never touches */
    FUZZ_ASSERT(n->f.seen_ms == f0.seen_ms);

    for (t = 0; t < DSG_MAX_TIERS; t++) {
        FUZZ_ASSERT(n->f.fair[t] == f0.fair[t]);
    }

    if (!say) {
        return;
    }

    redis_sync(fl, k, a, &n->g);
    n->pending = 1;

    if (b & 2) {
        /* an answer below the claim: apply keeps the claim */
        for (t = 0; t < c->ntiers; t++) {
            n->g.held[t] /= 2;
        }
    }

    if (!(b & 1)) {
        apply(fl, k);
    }
}


/* the least in-flight cap >= from that gives every tier a slot */

static void
op_fallback(const fleet_t *fl, uint32_t nodes)
{
    int                      rc;
    uint32_t                 from, lo;
    dsg_limit_conf_t         fb, tmp;
    const dsg_limit_conf_t  *c;

    c = &fl->c;

    memset(&fb, 0x5a, sizeof(fb));
    rc = dsg_fleet_fallback_conf(&fb, c, fl->reserve, nodes);

    if (nodes == 0) {
        FUZZ_ASSERT(rc == DSG_EINVAL);
        return;
    }

    if (c->n > 0 && (u128) c->period_ms * nodes > DSG_MAX_PERIOD_MS) {
        FUZZ_ASSERT(rc == DSG_EINVAL);
        return;
    }

    FUZZ_ASSERT(rc == DSG_OK);
    FUZZ_ASSERT(fb.n == c->n);
    FUZZ_ASSERT(fb.period_ms == c->period_ms * nodes);
    FUZZ_ASSERT(fb.burst == (c->n > 0 ? c->burst / nodes : 0));
    FUZZ_ASSERT(fb.nclasses == c->nclasses && fb.ntiers == c->ntiers);
    FUZZ_ASSERT(memcmp(fb.class_tier, c->class_tier, sizeof(fb.class_tier))
                == 0);
    FUZZ_ASSERT(memcmp(fb.share, c->share, sizeof(fb.share)) == 0);

    if (c->n > 0) {
        /* n per period * nodes: exactly the rate divided by nodes */
        FUZZ_ASSERT((u128) fb.gain[0] * c->cost * nodes
                    == (u128) c->gain[0] * fb.cost);
    }

    if (c->inflight == 0) {
        FUZZ_ASSERT(fb.inflight == 0);
        return;
    }

    from = c->inflight / nodes;
    if (from == 0) {
        from = 1;
    }

    FUZZ_ASSERT(fb.inflight >= from && fb.inflight <= c->inflight);

    for (lo = from; lo < fb.inflight; lo++) {
        FUZZ_ASSERT(dsg_limit_conf_init(&tmp, c->n, fb.period_ms, fb.burst,
                                        lo, fl->reserve, c->nclasses)
                    == DSG_ECAP);
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                rc;
    fz_t               in;
    uint8_t            op, b;
    uint32_t           k, t, nclasses, inflight;
    uint64_t           n, period, burst, dt;
    unsigned           steps;
    fleet_t           *fl;
    dsg_fleet_ask_t    a;
    dsg_fleet_key_t    f0;
    dsg_limit_state_t  s;

    static fleet_t     fleet;

    in.p = data;
    in.n = size;
    fl = &fleet;
    memset(fl, 0, sizeof(fleet_t));

    n = fz_pick(&in, DSG_MAX_RATE) % (DSG_MAX_RATE + 1);
    period = 1 + fz_pick(&in, DSG_MAX_PERIOD_MS) % DSG_MAX_PERIOD_MS;
    burst = fz_pick(&in, DSG_MAX_BURST) % (DSG_MAX_BURST + 1);
    inflight = (uint32_t) (fz_pick(&in, 64) % (DSG_MAX_INFLIGHT + 1));
    nclasses = 1 + fz_u8(&in) % DSG_MAX_CLASSES;

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        b = fz_u8(&in);
        fl->reserve[k] = (b < 128) ? 0 : b % 40;
    }

    rc = dsg_limit_conf_init(&fl->c, n, period, burst, inflight,
                             fl->reserve, nclasses);
    if (rc != DSG_OK) {
        return 0;
    }

    fl->nodes = 1 + fz_u8(&in) % NODES;
    fl->interval = 1 + fz_pick(&in, 1000) % 10000;
    fl->start = 1 + fz_uint(&in, 4);
    fl->now = fl->start;

    fl->r.last_ms = fl->now;
    for (t = 0; t < fl->c.ntiers; t++) {
        fl->r.level[t] = fl->c.capacity[t];
    }

    for (k = 0; k < fl->nodes; k++) {
        memset(&fl->nd[k].f, 0xa5, sizeof(dsg_fleet_key_t));
        dsg_fleet_key_init(&fl->nd[k].f);
        dsg_limit_state_init(&fl->c, &fl->nd[k].s, fl->now);

        for (t = 0; t < DSG_MAX_TIERS; t++) {
            FUZZ_ASSERT(fl->nd[k].f.wallet[t] == 0);
            FUZZ_ASSERT(fl->nd[k].f.held[t] == 0);
            FUZZ_ASSERT(fl->nd[k].f.fair[t] == 0);
            FUZZ_ASSERT(fl->nd[k].f.demand[t] == 0);
            FUZZ_ASSERT(fl->nd[k].f.est[t] == 0);
        }

        FUZZ_ASSERT(fl->nd[k].f.seen_ms == 0);
    }

    /* a key never seen has nothing to say */
    f0 = fl->nd[0].f;
    s = fl->nd[0].s;
    FUZZ_ASSERT(dsg_fleet_plan(&fl->c, &f0, &s, fl->now, fl->interval, &a)
                == 0);

    for (steps = 0; steps < 512 && !fz_empty(&in); steps++) {
        op = fz_u8(&in);
        k = (op >> 4) % fl->nodes;

        switch (op & 15) {

        case 0: case 1:                          /* time passes */
            dt = fz_pick(&in, fl->interval) % (1000 * fl->interval + 1);
            fl->now += dt;
            break;

        case 2: case 3: case 4: case 5: case 6:  /* a request */
            op_request(fl, k, fz_u8(&in));
            break;

        case 7: case 8:                          /* a request ends */
            op_release(fl, k, fz_u8(&in));
            break;

        case 9: case 10: case 11:                /* a sync */
            op_sync(fl, k, fz_u8(&in));
            break;

        case 12:                                 /* its answer comes */
            apply(fl, k);
            break;

        case 13:                                 /* waiters */
            fl->nd[k].s.queued = fz_u8(&in) % 16;
            break;

        case 14:                                 /* Redis unreachable */
            op_fallback(fl, (uint32_t) fz_pick(&in, 1440));
            break;

        default:                                 /* every agent syncs */
            for (k = 0; k < fl->nodes; k++) {
                op_sync(fl, k, 0);
            }
            break;
        }

        check_fleet(fl);
    }

    return 0;
}
