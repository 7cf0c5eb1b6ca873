/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * dsg_http: Cache-Control, list tokens, Accept-Encoding, Vary.
 */


#include <string.h>
#include <check.h>

#include "dsg_http.h"


static dsg_http_cc_t
cc_of(const char *v)
{
    dsg_http_cc_t  cc;

    dsg_http_cc_init(&cc);
    dsg_http_cc_parse(v, strlen(v), &cc);

    return cc;
}


START_TEST(test_http_cc)
{
    dsg_http_cc_t  cc;

    cc = cc_of("");
    ck_assert(!cc.no_store && !cc.private_ && !cc.public_);
    ck_assert_int_eq(cc.max_age, -1);
    ck_assert_int_eq(cc.s_maxage, -1);

    cc = cc_of("no-store");
    ck_assert(cc.no_store);

    cc = cc_of("Private, max-age=60");
    ck_assert(cc.private_);
    ck_assert_int_eq(cc.max_age, 60);

    cc = cc_of("public,s-maxage=\"30\" , must-revalidate");
    ck_assert(cc.public_ && cc.must_revalidate);
    ck_assert_int_eq(cc.s_maxage, 30);
    ck_assert_int_eq(cc.max_age, -1);

    /* a directive is a whole token, not a substring */
    cc = cc_of("x-private-thing, no-storex, max-agex=5");
    ck_assert(!cc.private_ && !cc.no_store);
    ck_assert_int_eq(cc.max_age, -1);

    /* malformed ages are 0; repeated ones take the lower */
    cc = cc_of("max-age=abc");
    ck_assert_int_eq(cc.max_age, 0);
    cc = cc_of("max-age=100, max-age=10");
    ck_assert_int_eq(cc.max_age, 10);

    /* no-cache only asks for revalidation: nothing set */
    cc = cc_of("no-cache");
    ck_assert(!cc.no_store && !cc.private_);

    /* several fields add up */
    dsg_http_cc_init(&cc);
    dsg_http_cc_parse("max-age=5", 9, &cc);
    dsg_http_cc_parse("private", 7, &cc);
    ck_assert(cc.private_);
    ck_assert_int_eq(cc.max_age, 5);
}
END_TEST


START_TEST(test_http_list)
{
    size_t       n, plen;
    const char  *v, *p, *tok, *par;

    v = " , Accept-Encoding,,accept-language ;x=1, *";
    p = v;

    ck_assert(dsg_http_list_next(&p, v + strlen(v), &tok, &n, &par, &plen));
    ck_assert_int_eq(n, 15);
    ck_assert(strncmp(tok, "Accept-Encoding", n) == 0);

    ck_assert(dsg_http_list_next(&p, v + strlen(v), &tok, &n, &par, &plen));
    ck_assert(strncmp(tok, "accept-language", n) == 0 && n == 15);
    ck_assert(strncmp(par, ";x=1", plen) == 0 && plen == 4);

    ck_assert(dsg_http_list_next(&p, v + strlen(v), &tok, &n, &par, &plen));
    ck_assert(n == 1 && tok[0] == '*');

    ck_assert(!dsg_http_list_next(&p, v + strlen(v), &tok, &n, &par, &plen));
}
END_TEST


START_TEST(test_http_gzip)
{
#define GZ(s)  dsg_http_accepts_gzip(s, strlen(s))

    ck_assert(GZ("gzip"));
    ck_assert(GZ("gzip, deflate, br"));
    ck_assert(GZ("br;q=1.0, GZIP;q=0.5"));
    ck_assert(GZ("x-gzip"));
    ck_assert(GZ("gzip;q=0.001"));

    ck_assert(!GZ(""));
    ck_assert(!GZ("identity"));
    ck_assert(!GZ("deflate, br"));
    ck_assert(!GZ("gzip;q=0"));
    ck_assert(!GZ("gzip; q=0.000, identity"));
    ck_assert(!GZ("gzipx"));
    ck_assert(!GZ("*"));

#undef GZ
}
END_TEST


START_TEST(test_http_vary)
{
    ck_assert(dsg_http_vary_star("*", 1));
    ck_assert(dsg_http_vary_star("Accept-Encoding, *", 18));
    ck_assert(!dsg_http_vary_star("Accept-Encoding", 15));
    ck_assert(!dsg_http_vary_star("", 0));
}
END_TEST


Suite *
dsg_http_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_http");
    tc = tcase_create("headers");

    tcase_add_test(tc, test_http_cc);
    tcase_add_test(tc, test_http_list);
    tcase_add_test(tc, test_http_gzip);
    tcase_add_test(tc, test_http_vary);

    suite_add_tcase(s, tc);

    return s;
}
