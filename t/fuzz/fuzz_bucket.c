/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_bucket, the admission maths.
 *
 * The input is a zone configuration (rate, period, burst, in-flight cap,
 * classes and reserves, any values, valid or not) and then a program of
 * operations on one key's state at arbitrary times (forward, backward,
 * huge jumps).  Checked against a shadow model computed independently in
 * 128-bit arithmetic:
 *
 *  - dsg_limit_conf_init() returns exactly the documented code, and on
 *    success every derived value is the documented formula, exact;
 *  - a bucket level never exceeds its capacity, follows
 *    min(capacity, level + elapsed * gain) on refill, loses exactly cost
 *    on a charge and gets it back, clamped, on a refund;
 *  - DSG_RATE's wait_ms is exact: checking again at now + wait_ms admits
 *    (tokens-wise), at now + wait_ms - 1 it still says DSG_RATE;
 *  - DSG_INFLIGHT is returned iff tokens are there and a tier is at cap;
 *  - with well-behaved callers (charge only after DSG_OK, release only
 *    what was charged) the in-flight counters are exactly the admitted
 *    requests of the classes at or below each tier, and never exceed the
 *    caps; misuse (the "chaos" mode) saturates and never wraps;
 *  - charge + refund right after a DSG_OK check is the identity;
 *  - dsg_limit_full() is true iff the key is idle and a refill would fill
 *    every bucket;
 *  - dsg_retry_after_s() is ceil(wait_ms / 1000), at least 1.
 *
 * UBSan (unsigned overflow is not UB, so the model catches wraps) and
 * ASan watch the rest.
 */


#include <string.h>

#include "dsg_bucket.h"
#include "fuzz.h"


typedef unsigned __int128  u128;


#define U64_MAX  ((u128) UINT64_MAX)


static int
expected_conf(uint64_t n, uint64_t period, uint64_t burst, uint32_t inflight,
    const uint32_t *reserve, uint32_t nclasses)
{
    uint32_t  k, share, prev, tiers;
    uint64_t  sum;

    if (nclasses == 0 || nclasses > DSG_MAX_CLASSES) {
        return DSG_EINVAL;
    }

    if (inflight > DSG_MAX_INFLIGHT) {
        return DSG_EINVAL;
    }

    if (n > 0 && (n > DSG_MAX_RATE || burst > DSG_MAX_BURST || period == 0
                  || period > DSG_MAX_PERIOD_MS))
    {
        return DSG_EINVAL;
    }

    sum = 0;
    for (k = 0; k < nclasses; k++) {
        sum += reserve[k];
    }

    if (sum >= 100) {
        return DSG_ERESERVE;
    }

    tiers = 1;
    prev = 100;
    sum = 0;

    for (k = 0; k < nclasses; k++) {
        share = 100 - (uint32_t) sum;

        if (share != prev) {
            tiers++;
            prev = share;

            if (tiers > DSG_MAX_TIERS) {
                return DSG_ETIERS;
            }
        }

        sum += reserve[k];
    }

    if (inflight > 0) {
        sum = 0;
        for (k = 0; k < nclasses; k++) {
            if ((uint64_t) inflight * (100 - sum) / 100 == 0) {
                return DSG_ECAP;
            }

            sum += reserve[k];
        }
    }

    return DSG_OK;
}


static void
check_conf(const dsg_limit_conf_t *c, const uint32_t *reserve)
{
    u128      cap, b;
    uint32_t  k, t;
    uint64_t  sum;

    FUZZ_ASSERT(c->ntiers >= 1 && c->ntiers <= DSG_MAX_TIERS);
    FUZZ_ASSERT(c->share[0] == 100);

    sum = 0;

    for (k = 0; k < c->nclasses; k++) {
        t = c->class_tier[k];
        FUZZ_ASSERT(t < c->ntiers);
        FUZZ_ASSERT(c->share[t] == 100 - sum);
        FUZZ_ASSERT(k == 0 || t >= c->class_tier[k - 1]);
        FUZZ_ASSERT(dsg_limit_class_tier(c, k) == t);
        sum += reserve[k];
    }

    FUZZ_ASSERT(dsg_limit_class_tier(c, c->nclasses) == c->ntiers - 1);
    FUZZ_ASSERT(c->class_tier[c->nclasses - 1] == c->ntiers - 1);

    for (t = 0; t < c->ntiers; t++) {
        FUZZ_ASSERT(c->share[t] >= 1 && c->share[t] <= 100);
        FUZZ_ASSERT(t == 0 || c->share[t] < c->share[t - 1]);

        if (c->n > 0) {
            FUZZ_ASSERT(c->cost == (u128) c->period_ms * 100);
            FUZZ_ASSERT(c->gain[t] == (u128) c->n * c->share[t]);

            b = (u128) (c->burst + 1) * c->period_ms * c->share[t];
            if (b < c->cost) {
                b = c->cost;
            }

            cap = b + c->gain[t] - 1;
            FUZZ_ASSERT(cap <= U64_MAX);
            FUZZ_ASSERT(c->capacity[t] == cap);
            FUZZ_ASSERT(c->capacity[t] >= c->cost);
            FUZZ_ASSERT(c->gain[t] > 0);

        } else {
            FUZZ_ASSERT(c->cost == 0 && c->gain[t] == 0
                        && c->capacity[t] == 0);
        }

        if (c->inflight > 0) {
            FUZZ_ASSERT(c->cap[t] == (uint64_t) c->inflight * c->share[t]
                                     / 100);
            FUZZ_ASSERT(c->cap[t] > 0);

        } else {
            FUZZ_ASSERT(c->cap[t] == 0);
        }
    }
}


