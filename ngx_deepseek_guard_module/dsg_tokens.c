/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include <string.h>

#include "dsg_tokens.h"


/* the state lives in shared memory next to the key: keep it small */
typedef char  dsg_tokens_state_size_check_t
    [sizeof(dsg_tokens_state_t) == 40 ? 1 : -1];


/* dsg_tokens_scan() states */
#define DSG_SCAN_TEXT   0
#define DSG_SCAN_ESC    1
#define DSG_SCAN_U0     2                     /* "\u", no digit yet */
#define DSG_SCAN_DONE   6                     /* "\u" and 4 digits */

/* dsg_tokens_sse() states */
#define DSG_SSE_FIELD   0                     /* line start, "data:" prefix */
#define DSG_SSE_SEARCH  1                     /* a data line: content" */
#define DSG_SSE_COLON   2                     /* after content", ':' */
#define DSG_SSE_QUOTE   3                     /* after ':', '"' */
#define DSG_SSE_FIRST   4                     /* the string's first byte */
#define DSG_SSE_SKIP    5                     /* to the end of the line */

#define DSG_PPM         1000000ULL


static void dsg_tokens_refill(const dsg_tokens_conf_t *c,
    dsg_tokens_state_t *s, uint64_t now_ms);
static uint64_t dsg_tokens_units(const dsg_tokens_conf_t *c, uint64_t tokens,
    uint64_t bound);
static void dsg_tokens_take(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t t, uint64_t tokens);
static void dsg_tokens_give(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t t, uint64_t tokens);
static uint64_t dsg_tokens_room(const dsg_tokens_conf_t *c,
    const dsg_tokens_state_t *s, uint32_t t);
static uint64_t dsg_tokens_add_sat(uint64_t a, uint64_t b);
static uint64_t dsg_tokens_mul_sat(uint64_t a, uint64_t b);
static void dsg_tokens_code(dsg_tokens_scan_t *sc, uint32_t code);
static int dsg_tokens_hex(unsigned char ch);
static int dsg_tokens_quote(const unsigned char *p, size_t i);
static int dsg_tokens_ws(unsigned char ch);
static int dsg_tokens_object(const unsigned char *p, size_t len, size_t i,
    uint64_t *prompt, uint64_t *completion);
static size_t dsg_tokens_string(const unsigned char *p, size_t len, size_t i);
static size_t dsg_tokens_value(const unsigned char *p, size_t len, size_t i);
static size_t dsg_tokens_int(const unsigned char *p, size_t len, size_t i,
    uint64_t *v);


int
dsg_tokens_conf_init(dsg_tokens_conf_t *c, uint64_t n, uint64_t period_ms,
    uint64_t burst, const dsg_limit_conf_t *lc)
{
    uint32_t  t, k;
    uint64_t  cap;

    if (c == NULL || lc == NULL) {
        return DSG_EINVAL;
    }

    if (n == 0 || n > DSG_MAX_TOKENS
        || period_ms == 0 || period_ms > DSG_MAX_PERIOD_MS
        || burst == 0 || burst > DSG_MAX_TOKENS)
    {
        return DSG_EINVAL;
    }

    if (lc->ntiers == 0 || lc->ntiers > DSG_MAX_TIERS
        || lc->nclasses == 0 || lc->nclasses > DSG_MAX_CLASSES)
    {
        return DSG_EINVAL;
    }

    for (t = 0; t < lc->ntiers; t++) {
        if (lc->share[t] == 0 || lc->share[t] > 100) {
            return DSG_EINVAL;
        }
    }

    for (k = 0; k < lc->nclasses; k++) {
        if (lc->class_tier[k] >= lc->ntiers) {
            return DSG_EINVAL;
        }
    }

    *c = (dsg_tokens_conf_t) { 0 };

    c->n = n;
    c->period_ms = period_ms;
    c->burst = burst;
    c->ntiers = lc->ntiers;
    c->nclasses = lc->nclasses;

    memcpy(c->share, lc->share, sizeof(c->share));
    memcpy(c->class_tier, lc->class_tier, sizeof(c->class_tier));

    /* the bounds keep these in int64_t; checked anyway, each product */

    if (period_ms > INT64_MAX / 100) {
        return DSG_EINVAL;
    }

    c->unit = period_ms * 100;

    for (t = 0; t < c->ntiers; t++) {

        if (n > INT64_MAX / c->share[t]) {
            return DSG_EINVAL;
        }

        c->gain[t] = n * c->share[t];

        if (burst > INT64_MAX / period_ms
            || burst * period_ms > INT64_MAX / c->share[t])
        {
            return DSG_EINVAL;
        }

        cap = burst * period_ms * c->share[t];
        c->capacity[t] = (int64_t) cap;
    }

    return DSG_OK;
}


