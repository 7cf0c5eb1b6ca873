/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_tokens, the token budgets: the usage reader, the
 * prompt estimator, the SSE event counter and the nested token buckets.
 *
 * The first byte chooses a mode:
 *
 *  - text (first byte % 4 is 0 or 1): the next two bytes choose two split
 *    points (as fractions of the text, 256ths), the fourth a ratio
 *    (byte * 10^5 ppm), the rest is the text, any bytes:
 *      . dsg_tokens_usage(): no crash; on 0 both values are below
 *        DSG_TOKENS_USAGE_MAX; deterministic; -1 when the text has no
 *        '"' at all; X "\n" U, where U is an SSE usage chunk, reads U's
 *        7 and 9 whatever X is (the last real "usage" key wins, and a
 *        quote's escaping is local: X cannot hide U's keys);
 *      . dsg_tokens_scan(): the text scanned in 3 pieces gives exactly
 *        the struct of the whole; without a backslash the counts are the
 *        ASCII bytes and the UTF-8 lead bytes; dsg_tokens_estimate() is
 *        the documented formula (128-bit reference), 0 iff nothing was
 *        counted, ratio 0 is ratio 1, monotonic in the ratio;
 *      . dsg_tokens_sse(): the events of the 3 pieces add up to the
 *        events of the whole, with the same final state; at most one a
 *        line;
 *  - bucket (2): a limit configuration filled by hand (dsg_bucket.c is
 *    not linked here: 1..8 classes, up to 4 tiers of decreasing shares,
 *    or a deliberately inconsistent one), dsg_tokens_conf_init() with any
 *    n, period and burst (its exact return code and derived values), then
 *    a program of checks, charges, settlements, remaining/reset/full
 *    queries at times that mostly advance, compared after every step with
 *    a 128-bit shadow model: every level within [-capacity_t,
 *    capacity_t], exact refill, exact wait_ms (admitted at now + wait,
 *    not at now + wait - 1), DSG_TOOBIG iff tokens * unit is above the
 *    capacity of a tier <= the class's, a charge after DSG_OK leaves
 *    every charged level >= 0, charge + settle(+tokens) at the same now
 *    is the identity, remaining <= burst, queries do not modify the state;
 *  - arithmetic (3): dsg_tokens_estimate() on arbitrary counts against
 *    the 128-bit formula, and dsg_tokens_correct() against its documented
 *    EWMA (exact when estimated * 10^6 fits in 64 bits, within 1 when
 *    it is scaled down, in range always; see the known bug there).
 *
 * Only dsg_tokens.c is linked (build.sh builds fuzz_<name>.c with
 * dsg_<name>.c alone).
 */


#include <string.h>

#include "dsg_tokens.h"
#include "fuzz.h"


typedef unsigned __int128  u128;
typedef __int128           s128;


#define U64_MAX    ((u128) UINT64_MAX)
#define PPM        1000000ULL


static const char  usage_tail[] =
    "data: {\"choices\":[],\"usage\":"
    "{\"prompt_tokens\":7,\"completion_tokens\":9}}";


/* the estimate's formula, in 128 bits: the reference */

static uint64_t
ref_estimate(uint64_t ascii, uint64_t nonascii, uint32_t ratio)
{
    u128  a, b, w, t;

    if (ascii == 0 && nonascii == 0) {
        return 0;
    }

    if (ratio == 0) {
        ratio = DSG_TOKENS_RATIO_ONE;
    }

    a = (u128) ascii * DSG_TOKENS_W_ASCII_PPM;
    b = (u128) nonascii * DSG_TOKENS_W_NONASCII_PPM;
    a = (a > U64_MAX) ? U64_MAX : a;
    b = (b > U64_MAX) ? U64_MAX : b;
    w = a + b;
    w = (w > U64_MAX) ? U64_MAX : w;

    t = (w * ratio + PPM * PPM - 1) / (PPM * PPM);

    FUZZ_ASSERT(t <= U64_MAX);

    return t ? (uint64_t) t : 1;
}


