/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The layout is documented in dsg_entry.h.  Integers are written and read
 * byte by byte with shifts: the result is little-endian on every host and
 * no struct is ever laid over the buffer, so neither alignment nor padding
 * nor host byte order can leak into the file format.
 */


#include <string.h>

#include "dsg_entry.h"


#define DSG_ENTRY_OFF_MAGIC       0
#define DSG_ENTRY_OFF_VERSION     4
#define DSG_ENTRY_OFF_FLAGS       6
#define DSG_ENTRY_OFF_STATUS      8
#define DSG_ENTRY_OFF_RESERVED   10
#define DSG_ENTRY_OFF_CREATED    12
#define DSG_ENTRY_OFF_EXPIRES    20
#define DSG_ENTRY_OFF_STALE      28
#define DSG_ENTRY_OFF_KEY_LEN    36
#define DSG_ENTRY_OFF_HDRS_LEN   40
#define DSG_ENTRY_OFF_BODY_LEN   44

#if (DSG_ENTRY_OFF_BODY_LEN + 8 != DSG_ENTRY_HEADER_SIZE)
#error "dsg_entry header layout and DSG_ENTRY_HEADER_SIZE disagree"
#endif


static void dsg_entry_put16(uint8_t *p, uint16_t v);
static void dsg_entry_put32(uint8_t *p, uint32_t v);
static void dsg_entry_put64(uint8_t *p, uint64_t v);
static uint16_t dsg_entry_get16(const uint8_t *p);
static uint32_t dsg_entry_get32(const uint8_t *p);
static uint64_t dsg_entry_get64(const uint8_t *p);
static uint64_t dsg_entry_total(uint64_t key_len, uint64_t hdrs_len,
    uint64_t body_len);


static void
dsg_entry_put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t) v;
    p[1] = (uint8_t) (v >> 8);
}


static void
dsg_entry_put32(uint8_t *p, uint32_t v)
{
    dsg_entry_put16(p, (uint16_t) v);
    dsg_entry_put16(p + 2, (uint16_t) (v >> 16));
}


static void
dsg_entry_put64(uint8_t *p, uint64_t v)
{
    dsg_entry_put32(p, (uint32_t) v);
    dsg_entry_put32(p + 4, (uint32_t) (v >> 32));
}


static uint16_t
dsg_entry_get16(const uint8_t *p)
{
    return (uint16_t) (p[0] | (p[1] << 8));
}


static uint32_t
dsg_entry_get32(const uint8_t *p)
{
    return (uint32_t) dsg_entry_get16(p)
           | ((uint32_t) dsg_entry_get16(p + 2) << 16);
}


static uint64_t
dsg_entry_get64(const uint8_t *p)
{
    return (uint64_t) dsg_entry_get32(p)
           | ((uint64_t) dsg_entry_get32(p + 4) << 32);
}


/*
 * Total encoded size, or 0 if absurd.  Each operand is first bounded by
 * DSG_ENTRY_MAX_SIZE (2^30), so the 64-bit sum cannot overflow whatever
 * the inputs (a decoded body_len may be anything up to 2^64 - 1).
 */

static uint64_t
dsg_entry_total(uint64_t key_len, uint64_t hdrs_len, uint64_t body_len)
{
    uint64_t  total;

    if (key_len > DSG_ENTRY_MAX_SIZE
        || hdrs_len > DSG_ENTRY_MAX_SIZE
        || body_len > DSG_ENTRY_MAX_SIZE)
    {
        return 0;
    }

    total = DSG_ENTRY_HEADER_SIZE + key_len + hdrs_len + body_len;

    if (total > DSG_ENTRY_MAX_SIZE) {
        return 0;
    }

    return total;
}


size_t
dsg_entry_size(size_t key_len, size_t hdrs_len, size_t body_len)
{
    return (size_t) dsg_entry_total(key_len, hdrs_len, body_len);
}


int
dsg_entry_encode_header(uint8_t *buf, size_t cap, const dsg_entry_t *e)
{
    if (dsg_entry_total(e->key_len, e->hdrs_len, e->body_len) == 0) {
        return DSG_ENTRY_ELEN;
    }

    if (buf == NULL || cap < DSG_ENTRY_HEADER_SIZE) {
        return DSG_ENTRY_ESPACE;
    }

    memcpy(buf + DSG_ENTRY_OFF_MAGIC, DSG_ENTRY_MAGIC, 4);
    dsg_entry_put16(buf + DSG_ENTRY_OFF_VERSION, DSG_ENTRY_VERSION);
    dsg_entry_put16(buf + DSG_ENTRY_OFF_FLAGS, e->flags);
    dsg_entry_put16(buf + DSG_ENTRY_OFF_STATUS, e->status);
    dsg_entry_put16(buf + DSG_ENTRY_OFF_RESERVED, 0);
    dsg_entry_put64(buf + DSG_ENTRY_OFF_CREATED, e->created_ms);
    dsg_entry_put64(buf + DSG_ENTRY_OFF_EXPIRES, e->expires_ms);
    dsg_entry_put64(buf + DSG_ENTRY_OFF_STALE, e->stale_until_ms);
    /* the lengths fit: each is <= DSG_ENTRY_MAX_SIZE < 2^32 */
    dsg_entry_put32(buf + DSG_ENTRY_OFF_KEY_LEN, (uint32_t) e->key_len);
    dsg_entry_put32(buf + DSG_ENTRY_OFF_HDRS_LEN, (uint32_t) e->hdrs_len);
    dsg_entry_put64(buf + DSG_ENTRY_OFF_BODY_LEN, e->body_len);

    return DSG_ENTRY_HEADER_SIZE;
}