void
dsg_tokens_state_init(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint64_t now_ms)
{
    uint32_t  t;

    *s = (dsg_tokens_state_t) { 0 };

    s->last_ms = now_ms;

    for (t = 0; t < c->ntiers; t++) {
        s->level[t] = c->capacity[t];
    }
}


static uint64_t
dsg_tokens_add_sat(uint64_t a, uint64_t b)
{
    return (a > UINT64_MAX - b) ? UINT64_MAX : a + b;
}


static uint64_t
dsg_tokens_mul_sat(uint64_t a, uint64_t b)
{
    return (b != 0 && a > UINT64_MAX / b) ? UINT64_MAX : a * b;
}


/*
 * capacity_t - level_t as an unsigned number: level_t is in
 * [INT64_MIN, capacity_t] after a refill, so the difference always fits
 */

static uint64_t
dsg_tokens_room(const dsg_tokens_conf_t *c, const dsg_tokens_state_t *s,
    uint32_t t)
{
    if (s->level[t] >= c->capacity[t]) {
        return 0;
    }

    return (uint64_t) c->capacity[t] - (uint64_t) s->level[t];
}


static void
dsg_tokens_refill(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
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

    for (t = 0; t < c->ntiers; t++) {

        if (s->level[t] >= c->capacity[t]) {
            /* a reload may have shrunk the bucket */
            s->level[t] = c->capacity[t];
            continue;
        }

        room = dsg_tokens_room(c, s, t);

        /* elapsed * gain <= room here: no overflow */

        if (elapsed >= room / c->gain[t] + (room % c->gain[t] != 0)) {
            s->level[t] = c->capacity[t];

        } else {
            s->level[t] = (int64_t) ((uint64_t) s->level[t]
                                     + elapsed * c->gain[t]);
        }
    }
}


/* tokens * unit, or bound if that is less (no overflow) */

static uint64_t
dsg_tokens_units(const dsg_tokens_conf_t *c, uint64_t tokens, uint64_t bound)
{
    if (tokens > bound / c->unit) {
        return bound;
    }

    /* tokens <= bound / unit: tokens * unit <= bound */

    return tokens * c->unit;
}


/* level_t -= tokens, never below -capacity_t */

static void
dsg_tokens_take(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t t, uint64_t tokens)
{
    uint64_t  room, u;

    if (s->level[t] <= -c->capacity[t]) {
        return;
    }

    room = (uint64_t) s->level[t] + (uint64_t) c->capacity[t];
    u = dsg_tokens_units(c, tokens, room);

    s->level[t] = (int64_t) ((uint64_t) s->level[t] - u);
}


/* level_t += tokens, never above capacity_t */

static void
dsg_tokens_give(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t t, uint64_t tokens)
{
    uint64_t  room, u;

    if (s->level[t] >= c->capacity[t]) {
        s->level[t] = c->capacity[t];
        return;
    }

    room = dsg_tokens_room(c, s, t);
    u = dsg_tokens_units(c, tokens, room);

    s->level[t] = (int64_t) ((uint64_t) s->level[t] + u);
}


int
dsg_tokens_check(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t cls, uint64_t tokens, uint64_t now_ms, uint64_t *wait_ms)
{
    uint32_t  t, tier;
    uint64_t  need, deficit, w, wait;

    if (wait_ms != NULL) {
        *wait_ms = 0;
    }

    if (cls >= c->nclasses) {
        return DSG_EINVAL;
    }

    dsg_tokens_refill(c, s, now_ms);

    if (tokens == 0) {
        return DSG_OK;
    }

    tier = c->class_tier[cls];

    for (t = 0; t <= tier; t++) {
        /* tokens * unit > capacity_t, without the product */
        if (tokens > (uint64_t) c->capacity[t] / c->unit) {
            return DSG_TOOBIG;
        }
    }

    need = tokens * c->unit;
    wait = 0;

    for (t = 0; t <= tier; t++) {
        if (s->level[t] >= (int64_t) need) {
            continue;
        }

        /* need <= capacity_t and level_t >= INT64_MIN: fits */
        deficit = need - (uint64_t) s->level[t];
        w = deficit / c->gain[t] + (deficit % c->gain[t] != 0);

        if (w > wait) {
            wait = w;
        }
    }

    if (wait == 0) {
        return DSG_OK;
    }

    if (now_ms < s->last_ms) {
        wait = dsg_tokens_add_sat(wait, s->last_ms - now_ms);
    }

    if (wait_ms != NULL) {
        *wait_ms = wait;
    }

    return DSG_RATE;
}