static void
check_estimate(uint64_t ascii, uint64_t nonascii, uint32_t r)
{
    size_t             k;
    uint64_t           e, prev;
    dsg_tokens_scan_t  sc;

    static const uint32_t  ratios[] = {
        1, 999, DSG_TOKENS_RATIO_MIN, 333333, 999999, DSG_TOKENS_RATIO_ONE,
        1000001, 1234567, DSG_TOKENS_RATIO_MAX, UINT32_MAX
    };

    memset(&sc, 0, sizeof(sc));
    sc.ascii = ascii;
    sc.nonascii = nonascii;

    e = dsg_tokens_estimate(&sc, r);
    FUZZ_ASSERT(e == ref_estimate(ascii, nonascii, r));
    FUZZ_ASSERT((e == 0) == (ascii == 0 && nonascii == 0));

    FUZZ_ASSERT(dsg_tokens_estimate(&sc, 0)
                == dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE));

    prev = 0;

    for (k = 0; k < sizeof(ratios) / sizeof(ratios[0]); k++) {
        e = dsg_tokens_estimate(&sc, ratios[k]);
        FUZZ_ASSERT(e >= prev);
        FUZZ_ASSERT(e == ref_estimate(ascii, nonascii, ratios[k]));

        if ((r ? r : DSG_TOKENS_RATIO_ONE) >= ratios[k]) {
            FUZZ_ASSERT(dsg_tokens_estimate(&sc, r) >= e);

        } else {
            FUZZ_ASSERT(dsg_tokens_estimate(&sc, r) <= e);
        }

        prev = e;
    }
}


/* the text mode */

static void
scan_eq(const dsg_tokens_scan_t *a, const dsg_tokens_scan_t *b)
{
    FUZZ_ASSERT(a->ascii == b->ascii);
    FUZZ_ASSERT(a->nonascii == b->nonascii);
    FUZZ_ASSERT(a->state == b->state);
    FUZZ_ASSERT(a->code == b->code);
    FUZZ_ASSERT(a->high == b->high);
}


static void
text_usage(const uint8_t *p, size_t len)
{
    int       rc, rc2;
    size_t    n;
    uint8_t  *buf;
    uint64_t  pr, co, pr2, co2;

    pr = co = pr2 = co2 = 0xdead;

    rc = dsg_tokens_usage(p, len, &pr, &co);
    FUZZ_ASSERT(rc == 0 || rc == -1);

    rc2 = dsg_tokens_usage(p, len, &pr2, &co2);
    FUZZ_ASSERT(rc2 == rc);

    if (rc == 0) {
        FUZZ_ASSERT(pr < DSG_TOKENS_USAGE_MAX && co < DSG_TOKENS_USAGE_MAX);
        FUZZ_ASSERT(pr == pr2 && co == co2);

    } else {
        /* a failure leaves the outputs alone */
        FUZZ_ASSERT(pr == 0xdead && co == 0xdead);
        FUZZ_ASSERT(pr2 == 0xdead && co2 == 0xdead);
    }

    if (memchr(p, '"', len) == NULL) {
        FUZZ_ASSERT(rc == -1);
    }

    /* X "\n" U: U's usage, whatever X is; an exact block for ASan */

    n = len + 1 + sizeof(usage_tail) - 1;
    buf = malloc(n);
    FUZZ_ASSERT(buf != NULL);

    if (len > 0) {
        memcpy(buf, p, len);
    }

    buf[len] = '\n';
    memcpy(buf + len + 1, usage_tail, sizeof(usage_tail) - 1);

    pr = co = 0;
    FUZZ_ASSERT(dsg_tokens_usage(buf, n, &pr, &co) == 0);
    FUZZ_ASSERT(pr == 7 && co == 9);

    /* U's usage object cut before its '}': -1, not an earlier key */

    FUZZ_ASSERT(dsg_tokens_usage(buf, n - 2, &pr, &co) == -1);

    free(buf);
}


