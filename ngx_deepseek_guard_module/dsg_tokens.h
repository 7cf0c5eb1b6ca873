/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Token budgets core: LLM tokens per key in nested priority tiers, in exact
 * integer fixed point; the prompt estimator; the upstream's usage reader.
 *
 * Pure C: no nginx headers, no global state, no clock (every time is an
 * argument, in ms), no allocation, no logging.  dsg_tokens_state_t lives in
 * shared memory and holds no pointers; the caller serializes access to it
 * (the zone's shared memory mutex).
 *
 * Model.  A zone grants n tokens per period_ms to each key, and a key may
 * hold at most burst tokens.  A request reserves its expected tokens
 * (prompt estimate + expected output) at admission, all or nothing, and
 * settles when it ends: the difference between the reservation and what
 * the upstream reports it used is given back or taken.
 *
 * Tiers nest exactly as in dsg_bucket.h (the tiers and the class -> tier
 * map are the zone's, copied from its dsg_limit_conf_t): tier t has share_t
 * percent of the budget, share_0 == 100; a request of tier T needs its
 * tokens in every tier t <= T and is charged in every one of them.  Lower
 * classes drain only the smaller, inner buckets, so the reserve of the
 * classes above them (the difference between the shares) is never theirs:
 * with a 20% reserve for class 0, class 1 sees 80% of the burst and of the
 * rate, class 0 100%, and whatever class 1 spends, class 0 still has 20%.
 *
 * Units, per tier t:
 *
 *     unit       = period_ms * 100                  one token, any tier
 *     gain_t     = n * share_t                      units per ms
 *     capacity_t = burst * period_ms * share_t      burst * share_t / 100
 *                                                   tokens
 *
 * One token costs the same in every tier, so a reservation is compared
 * with every tier's level in the same units, and the refill is exact: tier
 * 0 gains n tokens in exactly period_ms (60000 tokens/m: 1000 tokens in
 * exactly 1000 ms).  With the DSG_MAX_* bounds every value fits in int64_t
 * (checked by dsg_tokens_conf_init() anyway), and so does every difference
 * of two levels in uint64_t.
 *
 * Debt.  A reservation is an estimate: the upstream may use more.  The
 * settlement takes the excess even if the level goes below 0, so a key
 * that overran waits until the debt is paid back; but the level never goes
 * below -capacity_t: one bucket of debt at most, so even after a runaway
 * answer any admissible reservation waits at most 2 * burst / n periods.
 * A reservation larger than a tier's capacity can never be
 * admitted (DSG_TOOBIG): the caller rejects it at once instead of making
 * it wait forever.
 *
 * The estimator.  No tokenizer runs in nginx: the prompt is estimated from
 * the request body's bytes.  BPE vocabularies of English-centric models
 * average about 4 bytes of ASCII text per token (W_ASCII 0.25 token per
 * byte), while CJK and most other non-Latin scripts cost about one token
 * per code point (W_NONASCII 1.0 per code point, whatever its UTF-8
 * length: counting bytes would triple a Chinese prompt).  JSON escapes are
 * counted as the character they stand for ("\u4e2d" is one code point,
 * "\n" one ASCII byte).  The whole body is counted, JSON syntax and keys
 * included: the upstream's chat template adds tokens of its own too.  The
 * remaining error is learnt: each answer's usage.prompt_tokens corrects a
 * ratio (an EWMA in ppm, weight 1/8) the caller keeps per zone, so the
 * estimate converges to the upstream's own count for the traffic it sees.
 */


#ifndef DSG_TOKENS_H
#define DSG_TOKENS_H


#include <stddef.h>
#include <stdint.h>

#include "dsg_bucket.h"


#define DSG_TOOBIG              4   /* larger than a bucket: never admissible */

#define DSG_MAX_TOKENS          1000000000ULL     /* n and burst bound */

/* the estimator */
#define DSG_TOKENS_W_ASCII_PPM      250000        /* 4 ASCII bytes a token */
#define DSG_TOKENS_W_NONASCII_PPM   1000000       /* 1 token a code point */
#define DSG_TOKENS_RATIO_ONE        1000000       /* no correction */
#define DSG_TOKENS_RATIO_MIN        50000         /* 0.05 */
#define DSG_TOKENS_RATIO_MAX        20000000      /* 20 */

/* usage values at or above 2^53 are refused (not exact in a JSON double) */
#define DSG_TOKENS_USAGE_MAX        (1ULL << 53)


/* per zone, computed once by dsg_tokens_conf_init(); read-only afterwards */
typedef struct {
    uint64_t  n;                                /* tokens per period */
    uint64_t  period_ms;
    uint64_t  burst;                            /* bucket size, tokens */
    uint32_t  ntiers;
    uint32_t  nclasses;
    uint32_t  share[DSG_MAX_TIERS];             /* from the limit conf */
    uint8_t   class_tier[DSG_MAX_CLASSES];      /* from the limit conf */

    /* derived: one token is unit units in every tier */
    uint64_t  unit;                             /* period_ms * 100 */
    uint64_t  gain[DSG_MAX_TIERS];              /* units per ms */
    int64_t   capacity[DSG_MAX_TIERS];          /* units */
} dsg_tokens_conf_t;


/* per key, in shared memory: 40 bytes, no pointers */
typedef struct {
    uint64_t  last_ms;                          /* last refill */
    int64_t   level[DSG_MAX_TIERS];             /* units, < 0: debt */
} dsg_tokens_state_t;


/*
 * Fills *c: n in 1..DSG_MAX_TOKENS tokens per period_ms (1 ..
 * DSG_MAX_PERIOD_MS), buckets of burst (1..DSG_MAX_TOKENS) tokens; the
 * tiers and the class -> tier map are copied from lc, which
 * dsg_limit_conf_init() filled (its rate may be 0).  DSG_OK, or DSG_EINVAL
 * for a bound, an inconsistent lc, or a product that would not fit in
 * int64_t.
 */
int dsg_tokens_conf_init(dsg_tokens_conf_t *c, uint64_t n, uint64_t period_ms,
    uint64_t burst, const dsg_limit_conf_t *lc);

/* a new key: full buckets */
void dsg_tokens_state_init(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint64_t now_ms);

/*
 * Refills the buckets up to now_ms, then tells whether class cls may
 * reserve tokens, without charging anything:
 *
 *   DSG_OK        every tier t <= tier(cls) has the tokens (always for
 *                 tokens == 0), *wait_ms = 0;
 *   DSG_TOOBIG    tokens are more than some such tier's capacity: never
 *                 admissible, *wait_ms = 0;
 *   DSG_RATE      *wait_ms = the exact number of ms (rounded up) after
 *                 now_ms when every such tier has them, if nothing else
 *                 is charged or settled meanwhile;
 *   DSG_EINVAL    cls >= nclasses.
 *
 * If now_ms < s->last_ms (a worker with an older cached clock), nothing is
 * refilled, last_ms is kept and *wait_ms includes last_ms - now_ms.
 * wait_ms may be NULL.
 */
int dsg_tokens_check(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t cls, uint64_t tokens, uint64_t now_ms, uint64_t *wait_ms);

/*
 * What a charge of class cls takes, as a record the caller keeps with the
 * request: the number of tiers charged, tier(cls) + 1; 0 (nothing) for
 * cls >= nclasses.  The charge and the settlement use the record, not the
 * configuration of the day: a reload may change the classes while the
 * request runs.
 */
uint32_t dsg_tokens_record(const dsg_tokens_conf_t *c, uint32_t cls);

/*
 * Takes tokens in every tier t < record.  Only after a DSG_OK check under
 * the same lock; if misused, a level never goes below -capacity_t.
 */
void dsg_tokens_charge(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t record, uint64_t tokens);

/*
 * The settlement, after a refill to now_ms, in every tier t < record that
 * the configuration still has (t < ntiers): delta > 0 tokens are given
 * back, clamped to capacity_t; delta < 0 tokens are taken (the upstream
 * used more than was reserved), down to -capacity_t at most.  A charge
 * and a settlement of the same tokens at the same now_ms leave the state
 * exactly as it was.
 */
void dsg_tokens_settle(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t record, int64_t delta, uint64_t now_ms);

/*
 * For x-ratelimit-remaining-tokens: the tokens class cls could reserve at
 * now_ms, min over tiers t <= tier(cls) of max(0, level_t) / unit
 * (floor).  0 for cls >= nclasses.  Does not modify *s.
 */
uint64_t dsg_tokens_remaining(const dsg_tokens_conf_t *c,
    const dsg_tokens_state_t *s, uint32_t cls, uint64_t now_ms);

/*
 * For x-ratelimit-reset-tokens: the ms after now_ms (rounded up) when
 * every tier t <= tier(cls) is full again; 0 when they are, or for
 * cls >= nclasses.  A clock behind last_ms adds the difference.  Does not
 * modify *s.
 */
uint64_t dsg_tokens_reset_ms(const dsg_tokens_conf_t *c,
    const dsg_tokens_state_t *s, uint32_t cls, uint64_t now_ms);

/*
 * Every bucket would be full at now_ms: evicting the key loses no
 * information (a new key starts full).  Does not modify *s.
 */
int dsg_tokens_full(const dsg_tokens_conf_t *c, const dsg_tokens_state_t *s,
    uint64_t now_ms);


/*
 * The prompt estimator's counts over a request body (raw JSON bytes):
 * ascii bytes (< 0x80, a JSON escape counting as the one character it
 * stands for) and non-ASCII code points (UTF-8 lead bytes, and "\uXXXX"
 * escapes of 0x80 and above, a surrogate pair counting once).  The struct
 * must start zeroed: state, code and high carry an escape split across
 * two buffers.
 */
typedef struct {
    uint64_t  ascii;
    uint64_t  nonascii;
    uint32_t  state;          /* 0: text, 1: after '\', 2..5: \u + digits */
    uint32_t  code;           /* the \u digits so far */
    uint32_t  high;           /* the last character was a high surrogate */
} dsg_tokens_scan_t;

/* counts p[0 .. len) into *sc; consecutive buffers of one body add up */
void dsg_tokens_scan(const unsigned char *p, size_t len,
    dsg_tokens_scan_t *sc);

/*
 * The prompt estimate: ceil((ascii * W_ASCII_PPM + nonascii *
 * W_NONASCII_PPM) / 10^6 * ratio_ppm / 10^6), at least 1 if anything was
 * counted, exact in 64-bit integers (the weighted count saturates past
 * 1.8 * 10^13 tokens, far beyond any body).  ratio_ppm 0 is taken as
 * DSG_TOKENS_RATIO_ONE.
 */
uint64_t dsg_tokens_estimate(const dsg_tokens_scan_t *sc, uint32_t ratio_ppm);

/*
 * Learns from one answer: *ratio_ppm moves 1/8 of the way to
 * actual / estimated (in ppm; the step rounded up, so that a steady ratio
 * is reached exactly, not within a rounding error), then is clamped to
 * [DSG_TOKENS_RATIO_MIN, DSG_TOKENS_RATIO_MAX].  estimated is the
 * uncorrected estimate (ratio DSG_TOKENS_RATIO_ONE) of the same body;
 * estimated == 0 is ignored; *ratio_ppm == 0 is taken as
 * DSG_TOKENS_RATIO_ONE.
 */
void dsg_tokens_correct(uint32_t *ratio_ppm, uint64_t estimated,
    uint64_t actual);


/*
 * The upstream's usage, read from an answer: a whole JSON answer, or the
 * last bytes of one, or the last bytes of an SSE stream (the final chunk
 * "data: {...,"usage":{...}}").  Finds the last "usage" key whose value is
 * an object (the 7 bytes "usage" with both quotes unescaped, then optional
 * whitespace, ':', optional whitespace, '{') and reads its integer members
 * "prompt_tokens" and "completion_tokens"; other members are skipped,
 * nested objects and strings with escapes included.
 *
 * A quote is unescaped when an even number of backslashes precedes it:
 * that is a local property, so text inside JSON strings (an escaped
 * \"usage\":{ in a message) never matches, even when p starts in the
 * middle of a string (a tail cut anywhere).
 *
 * 0 when both were found; -1 otherwise: no such key (or only "usage":null),
 * an object truncated or malformed, a value not a non-negative integer
 * below DSG_TOKENS_USAGE_MAX.  Bounded by len, no allocation.
 */
int dsg_tokens_usage(const unsigned char *p, size_t len, uint64_t *prompt,
    uint64_t *completion);


/*
 * Counts the content events of an SSE stream as it passes, for a stream
 * whose usage never comes (cut, or not asked for): every "data:" line
 * with a non-empty "content" or "reasoning_content" string (a key ending
 * in content", optional whitespace, ':', optional whitespace, '"', then
 * not '"'), counted once a line.  An OpenAI-compatible stream carries
 * one token a content chunk; the role chunk ("content":""), the finish
 * chunk, the usage chunk, "[DONE]", comments and other fields do not
 * count, nor does text quoting content inside a string (its quotes are
 * escaped).  Returns the events found in p[0 .. len); lines may be split
 * across buffers anywhere.  The struct must start zeroed.
 */
typedef struct {
    uint32_t  state;
    uint32_t  matched;        /* bytes of "data:" or content" matched */
} dsg_tokens_sse_t;

uint64_t dsg_tokens_sse(dsg_tokens_sse_t *ev, const unsigned char *p,
    size_t len);


#endif /* DSG_TOKENS_H */
