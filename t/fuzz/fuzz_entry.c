/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_entry, the cached value codec.
 *
 * 1. The whole input is decoded as a stored value (what LMDB hands back,
 *    possibly corrupt): the return code must be the one the layout in
 *    dsg_entry.h implies, an error leaves the output untouched, a success
 *    yields views inside the buffer that re-encode to the same bytes
 *    (the reserved field aside), through dsg_entry_encode() and through
 *    dsg_entry_encode_prefix() + body alike.
 * 2. The input is also cut into scalars, key, headers and body: encode
 *    then decode must give them back, too small a buffer must be refused
 *    untouched.
 */


#include <string.h>

#include "dsg_entry.h"
#include "fuzz.h"


#define OFF_RESERVED  10


static uint16_t
get16(const uint8_t *p)
{
    return (uint16_t) (p[0] | (p[1] << 8));
}


static uint64_t
getn(const uint8_t *p, unsigned n)
{
    unsigned  i;
    uint64_t  v;

    v = 0;

    for (i = 0; i < n; i++) {
        v |= (uint64_t) p[i] << (8 * i);
    }

    return v;
}


/* what dsg_entry_decode() must return, from the layout alone */

static int
expected_decode(const uint8_t *buf, size_t len)
{
    uint64_t  k, h, b, max;

    if (len < DSG_ENTRY_HEADER_SIZE) {
        return DSG_ENTRY_ESHORT;
    }

    if (memcmp(buf, "DSGE", 4) != 0) {
        return DSG_ENTRY_EMAGIC;
    }

    if (get16(buf + 4) != DSG_ENTRY_VERSION) {
        return DSG_ENTRY_EVERSION;
    }

    k = getn(buf + 36, 4);
    h = getn(buf + 40, 4);
    b = getn(buf + 44, 8);
    max = DSG_ENTRY_MAX_SIZE;

    if (k > max || h > max || b > max
        || DSG_ENTRY_HEADER_SIZE + k + h + b > max)
    {
        return DSG_ENTRY_ELEN;
    }

    if (DSG_ENTRY_HEADER_SIZE + k + h + b > len) {
        return DSG_ENTRY_ESHORT;
    }

    if (DSG_ENTRY_HEADER_SIZE + k + h + b < len) {
        return DSG_ENTRY_ELEN;
    }

    return DSG_ENTRY_OK;
}


static int
same_view(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}


static void
fuzz_decode(const uint8_t *data, size_t size)
{
    int           rc, want;
    size_t        n;
    uint8_t      *out;
    dsg_entry_t   e, poison;

    memset(&poison, 0xa5, sizeof(poison));
    memcpy(&e, &poison, sizeof(e));

    rc = dsg_entry_decode(data, size, &e);
    want = expected_decode(data, size);

    FUZZ_ASSERT(rc == want);
    FUZZ_ASSERT(dsg_entry_strerror(rc) != NULL);

    if (rc != DSG_ENTRY_OK) {
        FUZZ_ASSERT(memcmp(&e, &poison, sizeof(e)) == 0);
        return;
    }

    /* the views tile the buffer after the header, in order */

    FUZZ_ASSERT(e.key == data + DSG_ENTRY_HEADER_SIZE);
    FUZZ_ASSERT(e.hdrs == e.key + e.key_len);
    FUZZ_ASSERT(e.body == e.hdrs + e.hdrs_len);
    FUZZ_ASSERT(e.body + e.body_len == data + size);
    FUZZ_ASSERT(dsg_entry_size(e.key_len, e.hdrs_len, e.body_len) == size);
    FUZZ_ASSERT(e.flags == get16(data + 6));
    FUZZ_ASSERT(e.status == get16(data + 8));
    FUZZ_ASSERT(e.created_ms == getn(data + 12, 8));
    FUZZ_ASSERT(e.expires_ms == getn(data + 20, 8));
    FUZZ_ASSERT(e.stale_until_ms == getn(data + 28, 8));

    /* re-encode: the same bytes, but the reserved field, written as 0 */

    out = malloc(size);
    FUZZ_ASSERT(out != NULL);

    rc = dsg_entry_encode(out, size, &e);
    FUZZ_ASSERT(rc == (int) size);
    FUZZ_ASSERT(memcmp(out, data, OFF_RESERVED) == 0);
    FUZZ_ASSERT(out[OFF_RESERVED] == 0 && out[OFF_RESERVED + 1] == 0);
    FUZZ_ASSERT(memcmp(out + OFF_RESERVED + 2, data + OFF_RESERVED + 2,
                       size - OFF_RESERVED - 2) == 0);

    memset(out, 0x5a, size);
    rc = dsg_entry_encode_prefix(out, size, &e);
    n = DSG_ENTRY_HEADER_SIZE + e.key_len + e.hdrs_len;
    FUZZ_ASSERT(rc == (int) n);
    FUZZ_ASSERT(memcmp(out + OFF_RESERVED + 2, data + OFF_RESERVED + 2,
                       n - OFF_RESERVED - 2) == 0);

    rc = dsg_entry_encode_header(out, size, &e);
    FUZZ_ASSERT(rc == DSG_ENTRY_HEADER_SIZE);

    /* a byte short: refused, not written */

    memset(out, 0x5a, size);
    rc = dsg_entry_encode(out, size - 1, &e);
    FUZZ_ASSERT(rc == DSG_ENTRY_ESPACE);
    FUZZ_ASSERT(out[0] == 0x5a);

    free(out);

    /* one byte more or less never decodes */

    FUZZ_ASSERT(dsg_entry_decode(data, size - 1, &poison) != DSG_ENTRY_OK);
}