static void
text_scan(const uint8_t *p, size_t len, size_t a, size_t b, uint32_t r)
{
    size_t             i;
    uint64_t           ascii, lead;
    dsg_tokens_scan_t  whole, parts;

    memset(&whole, 0, sizeof(whole));
    memset(&parts, 0, sizeof(parts));

    dsg_tokens_scan(p, len, &whole);

    dsg_tokens_scan(p, a, &parts);
    dsg_tokens_scan(p + a, b - a, &parts);
    dsg_tokens_scan(p + b, len - b, &parts);

    scan_eq(&whole, &parts);

    /* empty buffers change nothing */
    dsg_tokens_scan(p + len, 0, &parts);
    scan_eq(&whole, &parts);

    FUZZ_ASSERT(whole.ascii + whole.nonascii <= len);
    FUZZ_ASSERT(whole.state <= 5);

    if (memchr(p, '\\', len) == NULL) {
        ascii = 0;
        lead = 0;

        for (i = 0; i < len; i++) {
            if (p[i] < 0x80) {
                ascii++;

            } else if ((p[i] & 0xc0) != 0x80) {
                lead++;
            }
        }

        FUZZ_ASSERT(whole.ascii == ascii && whole.nonascii == lead);
        FUZZ_ASSERT(whole.state == 0 && whole.high == 0);
    }

    check_estimate(whole.ascii, whole.nonascii, r);

    if (len > 0 && (whole.ascii > 0 || whole.nonascii > 0)) {
        FUZZ_ASSERT(dsg_tokens_estimate(&whole, r) >= 1);
    }
}


static void
text_sse(const uint8_t *p, size_t len, size_t a, size_t b)
{
    size_t            i;
    uint64_t          n, m, lines;
    dsg_tokens_sse_t  whole, parts;

    memset(&whole, 0, sizeof(whole));
    memset(&parts, 0, sizeof(parts));

    n = dsg_tokens_sse(&whole, p, len);

    m = dsg_tokens_sse(&parts, p, a);
    m += dsg_tokens_sse(&parts, p + a, b - a);
    m += dsg_tokens_sse(&parts, p + b, len - b);

    FUZZ_ASSERT(n == m);
    FUZZ_ASSERT(whole.state == parts.state && whole.matched == parts.matched);

    /* byte by byte, for short texts */

    if (len <= 64) {
        memset(&parts, 0, sizeof(parts));
        m = 0;

        for (i = 0; i < len; i++) {
            m += dsg_tokens_sse(&parts, p + i, 1);
        }

        FUZZ_ASSERT(n == m);
    }

    /*
     * once a line at most, and a line needs the 16 bytes of
     * data:content":"x, lines a line end apart
     */

    lines = 1;

    for (i = 0; i < len; i++) {
        lines += (p[i] == '\n' || p[i] == '\r');
    }

    FUZZ_ASSERT(n <= lines);
    FUZZ_ASSERT(n * 17 <= (uint64_t) len + 1);
}


static void
text_mode(fz_t *f)
{
    size_t          len, a, b;
    uint32_t        r;
    uint64_t        pr, co;
    const uint8_t  *p;

    a = fz_u8(f);
    b = fz_u8(f);
    r = (uint32_t) fz_u8(f) * 100000;

    p = fz_rest(f, &len);

    a = len * a / 256;
    b = a + (len - a) * b / 256;

    text_usage(p, len);
    text_scan(p, len, a, b, r);
    text_sse(p, len, a, b);

    /* the pieces and tails alone: no crash, no overread */

    (void) dsg_tokens_usage(p + a, len - a, &pr, &co);
    (void) dsg_tokens_usage(p + b, len - b, &pr, &co);
    (void) dsg_tokens_usage(p, a, &pr, &co);
}


/* the arithmetic mode */

