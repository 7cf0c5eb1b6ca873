/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fleet zones: a node's share of a fleet-wide key, leased from Redis.
 *
 * Pure C: no nginx headers, no clock, no allocation, no logging; the
 * caller holds the zone's mutex.  docs/fleet.md has the whole model; in
 * short:
 *
 *   - Redis keeps the fleet's token buckets of each key (the tiers of
 *     dsg_bucket.h, nested the same way) and, for an in-flight cap, how
 *     many slots each node holds.  One agent per node talks to it every
 *     interval; nothing on the request path does.
 *   - A node admits against its wallet (tokens the fleet granted it and
 *     it has not spent) and its held slots.  A request of tier T spends a
 *     grant of tier T or of any lower tier T' > T (those were charged in
 *     the fleet's tiers 0..T', a superset of 0..T).  When every such wallet
 *     is empty, a tier T request may still go on credit: wallet[T] goes
 *     down to minus credit_ms of the tier's fleet rate (one request at
 *     least), and the next grant pays it back first.  This lets a key new
 *     to the node (or quiet for a while) through without a round trip; it
 *     bounds the over-admission to that credit per node, key and tier.
 *   - Slots are never lent on credit: in flight <= held in every tier.
 *     A node asks for what it uses plus what waits plus one, and shrinks
 *     its claim to the fleet's fair share (returned by the script) one
 *     sync later, never below what it uses.  The fleet records a claim
 *     before the node relies on it, so the sum of in-flight requests over
 *     the nodes never exceeds the cap while Redis is reachable.
 */


#ifndef DSG_FLEET_H
#define DSG_FLEET_H


#include <stdint.h>

#include "dsg_bucket.h"


/* per key, in shared memory after the key's node: 104 bytes */
typedef struct {
    int64_t   wallet[DSG_MAX_TIERS];    /* units granted, not spent */
    uint32_t  held[DSG_MAX_TIERS];      /* slots the fleet lets us use */
    uint32_t  fair[DSG_MAX_TIERS];      /* the fleet's fair share of them */
    uint32_t  demand[DSG_MAX_TIERS];    /* new requests since the last sync */
    uint32_t  est[DSG_MAX_TIERS];       /* demand per sync, EWMA, x16 */
    uint64_t  seen_ms;                  /* the last new request */
} dsg_fleet_key_t;


/* what a sync asks of the fleet for one key, by tier */
typedef struct {
    uint64_t  want[DSG_MAX_TIERS];      /* units wanted */
    uint64_t  back[DSG_MAX_TIERS];      /* units given back */
    uint32_t  claim[DSG_MAX_TIERS];     /* slots held from now on, at least */
    uint32_t  wslots[DSG_MAX_TIERS];    /* slots wanted */
} dsg_fleet_ask_t;


/* the fleet's answer for one key, by tier */
typedef struct {
    uint64_t  granted[DSG_MAX_TIERS];   /* units */
    uint32_t  held[DSG_MAX_TIERS];      /* slots held, >= the claim */
    uint32_t  fair[DSG_MAX_TIERS];      /* slots this node should keep */
} dsg_fleet_grant_t;


/*
 * dsg_fleet_check(): no slot is held because the fleet has not answered
 * for this key on this node yet (a key new to the node): the request may
 * wait for the next sync rather than be refused
 */
#define DSG_UNSPOKEN         3


/* a key is synced while it was seen within this many intervals */
#define DSG_FLEET_LINGER     20

/* new requests of one sync counted in its demand, at most */
#define DSG_FLEET_MAX_DEMAND  (UINT32_MAX / 64)


/* a new key: nothing granted, nothing held */
void dsg_fleet_key_init(dsg_fleet_key_t *f);

/*
 * Whether a class cls request is admissible on this node's share, without
 * charging anything: DSG_OK, DSG_RATE (no token on hand: *wait_ms is the
 * time the fleet takes to earn one, at least 1), DSG_INFLIGHT (no held
 * slot free) or DSG_UNSPOKEN (none held yet, the fleet has not answered
 * for the key), DSG_EINVAL for cls >= nclasses.  "fresh" counts the request
 * in the demand that the next sync asks for (a new request, not a waiter
 * trying again).  credit_ms: the debt a tier's wallet may run, in ms of
 * the tier's fleet rate, one request at least (0: one request).  wait_ms
 * may be NULL.
 */
int dsg_fleet_check(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    const dsg_limit_state_t *s, uint32_t cls, int fresh, uint64_t now_ms,
    uint64_t credit_ms, uint64_t *wait_ms);

/*
 * Counts a new class cls request in the key's demand without checking it:
 * a request admitted against the static share while Redis is away, so
 * that the key stays synced (and a failure that its sync meets stays one
 * episode) and its share is sized right when Redis answers again
 */
void dsg_fleet_seen(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    uint32_t cls, uint64_t now_ms);

/*
 * Takes one request's tokens from the wallet and, if capped, one in-flight
 * slot in every tier t <= tier(cls) of s (released by dsg_limit_release()
 * with dsg_limit_record()'s record, as a local zone's).  Only after a
 * DSG_OK check with the same credit_ms under the same lock.
 */
void dsg_fleet_charge(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    dsg_limit_state_t *s, uint32_t cls, uint64_t credit_ms);

/* undoes a charge: the tokens go back to wallet[tier(cls)], and the slots */
void dsg_fleet_refund(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    dsg_limit_state_t *s, uint32_t cls);

/*
 * Prepares one key's sync at now_ms: fills *a, takes the units given back
 * out of the wallet and lowers the held slots to the claim (both are the
 * fleet's from now on).  Returns 0 when the key has nothing to say (idle,
 * nothing granted or held): no sync for it.
 */
int dsg_fleet_plan(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    const dsg_limit_state_t *s, uint64_t now_ms, uint64_t interval_ms,
    dsg_fleet_ask_t *a);

/* applies the fleet's answer to a planned sync */
void dsg_fleet_apply(const dsg_limit_conf_t *c, dsg_fleet_key_t *f,
    const dsg_fleet_ask_t *a, const dsg_fleet_grant_t *g);

/*
 * The local configuration a fleet zone falls back to when Redis cannot be
 * reached: the rate, burst and in-flight cap divided by nodes (the rate
 * exactly, by stretching the period), with the same classes.  Returns
 * dsg_limit_conf_init()'s code.
 */
int dsg_fleet_fallback_conf(dsg_limit_conf_t *fb, const dsg_limit_conf_t *c,
    const uint32_t *reserve_pct, uint32_t nodes);


#endif /* DSG_FLEET_H */
