/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "dsg_http.h"


#define DSG_HTTP_AGE_MAX  ((int64_t) 1 << 40)


static int
dsg_http_blank(char c)
{
    return c == ' ' || c == '\t';
}


static int
dsg_http_lower(int c)
{
    return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
}


/* case-insensitive: tok[0 .. len) is the NUL-terminated lowercase word */

static int
dsg_http_is(const char *tok, size_t len, const char *word)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        if (word[i] == '\0' || dsg_http_lower((unsigned char) tok[i]) != word[i])
        {
            return 0;
        }
    }

    return word[len] == '\0';
}


void
dsg_http_cc_init(dsg_http_cc_t *cc)
{
    cc->no_store = 0;
    cc->private_ = 0;
    cc->public_ = 0;
    cc->must_revalidate = 0;
    cc->max_age = -1;
    cc->s_maxage = -1;
}


int
dsg_http_list_next(const char **pos, const char *end, const char **tok,
    size_t *toklen, const char **par, size_t *parlen)
{
    const char  *p, *t, *te, *q;
    int          quoted;

    p = *pos;

    for ( ;; ) {
        while (p < end && (dsg_http_blank(*p) || *p == ',')) {
            p++;
        }

        if (p == end) {
            *pos = p;
            return 0;
        }

        /* the token: up to ';', ',' or a blank */

        t = p;

        while (p < end && *p != ',' && *p != ';' && !dsg_http_blank(*p)) {
            p++;
        }

        te = p;

        /* the parameters, to the next comma outside a quoted string */

        while (p < end && dsg_http_blank(*p)) {
            p++;
        }

        q = p;
        quoted = 0;

        while (p < end && (quoted || *p != ',')) {
            if (*p == '"') {
                quoted = !quoted;

            } else if (*p == '\\' && quoted && p + 1 < end) {
                p++;
            }

            p++;
        }

        if (te == t) {
            continue;
        }

        *tok = t;
        *toklen = te - t;
        *par = q;
        *parlen = p - q;
        *pos = p;

        return 1;
    }
}


/* a delta-seconds value after '=', quotes allowed; malformed: 0 */

static int64_t
dsg_http_age(const char *p, size_t len)
{
    int64_t  n;
    size_t   i;

    while (len && (dsg_http_blank(*p) || *p == '=')) {
        p++;
        len--;
    }

    if (len && *p == '"') {
        p++;
        len--;
    }

    n = 0;

    for (i = 0; i < len && p[i] >= '0' && p[i] <= '9'; i++) {
        n = n * 10 + (p[i] - '0');

        if (n > DSG_HTTP_AGE_MAX) {
            return DSG_HTTP_AGE_MAX;
        }
    }

    return (i == 0) ? 0 : n;
}


void
dsg_http_cc_parse(const char *v, size_t len, dsg_http_cc_t *cc)
{
    size_t       n, i, plen;
    int64_t      age;
    const char  *p, *end, *tok, *par;

    p = v;
    end = v + len;

    while (dsg_http_list_next(&p, end, &tok, &n, &par, &plen)) {

        /* "max-age=60": the token ends at '=', the value follows */

        for (i = 0; i < n && tok[i] != '='; i++) { /* void */ }

        if (i < n) {
            par = tok + i;
            plen = n - i;
            n = i;
        }

        if (dsg_http_is(tok, n, "no-store")) {
            cc->no_store = 1;

        } else if (dsg_http_is(tok, n, "private")) {
            cc->private_ = 1;

        } else if (dsg_http_is(tok, n, "public")) {
            cc->public_ = 1;

        } else if (dsg_http_is(tok, n, "must-revalidate")) {
            cc->must_revalidate = 1;

        } else if (dsg_http_is(tok, n, "max-age")) {
            age = dsg_http_age(par, plen);
            /* a repeated directive: the lower, the safer */
            if (cc->max_age < 0 || age < cc->max_age) {
                cc->max_age = age;
            }

        } else if (dsg_http_is(tok, n, "s-maxage")) {
            age = dsg_http_age(par, plen);
            if (cc->s_maxage < 0 || age < cc->s_maxage) {
                cc->s_maxage = age;
            }
        }
    }
}


/* a q parameter of zero: "q=0", "q=0.", "q=0.000" */

static int
dsg_http_q_zero(const char *par, size_t len)
{
    size_t       i;
    const char  *p, *end;

    p = par;
    end = par + len;

    while (p < end) {
        while (p < end && (*p == ';' || dsg_http_blank(*p))) {
            p++;
        }

        if (end - p >= 2 && (p[0] == 'q' || p[0] == 'Q') && p[1] == '=') {
            p += 2;

            if (p == end || *p != '0') {
                return 0;
            }

            p++;

            if (p < end && *p == '.') {
                p++;

                for (i = 0; i < 3 && p < end && *p >= '0' && *p <= '9'; i++)
                {
                    if (*p != '0') {
                        return 0;
                    }

                    p++;
                }
            }

            return 1;
        }

        while (p < end && *p != ';') {
            p++;
        }
    }

    return 0;
}


int
dsg_http_accepts_gzip(const char *v, size_t len)
{
    size_t       n, plen;
    const char  *p, *tok, *par;

    p = v;

    while (dsg_http_list_next(&p, v + len, &tok, &n, &par, &plen)) {
        if ((dsg_http_is(tok, n, "gzip") || dsg_http_is(tok, n, "x-gzip"))
            && !dsg_http_q_zero(par, plen))
        {
            return 1;
        }
    }

    return 0;
}


int
dsg_http_vary_star(const char *v, size_t len)
{
    size_t       n, plen;
    const char  *p, *tok, *par;

    p = v;

    while (dsg_http_list_next(&p, v + len, &tok, &n, &par, &plen)) {
        if (n == 1 && tok[0] == '*') {
            return 1;
        }
    }

    return 0;
}