uint32_t
dsg_tokens_record(const dsg_tokens_conf_t *c, uint32_t cls)
{
    if (cls >= c->nclasses) {
        return 0;
    }

    return c->class_tier[cls] + 1u;
}


void
dsg_tokens_charge(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t record, uint64_t tokens)
{
    uint32_t  t;

    for (t = 0; t < record && t < c->ntiers; t++) {
        dsg_tokens_take(c, s, t, tokens);
    }
}


void
dsg_tokens_settle(const dsg_tokens_conf_t *c, dsg_tokens_state_t *s,
    uint32_t record, int64_t delta, uint64_t now_ms)
{
    uint32_t  t;
    uint64_t  tokens;

    dsg_tokens_refill(c, s, now_ms);

    if (delta == 0) {
        return;
    }

    /* |delta|, INT64_MIN included */
    tokens = (delta > 0) ? (uint64_t) delta
                         : (uint64_t) -(delta + 1) + 1;

    for (t = 0; t < record && t < c->ntiers; t++) {
        if (delta > 0) {
            dsg_tokens_give(c, s, t, tokens);

        } else {
            dsg_tokens_take(c, s, t, tokens);
        }
    }
}


uint64_t
dsg_tokens_remaining(const dsg_tokens_conf_t *c, const dsg_tokens_state_t *s,
    uint32_t cls, uint64_t now_ms)
{
    uint32_t            t, tier;
    uint64_t            v, min;
    dsg_tokens_state_t  copy;

    if (cls >= c->nclasses) {
        return 0;
    }

    copy = *s;
    dsg_tokens_refill(c, &copy, now_ms);

    tier = c->class_tier[cls];
    min = UINT64_MAX;

    for (t = 0; t <= tier; t++) {
        v = (copy.level[t] > 0) ? (uint64_t) copy.level[t] / c->unit : 0;

        if (v < min) {
            min = v;
        }
    }

    return min;
}


uint64_t
dsg_tokens_reset_ms(const dsg_tokens_conf_t *c, const dsg_tokens_state_t *s,
    uint32_t cls, uint64_t now_ms)
{
    uint32_t            t, tier;
    uint64_t            room, w, wait;
    dsg_tokens_state_t  copy;

    if (cls >= c->nclasses) {
        return 0;
    }

    copy = *s;
    dsg_tokens_refill(c, &copy, now_ms);

    tier = c->class_tier[cls];
    wait = 0;

    for (t = 0; t <= tier; t++) {
        room = dsg_tokens_room(c, &copy, t);
        w = room / c->gain[t] + (room % c->gain[t] != 0);

        if (w > wait) {
            wait = w;
        }
    }

    if (wait > 0 && now_ms < copy.last_ms) {
        wait = dsg_tokens_add_sat(wait, copy.last_ms - now_ms);
    }

    return wait;
}


int
dsg_tokens_full(const dsg_tokens_conf_t *c, const dsg_tokens_state_t *s,
    uint64_t now_ms)
{
    uint32_t  t;
    uint64_t  elapsed, room;

    elapsed = (now_ms > s->last_ms) ? now_ms - s->last_ms : 0;

    for (t = 0; t < c->ntiers; t++) {
        room = dsg_tokens_room(c, s, t);

        /* full iff elapsed * gain >= room */

        if (room > 0
            && elapsed < room / c->gain[t] + (room % c->gain[t] != 0))
        {
            return 0;
        }
    }

    return 1;
}


/* the estimator */

static int
dsg_tokens_hex(unsigned char ch)
{
    if (ch >= '0' && ch <= '9') {
        return ch - '0';
    }

    if (ch >= 'a' && ch <= 'f') {
        return ch - 'a' + 10;
    }

    if (ch >= 'A' && ch <= 'F') {
        return ch - 'A' + 10;
    }

    return -1;
}


/* a complete "\uXXXX": the low half of a surrogate pair is not counted */

