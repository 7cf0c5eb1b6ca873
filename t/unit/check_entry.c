/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_entry, the cached value codec.
 */


#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <check.h>

#include "dsg_entry.h"


Suite *dsg_entry_suite(void);


static const char  t_key[] = "POST /v1/chat/completions "
                             "{\"messages\":[],\"model\":\"deepseek-chat\"}";
static const char  t_hdrs[] = "Content-Type: application/json\r\n";
static const char  t_body[] = "{\"id\":\"x\",\"choices\":[]}";


static void
t_entry_init(dsg_entry_t *e)
{
    memset(e, 0, sizeof(dsg_entry_t));

    e->flags = DSG_ENTRY_FLAG_SSE;
    e->status = 200;
    e->created_ms = 1700000000000ULL;
    e->expires_ms = 1700000060000ULL;
    e->stale_until_ms = 1700003600000ULL;
    e->key = (const uint8_t *) t_key;
    e->key_len = sizeof(t_key) - 1;
    e->hdrs = (const uint8_t *) t_hdrs;
    e->hdrs_len = sizeof(t_hdrs) - 1;
    e->body = (const uint8_t *) t_body;
    e->body_len = sizeof(t_body) - 1;
}


/* encodes e into a malloc'ed buffer of exactly the entry size */

static uint8_t *
t_encode(const dsg_entry_t *e, size_t *len)
{
    int       rc;
    size_t    n;
    uint8_t  *buf;

    n = dsg_entry_size(e->key_len, e->hdrs_len, e->body_len);
    ck_assert_uint_gt(n, 0);

    buf = malloc(n);
    ck_assert_ptr_nonnull(buf);

    rc = dsg_entry_encode(buf, n, e);
    ck_assert_int_eq(rc, (int) n);

    *len = n;

    return buf;
}


static void
t_assert_same(const dsg_entry_t *a, const dsg_entry_t *b)
{
    ck_assert_uint_eq(a->flags, b->flags);
    ck_assert_uint_eq(a->status, b->status);
    ck_assert_uint_eq(a->created_ms, b->created_ms);
    ck_assert_uint_eq(a->expires_ms, b->expires_ms);
    ck_assert_uint_eq(a->stale_until_ms, b->stale_until_ms);
    ck_assert_uint_eq(a->key_len, b->key_len);
    ck_assert_uint_eq(a->hdrs_len, b->hdrs_len);
    ck_assert_uint_eq(a->body_len, b->body_len);

    if (a->key_len) {
        ck_assert_mem_eq(a->key, b->key, a->key_len);
    }

    if (a->hdrs_len) {
        ck_assert_mem_eq(a->hdrs, b->hdrs, a->hdrs_len);
    }

    if (a->body_len) {
        ck_assert_mem_eq(a->body, b->body, a->body_len);
    }
}


START_TEST(test_entry_roundtrip)
{
    size_t       len;
    uint8_t     *buf;
    dsg_entry_t  in, out;

    t_entry_init(&in);

    buf = t_encode(&in, &len);
    ck_assert_uint_eq(len, DSG_ENTRY_HEADER_SIZE + in.key_len + in.hdrs_len
                           + in.body_len);

    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_OK);
    t_assert_same(&in, &out);

    /* the views point into the buffer, in layout order */
    ck_assert_ptr_eq(out.key, buf + DSG_ENTRY_HEADER_SIZE);
    ck_assert_ptr_eq(out.hdrs, out.key + out.key_len);
    ck_assert_ptr_eq(out.body, out.hdrs + out.hdrs_len);
    ck_assert_ptr_eq(out.body + out.body_len, buf + len);

    free(buf);
}
END_TEST


START_TEST(test_entry_roundtrip_empty)
{
    size_t       len;
    uint8_t     *buf;
    dsg_entry_t  in, out;

    /* all three parts empty, NULL views: a legal entry of header only */
    memset(&in, 0, sizeof(dsg_entry_t));
    in.status = 204;
    in.expires_ms = UINT64_MAX;

    buf = t_encode(&in, &len);
    ck_assert_uint_eq(len, DSG_ENTRY_HEADER_SIZE);

    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_OK);
    t_assert_same(&in, &out);
    ck_assert_ptr_eq(out.body, buf + len);

    free(buf);

    /* empty body only */
    t_entry_init(&in);
    in.body = NULL;
    in.body_len = 0;

    buf = t_encode(&in, &len);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_OK);
    t_assert_same(&in, &out);
    ck_assert_uint_eq(out.body_len, 0);

    free(buf);
}
END_TEST


