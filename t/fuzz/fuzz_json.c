/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_json_canonical(), the cache key canonicalization of
 * request bodies.
 *
 * Properties: no crash or sanitizer report on any input; the ESPACE
 * protocol (*outlen is the size needed, and that size then suffices);
 * determinism; idempotence: canonical(canonical(x)) == canonical(x) byte
 * for byte; the canonical text has no insignificant whitespace.
 *
 * jansson itself is not built with coverage instrumentation (it is the
 * distribution's library), so libFuzzer sees little of the parser.  To
 * give it some guidance the target walks the parsed canonical value
 * with branches on types, depths, sizes and string contents: the
 * structure of accepted inputs becomes coverage.
 */


#include <string.h>
#include <jansson.h>

#include "dsg_json.h"
#include "fuzz.h"


static unsigned  sink;


static void
walk(json_t *v, unsigned depth)
{
    size_t       i, n;
    json_t      *x;
    const char  *k, *s;

    if (depth > 12) {
        depth = 12;
    }

    switch (json_typeof(v)) {

    case JSON_OBJECT:
        n = json_object_size(v);
        sink += (n == 0) ? 1 : (n == 1) ? 2 : (n < 8) ? 3 : 4;

        json_object_foreach(v, k, x) {
            sink += (k[0] == '\0') ? 5 : (strlen(k) < 4) ? 6 : 7;
            walk(x, depth + 1);
        }

        break;

    case JSON_ARRAY:
        n = json_array_size(v);
        sink += (n == 0) ? 8 : (n == 1) ? 9 : (n < 8) ? 10 : 11;

        json_array_foreach(v, i, x) {
            walk(x, depth + 1);
        }

        break;

    case JSON_STRING:
        s = json_string_value(v);
        n = json_string_length(v);

        for (i = 0; i < n; i++) {
            unsigned char  c = (unsigned char) s[i];

            if (c == 0) {
                sink += 12;
            } else if (c < 0x20) {
                sink += 13;
            } else if (c == '"' || c == '\\') {
                sink += 14;
            } else if (c >= 0xf0) {
                sink += 15;
            } else if (c >= 0xe0) {
                sink += 16;
            } else if (c >= 0xc0) {
                sink += 17;
            }
        }

        break;

    case JSON_INTEGER:
        sink += (json_integer_value(v) < 0) ? 18
                : (json_integer_value(v) > 0xffffffffLL) ? 19 : 20;
        break;

    case JSON_REAL:
        sink += (json_real_value(v) < 0) ? 21
                : (json_real_value(v) > 1e15) ? 22
                : (json_real_value(v) < 1e-5) ? 23 : 24;
        break;

    default:
        sink += 25;
        break;
    }

    switch (depth) {
    case 0: sink += 30; break;
    case 1: sink += 31; break;
    case 2: sink += 32; break;
    case 3: sink += 33; break;
    case 4: sink += 34; break;
    default: sink += 35; break;
    }
}


/* outside of strings, the canonical text has no whitespace at all */

static void
assert_compact(const char *s, size_t n)
{
    int     in_str, esc;
    size_t  i;

    in_str = 0;
    esc = 0;

    for (i = 0; i < n; i++) {
        if (in_str) {
            FUZZ_ASSERT((unsigned char) s[i] >= 0x20);

            if (esc) {
                esc = 0;
            } else if (s[i] == '\\') {
                esc = 1;
            } else if (s[i] == '"') {
                in_str = 0;
            }

            continue;
        }

        FUZZ_ASSERT(s[i] != ' ' && s[i] != '\t' && s[i] != '\n'
                    && s[i] != '\r');

        if (s[i] == '"') {
            in_str = 1;
        }
    }

    FUZZ_ASSERT(!in_str);
}


/* a positive integer member below 2^53, as the token reservation reads it */
static uint64_t
positive(json_t *obj, const char *name)
{
    json_t  *v;

    v = json_object_get(obj, name);

    if (!json_is_integer(v) || json_integer_value(v) <= 0
        || json_integer_value(v) >= (json_int_t) 1 << 53)
    {
        return 0;
    }

    return (uint64_t) json_integer_value(v);
}


/*
 * dsg_json_max_tokens() and dsg_json_stream_usage(), the one-pass scan of
 * the top level: no crash; an insertion point just after a '{'; and, for
 * a JSON object jansson accepts and whose text has no escape (the scan
 * compares names as raw bytes), the same answers as jansson's tree
 */
static void
top_level(const uint8_t *data, size_t size)
{
    int           rc, rc2;
    size_t        at;
    uint64_t      mt, want;
    json_t       *root;
    json_error_t  err;

    rc = dsg_json_max_tokens((const char *) data, size, &mt);
    rc2 = dsg_json_stream_usage((const char *) data, size, &at);

    FUZZ_ASSERT(rc == rc2);
    FUZZ_ASSERT(rc == DSG_JSON_OK || mt == 0);
    FUZZ_ASSERT(at == 0 || (at <= size && data[at - 1] == '{'));

    if (memchr(data, '\\', size) != NULL) {
        return;
    }

    root = json_loadb((const char *) data, size, JSON_REJECT_DUPLICATES, &err);
    if (root == NULL) {
        return;
    }

    FUZZ_ASSERT(rc == DSG_JSON_OK || rc == DSG_JSON_ELIMIT);

    if (rc == DSG_JSON_OK && json_is_object(root)) {
        want = positive(root, "max_completion_tokens");
        if (want == 0) {
            want = positive(root, "max_tokens");
        }

        FUZZ_ASSERT(mt == want);
        FUZZ_ASSERT((at != 0)
                    == (json_is_true(json_object_get(root, "stream"))
                        && json_object_get(root, "stream_options") == NULL));
    }

    json_decref(root);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int           rc;
    char         *out, *out2, small[16];
    size_t        n, n2, cap;
    json_t       *root;
    json_error_t  err;

    top_level(data, size);

    /* the first call: a small buffer, ESPACE for most inputs */

    cap = size ? data[0] % sizeof(small) : 0;
    rc = dsg_json_canonical((const char *) data, size, small, cap, &n);

    FUZZ_ASSERT(dsg_json_strerror(rc) != NULL);
    FUZZ_ASSERT(rc == DSG_JSON_OK || rc == DSG_JSON_ESPACE
                || rc == DSG_JSON_EPARSE);

    if (rc == DSG_JSON_EPARSE) {
        FUZZ_ASSERT(n == 0);
        return 0;
    }

    FUZZ_ASSERT(n > 0);
    FUZZ_ASSERT(rc == (n > cap ? DSG_JSON_ESPACE : DSG_JSON_OK));

    /* exactly the size asked for is enough */

    out = malloc(n);
    FUZZ_ASSERT(out != NULL);

    rc = dsg_json_canonical((const char *) data, size, out, n, &n2);
    FUZZ_ASSERT(rc == DSG_JSON_OK);
    FUZZ_ASSERT(n2 == n);

    if (cap >= n) {
        FUZZ_ASSERT(memcmp(small, out, n) == 0);
    }

    /* deterministic */

    out2 = malloc(n + 1);
    FUZZ_ASSERT(out2 != NULL);

    rc = dsg_json_canonical((const char *) data, size, out2, n + 1, &n2);
    FUZZ_ASSERT(rc == DSG_JSON_OK && n2 == n);
    FUZZ_ASSERT(memcmp(out, out2, n) == 0);

    assert_compact(out, n);

    /* idempotent */

    rc = dsg_json_canonical(out, n, out2, n + 1, &n2);
    FUZZ_ASSERT(rc == DSG_JSON_OK);
    FUZZ_ASSERT(n2 == n);
    FUZZ_ASSERT(memcmp(out, out2, n) == 0);

    /* guidance for the fuzzer: the shape of what was accepted */

    root = json_loadb(out, n, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
    FUZZ_ASSERT(root != NULL);
    walk(root, 0);
    json_decref(root);

    free(out);
    free(out2);

    return 0;
}
