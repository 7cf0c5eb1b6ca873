/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_json, JSON canonicalization.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <check.h>

#include "dsg_json.h"


Suite *dsg_json_suite(void);


#define T_CAP  4096


/* canonical form of a NUL-terminated text, NUL-terminated into out */

static int
t_canon(const char *in, char *out)
{
    int     rc;
    size_t  n;

    n = (size_t) -1;
    rc = dsg_json_canonical(in, strlen(in), out, T_CAP - 1, &n);

    if (rc == DSG_JSON_OK) {
        ck_assert_uint_lt(n, T_CAP);
        out[n] = '\0';

    } else {
        out[0] = '\0';
    }

    return rc;
}


static void
t_assert_canon(const char *in, const char *want)
{
    char  out[T_CAP];

    ck_assert_int_eq(t_canon(in, out), DSG_JSON_OK);
    ck_assert_str_eq(out, want);
}


static void
t_assert_same(const char *a, const char *b)
{
    char  ca[T_CAP], cb[T_CAP];

    ck_assert_int_eq(t_canon(a, ca), DSG_JSON_OK);
    ck_assert_int_eq(t_canon(b, cb), DSG_JSON_OK);
    ck_assert_str_eq(ca, cb);
}


static void
t_assert_differ(const char *a, const char *b)
{
    char  ca[T_CAP], cb[T_CAP];

    ck_assert_int_eq(t_canon(a, ca), DSG_JSON_OK);
    ck_assert_int_eq(t_canon(b, cb), DSG_JSON_OK);
    ck_assert_str_ne(ca, cb);
}


static void
t_assert_invalid(const char *in)
{
    char  out[T_CAP];

    ck_assert_msg(t_canon(in, out) == DSG_JSON_EPARSE,
                  "accepted invalid JSON: %s", in);
}


START_TEST(test_json_key_order)
{
    t_assert_canon("{\"model\":\"deepseek-chat\",\"messages\":[],"
                   "\"temperature\":0}",
                   "{\"messages\":[],\"model\":\"deepseek-chat\","
                   "\"temperature\":0}");

    t_assert_same("{\"b\":1,\"a\":2,\"c\":3}", "{\"c\":3,\"a\":2,\"b\":1}");

    /* bytewise order: upper case before lower case, prefixes first */
    t_assert_canon("{\"b\":0,\"B\":0,\"ab\":0,\"a\":0}",
                   "{\"B\":0,\"a\":0,\"ab\":0,\"b\":0}");
}
END_TEST


START_TEST(test_json_whitespace)
{
    t_assert_same("{\"a\":[1,2,{\"b\":null}],\"c\":\"x y\"}",
                  " \r\n\t{ \"c\" :\t\"x y\" ,\n  \"a\" : [ 1 , 2 ,"
                  " { \"b\" : null } ] }\n\n");

    /* whitespace inside strings is content */
    t_assert_differ("{\"c\":\"x y\"}", "{\"c\":\"x  y\"}");

    t_assert_canon("  [ ]  ", "[]");
    t_assert_canon("{ }", "{}");
}
END_TEST


START_TEST(test_json_array_order)
{
    t_assert_differ("[1,2,3]", "[3,2,1]");
    t_assert_differ("{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},"
                    "{\"role\":\"assistant\",\"content\":\"b\"}]}",
                    "{\"messages\":[{\"role\":\"assistant\",\"content\":\"b\"},"
                    "{\"role\":\"user\",\"content\":\"a\"}]}");
    t_assert_canon("[3,1,2]", "[3,1,2]");
}
END_TEST


START_TEST(test_json_nested)
{
    t_assert_canon("{\"z\":{\"y\":[{\"b\":1,\"a\":2},[{\"d\":4,\"c\":3}]],"
                   "\"x\":null},\"a\":true,\"m\":{}}",
                   "{\"a\":true,\"m\":{},\"z\":{\"x\":null,"
                   "\"y\":[{\"a\":2,\"b\":1},[{\"c\":3,\"d\":4}]]}}");

    t_assert_same("{\"o\":{\"q\":{\"s\":1,\"r\":2},\"p\":false}}",
                  "{\"o\":{\"p\":false,\"q\":{\"r\":2,\"s\":1}}}");
}
END_TEST