START_TEST(test_entry_roundtrip_large)
{
    size_t       len, i, n;
    uint8_t     *buf, *body;
    dsg_entry_t  in, out;

    n = 1024 * 1024 + 7;

    body = malloc(n);
    ck_assert_ptr_nonnull(body);

    for (i = 0; i < n; i++) {
        body[i] = (uint8_t) (i * 131 + (i >> 13));
    }

    t_entry_init(&in);
    in.flags = 0;
    in.body = body;
    in.body_len = n;

    buf = t_encode(&in, &len);

    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_OK);
    t_assert_same(&in, &out);

    free(buf);
    free(body);
}
END_TEST


/*
 * Every proper prefix of a valid entry is rejected as truncated (or, when
 * even the header is cut, as short) and never read past its end: each
 * prefix is decoded from its own exact-size heap copy, under ASan.
 */

START_TEST(test_entry_truncation)
{
    int          rc;
    size_t       len, cut;
    uint8_t     *buf, *copy;
    dsg_entry_t  in, out;

    t_entry_init(&in);
    buf = t_encode(&in, &len);

    for (cut = 0; cut < len; cut++) {
        copy = malloc(cut ? cut : 1);
        ck_assert_ptr_nonnull(copy);
        memcpy(copy, buf, cut);

        memset(&out, 0xa5, sizeof(out));
        rc = dsg_entry_decode(copy, cut, &out);

        ck_assert_msg(rc == DSG_ENTRY_ESHORT || rc == DSG_ENTRY_ELEN,
                      "prefix %zu of %zu: rc %d", cut, len, rc);

        free(copy);
    }

    ck_assert_int_eq(dsg_entry_decode(NULL, 0, &out), DSG_ENTRY_ESHORT);

    /* one trailing byte: the lengths do not add up */
    copy = malloc(len + 1);
    ck_assert_ptr_nonnull(copy);
    memcpy(copy, buf, len);
    copy[len] = 0;

    ck_assert_int_eq(dsg_entry_decode(copy, len + 1, &out), DSG_ENTRY_ELEN);

    free(copy);
    free(buf);
}
END_TEST


START_TEST(test_entry_bad_magic)
{
    size_t       len, i;
    uint8_t     *buf;
    dsg_entry_t  in, out;

    t_entry_init(&in);
    buf = t_encode(&in, &len);

    for (i = 0; i < 4; i++) {
        buf[i] ^= 0x20;
        ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_EMAGIC);
        buf[i] ^= 0x20;
    }

    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_OK);

    free(buf);
}
END_TEST


START_TEST(test_entry_bad_version)
{
    size_t       len;
    uint8_t     *buf;
    dsg_entry_t  in, out;

    t_entry_init(&in);
    buf = t_encode(&in, &len);

    buf[4] = 2;
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_EVERSION);

    buf[4] = 0;
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_EVERSION);

    buf[4] = 1;
    buf[5] = 1;     /* 0x0101 */
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_EVERSION);

    buf[5] = 0;
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_OK);

    free(buf);
}
END_TEST


/* overwrites the n-byte little-endian field at off */

static void
t_set_le(uint8_t *p, size_t off, size_t n, uint64_t v)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        p[off + i] = (uint8_t) (v >> (8 * i));
    }
}


