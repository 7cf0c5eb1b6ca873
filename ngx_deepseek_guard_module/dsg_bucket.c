/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include <stddef.h>

#include "dsg_bucket.h"


/* the state lives in shared memory next to the key: keep it small */
typedef char  dsg_limit_state_size_check_t
    [sizeof(dsg_limit_state_t) <= 56 ? 1 : -1];


static void dsg_limit_refill(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint64_t now_ms);
static uint64_t dsg_add_sat(uint64_t a, uint64_t b);


int
dsg_limit_conf_init(dsg_limit_conf_t *c, uint64_t n, uint64_t period_ms,
    uint64_t burst, uint32_t inflight, const uint32_t *reserve_pct,
    uint32_t nclasses)
{
    uint32_t  k, t, share, prev;
    uint64_t  sum, b;

    if (c == NULL || nclasses == 0 || nclasses > DSG_MAX_CLASSES) {
        return DSG_EINVAL;
    }

    if (inflight > DSG_MAX_INFLIGHT) {
        return DSG_EINVAL;
    }

    if (n > 0) {
        if (n > DSG_MAX_RATE || burst > DSG_MAX_BURST
            || period_ms == 0 || period_ms > DSG_MAX_PERIOD_MS)
        {
            return DSG_EINVAL;
        }

    } else {
        period_ms = 0;
        burst = 0;
    }

    sum = 0;

    if (reserve_pct != NULL) {
        for (k = 0; k < nclasses; k++) {
            sum += reserve_pct[k];
        }
    }

    if (sum >= 100) {
        return DSG_ERESERVE;
    }

    *c = (dsg_limit_conf_t) { 0 };

    c->n = n;
    c->period_ms = period_ms;
    c->burst = burst;
    c->inflight = inflight;
    c->nclasses = nclasses;

    /* shares are non-increasing with the class index: a new one, a new tier */

    sum = 0;
    t = 0;
    prev = 100;
    c->share[0] = 100;

    for (k = 0; k < nclasses; k++) {
        share = 100 - (uint32_t) sum;

        if (share != prev) {
            if (++t == DSG_MAX_TIERS) {
                return DSG_ETIERS;
            }

            c->share[t] = share;
            prev = share;
        }

        c->class_tier[k] = (uint8_t) t;

        if (reserve_pct != NULL) {
            sum += reserve_pct[k];
        }
    }

    c->ntiers = t + 1;

    if (n > 0) {
        c->cost = period_ms * 100;
    }

    for (t = 0; t < c->ntiers; t++) {

        if (n > 0) {
            c->gain[t] = n * c->share[t];

            b = (burst + 1) * period_ms * c->share[t];
            if (b < c->cost) {
                b = c->cost;
            }

            c->capacity[t] = b + c->gain[t] - 1;
        }

        if (inflight > 0) {
            c->cap[t] = inflight * c->share[t] / 100;

            if (c->cap[t] == 0) {
                return DSG_ECAP;
            }
        }
    }

    return DSG_OK;
}


uint32_t
dsg_limit_class_tier(const dsg_limit_conf_t *c, uint32_t cls)
{
    if (cls >= c->nclasses) {
        return c->ntiers - 1;
    }

    return c->class_tier[cls];
}


uint32_t
dsg_limit_inflight_cap(const dsg_limit_conf_t *c, uint32_t cls)
{
    return c->cap[dsg_limit_class_tier(c, cls)];
}


void
dsg_limit_state_init(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint64_t now_ms)
{
    uint32_t  t;

    *s = (dsg_limit_state_t) { 0 };

    s->last_ms = now_ms;

    for (t = 0; t < c->ntiers; t++) {
        s->level[t] = c->capacity[t];
    }
}


static uint64_t
dsg_add_sat(uint64_t a, uint64_t b)
{
    return (a > UINT64_MAX - b) ? UINT64_MAX : a + b;
}


static void
dsg_limit_refill(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint64_t now_ms)
{
    uint32_t  t;
    uint64_t  elapsed, room;

    if (now_ms <= s->last_ms) {
        /* same tick, or a clock behind ours: keep last_ms, no refill */
        return;
    }

    elapsed = now_ms - s->last_ms;
    s->last_ms = now_ms;

    if (c->n == 0) {
        return;
    }

    for (t = 0; t < c->ntiers; t++) {

        if (s->level[t] >= c->capacity[t]) {
            s->level[t] = c->capacity[t];
            continue;
        }

        room = c->capacity[t] - s->level[t];

        /* elapsed * gain <= room here: no overflow */

        if (elapsed > room / c->gain[t]) {
            s->level[t] = c->capacity[t];

        } else {
            s->level[t] += elapsed * c->gain[t];
        }
    }
}


