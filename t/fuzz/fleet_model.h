/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * A model of the fleet's Redis script (the Lua of
 * ngx_http_deepseek_guard_fleet.c) for the core's tests: one key's nested
 * token buckets and the slots each node holds, as the script grants them.
 * Shared by t/unit/check_fleet.c and t/fuzz/fuzz_fleet.c.  It keeps the
 * buckets at the zone's own capacity (the script lets them hold one more
 * interval of refill): a stricter fleet than the real one.
 */


#ifndef DSG_FLEET_MODEL_H
#define DSG_FLEET_MODEL_H


#include <stdint.h>
#include <string.h>

#include "dsg_fleet.h"


#define DSG_MODEL_NODES  4


typedef struct {
    uint64_t  last_ms;
    uint64_t  level[DSG_MAX_TIERS];
    uint32_t  h[DSG_MODEL_NODES][DSG_MAX_TIERS];   /* held, by node */
    uint32_t  w[DSG_MODEL_NODES][DSG_MAX_TIERS];   /* wanted, by node */
} dsg_model_redis_t;


static inline uint64_t
dsg_model_add_clamp(uint64_t level, unsigned __int128 add, uint64_t cap)
{
    if (level >= cap || add >= (unsigned __int128) (cap - level)) {
        return cap;
    }

    return level + (uint64_t) add;
}


/* a new key: full buckets, nothing held */

static inline void
dsg_model_init(const dsg_limit_conf_t *c, dsg_model_redis_t *r,
    uint64_t now)
{
    uint32_t  t;

    memset(r, 0, sizeof(dsg_model_redis_t));
    r->last_ms = now;

    for (t = 0; t < c->ntiers; t++) {
        r->level[t] = c->capacity[t];
    }
}


/* one node's sync at now: the script's answer to ask a */

static inline void
dsg_model_sync(const dsg_limit_conf_t *c, dsg_model_redis_t *r,
    uint32_t nodes, uint32_t node, uint64_t now, const dsg_fleet_ask_t *a,
    dsg_fleet_grant_t *g)
{
    int       starved;
    uint32_t  i, j, k, ws, fair, held;
    uint64_t  m, grant, sumh, sumw, avail;

    memset(g, 0, sizeof(dsg_fleet_grant_t));

    if (c->n > 0) {
        if (now > r->last_ms) {
            for (i = 0; i < c->ntiers; i++) {
                r->level[i] = dsg_model_add_clamp(r->level[i],
                                  (unsigned __int128) (now - r->last_ms)
                                  * c->gain[i],
                                  c->capacity[i]);
            }
        }

        for (i = 0; i < c->ntiers; i++) {
            for (j = 0; j <= i; j++) {
                r->level[j] = dsg_model_add_clamp(r->level[j], a->back[i],
                                                  c->capacity[j]);
            }
        }

        for (i = 0; i < c->ntiers; i++) {
            m = r->level[0];
            for (j = 1; j <= i; j++) {
                if (r->level[j] < m) {
                    m = r->level[j];
                }
            }

            grant = m / c->cost * c->cost;
            if (grant > a->want[i]) {
                grant = a->want[i];
            }

            for (j = 0; j <= i; j++) {
                r->level[j] -= grant;
            }

            g->granted[i] = grant;
        }
    }

    if (now > r->last_ms) {
        r->last_ms = now;
    }

    if (c->inflight == 0) {
        return;
    }

    for (i = 0; i < c->ntiers; i++) {
        sumh = 0;
        sumw = 0;
        starved = 0;

        for (k = 0; k < nodes; k++) {
            if (k == node) {
                continue;
            }

            sumh += r->h[k][i];
            sumw += r->w[k][i];

            if (r->w[k][i] > r->h[k][i]) {
                starved = 1;
            }
        }

        ws = a->wslots[i];
        avail = (sumh < c->cap[i]) ? c->cap[i] - sumh : 0;

        if (starved && ws > 0) {
            fair = (uint32_t) ((uint64_t) c->cap[i] * ws / (ws + sumw));
            if (fair < 1) {
                fair = 1;
            }

        } else {
            fair = c->cap[i];
        }

        held = ws;
        if (held > avail) {
            held = (uint32_t) avail;
        }

        if (held > fair) {
            held = fair;
        }

        if (held < a->claim[i]) {
            held = a->claim[i];
        }

        r->h[node][i] = held;
        r->w[node][i] = ws;
        g->held[i] = held;
        g->fair[i] = fair;
    }
}


#endif /* DSG_FLEET_MODEL_H */