START_TEST(test_json_unicode)
{
    /* escapes and raw UTF-8 are the same text */
    t_assert_same("{\"k\":\"caf\\u00e9\"}", "{\"k\":\"caf\xc3\xa9\"}");
    t_assert_canon("\"caf\\u00E9\"", "\"caf\xc3\xa9\"");

    /* a surrogate pair: U+1F600 */
    t_assert_canon("[\"\\ud83d\\ude00\"]", "[\"\xf0\x9f\x98\x80\"]");

    /* CJK in keys and values, sorted by their UTF-8 bytes */
    t_assert_canon("{\"\\u4e2d\":1,\"a\":2}", "{\"a\":2,\"\xe4\xb8\xad\":1}");

    /* escapes are normalized, control characters stay escaped */
    t_assert_canon("\"a\\/b\"", "\"a/b\"");
    t_assert_canon("\"\\u0041\\t\\n\\\"\\\\\"", "\"A\\t\\n\\\"\\\\\"");
    t_assert_canon("\"\\u001f\"", "\"\\u001F\"");

    /* NUL in a string is valid JSON */
    t_assert_canon("\"a\\u0000b\"", "\"a\\u0000b\"");

    /* a lone surrogate or invalid UTF-8 is not */
    t_assert_invalid("\"\\ud800\"");
    t_assert_invalid("\"\\udc00x\"");
    t_assert_invalid("\"\xff\"");
    t_assert_invalid("\"\xc3\"");
}
END_TEST


START_TEST(test_json_numbers)
{
    t_assert_same("{\"t\":1.0}", "{\"t\":1.00}");
    t_assert_same("[0.5]", "[5e-1]");
    t_assert_canon("[1.0,-0,100,-7]", "[1.0,0,100,-7]");

    /* integer and real are distinct JSON types to jansson */
    t_assert_differ("[1]", "[1.0]");

    /* scalars at top level */
    t_assert_canon("42", "42");
    t_assert_canon(" \"x\" ", "\"x\"");
    t_assert_canon("null", "null");

    /* beyond int64 */
    t_assert_invalid("[9223372036854775808]");
    t_assert_canon("[9223372036854775807]", "[9223372036854775807]");
}
END_TEST


START_TEST(test_json_invalid)
{
    char    out[16];
    size_t  n;

    t_assert_invalid("");
    t_assert_invalid("   ");
    t_assert_invalid("{");
    t_assert_invalid("{\"a\":}");
    t_assert_invalid("{\"a\":1,}");
    t_assert_invalid("[1,2");
    t_assert_invalid("[1 2]");
    t_assert_invalid("{a:1}");
    t_assert_invalid("{'a':1}");
    t_assert_invalid("{\"a\":1} x");
    t_assert_invalid("{} {}");
    t_assert_invalid("[NaN]");
    t_assert_invalid("[01]");
    t_assert_invalid("\"unterminated");

    /* duplicate keys are ambiguous: rejected, also when nested */
    t_assert_invalid("{\"a\":1,\"a\":2}");
    t_assert_invalid("{\"a\":1,\"a\":1}");
    t_assert_invalid("{\"x\":[{\"m\":1,\"m\":2}]}");

    /* the length is honoured: no read of the NUL terminator */
    ck_assert_int_eq(dsg_json_canonical("[1]x", 3, out, sizeof(out), &n),
                     DSG_JSON_OK);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(dsg_json_canonical("[1]", 2, out, sizeof(out), &n),
                     DSG_JSON_EPARSE);

    /* an embedded NUL byte (not the escape) ends nothing: invalid */
    ck_assert_int_eq(dsg_json_canonical("[1]\0", 4, out, sizeof(out), &n),
                     DSG_JSON_EPARSE);

    ck_assert_int_eq(dsg_json_canonical(NULL, 0, out, sizeof(out), &n),
                     DSG_JSON_EPARSE);
}
END_TEST