static void
fuzz_roundtrip(const uint8_t *data, size_t size)
{
    int            rc;
    fz_t           f;
    size_t         total, klen, hlen, cap;
    uint8_t       *buf;
    dsg_entry_t    e, d;

    f.p = data;
    f.n = size;

    memset(&e, 0, sizeof(e));
    e.flags = (uint16_t) fz_uint(&f, 2);
    e.status = (uint16_t) fz_uint(&f, 2);
    e.created_ms = fz_uint(&f, 8);
    e.expires_ms = fz_uint(&f, 8);
    e.stale_until_ms = fz_uint(&f, 8);
    klen = fz_u8(&f);
    hlen = fz_u8(&f);
    cap = fz_u8(&f);

    e.key = fz_bytes(&f, klen, &e.key_len);
    e.hdrs = fz_bytes(&f, hlen, &e.hdrs_len);
    e.body = fz_rest(&f, &e.body_len);

    total = dsg_entry_size(e.key_len, e.hdrs_len, e.body_len);
    FUZZ_ASSERT(total == DSG_ENTRY_HEADER_SIZE + e.key_len + e.hdrs_len
                         + e.body_len);

    /* too small a buffer: refused, nothing written */

    if (cap < total) {
        buf = malloc(cap + 1);
        FUZZ_ASSERT(buf != NULL);
        memset(buf, 0x5a, cap + 1);
        rc = dsg_entry_encode(buf, cap, &e);
        FUZZ_ASSERT(rc == DSG_ENTRY_ESPACE);
        FUZZ_ASSERT(buf[0] == 0x5a);
        free(buf);
    }

    buf = malloc(total);
    FUZZ_ASSERT(buf != NULL);

    rc = dsg_entry_encode(buf, total, &e);
    FUZZ_ASSERT(rc == (int) total);

    rc = dsg_entry_decode(buf, total, &d);
    FUZZ_ASSERT(rc == DSG_ENTRY_OK);

    FUZZ_ASSERT(d.flags == e.flags);
    FUZZ_ASSERT(d.status == e.status);
    FUZZ_ASSERT(d.created_ms == e.created_ms);
    FUZZ_ASSERT(d.expires_ms == e.expires_ms);
    FUZZ_ASSERT(d.stale_until_ms == e.stale_until_ms);
    FUZZ_ASSERT(same_view(d.key, d.key_len, e.key, e.key_len));
    FUZZ_ASSERT(same_view(d.hdrs, d.hdrs_len, e.hdrs, e.hdrs_len));
    FUZZ_ASSERT(same_view(d.body, d.body_len, e.body, e.body_len));

    /* a NULL view of a nonzero length is refused */

    if (e.body_len != 0) {
        d = e;
        d.body = NULL;
        FUZZ_ASSERT(dsg_entry_encode(buf, total, &d) == DSG_ENTRY_EINVAL);
    }

    if (e.key_len != 0) {
        d = e;
        d.key = NULL;
        FUZZ_ASSERT(dsg_entry_encode(buf, total, &d) == DSG_ENTRY_EINVAL);
    }

    free(buf);

    /* absurd lengths are refused without touching the buffer */

    d = e;
    d.body_len = DSG_ENTRY_MAX_SIZE + (e.flags & 0xff);
    d.body = NULL;
    FUZZ_ASSERT(dsg_entry_size(d.key_len, d.hdrs_len, d.body_len) == 0);
    FUZZ_ASSERT(dsg_entry_encode_header(NULL, 0, &d) == DSG_ENTRY_ELEN);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_decode(data, size);
    fuzz_roundtrip(data, size);

    return 0;
}