/* the model's refill of one level */

static uint64_t
model_refill(const dsg_limit_conf_t *c, uint32_t t, uint64_t level,
    uint64_t elapsed)
{
    u128  l;

    l = (u128) level + (u128) elapsed * c->gain[t];

    return (l > c->capacity[t]) ? c->capacity[t] : (uint64_t) l;
}


typedef struct {
    dsg_limit_state_t  s;
    uint32_t           admitted[DSG_MAX_CLASSES];   /* charged, not released */
    int                chaos;                       /* misuse allowed */
} model_t;


static void
check_state(const dsg_limit_conf_t *c, const model_t *m,
    const dsg_limit_state_t *s)
{
    uint32_t  t, k, n;

    for (t = 0; t < DSG_MAX_TIERS; t++) {
        FUZZ_ASSERT(s->level[t] == m->s.level[t]);
        FUZZ_ASSERT(t < c->ntiers || s->level[t] == 0);
        FUZZ_ASSERT(t >= c->ntiers || s->level[t] <= c->capacity[t]);
        FUZZ_ASSERT(s->inflight[t] == m->s.inflight[t]);

        if (c->inflight == 0) {
            FUZZ_ASSERT(s->inflight[t] == 0);
        }
    }

    FUZZ_ASSERT(s->last_ms == m->s.last_ms);

    if (m->chaos || c->inflight == 0) {
        return;
    }

    for (t = 0; t < c->ntiers; t++) {
        n = 0;

        for (k = 0; k < c->nclasses; k++) {
            if (c->class_tier[k] >= t) {
                n += m->admitted[k];
            }
        }

        FUZZ_ASSERT(s->inflight[t] == n);
        FUZZ_ASSERT(s->inflight[t] <= c->cap[t]);
    }
}


/* the model's check: refills m, returns the code and the wait */

static int
model_check(const dsg_limit_conf_t *c, model_t *m, uint32_t cls,
    uint64_t now, uint64_t *wait)
{
    u128      w, need, best;
    uint32_t  t, tier;

    *wait = 0;

    if (cls >= c->nclasses) {
        return DSG_EINVAL;
    }

    if (now > m->s.last_ms) {
        for (t = 0; t < c->ntiers && c->n > 0; t++) {
            m->s.level[t] = model_refill(c, t, m->s.level[t],
                                         now - m->s.last_ms);
        }

        m->s.last_ms = now;
    }

    tier = c->class_tier[cls];

    if (c->n > 0) {
        best = 0;

        for (t = 0; t <= tier; t++) {
            if (m->s.level[t] >= c->cost) {
                continue;
            }

            need = c->cost - m->s.level[t];
            w = (need + c->gain[t] - 1) / c->gain[t];

            if (w > best) {
                best = w;
            }
        }

        if (best > 0) {
            best += m->s.last_ms - now;      /* 0 unless the clock is behind */
            *wait = (best > U64_MAX) ? UINT64_MAX : (uint64_t) best;
            return DSG_RATE;
        }
    }

    for (t = 0; t <= tier && c->inflight > 0; t++) {
        if (m->s.inflight[t] >= c->cap[t]) {
            return DSG_INFLIGHT;
        }
    }

    return DSG_OK;
}


static void
model_charge(const dsg_limit_conf_t *c, model_t *m, uint32_t cls)
{
    uint32_t  t;

    if (cls >= c->nclasses) {
        return;
    }

    for (t = 0; t <= c->class_tier[cls]; t++) {
        if (c->n > 0) {
            m->s.level[t] = (m->s.level[t] >= c->cost)
                            ? m->s.level[t] - c->cost : 0;
        }

        if (c->inflight > 0 && m->s.inflight[t] < UINT16_MAX) {
            m->s.inflight[t]++;
        }
    }
}