START_TEST(test_entry_absurd_lengths)
{
    size_t       len;
    uint8_t     *buf, *orig;
    dsg_entry_t  in, out;

    t_entry_init(&in);
    orig = t_encode(&in, &len);

    buf = malloc(len);
    ck_assert_ptr_nonnull(buf);

    /* key_len = 0xffffffff */
    memcpy(buf, orig, len);
    t_set_le(buf, 36, 4, 0xffffffffULL);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ELEN);

    /* hdrs_len = 0xffffffff */
    memcpy(buf, orig, len);
    t_set_le(buf, 40, 4, 0xffffffffULL);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ELEN);

    /* body_len huge: 2^64 - 1, 2^63, and one that wraps a 64-bit sum */
    memcpy(buf, orig, len);
    t_set_le(buf, 44, 8, UINT64_MAX);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ELEN);

    t_set_le(buf, 44, 8, 1ULL << 63);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ELEN);

    /* header + key + hdrs + body == 2^64: wraps to 0 in 64 bits */
    t_set_le(buf, 44, 8, UINT64_MAX - DSG_ENTRY_HEADER_SIZE - in.key_len
                         - in.hdrs_len + 1);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ELEN);

    /* all three at the bound: each legal, the sum is not */
    t_set_le(buf, 36, 4, DSG_ENTRY_MAX_SIZE);
    t_set_le(buf, 40, 4, DSG_ENTRY_MAX_SIZE);
    t_set_le(buf, 44, 8, DSG_ENTRY_MAX_SIZE);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ELEN);

    /* plausible lengths claiming more than the buffer: truncated */
    memcpy(buf, orig, len);
    t_set_le(buf, 44, 8, in.body_len + 1);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ESHORT);

    /* lengths claiming less than the buffer: do not add up */
    memcpy(buf, orig, len);
    t_set_le(buf, 36, 4, in.key_len - 1);
    ck_assert_int_eq(dsg_entry_decode(buf, len, &out), DSG_ENTRY_ELEN);

    free(buf);
    free(orig);

    /* the size function refuses them too */
    ck_assert_uint_eq(dsg_entry_size(0xffffffffUL, 0, 0), 0);
    ck_assert_uint_eq(dsg_entry_size(0, 0, SIZE_MAX), 0);
    ck_assert_uint_eq(dsg_entry_size(SIZE_MAX, SIZE_MAX, SIZE_MAX), 0);
    ck_assert_uint_eq(dsg_entry_size(DSG_ENTRY_MAX_SIZE, 0, 0), 0);
    ck_assert_uint_eq(dsg_entry_size(0, 0, DSG_ENTRY_MAX_SIZE
                                           - DSG_ENTRY_HEADER_SIZE),
                      DSG_ENTRY_MAX_SIZE);
    ck_assert_uint_eq(dsg_entry_size(0, 0, 0), DSG_ENTRY_HEADER_SIZE);
}
END_TEST


START_TEST(test_entry_encode_errors)
{
    size_t       len;
    uint8_t      buf[512];
    dsg_entry_t  e;

    t_entry_init(&e);
    len = dsg_entry_size(e.key_len, e.hdrs_len, e.body_len);
    ck_assert_uint_lt(len, sizeof(buf));

    /* too small: refused before anything is written */
    memset(buf, 0xee, sizeof(buf));
    ck_assert_int_eq(dsg_entry_encode(buf, len - 1, &e), DSG_ENTRY_ESPACE);
    ck_assert_uint_eq(buf[0], 0xee);

    ck_assert_int_eq(dsg_entry_encode_header(buf, DSG_ENTRY_HEADER_SIZE - 1,
                                             &e),
                     DSG_ENTRY_ESPACE);
    ck_assert_int_eq(dsg_entry_encode_prefix(buf, DSG_ENTRY_HEADER_SIZE
                                                  + e.key_len, &e),
                     DSG_ENTRY_ESPACE);
    ck_assert_uint_eq(buf[0], 0xee);
    ck_assert_int_eq(dsg_entry_encode(NULL, 0, &e), DSG_ENTRY_ESPACE);

    ck_assert_int_eq(dsg_entry_encode(buf, len, &e), (int) len);

    /* a NULL view with a length */
    e.body = NULL;
    ck_assert_int_eq(dsg_entry_encode(buf, sizeof(buf), &e),
                     DSG_ENTRY_EINVAL);
    t_entry_init(&e);
    e.key = NULL;
    ck_assert_int_eq(dsg_entry_encode(buf, sizeof(buf), &e),
                     DSG_ENTRY_EINVAL);
    t_entry_init(&e);
    e.hdrs = NULL;
    ck_assert_int_eq(dsg_entry_encode_prefix(buf, sizeof(buf), &e),
                     DSG_ENTRY_EINVAL);

    /* absurd lengths */
    t_entry_init(&e);
    e.body_len = DSG_ENTRY_MAX_SIZE;
    ck_assert_int_eq(dsg_entry_encode(buf, sizeof(buf), &e), DSG_ENTRY_ELEN);
    ck_assert_int_eq(dsg_entry_encode_header(buf, sizeof(buf), &e),
                     DSG_ENTRY_ELEN);
    e.body_len = SIZE_MAX;
    ck_assert_int_eq(dsg_entry_encode_prefix(buf, sizeof(buf), &e),
                     DSG_ENTRY_ELEN);
}
END_TEST


/* the byte layout itself: fixed offsets, little-endian */