static void
dsg_tokens_code(dsg_tokens_scan_t *sc, uint32_t code)
{
    if (code < 0x80) {
        sc->ascii++;
        sc->high = 0;
        return;
    }

    if (code >= 0xdc00 && code <= 0xdfff && sc->high) {
        sc->high = 0;
        return;
    }

    sc->nonascii++;
    sc->high = (code >= 0xd800 && code <= 0xdbff);
}


void
dsg_tokens_scan(const unsigned char *p, size_t len, dsg_tokens_scan_t *sc)
{
    int            h;
    size_t         i;
    unsigned char  ch;

    i = 0;

    while (i < len) {
        ch = p[i];

        switch (sc->state) {

        case DSG_SCAN_TEXT:
            if (ch == '\\') {
                sc->state = DSG_SCAN_ESC;

            } else if (ch < 0x80) {
                sc->ascii++;
                sc->high = 0;

            } else if ((ch & 0xc0) != 0x80) {
                /* a UTF-8 lead byte: one code point */
                sc->nonascii++;
                sc->high = 0;
            }

            i++;
            break;

        case DSG_SCAN_ESC:
            if (ch == 'u') {
                sc->state = DSG_SCAN_U0;
                sc->code = 0;

            } else {
                /* "\n", "\"", "\\" ...: one ASCII character */
                sc->ascii++;
                sc->high = 0;
                sc->state = DSG_SCAN_TEXT;
            }

            i++;
            break;

        default:
            h = dsg_tokens_hex(ch);

            if (h < 0) {
                /* not JSON: the escape counts as one character, ch anew */
                sc->ascii++;
                sc->high = 0;
                sc->state = DSG_SCAN_TEXT;
                break;
            }

            sc->code = sc->code * 16 + (uint32_t) h;
            i++;

            if (++sc->state == DSG_SCAN_DONE) {
                dsg_tokens_code(sc, sc->code);
                sc->state = DSG_SCAN_TEXT;
            }

            break;
        }
    }
}


uint64_t
dsg_tokens_estimate(const dsg_tokens_scan_t *sc, uint32_t ratio_ppm)
{
    uint64_t  w, a, b, x, lo, tokens;

    if (sc->ascii == 0 && sc->nonascii == 0) {
        return 0;
    }

    if (ratio_ppm == 0) {
        ratio_ppm = DSG_TOKENS_RATIO_ONE;
    }

    /* w: uncorrected tokens in ppm (saturates only past 10^13 tokens) */
    w = dsg_tokens_add_sat(
            dsg_tokens_mul_sat(sc->ascii, DSG_TOKENS_W_ASCII_PPM),
            dsg_tokens_mul_sat(sc->nonascii, DSG_TOKENS_W_NONASCII_PPM));

    /*
     * ceil(w * ratio / 10^12) without a 128-bit product, ratio < 2^32:
     * w = a * 10^12 + b, b = bh * 10^6 + bl, bh * ratio = x, so
     * w * ratio = (a * ratio + x / 10^6) * 10^12
     *             + (x % 10^6) * 10^6 + bl * ratio,
     * where a * ratio < 2^57 and the last two terms < 2^53
     */

    a = w / (DSG_PPM * DSG_PPM);
    b = w % (DSG_PPM * DSG_PPM);
    x = (b / DSG_PPM) * ratio_ppm;
    lo = (x % DSG_PPM) * DSG_PPM + (b % DSG_PPM) * ratio_ppm;

    tokens = a * ratio_ppm + x / DSG_PPM
             + lo / (DSG_PPM * DSG_PPM) + (lo % (DSG_PPM * DSG_PPM) != 0);

    return tokens ? tokens : 1;
}