static void
model_refund(const dsg_limit_conf_t *c, model_t *m, uint32_t cls)
{
    u128      l;
    uint32_t  t;

    if (cls >= c->nclasses) {
        return;
    }

    for (t = 0; t <= c->class_tier[cls]; t++) {
        if (c->n > 0) {
            l = (u128) m->s.level[t] + c->cost;
            m->s.level[t] = (l > c->capacity[t]) ? c->capacity[t]
                                                 : (uint64_t) l;
        }

        if (c->inflight > 0 && m->s.inflight[t] > 0) {
            m->s.inflight[t]--;
        }
    }
}


static void
model_release(const dsg_limit_conf_t *c, model_t *m, uint32_t cls)
{
    uint32_t  t;

    if (cls >= c->nclasses || c->inflight == 0) {
        return;
    }

    for (t = 0; t <= c->class_tier[cls]; t++) {
        if (m->s.inflight[t] > 0) {
            m->s.inflight[t]--;
        }
    }
}


static int
model_full(const dsg_limit_conf_t *c, const model_t *m, uint64_t now)
{
    uint32_t  t;
    uint64_t  elapsed;

    if (m->s.inflight[0] != 0 || m->s.queued != 0) {
        return 0;
    }

    if (c->n == 0) {
        return 1;
    }

    elapsed = (now > m->s.last_ms) ? now - m->s.last_ms : 0;

    for (t = 0; t < c->ntiers; t++) {
        if (model_refill(c, t, m->s.level[t], elapsed) != c->capacity[t]) {
            return 0;
        }
    }

    return 1;
}


/* DSG_RATE with wait w at now: exact, on copies of the state */