START_TEST(test_json_espace)
{
    int          rc;
    char         out[T_CAP];
    size_t       n, need;
    const char  *in = "{ \"b\" : [1, 2, 3], \"a\" : \"hello\" }";
    const char  *want = "{\"a\":\"hello\",\"b\":[1,2,3]}";

    need = strlen(want);

    /* one byte short */
    n = 0;
    rc = dsg_json_canonical(in, strlen(in), out, need - 1, &n);
    ck_assert_int_eq(rc, DSG_JSON_ESPACE);
    ck_assert_uint_eq(n, need);

    /* no buffer at all: a size query */
    n = 0;
    rc = dsg_json_canonical(in, strlen(in), NULL, 0, &n);
    ck_assert_int_eq(rc, DSG_JSON_ESPACE);
    ck_assert_uint_eq(n, need);

    /* exactly enough; bytes past it are not touched */
    memset(out, '#', sizeof(out));
    rc = dsg_json_canonical(in, strlen(in), out, need, &n);
    ck_assert_int_eq(rc, DSG_JSON_OK);
    ck_assert_uint_eq(n, need);
    ck_assert_mem_eq(out, want, need);
    ck_assert_int_eq(out[need], '#');
}
END_TEST


/* a larger, realistic body: canonical form is a fixed point */

START_TEST(test_json_idempotent)
{
    int     rc;
    char   *in, *c1, *c2;
    size_t  i, len, n1, n2, cap;

    cap = 1 << 20;
    in = malloc(cap);
    c1 = malloc(cap);
    c2 = malloc(cap);
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(c1);
    ck_assert_ptr_nonnull(c2);

    len = (size_t) snprintf(in, cap, "{\"stream\": true, \"model\": "
                            "\"deepseek-chat\", \"messages\": [");

    for (i = 0; i < 500; i++) {
        len += (size_t) snprintf(in + len, cap - len,
                                 "%s{\"content\": \"message %zu \\u00e9\", "
                                 "\"role\": \"%s\"}", i ? ", " : "",
                                 i, (i & 1) ? "assistant" : "user");
    }

    len += (size_t) snprintf(in + len, cap - len,
                             "], \"max_tokens\": 1024, \"top_p\": 0.95}");

    rc = dsg_json_canonical(in, len, c1, cap, &n1);
    ck_assert_int_eq(rc, DSG_JSON_OK);
    ck_assert_uint_lt(n1, len);

    rc = dsg_json_canonical(c1, n1, c2, cap, &n2);
    ck_assert_int_eq(rc, DSG_JSON_OK);
    ck_assert_uint_eq(n1, n2);
    ck_assert_mem_eq(c1, c2, n1);

    ck_assert_mem_eq(c1, "{\"max_tokens\":1024,\"messages\":[{\"content\":",
                     42);

    free(in);
    free(c1);
    free(c2);
}
END_TEST


START_TEST(test_json_strerror)
{
    ck_assert_str_ne(dsg_json_strerror(DSG_JSON_EPARSE),
                     dsg_json_strerror(DSG_JSON_ESPACE));
    ck_assert_ptr_nonnull(dsg_json_strerror(DSG_JSON_ENOMEM));
    ck_assert_ptr_nonnull(dsg_json_strerror(DSG_JSON_OK));
    ck_assert_ptr_nonnull(dsg_json_strerror(12345));
}
END_TEST


/* the prescan bounds values and depth, and is not fooled by strings */

START_TEST(test_json_prescan)
{
    size_t   i;
    char    *big;
    const char  *ok = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    const char  *str = "[\"{[,:,:,:,:,:\\\"[[[[[[\"]";

    ck_assert_int_eq(dsg_json_prescan(ok, strlen(ok), 16, 4), DSG_JSON_OK);

    /* { : [ { : , : = 7 values beside the root */
    ck_assert_int_eq(dsg_json_prescan(ok, strlen(ok), 7, 4),
                     DSG_JSON_ELIMIT);
    ck_assert_int_eq(dsg_json_prescan(ok, strlen(ok), 16, 2),
                     DSG_JSON_ELIMIT);

    /* brackets, commas and an escaped quote inside a string count nothing */
    ck_assert_int_eq(dsg_json_prescan(str, strlen(str), 2, 1), DSG_JSON_OK);

    /* the hostile body of issue 13: [{},{},...] */
    big = malloc(1024 * 1024);
    ck_assert_ptr_nonnull(big);
    big[0] = '[';
    for (i = 1; i + 3 < 1024 * 1024; i += 3) {
        memcpy(big + i, "{},", 3);
    }
    big[i - 1] = ']';

    ck_assert_int_eq(dsg_json_prescan(big, i, DSG_JSON_MAX_VALUES,
                                      DSG_JSON_MAX_DEPTH),
                     DSG_JSON_ELIMIT);

    /* deep nesting */
    memset(big, '[', 100);
    ck_assert_int_eq(dsg_json_prescan(big, 100, DSG_JSON_MAX_VALUES,
                                      DSG_JSON_MAX_DEPTH),
                     DSG_JSON_ELIMIT);
    free(big);

    ck_assert_ptr_nonnull(dsg_json_strerror(DSG_JSON_ELIMIT));
}
END_TEST