void
dsg_tokens_correct(uint32_t *ratio_ppm, uint64_t estimated, uint64_t actual)
{
    uint64_t  old, sample, q, rem, frac, v;

    if (estimated == 0) {
        return;
    }

    old = *ratio_ppm ? *ratio_ppm : DSG_TOKENS_RATIO_ONE;

    /* sample = actual * 10^6 / estimated, rounded, at most RATIO_MAX */

    q = actual / estimated;

    if (q >= DSG_TOKENS_RATIO_MAX / DSG_PPM) {
        sample = DSG_TOKENS_RATIO_MAX;

    } else {
        rem = actual % estimated;

        /*
         * keep rem * 10^6 + estimated / 2 in range: scale both down
         * (absurd counts only)
         */
        while (estimated > UINT64_MAX / DSG_PPM / 2) {
            estimated >>= 1;
            rem >>= 1;
        }

        frac = (rem * DSG_PPM + estimated / 2) / estimated;
        sample = q * DSG_PPM + frac;
    }

    /*
     * EWMA, weight 1/8 for the new sample; the step is rounded away from
     * the old value, so a steady sample is reached exactly
     */

    if (sample >= old) {
        v = old + (sample - old + 7) / 8;

    } else {
        v = old - (old - sample + 7) / 8;
    }

    if (v < DSG_TOKENS_RATIO_MIN) {
        v = DSG_TOKENS_RATIO_MIN;

    } else if (v > DSG_TOKENS_RATIO_MAX) {
        v = DSG_TOKENS_RATIO_MAX;
    }

    *ratio_ppm = (uint32_t) v;
}


/* the usage reader */

static int
dsg_tokens_ws(unsigned char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}


/* p[i] is '"' and not escaped: an even run of backslashes before it */

static int
dsg_tokens_quote(const unsigned char *p, size_t i)
{
    size_t  j;

    if (p[i] != '"') {
        return 0;
    }

    j = i;

    while (j > 0 && p[j - 1] == '\\') {
        j--;
    }

    return (i - j) % 2 == 0;
}


/*
 * p[i] is the opening '"' of a string: the index after its closing '"',
 * or len if it is not closed
 */

static size_t
dsg_tokens_string(const unsigned char *p, size_t len, size_t i)
{
    for (i++; i < len; i++) {
        if (p[i] == '\\') {
            i++;
            continue;
        }

        if (p[i] == '"') {
            return i + 1;
        }
    }

    return len;
}


/*
 * p[i] starts a JSON value: the index after it, or len if it is truncated
 * or empty.  Objects and arrays are skipped by depth (the brackets are
 * not matched by kind: the object's own parse catches gross errors).
 */

static size_t
dsg_tokens_value(const unsigned char *p, size_t len, size_t i)
{
    size_t  depth, start;

    if (p[i] == '"') {
        return dsg_tokens_string(p, len, i);
    }

    if (p[i] == '{' || p[i] == '[') {
        depth = 0;

        while (i < len) {
            switch (p[i]) {

            case '"':
                i = dsg_tokens_string(p, len, i);
                continue;

            case '{':
            case '[':
                depth++;
                break;

            case '}':
            case ']':
                if (--depth == 0) {
                    return i + 1;
                }
                break;
            }

            i++;
        }

        return len;
    }

    /* a number or a literal */

    start = i;

    while (i < len && p[i] != ',' && p[i] != '}' && p[i] != ']'
           && !dsg_tokens_ws(p[i]))
    {
        i++;
    }

    return (i == start) ? len : i;
}


/*
 * p[i] starts an integer member's value: the index after it, or len for
 * anything but a non-negative integer below DSG_TOKENS_USAGE_MAX
 */

static size_t
dsg_tokens_int(const unsigned char *p, size_t len, size_t i, uint64_t *v)
{
    size_t    start;
    uint64_t  d, n;

    n = 0;
    start = i;

    while (i < len && p[i] >= '0' && p[i] <= '9') {
        d = p[i] - '0';

        if (n > (DSG_TOKENS_USAGE_MAX - 1 - d) / 10) {
            return len;
        }

        n = n * 10 + d;
        i++;
    }

    /* "-1", "1.5", "1e3", "\"1\"", "null", or cut after the digits */

    if (i == start || i == len
        || !(p[i] == ',' || p[i] == '}' || dsg_tokens_ws(p[i])))
    {
        return len;
    }

    *v = n;

    return i;
}


/* p[i] is the '{' of the usage object */