static void
arith_mode(fz_t *f)
{
    uint32_t  r, old, v;
    uint64_t  ascii, nonascii, est, act, o, sample, want, e, rem;
    u128      q;

    ascii = fz_pick(f, UINT64_MAX / DSG_TOKENS_W_ASCII_PPM);
    nonascii = fz_pick(f, UINT64_MAX / DSG_TOKENS_W_NONASCII_PPM);
    r = (uint32_t) fz_pick(f, DSG_TOKENS_RATIO_MAX);

    check_estimate(ascii, nonascii, r);

    while (!fz_empty(f)) {
        old = (uint32_t) fz_pick(f, DSG_TOKENS_RATIO_ONE);
        est = fz_pick(f, UINT64_MAX / PPM);
        act = fz_pick(f, est);

        v = old;
        dsg_tokens_correct(&v, est, act);

        if (est == 0) {
            FUZZ_ASSERT(v == old);
            continue;
        }

        FUZZ_ASSERT(v >= DSG_TOKENS_RATIO_MIN && v <= DSG_TOKENS_RATIO_MAX);

        o = old ? old : DSG_TOKENS_RATIO_ONE;

        /*
         * where dsg_tokens_correct() computes the sample exactly: it
         * halves estimated and the remainder while 2 * estimated * 10^6
         * does not fit (then the sample is within 1 of the exact one),
         * and rounds with rem * 10^6 + estimated / 2 in 64 bits
         */

        e = est;
        rem = act % est;

        while (e > UINT64_MAX / PPM / 2) {
            e >>= 1;
            rem >>= 1;
        }

        /* the rounding term always fits (t/fuzz/regress/tokens/) */
        FUZZ_ASSERT(act / est >= DSG_TOKENS_RATIO_MAX / PPM
                    || (u128) rem * PPM + e / 2 <= U64_MAX);

        q = ((u128) act * PPM + est / 2) / est;
        sample = (act / est >= DSG_TOKENS_RATIO_MAX / PPM)
                 ? DSG_TOKENS_RATIO_MAX : (uint64_t) q;

        want = (sample >= o) ? o + (sample - o + 7) / 8
                             : o - (o - sample + 7) / 8;
        want = (want < DSG_TOKENS_RATIO_MIN) ? DSG_TOKENS_RATIO_MIN
               : (want > DSG_TOKENS_RATIO_MAX) ? DSG_TOKENS_RATIO_MAX : want;

        if (e != est) {
            FUZZ_ASSERT(v + 1 >= want && v <= want + 1);
            continue;
        }

        FUZZ_ASSERT(v == want);

        /* a steady sample in range is kept exactly */
        if (sample == o && o >= DSG_TOKENS_RATIO_MIN
            && o <= DSG_TOKENS_RATIO_MAX)
        {
            FUZZ_ASSERT(v == o);
        }
    }
}


/* the bucket mode: the shadow model, levels in 128 bits */

typedef struct {
    uint64_t  last_ms;
    s128      level[DSG_MAX_TIERS];
} model_t;


typedef struct {
    uint32_t  record;
    uint64_t  tokens;
} resv_t;


static void
model_refill(const dsg_tokens_conf_t *c, model_t *m, uint64_t now)
{
    s128      l;
    uint32_t  t;
    uint64_t  elapsed;

    if (now <= m->last_ms) {
        return;
    }

    elapsed = now - m->last_ms;
    m->last_ms = now;

    for (t = 0; t < c->ntiers; t++) {
        l = m->level[t] + (s128) elapsed * (s128) c->gain[t];
        m->level[t] = (l > c->capacity[t]) ? c->capacity[t] : l;
    }
}


static void
model_take(const dsg_tokens_conf_t *c, model_t *m, uint32_t t,
    uint64_t tokens)
{
    s128  l;

    if (m->level[t] <= -(s128) c->capacity[t]) {
        return;
    }

    l = m->level[t] - (s128) tokens * (s128) c->unit;
    m->level[t] = (l < -(s128) c->capacity[t]) ? -(s128) c->capacity[t] : l;
}


static void
model_give(const dsg_tokens_conf_t *c, model_t *m, uint32_t t,
    uint64_t tokens)
{
    s128  l;

    l = m->level[t] + (s128) tokens * (s128) c->unit;
    m->level[t] = (l > c->capacity[t]) ? c->capacity[t] : l;
}


static void
model_charge(const dsg_tokens_conf_t *c, model_t *m, uint32_t record,
    uint64_t tokens)
{
    uint32_t  t;

    for (t = 0; t < record && t < c->ntiers; t++) {
        model_take(c, m, t, tokens);
    }
}