int
dsg_limit_check(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint32_t cls, uint64_t now_ms, uint64_t *wait_ms)
{
    uint32_t  t, tier;
    uint64_t  need, w, wait;

    if (wait_ms != NULL) {
        *wait_ms = 0;
    }

    if (cls >= c->nclasses) {
        return DSG_EINVAL;
    }

    dsg_limit_refill(c, s, now_ms);

    tier = c->class_tier[cls];

    if (c->n > 0) {
        wait = 0;

        for (t = 0; t <= tier; t++) {
            if (s->level[t] >= c->cost) {
                continue;
            }

            need = c->cost - s->level[t];
            w = need / c->gain[t] + (need % c->gain[t] != 0);

            if (w > wait) {
                wait = w;
            }
        }

        if (wait > 0) {
            if (now_ms < s->last_ms) {
                wait = dsg_add_sat(wait, s->last_ms - now_ms);
            }

            if (wait_ms != NULL) {
                *wait_ms = wait;
            }

            return DSG_RATE;
        }
    }

    if (c->inflight > 0) {
        for (t = 0; t <= tier; t++) {
            if (s->inflight[t] >= c->cap[t]) {
                return DSG_INFLIGHT;
            }
        }
    }

    return DSG_OK;
}


void
dsg_limit_charge(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint32_t cls)
{
    uint32_t  t, tier;

    if (cls >= c->nclasses) {
        return;
    }

    tier = c->class_tier[cls];

    for (t = 0; t <= tier; t++) {

        if (c->n > 0) {
            s->level[t] = (s->level[t] >= c->cost) ? s->level[t] - c->cost
                                                   : 0;
        }

        if (c->inflight > 0 && s->inflight[t] < UINT16_MAX) {
            s->inflight[t]++;
        }
    }
}


void
dsg_limit_refund(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint32_t cls)
{
    uint32_t  t, tier;

    if (cls >= c->nclasses) {
        return;
    }

    tier = c->class_tier[cls];

    for (t = 0; t <= tier; t++) {

        if (c->n > 0) {
            if (s->level[t] >= c->capacity[t]
                || c->capacity[t] - s->level[t] <= c->cost)
            {
                s->level[t] = c->capacity[t];

            } else {
                s->level[t] += c->cost;
            }
        }

        if (c->inflight > 0 && s->inflight[t] > 0) {
            s->inflight[t]--;
        }
    }
}


uint32_t
dsg_limit_record(const dsg_limit_conf_t *c, uint32_t cls)
{
    if (cls >= c->nclasses) {
        return 0;
    }

    return (c->class_tier[cls] + 1u)
           | (c->inflight > 0 ? DSG_RECORD_INFLIGHT : 0);
}


void
dsg_limit_release(dsg_limit_state_t *s, uint32_t record)
{
    uint32_t  t, ntiers;

    ntiers = record & 0xff;

    if (!(record & DSG_RECORD_INFLIGHT) || ntiers > DSG_MAX_TIERS) {
        return;
    }

    for (t = 0; t < ntiers; t++) {
        if (s->inflight[t] > 0) {
            s->inflight[t]--;
        }
    }
}


int
dsg_limit_idle(const dsg_limit_conf_t *c, const dsg_limit_state_t *s)
{
    (void) c;

    /* tier 0 counts every request */

    return s->inflight[0] == 0 && s->queued == 0;
}


int
dsg_limit_full(const dsg_limit_conf_t *c, const dsg_limit_state_t *s,
    uint64_t now_ms)
{
    uint32_t  t;
    uint64_t  elapsed, room;

    if (!dsg_limit_idle(c, s)) {
        return 0;
    }

    if (c->n == 0) {
        return 1;
    }

    elapsed = (now_ms > s->last_ms) ? now_ms - s->last_ms : 0;

    for (t = 0; t < c->ntiers; t++) {

        if (s->level[t] >= c->capacity[t]) {
            continue;
        }

        room = c->capacity[t] - s->level[t];

        /* full iff elapsed * gain >= room */

        if (elapsed < room / c->gain[t] + (room % c->gain[t] != 0)) {
            return 0;
        }
    }

    return 1;
}


uint64_t
dsg_limit_remaining(const dsg_limit_conf_t *c, const dsg_limit_state_t *s,
    uint32_t cls, uint64_t now_ms, uint64_t *reset_ms)
{
    uint32_t           t, tier;
    uint64_t           n, left, room, ms;
    dsg_limit_state_t  copy;

    if (reset_ms) {
        *reset_ms = 0;
    }

    if (c->n == 0 || cls >= c->nclasses) {
        return 0;
    }

    copy = *s;
    dsg_limit_refill(c, &copy, now_ms);

    tier = c->class_tier[cls];
    left = UINT64_MAX;

    for (t = 0; t <= tier; t++) {
        n = copy.level[t] / c->cost;

        if (n < left) {
            left = n;
        }

        if (reset_ms && copy.level[t] < c->capacity[t]) {
            room = c->capacity[t] - copy.level[t];
            ms = room / c->gain[t] + (room % c->gain[t] != 0);

            if (ms > *reset_ms) {
                *reset_ms = ms;
            }
        }
    }

    return left;
}


uint32_t
dsg_retry_after_s(uint64_t wait_ms)
{
    uint64_t  s;

    s = wait_ms / 1000 + (wait_ms % 1000 != 0);

    if (s == 0) {
        return 1;
    }

    return (s > UINT32_MAX) ? UINT32_MAX : (uint32_t) s;
}