int
dsg_entry_encode_prefix(uint8_t *buf, size_t cap, const dsg_entry_t *e)
{
    size_t  prefix;

    if (dsg_entry_total(e->key_len, e->hdrs_len, e->body_len) == 0) {
        return DSG_ENTRY_ELEN;
    }

    if ((e->key == NULL && e->key_len != 0)
        || (e->hdrs == NULL && e->hdrs_len != 0))
    {
        return DSG_ENTRY_EINVAL;
    }

    /* bounded by DSG_ENTRY_MAX_SIZE: checked above */
    prefix = DSG_ENTRY_HEADER_SIZE + e->key_len + e->hdrs_len;

    if (buf == NULL || cap < prefix) {
        return DSG_ENTRY_ESPACE;
    }

    (void) dsg_entry_encode_header(buf, cap, e);

    if (e->key_len != 0) {
        memcpy(buf + DSG_ENTRY_HEADER_SIZE, e->key, e->key_len);
    }

    if (e->hdrs_len != 0) {
        memcpy(buf + DSG_ENTRY_HEADER_SIZE + e->key_len, e->hdrs,
               e->hdrs_len);
    }

    return (int) prefix;
}


int
dsg_entry_encode(uint8_t *buf, size_t cap, const dsg_entry_t *e)
{
    int       rc;
    uint64_t  total;

    total = dsg_entry_total(e->key_len, e->hdrs_len, e->body_len);
    if (total == 0) {
        return DSG_ENTRY_ELEN;
    }

    if (e->body == NULL && e->body_len != 0) {
        return DSG_ENTRY_EINVAL;
    }

    /* check the whole size first: never leave a half-written entry */
    if (cap < total) {
        return DSG_ENTRY_ESPACE;
    }

    rc = dsg_entry_encode_prefix(buf, cap, e);
    if (rc < 0) {
        return rc;
    }

    if (e->body_len != 0) {
        memcpy(buf + rc, e->body, e->body_len);
    }

    return (int) total;
}


int
dsg_entry_decode(const uint8_t *buf, size_t len, dsg_entry_t *e)
{
    uint64_t  key_len, hdrs_len, body_len, total;

    if (buf == NULL || len < DSG_ENTRY_HEADER_SIZE) {
        return DSG_ENTRY_ESHORT;
    }

    if (memcmp(buf + DSG_ENTRY_OFF_MAGIC, DSG_ENTRY_MAGIC, 4) != 0) {
        return DSG_ENTRY_EMAGIC;
    }

    if (dsg_entry_get16(buf + DSG_ENTRY_OFF_VERSION) != DSG_ENTRY_VERSION) {
        return DSG_ENTRY_EVERSION;
    }

    key_len = dsg_entry_get32(buf + DSG_ENTRY_OFF_KEY_LEN);
    hdrs_len = dsg_entry_get32(buf + DSG_ENTRY_OFF_HDRS_LEN);
    body_len = dsg_entry_get64(buf + DSG_ENTRY_OFF_BODY_LEN);

    total = dsg_entry_total(key_len, hdrs_len, body_len);
    if (total == 0) {
        return DSG_ENTRY_ELEN;
    }

    if (total > len) {
        return DSG_ENTRY_ESHORT;
    }

    if (total < len) {
        return DSG_ENTRY_ELEN;
    }

    e->flags = dsg_entry_get16(buf + DSG_ENTRY_OFF_FLAGS);
    e->status = dsg_entry_get16(buf + DSG_ENTRY_OFF_STATUS);
    e->created_ms = dsg_entry_get64(buf + DSG_ENTRY_OFF_CREATED);
    e->expires_ms = dsg_entry_get64(buf + DSG_ENTRY_OFF_EXPIRES);
    e->stale_until_ms = dsg_entry_get64(buf + DSG_ENTRY_OFF_STALE);

    e->key = buf + DSG_ENTRY_HEADER_SIZE;
    e->key_len = (size_t) key_len;
    e->hdrs = e->key + key_len;
    e->hdrs_len = (size_t) hdrs_len;
    e->body = e->hdrs + hdrs_len;
    e->body_len = (size_t) body_len;

    return DSG_ENTRY_OK;
}


const char *
dsg_entry_strerror(int rc)
{
    switch (rc) {

    case DSG_ENTRY_OK:
        return "ok";

    case DSG_ENTRY_ESHORT:
        return "cache entry truncated";

    case DSG_ENTRY_EMAGIC:
        return "not a cache entry (bad magic)";

    case DSG_ENTRY_EVERSION:
        return "cache entry of an unsupported version";

    case DSG_ENTRY_ELEN:
        return "cache entry lengths invalid";

    case DSG_ENTRY_ESPACE:
        return "cache entry buffer too small";

    case DSG_ENTRY_EINVAL:
        return "cache entry view is NULL";

    default:
        return (rc > 0) ? "cache entry encoded" : "unknown cache entry error";
    }
}