static void
model_settle(const dsg_tokens_conf_t *c, model_t *m, uint32_t record,
    int64_t delta, uint64_t now)
{
    s128      d;
    uint32_t  t;
    uint64_t  tokens;

    model_refill(c, m, now);

    if (delta == 0) {
        return;
    }

    d = delta;
    tokens = (uint64_t) (d > 0 ? d : -d);

    for (t = 0; t < record && t < c->ntiers; t++) {
        if (delta > 0) {
            model_give(c, m, t, tokens);

        } else {
            model_take(c, m, t, tokens);
        }
    }
}


static u128
ceil_div(u128 a, u128 b)
{
    return (a + b - 1) / b;
}


static int
model_check(const dsg_tokens_conf_t *c, model_t *m, uint32_t cls,
    uint64_t tokens, uint64_t now, uint64_t *wait)
{
    s128      need;
    u128      w, best;
    uint32_t  t, tier;

    *wait = 0;

    if (cls >= c->nclasses) {
        return DSG_EINVAL;
    }

    model_refill(c, m, now);

    if (tokens == 0) {
        return DSG_OK;
    }

    tier = c->class_tier[cls];
    need = (s128) tokens * (s128) c->unit;

    for (t = 0; t <= tier; t++) {
        if (need > c->capacity[t]) {
            return DSG_TOOBIG;
        }
    }

    best = 0;

    for (t = 0; t <= tier; t++) {
        if (m->level[t] >= need) {
            continue;
        }

        w = ceil_div((u128) (need - m->level[t]), c->gain[t]);
        best = (w > best) ? w : best;
    }

    if (best == 0) {
        return DSG_OK;
    }

    if (now < m->last_ms) {
        best += m->last_ms - now;
    }

    *wait = (best > U64_MAX) ? UINT64_MAX : (uint64_t) best;

    return DSG_RATE;
}


static uint64_t
model_remaining(const dsg_tokens_conf_t *c, const model_t *m, uint32_t cls,
    uint64_t now)
{
    s128      v;
    model_t   copy;
    uint32_t  t;
    uint64_t  min;

    if (cls >= c->nclasses) {
        return 0;
    }

    copy = *m;
    model_refill(c, &copy, now);

    min = UINT64_MAX;

    for (t = 0; t <= c->class_tier[cls]; t++) {
        v = (copy.level[t] > 0) ? copy.level[t] / c->unit : 0;
        min = ((u128) v < min) ? (uint64_t) v : min;
    }

    return min;
}


static uint64_t
model_reset(const dsg_tokens_conf_t *c, const model_t *m, uint32_t cls,
    uint64_t now)
{
    u128      w, best;
    model_t   copy;
    uint32_t  t;

    if (cls >= c->nclasses) {
        return 0;
    }

    copy = *m;
    model_refill(c, &copy, now);

    best = 0;

    for (t = 0; t <= c->class_tier[cls]; t++) {
        if (copy.level[t] < c->capacity[t]) {
            w = ceil_div((u128) (c->capacity[t] - copy.level[t]), c->gain[t]);
            best = (w > best) ? w : best;
        }
    }

    if (best > 0 && now < copy.last_ms) {
        best += copy.last_ms - now;
    }

    return (best > U64_MAX) ? UINT64_MAX : (uint64_t) best;
}


static int
model_full(const dsg_tokens_conf_t *c, const model_t *m, uint64_t now)
{
    uint32_t  t;
    uint64_t  elapsed;

    elapsed = (now > m->last_ms) ? now - m->last_ms : 0;

    for (t = 0; t < c->ntiers; t++) {
        if (m->level[t] + (s128) elapsed * (s128) c->gain[t]
            < c->capacity[t])
        {
            return 0;
        }
    }

    return 1;
}


static void
check_state(const dsg_tokens_conf_t *c, const model_t *m,
    const dsg_tokens_state_t *s)
{
    uint32_t  t;

    FUZZ_ASSERT(s->last_ms == m->last_ms);

    for (t = 0; t < DSG_MAX_TIERS; t++) {
        FUZZ_ASSERT(s->level[t] == m->level[t]);

        if (t < c->ntiers) {
            FUZZ_ASSERT(s->level[t] <= c->capacity[t]);
            FUZZ_ASSERT(s->level[t] >= -c->capacity[t]);

        } else {
            FUZZ_ASSERT(s->level[t] == 0);
        }
    }
}