static void
check_wait(const dsg_limit_conf_t *c, const dsg_limit_state_t *before,
    uint32_t cls, uint64_t now, uint64_t w)
{
    int                rc;
    uint64_t           w2;
    dsg_limit_state_t  s;

    FUZZ_ASSERT(w > 0);

    if (w == UINT64_MAX) {
        return;                      /* saturated: not exact by design */
    }

    if ((u128) now + w <= U64_MAX) {
        s = *before;
        rc = dsg_limit_check(c, &s, cls, now + w, &w2);
        FUZZ_ASSERT(rc == DSG_OK || rc == DSG_INFLIGHT);
        FUZZ_ASSERT(w2 == 0);
    }

    if ((u128) now + w - 1 <= U64_MAX) {
        s = *before;
        rc = dsg_limit_check(c, &s, cls, now + w - 1, &w2);
        FUZZ_ASSERT(rc == DSG_RATE);
        FUZZ_ASSERT(w2 == 1 || now + w - 1 < before->last_ms);
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                rc, want, mrc;
    fz_t               f;
    model_t            m;
    uint8_t            op;
    uint32_t           k, cls, nclasses, inflight, reserve[DSG_MAX_CLASSES];
    uint32_t           ra;
    uint64_t           n, period, burst, now, t, w, mw, dt;
    unsigned           steps;
    dsg_limit_conf_t   c;
    dsg_limit_state_t  s, before;

    f.p = data;
    f.n = size;

    n = fz_pick(&f, DSG_MAX_RATE);
    period = fz_pick(&f, DSG_MAX_PERIOD_MS);
    burst = fz_pick(&f, DSG_MAX_BURST);
    inflight = (uint32_t) fz_pick(&f, DSG_MAX_INFLIGHT);
    nclasses = fz_u8(&f) % (DSG_MAX_CLASSES + 2);

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        op = fz_u8(&f);
        reserve[k] = (op < 200) ? op % 40 : (uint32_t) fz_pick(&f, 100);
    }

    want = expected_conf(n, period, burst, inflight, reserve, nclasses);

    memset(&c, 0x5a, sizeof(c));
    rc = dsg_limit_conf_init(&c, n, period, burst, inflight, reserve,
                             nclasses);
    FUZZ_ASSERT(rc == want);

    /* no reserves at all: one tier */

    if (nclasses >= 1 && nclasses <= DSG_MAX_CLASSES
        && expected_conf(n, period, burst, inflight, (uint32_t[8]) { 0 },
                         nclasses) == DSG_OK)
    {
        dsg_limit_conf_t  c0;

        FUZZ_ASSERT(dsg_limit_conf_init(&c0, n, period, burst, inflight,
                                        NULL, nclasses) == DSG_OK);
        FUZZ_ASSERT(c0.ntiers == 1);
    }

    if (rc != DSG_OK) {
        return 0;
    }

    check_conf(&c, reserve);

    now = fz_pick(&f, UINT64_MAX);

    dsg_limit_state_init(&c, &s, now);

    memset(&m, 0, sizeof(m));
    m.s = s;
    m.chaos = fz_u8(&f) & 1;

    for (k = 0; k < c.ntiers; k++) {
        FUZZ_ASSERT(s.level[k] == c.capacity[k]);
    }

    FUZZ_ASSERT(dsg_limit_idle(&c, &s));
    FUZZ_ASSERT(dsg_limit_full(&c, &s, now));

    check_state(&c, &m, &s);

    for (steps = 0; steps < 256 && !fz_empty(&f); steps++) {
        op = fz_u8(&f);
        cls = (op >> 4) % (c.nclasses + 1);    /* nclasses: invalid */

        switch (op & 15) {

        case 0: case 1: case 2:                /* time passes */
            dt = fz_pick(&f, c.period_ms);
            now = ((u128) now + dt > U64_MAX) ? UINT64_MAX : now + dt;
            break;

        case 3:                                /* an older clock */
            dt = fz_pick(&f, 1000);
            now = (dt > now) ? 0 : now - dt;
            break;

        case 4: case 5: case 6: case 7:        /* a request */
            t = now;
            if (op & 1) {
                dt = fz_u8(&f) % 16;           /* another worker's clock */
                t = (dt > t) ? 0 : t - dt;
            }

            before = s;
            rc = dsg_limit_check(&c, &s, cls, t, &w);
            mrc = model_check(&c, &m, cls, t, &mw);
            FUZZ_ASSERT(rc == mrc);
            FUZZ_ASSERT(w == mw);
            FUZZ_ASSERT(s.last_ms >= before.last_ms);
            check_state(&c, &m, &s);

            FUZZ_ASSERT(dsg_limit_check(&c, &before, cls, t, NULL) == rc);

            if (rc == DSG_RATE) {
                check_wait(&c, &s, cls, t, w);
                FUZZ_ASSERT(dsg_retry_after_s(w) >= 1);

            } else {
                FUZZ_ASSERT(w == 0);
            }

            if (rc != DSG_OK) {
                break;
            }

            before = s;
            dsg_limit_charge(&c, &s, cls);
            model_charge(&c, &m, cls);
            m.admitted[cls]++;
            check_state(&c, &m, &s);

            if (op & 2) {                      /* rejected by another zone */
                dsg_limit_refund(&c, &s, cls);
                model_refund(&c, &m, cls);
                m.admitted[cls]--;
                FUZZ_ASSERT(memcmp(&s, &before, sizeof(s)) == 0);
                check_state(&c, &m, &s);
            }

            break;

        case 8: case 9:                        /* a request finishes */
            if (!m.chaos) {
                for (k = 0; k < c.nclasses; k++) {
                    if (m.admitted[(cls + k) % c.nclasses] != 0) {
                        break;
                    }
                }

                if (k == c.nclasses) {
                    break;
                }

                cls = (cls + k) % c.nclasses;
                m.admitted[cls]--;
            }

            dsg_limit_release(&s, dsg_limit_record(&c, cls));
            model_release(&c, &m, cls);
            check_state(&c, &m, &s);
            break;

        case 10:                               /* misuse: blind charge */
            if (m.chaos) {
                dsg_limit_charge(&c, &s, cls);
                model_charge(&c, &m, cls);
                check_state(&c, &m, &s);
            }
            break;

        case 11:                               /* misuse: blind refund */
            if (m.chaos) {
                dsg_limit_refund(&c, &s, cls);
                model_refund(&c, &m, cls);
                check_state(&c, &m, &s);
            }
            break;

        case 12:                               /* eviction check */
            t = now + (fz_u8(&f) & 1 ? fz_pick(&f, c.period_ms) : 0);
            if (t < now) {
                t = UINT64_MAX;
            }

            before = s;
            rc = dsg_limit_full(&c, &s, t);
            FUZZ_ASSERT(memcmp(&s, &before, sizeof(s)) == 0);
            FUZZ_ASSERT(rc == model_full(&c, &m, t));
            FUZZ_ASSERT(dsg_limit_idle(&c, &s)
                        == (s.inflight[0] == 0 && s.queued == 0));
            FUZZ_ASSERT(!rc || dsg_limit_idle(&c, &s));
            break;

        case 13:                               /* waiters of the key */
            s.queued = (uint16_t) fz_uint(&f, 2);
            m.s.queued = s.queued;
            break;

        case 14:                               /* Retry-After */
            w = fz_pick(&f, 1000);
            ra = dsg_retry_after_s(w);
            FUZZ_ASSERT(ra >= 1);
            if (w > 0 && w / 1000 < UINT32_MAX) {
                FUZZ_ASSERT((u128) ra * 1000 >= w);
                FUZZ_ASSERT((u128) (ra - 1) * 1000 < w);
            }
            break;

        default:                               /* caps */
            FUZZ_ASSERT(dsg_limit_inflight_cap(&c, cls)
                        == c.cap[dsg_limit_class_tier(&c, cls)]);
            break;
        }
    }

    return 0;
}
