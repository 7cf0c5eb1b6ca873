/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include <string.h>
#include <jansson.h>

#include "dsg_json.h"


/*
 * JSON_REJECT_DUPLICATES: see dsg_json.h.
 * JSON_DECODE_ANY: a scalar top-level value is valid JSON (RFC 8259).
 * JSON_ALLOW_NUL: "\u0000" in a string is valid JSON too; jansson keeps
 * the length and re-escapes it on output.
 * The end-of-input check stays on: trailing bytes are an error.
 */
#define DSG_JSON_LOAD_FLAGS                                                  \
    (JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL)

#define DSG_JSON_DUMP_FLAGS                                                  \
    (JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY)


int
dsg_json_canonical(const char *in, size_t len, char *out, size_t cap,
    size_t *outlen)
{
    size_t        n;
    json_t       *root;
    json_error_t  err;

    *outlen = 0;

    if (in == NULL) {
        return DSG_JSON_EPARSE;
    }

    root = json_loadb(in, len, DSG_JSON_LOAD_FLAGS, &err);
    if (root == NULL) {
        return (json_error_code(&err) == json_error_out_of_memory)
               ? DSG_JSON_ENOMEM : DSG_JSON_EPARSE;
    }

    /*
     * json_dumpb() returns the length the full output needs, writing at
     * most cap bytes, and 0 on failure (only allocation can fail for a
     * parsed value: key sorting and number formatting use the heap).
     */
    n = json_dumpb(root, (cap != 0) ? out : NULL, cap, DSG_JSON_DUMP_FLAGS);

    json_decref(root);

    if (n == 0) {
        return DSG_JSON_ENOMEM;
    }

    *outlen = n;

    return (n > cap) ? DSG_JSON_ESPACE : DSG_JSON_OK;
}


/*
 * The top-level members of a chat request that token budgets need, in one
 * pass over the bytes, without a tree: jansson has no streaming interface,
 * and building the whole tree of a 1 MB body to read one integer holds the
 * worker for tens of milliseconds.  Strings are skipped with their escapes,
 * nesting is counted (at most DSG_JSON_MAX_DEPTH); a key is compared as
 * its raw bytes (an escaped name is another name: the reservation then
 * falls back to its default, nothing else depends on it).  The last of
 * duplicate members wins.  Not a validator: an input that is not JSON may
 * give values; the upstream refuses it, and its reservation is refunded.
 */

typedef struct {
    uint64_t  max_tokens;
    uint64_t  max_completion_tokens;
    int       stream;               /* "stream": true */
    int       stream_options;       /* a "stream_options" member */
    size_t    brace;                /* just after the object's '{', 0: none */
} dsg_json_top_t;


#define dsg_json_ws(c)  ((c) == ' ' || (c) == '\t' || (c) == '\n' || (c) == '\r')
#define dsg_json_end(c)  (dsg_json_ws(c) || (c) == ',' || (c) == '}')


static int
dsg_json_key(const char *k, size_t n, const char *name)
{
    return n == strlen(name) && memcmp(k, name, n) == 0;
}


/* a non-negative integer below 2^53 at in[i ..), else 0 */

static uint64_t
dsg_json_uint(const char *in, size_t len, size_t i)
{
    uint64_t  v;
    size_t    start;

    v = 0;
    start = i;

    while (i < len && in[i] >= '0' && in[i] <= '9') {
        v = v * 10 + (uint64_t) (in[i] - '0');

        if (v >= (1ULL << 53)) {
            return 0;
        }

        i++;
    }

    if (i == start || (i < len && !dsg_json_end(in[i]))) {
        /* not a number, negative, a fraction or an exponent */
        return 0;
    }

    return v;
}