static int
dsg_tokens_object(const unsigned char *p, size_t len, size_t i,
    uint64_t *prompt, uint64_t *completion)
{
    int        found;
    size_t     k, klen;
    uint64_t  *dst;

    static const char  pt[] = "prompt_tokens";
    static const char  ct[] = "completion_tokens";

    found = 0;
    i++;

    for ( ;; ) {

        while (i < len && dsg_tokens_ws(p[i])) {
            i++;
        }

        if (i == len) {
            return -1;
        }

        if (p[i] == '}') {
            break;
        }

        if (p[i] != '"') {
            return -1;
        }

        k = i + 1;
        i = dsg_tokens_string(p, len, i);

        if (i == len) {
            return -1;
        }

        klen = i - 1 - k;

        while (i < len && dsg_tokens_ws(p[i])) {
            i++;
        }

        if (i == len || p[i] != ':') {
            return -1;
        }

        i++;

        while (i < len && dsg_tokens_ws(p[i])) {
            i++;
        }

        if (i == len) {
            return -1;
        }

        if (klen == sizeof(pt) - 1 && memcmp(p + k, pt, klen) == 0) {
            dst = prompt;
            found |= 1;

        } else if (klen == sizeof(ct) - 1 && memcmp(p + k, ct, klen) == 0) {
            dst = completion;
            found |= 2;

        } else {
            dst = NULL;
        }

        i = (dst != NULL) ? dsg_tokens_int(p, len, i, dst)
                          : dsg_tokens_value(p, len, i);

        while (i < len && dsg_tokens_ws(p[i])) {
            i++;
        }

        if (i == len) {
            return -1;
        }

        if (p[i] == ',') {
            i++;
            continue;
        }

        if (p[i] != '}') {
            return -1;
        }

        break;
    }

    return (found == 3) ? 0 : -1;
}


int
dsg_tokens_usage(const unsigned char *p, size_t len, uint64_t *prompt,
    uint64_t *completion)
{
    size_t    i, j;
    uint64_t  pr, co;

    static const char  key[] = "\"usage\"";

    if (len < sizeof(key) - 1) {
        return -1;
    }

    /* the last real key "usage" whose value is an object, from the end */

    i = len - (sizeof(key) - 1) + 1;

    while (i-- > 0) {

        if (p[i] != '"' || memcmp(p + i, key, sizeof(key) - 1) != 0
            || !dsg_tokens_quote(p, i))
        {
            continue;
        }

        j = i + sizeof(key) - 1;

        while (j < len && dsg_tokens_ws(p[j])) {
            j++;
        }

        if (j == len || p[j] != ':') {
            continue;
        }

        j++;

        while (j < len && dsg_tokens_ws(p[j])) {
            j++;
        }

        if (j == len || p[j] != '{') {
            continue;
        }

        if (dsg_tokens_object(p, len, j, &pr, &co) != 0) {
            return -1;
        }

        *prompt = pr;
        *completion = co;

        return 0;
    }

    return -1;
}


/* the SSE event counter */

uint64_t
dsg_tokens_sse(dsg_tokens_sse_t *ev, const unsigned char *p, size_t len)
{
    size_t          i;
    uint64_t        n;
    unsigned char   ch;

    static const char  field[] = "data:";
    static const char  key[] = "content\"";

    n = 0;

    for (i = 0; i < len; i++) {
        ch = p[i];

        if (ch == '\n' || ch == '\r') {
            ev->state = DSG_SSE_FIELD;
            ev->matched = 0;
            continue;
        }

        switch (ev->state) {

        case DSG_SSE_FIELD:
            if ((char) ch != field[ev->matched]) {
                ev->state = DSG_SSE_SKIP;
                break;
            }

            if (++ev->matched == sizeof(field) - 1) {
                ev->state = DSG_SSE_SEARCH;
                ev->matched = 0;
            }

            break;

        case DSG_SSE_COLON:
            if (dsg_tokens_ws(ch)) {
                break;
            }

            if (ch == ':') {
                ev->state = DSG_SSE_QUOTE;
                break;
            }

            goto search;

        case DSG_SSE_QUOTE:
            if (dsg_tokens_ws(ch)) {
                break;
            }

            if (ch == '"') {
                ev->state = DSG_SSE_FIRST;
                break;
            }

            goto search;

        case DSG_SSE_FIRST:
            if (ch != '"') {
                /* a non-empty content: the line counts, once */
                n++;
                ev->state = DSG_SSE_SKIP;
                break;
            }

            /* "": a role or finish chunk, keep looking */

            ev->state = DSG_SSE_SEARCH;
            ev->matched = 0;
            break;

        case DSG_SSE_SEARCH:
            if ((char) ch == key[ev->matched]) {
                if (++ev->matched == sizeof(key) - 1) {
                    ev->state = DSG_SSE_COLON;
                }

                break;
            }

        search:

            /* "content\"" has no inner repeat: restart at its 'c' or 0 */

            ev->state = DSG_SSE_SEARCH;
            ev->matched = (ch == 'c');
            break;

        default:
            break;
        }
    }

    return n;
}