/* the output cap of a chat request, for its token reservation */
START_TEST(test_json_max_tokens)
{
    uint64_t     n;
    const char  *both = "{\"max_tokens\":50,\"max_completion_tokens\":20}";
    const char  *old = "{\"messages\":[],\"max_tokens\":300}";
    const char  *bad = "{\"max_tokens\":-5,\"max_completion_tokens\":1.5}";
    const char  *nested = "{\"x\":{\"max_tokens\":9}}";

    ck_assert_int_eq(dsg_json_max_tokens(both, strlen(both), &n),
                     DSG_JSON_OK);
    ck_assert_uint_eq(n, 20);       /* max_completion_tokens wins */

    ck_assert_int_eq(dsg_json_max_tokens(old, strlen(old), &n), DSG_JSON_OK);
    ck_assert_uint_eq(n, 300);

    ck_assert_int_eq(dsg_json_max_tokens(bad, strlen(bad), &n), DSG_JSON_OK);
    ck_assert_uint_eq(n, 0);        /* not positive integers: ignored */

    ck_assert_int_eq(dsg_json_max_tokens(nested, strlen(nested), &n),
                     DSG_JSON_OK);
    ck_assert_uint_eq(n, 0);        /* only the top level counts */

    ck_assert_int_eq(dsg_json_max_tokens("{\"max_tokens\":", 14, &n),
                     DSG_JSON_EPARSE);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(dsg_json_max_tokens(NULL, 0, &n), DSG_JSON_EPARSE);
}
END_TEST


/* where "stream_options":{"include_usage":true} may go */
START_TEST(test_json_stream_usage)
{
    size_t       at;
    const char  *s1 = "  {\"stream\":true,\"messages\":[]}";
    const char  *s2 = "{\"stream\":true,\"stream_options\":{}}";
    const char  *s3 = "{\"stream\":false}";
    const char  *s4 = "{\"messages\":[]}";
    const char  *s5 = "[{\"stream\":true}]";

    ck_assert_int_eq(dsg_json_stream_usage(s1, strlen(s1), &at),
                     DSG_JSON_OK);
    ck_assert_uint_eq(at, 3);       /* just after the brace */

    ck_assert_int_eq(dsg_json_stream_usage(s2, strlen(s2), &at),
                     DSG_JSON_OK);
    ck_assert_uint_eq(at, 0);       /* the client's own choice stays */

    ck_assert_int_eq(dsg_json_stream_usage(s3, strlen(s3), &at),
                     DSG_JSON_OK);
    ck_assert_uint_eq(at, 0);       /* not a stream: DeepSeek refuses it */

    ck_assert_int_eq(dsg_json_stream_usage(s4, strlen(s4), &at),
                     DSG_JSON_OK);
    ck_assert_uint_eq(at, 0);

    ck_assert_int_eq(dsg_json_stream_usage(s5, strlen(s5), &at),
                     DSG_JSON_OK);
    ck_assert_uint_eq(at, 0);       /* not an object */

    ck_assert_int_eq(dsg_json_stream_usage("{\"stream\":tru", 14, &at),
                     DSG_JSON_EPARSE);
    ck_assert_uint_eq(at, 0);
}
END_TEST


Suite *
dsg_json_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_json");
    tc = tcase_create("canonical");

    tcase_add_test(tc, test_json_key_order);
    tcase_add_test(tc, test_json_whitespace);
    tcase_add_test(tc, test_json_array_order);
    tcase_add_test(tc, test_json_nested);
    tcase_add_test(tc, test_json_unicode);
    tcase_add_test(tc, test_json_numbers);
    tcase_add_test(tc, test_json_invalid);
    tcase_add_test(tc, test_json_espace);
    tcase_add_test(tc, test_json_idempotent);
    tcase_add_test(tc, test_json_strerror);
    tcase_add_test(tc, test_json_prescan);
    tcase_add_test(tc, test_json_max_tokens);
    tcase_add_test(tc, test_json_stream_usage);

    suite_add_tcase(s, tc);

    return s;
}
