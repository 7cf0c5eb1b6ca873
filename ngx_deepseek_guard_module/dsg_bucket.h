/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Admission core: token buckets with reserved priority tiers and an
 * in-flight cap, in exact integer fixed point.
 *
 * Pure C: no nginx headers, no global state, no clock (every time is an
 * argument, in ms), no allocation, no logging.  dsg_limit_state_t lives in
 * shared memory and holds no pointers; the caller serializes access to it
 * (the zone's shared memory mutex).
 *
 * Model.  A zone admits n requests per period_ms plus burst extra requests,
 * and optionally at most "inflight" concurrent requests (0: no cap).  n == 0
 * means no rate limit (in-flight cap only).
 *
 * Priority classes are numbered 0 (highest) .. nclasses - 1.  Class k may
 * reserve reserve[k] percent of the zone's capacity that lower classes
 * (k + 1 ..) never use.  Class c may use share(c) = 100 - sum(reserve[j],
 * j < c) percent.  Classes with the same share form a tier; tier 0 has share
 * 100; there are at most DSG_MAX_TIERS tiers.  A request of tier T needs
 * capacity in every tier t <= T and is charged in every tier t <= T: nested
 * buckets, so classes above a reserve always keep it.  E.g. critical reserve
 * 20: normal and low together never take more than 80% of the rate or of
 * the in-flight cap, critical may use 100%.
 *
 * Rate, per tier t, in units:
 *
 *     cost       = period_ms * 100                  one request, any tier
 *     gain_t     = n * share_t                      units per ms
 *     capacity_t = max(cost, (burst + 1) * period_ms * share_t)
 *                  + gain_t - 1
 *
 * The "+ gain_t - 1" is just under one ms of refill: a high rate with
 * burst 0 is not capped at one request per ms tick (100000r/s admits 100
 * requests per ms), while a rate whose period is a whole number of ms stays
 * exact (1r/m: the next request is admitted exactly 60000 ms later, not
 * 59999).  Every value is exact in uint64_t; refill never multiplies past
 * the capacity.
 *
 * In-flight, per tier t: cap_t = inflight * share_t / 100 (floor).  A tier T
 * request needs count_t < cap_t for every t <= T and is counted in every
 * t <= T.
 */


#ifndef DSG_BUCKET_H
#define DSG_BUCKET_H


#include <stdint.h>


#define DSG_MAX_CLASSES      8
#define DSG_MAX_TIERS        4

/* limits accepted by dsg_limit_conf_init(), keep every product in uint64_t */
#define DSG_MAX_RATE         1000000000ULL            /* n */
#define DSG_MAX_BURST        1000000000ULL
#define DSG_MAX_PERIOD_MS    86400000ULL              /* one day */
#define DSG_MAX_INFLIGHT     65535                    /* uint16_t counters */


enum {
    DSG_OK = 0,                  /* admissible */
    DSG_RATE = 1,                /* no token: *wait_ms says when */
    DSG_INFLIGHT = 2,            /* in-flight cap reached: wait for a release */
    DSG_EINVAL = -1,             /* bad argument */
    DSG_ETIERS = -2,             /* more than DSG_MAX_TIERS distinct shares */
    DSG_ERESERVE = -3,           /* reserves sum to 100% or more */
    DSG_ECAP = -4                /* a tier's in-flight cap rounds down to 0 */
};


/* per zone, computed once by dsg_limit_conf_init(); read-only afterwards */
typedef struct {
    uint64_t  n;                                /* requests per period */
    uint64_t  period_ms;
    uint64_t  burst;
    uint32_t  inflight;                         /* 0: no in-flight cap */
    uint32_t  ntiers;
    uint32_t  nclasses;
    uint32_t  share[DSG_MAX_TIERS];             /* percent, share[0] == 100 */
    uint8_t   class_tier[DSG_MAX_CLASSES];

    /* derived */
    uint64_t  cost;                             /* units per request */
    uint64_t  gain[DSG_MAX_TIERS];              /* units per ms */
    uint64_t  capacity[DSG_MAX_TIERS];          /* units */
    uint32_t  cap[DSG_MAX_TIERS];               /* in-flight cap, 0: none */
} dsg_limit_conf_t;


/* per key, in shared memory: 56 bytes */
typedef struct {
    uint64_t  last_ms;                          /* last refill */
    uint64_t  level[DSG_MAX_TIERS];             /* units */
    uint16_t  inflight[DSG_MAX_TIERS];          /* counted only if capped */
    uint16_t  queued;                           /* caller's: waiters of key */
    uint16_t  reserved_pad;
} dsg_limit_state_t;


/*
 * Fills *c.  reserve_pct[k] is class k's reserve in percent (NULL: no
 * reserves).  The reserves of all nclasses classes must sum to less than
 * 100, so that the lowest class keeps a non-zero share; the last class's
 * reserve has no effect but is counted.  Returns DSG_OK, DSG_EINVAL
 * (nclasses not in 1..DSG_MAX_CLASSES, n > 0 with period_ms == 0, n, burst,
 * period_ms or inflight above the DSG_MAX_* limits), DSG_ERESERVE,
 * DSG_ETIERS, or DSG_ECAP (inflight > 0 and inflight * share_t / 100 == 0
 * for some tier).  With n == 0, period_ms and burst are ignored.
 */
int dsg_limit_conf_init(dsg_limit_conf_t *c, uint64_t n, uint64_t period_ms,
    uint64_t burst, uint32_t inflight, const uint32_t *reserve_pct,
    uint32_t nclasses);

/* tier of class cls; the lowest tier for cls >= nclasses */
uint32_t dsg_limit_class_tier(const dsg_limit_conf_t *c, uint32_t cls);

/* in-flight cap that applies to class cls (its own tier's), 0: no cap */
uint32_t dsg_limit_inflight_cap(const dsg_limit_conf_t *c, uint32_t cls);

/* a new key: full buckets, nothing in flight, nothing queued */
void dsg_limit_state_init(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint64_t now_ms);

/*
 * Refills the buckets up to now_ms, then tells whether a class cls request
 * is admissible, without charging anything:
 *
 *   DSG_OK        admissible, *wait_ms = 0;
 *   DSG_RATE      some tier t <= tier(cls) lacks a token, *wait_ms = the
 *                 exact number of ms (rounded up) after now_ms when every
 *                 such tier has one, if nothing else is charged meanwhile;
 *                 the rate is checked first;
 *   DSG_INFLIGHT  tokens are there but some tier's in-flight cap is reached,
 *                 *wait_ms = 0: wait for a release;
 *   DSG_EINVAL    cls >= nclasses.
 *
 * If now_ms < s->last_ms (a worker with an older cached clock), nothing is
 * refilled, last_ms is kept and *wait_ms includes last_ms - now_ms.
 * wait_ms may be NULL.
 */
int dsg_limit_check(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint32_t cls, uint64_t now_ms, uint64_t *wait_ms);

/*
 * Takes one request's tokens in every tier t <= tier(cls) and, if capped,
 * one in-flight slot in each.  Only after a DSG_OK check under the same
 * lock; saturates (never wraps) if misused.  No-op for cls >= nclasses.
 */
void dsg_limit_charge(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint32_t cls);

/*
 * Undoes a charge (a request admitted by this zone but rejected by
 * another): the tokens go back, clamped to capacity, and the in-flight
 * slots too.  A charge immediately followed by a refund leaves the state
 * exactly as it was.
 */
void dsg_limit_refund(const dsg_limit_conf_t *c, dsg_limit_state_t *s,
    uint32_t cls);

/*
 * What dsg_limit_charge() takes for class cls, as a record the caller
 * keeps with the request: the number of tiers charged (bits 0..7) and
 * whether their in-flight counts were raised (DSG_RECORD_INFLIGHT).  0:
 * nothing (cls >= nclasses).  The record, not the configuration, says what
 * to give back: a reload may change the classes, reserves or in-flight cap
 * while the request runs, and the release must undo exactly what was done.
 */
#define DSG_RECORD_INFLIGHT  0x100

uint32_t dsg_limit_record(const dsg_limit_conf_t *c, uint32_t cls);

/*
 * The request finished: the in-flight slots its record says were taken go
 * back, never below 0, whatever the configuration is now
 */
void dsg_limit_release(dsg_limit_state_t *s, uint32_t record);

/* nothing in flight and nothing queued: the key may be evicted */
int dsg_limit_idle(const dsg_limit_conf_t *c, const dsg_limit_state_t *s);

/*
 * Idle and every bucket would be full at now_ms: evicting the key loses no
 * information at all (a new key starts full).  Does not modify *s.
 */
int dsg_limit_full(const dsg_limit_conf_t *c, const dsg_limit_state_t *s,
    uint64_t now_ms);

/*
 * For x-ratelimit-remaining-requests: the requests class cls could make
 * at now_ms (whole tokens of its tightest tier), and in *reset_ms (may be
 * NULL) the ms until every one of its tiers is full again.  Does not
 * modify *s.  0 without a rate.
 */
uint64_t dsg_limit_remaining(const dsg_limit_conf_t *c,
    const dsg_limit_state_t *s, uint32_t cls, uint64_t now_ms,
    uint64_t *reset_ms);

/* Retry-After in seconds: ceil(wait_ms / 1000), at least 1 */
uint32_t dsg_retry_after_s(uint64_t wait_ms);


#endif /* DSG_BUCKET_H */