/* DSG_RATE with wait w at now: exact, on copies of the state */

static void
check_wait(const dsg_tokens_conf_t *c, const dsg_tokens_state_t *before,
    uint32_t cls, uint64_t tokens, uint64_t now, uint64_t w)
{
    int                 rc;
    uint64_t            w2;
    dsg_tokens_state_t  s;

    FUZZ_ASSERT(w > 0);

    if (w == UINT64_MAX || (u128) now + w > U64_MAX) {
        return;                      /* saturated: not exact by design */
    }

    s = *before;
    rc = dsg_tokens_check(c, &s, cls, tokens, now + w, &w2);
    FUZZ_ASSERT(rc == DSG_OK && w2 == 0);

    s = *before;
    rc = dsg_tokens_check(c, &s, cls, tokens, now + w - 1, &w2);
    FUZZ_ASSERT(rc == DSG_RATE);
    FUZZ_ASSERT(w2 == 1 || now + w - 1 < before->last_ms);
}


/*
 * a limit configuration as dsg_limit_conf_init() would fill it, by hand:
 * share[0] == 100, decreasing, classes in non-decreasing tiers; returns
 * whether it is consistent (a corruption byte may spoil it)
 */

static int
fill_limit(fz_t *f, dsg_limit_conf_t *lc)
{
    uint8_t   op;
    uint32_t  k, sum, share, reserve;

    memset(lc, 0, sizeof(*lc));

    lc->nclasses = 1 + fz_u8(f) % DSG_MAX_CLASSES;
    lc->ntiers = 1;
    lc->share[0] = 100;
    sum = 0;

    for (k = 0; k < lc->nclasses; k++) {
        share = 100 - sum;

        if (share != lc->share[lc->ntiers - 1]) {
            lc->share[lc->ntiers++] = share;
        }

        lc->class_tier[k] = (uint8_t) (lc->ntiers - 1);

        op = fz_u8(f);
        reserve = (op < 128) ? 0 : op % 40;

        if (lc->ntiers == DSG_MAX_TIERS || sum + reserve >= 100) {
            reserve = 0;
        }

        sum += reserve;
    }

    /* sometimes an inconsistent configuration: refused */

    op = fz_u8(f);

    switch (op < 240 ? 0 : op % 7) {
    case 0:
        return 1;
    case 1:
        lc->ntiers = 0;
        break;
    case 2:
        lc->ntiers = DSG_MAX_TIERS + 1;
        break;
    case 3:
        lc->nclasses = 0;
        break;
    case 4:
        lc->nclasses = DSG_MAX_CLASSES + 1;
        break;
    case 5:
        lc->share[lc->ntiers - 1] = (op & 8) ? 0 : 101;
        break;
    default:
        lc->class_tier[lc->nclasses - 1] = (uint8_t) lc->ntiers;
        break;
    }

    return 0;
}