START_TEST(test_entry_layout)
{
    uint8_t      buf[DSG_ENTRY_HEADER_SIZE + 3];
    dsg_entry_t  e;

    memset(&e, 0, sizeof(e));
    e.flags = 0x0102;
    e.status = 0x0304;
    e.created_ms = 0x1112131415161718ULL;
    e.expires_ms = 0x2122232425262728ULL;
    e.stale_until_ms = 0x3132333435363738ULL;
    e.key = (const uint8_t *) "K";
    e.key_len = 1;
    e.hdrs = (const uint8_t *) "H";
    e.hdrs_len = 1;
    e.body = (const uint8_t *) "B";
    e.body_len = 1;

    ck_assert_int_eq(dsg_entry_encode(buf, sizeof(buf), &e), sizeof(buf));

    ck_assert_mem_eq(buf, "DSGE", 4);
    ck_assert_mem_eq(buf + 4, "\x01\x00", 2);
    ck_assert_mem_eq(buf + 6, "\x02\x01", 2);
    ck_assert_mem_eq(buf + 8, "\x04\x03", 2);
    ck_assert_mem_eq(buf + 10, "\x00\x00", 2);
    ck_assert_mem_eq(buf + 12, "\x18\x17\x16\x15\x14\x13\x12\x11", 8);
    ck_assert_mem_eq(buf + 20, "\x28\x27\x26\x25\x24\x23\x22\x21", 8);
    ck_assert_mem_eq(buf + 28, "\x38\x37\x36\x35\x34\x33\x32\x31", 8);
    ck_assert_mem_eq(buf + 36, "\x01\x00\x00\x00", 4);
    ck_assert_mem_eq(buf + 40, "\x01\x00\x00\x00", 4);
    ck_assert_mem_eq(buf + 44, "\x01\x00\x00\x00\x00\x00\x00\x00", 8);
    ck_assert_mem_eq(buf + 52, "KHB", 3);
}
END_TEST


/*
 * The zero-copy path of the glue: header + key + hdrs, then the body
 * appended chunk by chunk into the same (reserved) buffer, gives exactly
 * the one-shot encoding.
 */

START_TEST(test_entry_prefix_append)
{
    int          rc;
    size_t       len, n, off, chunk, i;
    uint8_t     *one, *two, *body;
    dsg_entry_t  e, out;

    n = 100000;
    body = malloc(n);
    ck_assert_ptr_nonnull(body);

    for (i = 0; i < n; i++) {
        body[i] = (uint8_t) (i ^ (i >> 8));
    }

    t_entry_init(&e);
    e.body = body;
    e.body_len = n;

    one = t_encode(&e, &len);

    two = malloc(len);
    ck_assert_ptr_nonnull(two);
    memset(two, 0, len);

    /* the header alone is the first bytes of the entry */
    rc = dsg_entry_encode_header(two, len, &e);
    ck_assert_int_eq(rc, DSG_ENTRY_HEADER_SIZE);
    ck_assert_mem_eq(two, one, DSG_ENTRY_HEADER_SIZE);

    /* the prefix does not need the body view */
    e.body = NULL;
    memset(two, 0, len);

    rc = dsg_entry_encode_prefix(two, len, &e);
    ck_assert_int_eq(rc, (int) (DSG_ENTRY_HEADER_SIZE + e.key_len
                                + e.hdrs_len));

    for (off = 0; off < n; off += chunk) {
        chunk = (off % 3 == 0) ? 4093 : 8192;
        if (chunk > n - off) {
            chunk = n - off;
        }

        memcpy(two + rc + off, body + off, chunk);
    }

    ck_assert_mem_eq(one, two, len);
    ck_assert_int_eq(dsg_entry_decode(two, len, &out), DSG_ENTRY_OK);
    ck_assert_mem_eq(out.body, body, n);

    free(two);
    free(one);
    free(body);
}
END_TEST


START_TEST(test_entry_strerror)
{
    int  rc;

    for (rc = DSG_ENTRY_EINVAL; rc <= DSG_ENTRY_OK; rc++) {
        ck_assert_ptr_nonnull(dsg_entry_strerror(rc));
    }

    ck_assert_str_ne(dsg_entry_strerror(DSG_ENTRY_ESHORT),
                     dsg_entry_strerror(DSG_ENTRY_ELEN));
    ck_assert_ptr_nonnull(dsg_entry_strerror(-1000));
}
END_TEST


Suite *
dsg_entry_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_entry");
    tc = tcase_create("codec");

    tcase_add_test(tc, test_entry_roundtrip);
    tcase_add_test(tc, test_entry_roundtrip_empty);
    tcase_add_test(tc, test_entry_roundtrip_large);
    tcase_add_test(tc, test_entry_truncation);
    tcase_add_test(tc, test_entry_bad_magic);
    tcase_add_test(tc, test_entry_bad_version);
    tcase_add_test(tc, test_entry_absurd_lengths);
    tcase_add_test(tc, test_entry_encode_errors);
    tcase_add_test(tc, test_entry_layout);
    tcase_add_test(tc, test_entry_prefix_append);
    tcase_add_test(tc, test_entry_strerror);

    suite_add_tcase(s, tc);

    return s;
}