static int
dsg_json_top(const char *in, size_t len, dsg_json_top_t *t)
{
    int          key, c;
    size_t       i, j, n, depth;
    const char  *name;

    memset(t, 0, sizeof(dsg_json_top_t));

    if (in == NULL) {
        return DSG_JSON_EPARSE;
    }

    for (i = 0; i < len && dsg_json_ws(in[i]); i++) {
        /* void */
    }

    if (i == len || in[i] != '{') {
        /* not an object: none of the members */
        return (i == len) ? DSG_JSON_EPARSE : DSG_JSON_OK;
    }

    t->brace = ++i;
    depth = 1;
    key = 1;

    while (i < len) {
        c = (unsigned char) in[i];

        if (c == '"') {
            for (j = i + 1; j < len && in[j] != '"'; j++) {
                if (in[j] == '\\') {
                    j++;
                }
            }

            if (j >= len) {
                return DSG_JSON_EPARSE;
            }

            if (depth > 1 || !key) {
                i = j + 1;
                continue;
            }

            /* a member's name, then ':' and its value */

            name = in + i + 1;
            n = j - i - 1;
            key = 0;

            for (i = j + 1; i < len && dsg_json_ws(in[i]); i++) {
                /* void */
            }

            if (i == len || in[i] != ':') {
                return DSG_JSON_EPARSE;
            }

            for (i++; i < len && dsg_json_ws(in[i]); i++) {
                /* void */
            }

            if (i == len) {
                return DSG_JSON_EPARSE;
            }

            /* the value itself is passed over by this loop */

            if (dsg_json_key(name, n, "max_tokens")) {
                t->max_tokens = dsg_json_uint(in, len, i);

            } else if (dsg_json_key(name, n, "max_completion_tokens")) {
                t->max_completion_tokens = dsg_json_uint(in, len, i);

            } else if (dsg_json_key(name, n, "stream")) {
                t->stream = (len - i >= 4 && memcmp(in + i, "true", 4) == 0
                             && (len - i == 4 || dsg_json_end(in[i + 4])));

            } else if (dsg_json_key(name, n, "stream_options")) {
                t->stream_options = 1;
            }

            continue;
        }

        if (c == '{' || c == '[') {
            if (++depth > DSG_JSON_MAX_DEPTH) {
                return DSG_JSON_ELIMIT;
            }

        } else if (c == '}' || c == ']') {
            if (--depth == 0) {
                for (i++; i < len; i++) {
                    if (!dsg_json_ws(in[i])) {
                        return DSG_JSON_EPARSE;
                    }
                }

                return DSG_JSON_OK;
            }

        } else if (c == ',' && depth == 1) {
            key = 1;
        }

        i++;
    }

    return DSG_JSON_EPARSE;
}


int
dsg_json_max_tokens(const char *in, size_t len, uint64_t *max_tokens)
{
    int             rc;
    dsg_json_top_t  t;

    rc = dsg_json_top(in, len, &t);

    *max_tokens = (rc != DSG_JSON_OK) ? 0
                  : t.max_completion_tokens ? t.max_completion_tokens
                  : t.max_tokens;

    return rc;
}


int
dsg_json_stream_usage(const char *in, size_t len, size_t *at)
{
    int             rc;
    dsg_json_top_t  t;

    rc = dsg_json_top(in, len, &t);

    *at = (rc == DSG_JSON_OK && t.stream && !t.stream_options) ? t.brace : 0;

    return rc;
}


int
dsg_json_prescan(const char *in, size_t len, size_t max_values,
    size_t max_depth)
{
    size_t       values, depth;
    const char  *p, *end;

    values = 1;
    depth = 0;

    for (p = in, end = in + len; p < end; p++) {

        switch (*p) {

        case '"':
            /* skip the string: escapes hide quotes */
            for (p++; p < end && *p != '"'; p++) {
                if (*p == '\\') {
                    p++;
                }
            }

            break;

        case '[':
        case '{':
            if (++depth > max_depth) {
                return DSG_JSON_ELIMIT;
            }

            /* fall through */

        case ',':
        case ':':
            if (++values > max_values) {
                return DSG_JSON_ELIMIT;
            }

            break;

        case ']':
        case '}':
            if (depth) {
                depth--;
            }

            break;

        default:
            break;
        }
    }

    return DSG_JSON_OK;
}


const char *
dsg_json_strerror(int rc)
{
    switch (rc) {

    case DSG_JSON_OK:
        return "ok";

    case DSG_JSON_EPARSE:
        return "invalid or ambiguous JSON";

    case DSG_JSON_ESPACE:
        return "canonical JSON buffer too small";

    case DSG_JSON_ENOMEM:
        return "out of memory canonicalizing JSON";

    case DSG_JSON_ELIMIT:
        return "too many JSON values or too deep to canonicalize";

    default:
        return "unknown JSON error";
    }
}