static void
bucket_mode(fz_t *f)
{
    int                 rc, mrc, ok;
    model_t             m;
    uint8_t             op;
    uint32_t            t, cls, tier, record, nresv, k;
    int64_t             delta;
    uint64_t            n, period, burst, now, at, tokens, w, mw, dt, actual;
    uint64_t            v;
    unsigned            steps;
    resv_t              resv[16];
    dsg_limit_conf_t    lc;
    dsg_tokens_conf_t   c;
    dsg_tokens_state_t  s, before;

    ok = fill_limit(f, &lc);

    n = fz_pick(f, DSG_MAX_TOKENS);
    period = fz_pick(f, DSG_MAX_PERIOD_MS);
    burst = fz_pick(f, DSG_MAX_TOKENS);

    ok = ok && n >= 1 && n <= DSG_MAX_TOKENS
         && period >= 1 && period <= DSG_MAX_PERIOD_MS
         && burst >= 1 && burst <= DSG_MAX_TOKENS;

    memset(&c, 0x5a, sizeof(c));
    rc = dsg_tokens_conf_init(&c, n, period, burst, &lc);
    FUZZ_ASSERT(rc == (ok ? DSG_OK : DSG_EINVAL));

    FUZZ_ASSERT(dsg_tokens_conf_init(NULL, n, period, burst, &lc)
                == DSG_EINVAL);
    FUZZ_ASSERT(dsg_tokens_conf_init(&c, n, period, burst, NULL)
                == DSG_EINVAL);

    if (rc != DSG_OK) {
        return;
    }

    /* the derived values */

    FUZZ_ASSERT(c.n == n && c.period_ms == period && c.burst == burst);
    FUZZ_ASSERT(c.ntiers == lc.ntiers && c.nclasses == lc.nclasses);
    FUZZ_ASSERT(c.unit == period * 100);

    for (t = 0; t < DSG_MAX_TIERS; t++) {
        FUZZ_ASSERT(c.share[t] == lc.share[t]);

        if (t < c.ntiers) {
            FUZZ_ASSERT(c.gain[t] == (u128) n * c.share[t]);
            FUZZ_ASSERT((u128) c.capacity[t]
                        == (u128) burst * period * c.share[t]);
            FUZZ_ASSERT(c.gain[t] > 0 && c.capacity[t] > 0);
        }
    }

    for (k = 0; k < DSG_MAX_CLASSES; k++) {
        FUZZ_ASSERT(c.class_tier[k] == lc.class_tier[k]);
        FUZZ_ASSERT(dsg_tokens_record(&c, k)
                    == (k < c.nclasses ? c.class_tier[k] + 1u : 0));
    }

    now = fz_pick(f, UINT64_MAX);

    dsg_tokens_state_init(&c, &s, now);

    memset(&m, 0, sizeof(m));
    m.last_ms = now;

    for (t = 0; t < c.ntiers; t++) {
        m.level[t] = c.capacity[t];
    }

    check_state(&c, &m, &s);
    FUZZ_ASSERT(dsg_tokens_full(&c, &s, now));

    nresv = 0;

    for (steps = 0; steps < 256 && !fz_empty(f); steps++) {
        op = fz_u8(f);
        cls = (op >> 4) % (c.nclasses + 1);    /* nclasses: invalid */

        switch (op & 15) {

        case 0: case 1: case 2: case 3:        /* time passes */
            dt = fz_pick(f, c.period_ms);
            now = ((u128) now + dt > U64_MAX) ? UINT64_MAX : now + dt;
            break;

        case 4:                                /* an older clock */
            dt = fz_pick(f, 1000);
            now = (dt > now) ? 0 : now - dt;
            break;

        case 5: case 6: case 7: case 8:        /* a reservation */
            at = now;
            if (op & 1) {
                dt = fz_u8(f) % 16;            /* another worker's clock */
                at = (dt > at) ? 0 : at - dt;
            }

            tier = (cls < c.nclasses) ? c.class_tier[cls] : 0;

            switch (fz_u8(f) & 3) {
            case 0:                            /* around a tier's capacity */
                tokens = (uint64_t) (c.capacity[tier] / c.unit);
                dt = fz_u8(f) % 5;
                tokens = (dt <= 2) ? tokens + dt
                                   : (tokens >= dt - 2 ? tokens - (dt - 2)
                                                       : 0);
                break;
            case 1:
                tokens = fz_pick(f, c.burst);
                break;
            case 2:
                tokens = fz_pick(f, UINT64_MAX);
                break;
            default:
                tokens = fz_u8(f);
                break;
            }

            before = s;
            rc = dsg_tokens_check(&c, &s, cls, tokens, at, &w);
            mrc = model_check(&c, &m, cls, tokens, at, &mw);
            FUZZ_ASSERT(rc == mrc);
            FUZZ_ASSERT(w == mw);
            FUZZ_ASSERT(s.last_ms >= before.last_ms);
            check_state(&c, &m, &s);

            FUZZ_ASSERT(dsg_tokens_check(&c, &before, cls, tokens, at, NULL)
                        == rc);

            if (rc == DSG_RATE) {
                check_wait(&c, &s, cls, tokens, at, w);

            } else {
                FUZZ_ASSERT(w == 0);
            }

            if (rc != DSG_OK) {
                break;
            }

            record = dsg_tokens_record(&c, cls);
            FUZZ_ASSERT(record == c.class_tier[cls] + 1u);

            before = s;
            dsg_tokens_charge(&c, &s, record, tokens);
            model_charge(&c, &m, record, tokens);
            check_state(&c, &m, &s);

            /* tokens == 0 is always admitted, even in debt: a no-op */

            for (t = 0; t < record; t++) {
                FUZZ_ASSERT(tokens == 0 ? s.level[t] == before.level[t]
                                        : s.level[t] >= 0);
            }

            if (op & 2) {
                /* rejected by another zone: settled at once */
                dsg_tokens_settle(&c, &s, record, (int64_t) tokens, at);
                model_settle(&c, &m, record, (int64_t) tokens, at);
                FUZZ_ASSERT(memcmp(&s, &before, sizeof(s)) == 0);
                check_state(&c, &m, &s);

            } else if (nresv < 16) {
                resv[nresv].record = record;
                resv[nresv].tokens = tokens;
                nresv++;
            }

            break;

        case 9: case 10:                       /* an answer settles */
            if (nresv == 0) {
                break;
            }

            k = cls % nresv;

            switch (fz_u8(f) & 3) {
            case 0:
                actual = resv[k].tokens;
                break;
            case 1:
                actual = fz_pick(f, resv[k].tokens);
                break;
            case 2:                            /* a runaway answer */
                actual = fz_pick(f, (uint64_t) INT64_MAX);
                break;
            default:
                actual = fz_u8(f);
                break;
            }

            if (actual > (uint64_t) INT64_MAX) {
                actual = INT64_MAX;
            }

            delta = (int64_t) resv[k].tokens - (int64_t) actual;

            dsg_tokens_settle(&c, &s, resv[k].record, delta, now);
            model_settle(&c, &m, resv[k].record, delta, now);
            check_state(&c, &m, &s);

            resv[k] = resv[--nresv];
            break;

        case 11:                               /* misuse: blind charge */
            record = fz_u8(f) % (DSG_MAX_TIERS + 2);
            tokens = fz_pick(f, c.burst);
            dsg_tokens_charge(&c, &s, record, tokens);
            model_charge(&c, &m, record, tokens);
            check_state(&c, &m, &s);
            break;

        case 12:                               /* misuse: any settlement */
            record = fz_u8(f) % (DSG_MAX_TIERS + 2);
            v = fz_pick(f, (uint64_t) INT64_MAX);
            delta = (fz_u8(f) & 1) ? (int64_t) v : -(int64_t) (v >> 1) - 1;
            dsg_tokens_settle(&c, &s, record, delta, now);
            model_settle(&c, &m, record, delta, now);
            check_state(&c, &m, &s);
            break;

        default:                               /* the headers, eviction */
            at = now;
            op = fz_u8(f);

            if (op & 1) {
                dt = fz_pick(f, c.period_ms);
                at = ((u128) now + dt > U64_MAX) ? UINT64_MAX : now + dt;

            } else if (op & 2) {
                dt = op >> 2;
                at = (dt > now) ? 0 : now - dt;
            }

            before = s;

            v = dsg_tokens_remaining(&c, &s, cls, at);
            FUZZ_ASSERT(v == model_remaining(&c, &m, cls, at));
            FUZZ_ASSERT(v <= c.burst);

            w = dsg_tokens_reset_ms(&c, &s, cls, at);
            FUZZ_ASSERT(w == model_reset(&c, &m, cls, at));

            rc = dsg_tokens_full(&c, &s, at);
            FUZZ_ASSERT(rc == model_full(&c, &m, at));

            FUZZ_ASSERT(memcmp(&s, &before, sizeof(s)) == 0);

            /* full: every class could reserve its whole bucket */
            if (rc && cls < c.nclasses) {
                FUZZ_ASSERT(w == 0);
                FUZZ_ASSERT(v == (uint64_t) c.capacity[c.class_tier[cls]]
                                 / c.unit);
            }

            break;
        }
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_t  f;

    f.p = data;
    f.n = size;

    switch (fz_u8(&f) % 4) {
    case 0:
    case 1:
        text_mode(&f);
        break;
    case 2:
        bucket_mode(&f);
        break;
    default:
        arith_mode(&f);
        break;
    }

    return 0;
}
