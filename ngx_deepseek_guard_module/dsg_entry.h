/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * dsg_entry: the codec of one cached HTTP response (the value stored in
 * the LMDB "entries" table).  Pure C, no allocation, bounds-checked.
 *
 * Layout (all integers little-endian, fixed width, no padding):
 *
 *     offset  size  field
 *          0     4  magic "DSGE"
 *          4     2  version (DSG_ENTRY_VERSION)
 *          6     2  flags (DSG_ENTRY_FLAG_*)
 *          8     2  HTTP status
 *         10     2  reserved, written as 0, ignored on decode
 *         12     8  created_ms
 *         20     8  expires_ms      fresh until
 *         28     8  stale_until_ms  may be served stale until
 *         36     4  key_len
 *         40     4  hdrs_len
 *         44     8  body_len
 *         52        key bytes   (the full cache key text: the glue compares
 *                                it to detect a SHA-256 digest collision)
 *                   hdrs bytes  ("Name: value\r\n" lines kept by the glue)
 *                   body bytes
 *
 * A value is exactly DSG_ENTRY_HEADER_SIZE + key_len + hdrs_len + body_len
 * bytes long; anything else is rejected.
 */


#ifndef DSG_ENTRY_H
#define DSG_ENTRY_H


#include <stddef.h>
#include <stdint.h>


#define DSG_ENTRY_MAGIC          "DSGE"
#define DSG_ENTRY_VERSION        1
#define DSG_ENTRY_HEADER_SIZE    52

#define DSG_ENTRY_FLAG_SSE       0x0001     /* body is a text/event-stream */

/*
 * Upper bound of a whole encoded value and so of every length field;
 * larger lengths are "absurd" (DSG_ENTRY_ELEN).  It keeps every size
 * representable in the int returned by the encoders.
 */
#define DSG_ENTRY_MAX_SIZE       ((size_t) 1 << 30)

#define DSG_ENTRY_OK              0
#define DSG_ENTRY_ESHORT         -1     /* buffer shorter than the entry */
#define DSG_ENTRY_EMAGIC         -2     /* not an entry */
#define DSG_ENTRY_EVERSION       -3     /* entry of another format version */
#define DSG_ENTRY_ELEN           -4     /* lengths absurd or not adding up */
#define DSG_ENTRY_ESPACE         -5     /* encode: output buffer too small */
#define DSG_ENTRY_EINVAL         -6     /* encode: NULL view of nonzero len */


typedef struct {
    uint16_t        flags;
    uint16_t        status;
    uint64_t        created_ms;
    uint64_t        expires_ms;
    uint64_t        stale_until_ms;

    /* views; after decode they point into the decoded buffer */
    const uint8_t  *key;
    size_t          key_len;
    const uint8_t  *hdrs;
    size_t          hdrs_len;
    const uint8_t  *body;
    size_t          body_len;
} dsg_entry_t;


/*
 * Size of the encoded entry, or 0 if a length (or the total) exceeds
 * DSG_ENTRY_MAX_SIZE.
 */
size_t dsg_entry_size(size_t key_len, size_t hdrs_len, size_t body_len);

/*
 * One-shot encode of e (header, key, hdrs and body) into buf.  Returns the
 * number of bytes written (== dsg_entry_size()) or DSG_ENTRY_ELEN,
 * DSG_ENTRY_ESPACE, DSG_ENTRY_EINVAL.
 */
int dsg_entry_encode(uint8_t *buf, size_t cap, const dsg_entry_t *e);

/*
 * Encodes the fixed header only (DSG_ENTRY_HEADER_SIZE bytes) from the
 * scalar fields and the three lengths of e; the pointers are not used.
 * Returns DSG_ENTRY_HEADER_SIZE or DSG_ENTRY_ELEN, DSG_ENTRY_ESPACE.
 */
int dsg_entry_encode_header(uint8_t *buf, size_t cap, const dsg_entry_t *e);

/*
 * Encodes header + key + hdrs, everything before the body, and returns
 * its length, i.e. the offset at which the body_len body bytes must
 * follow.  With cap >= dsg_entry_size() the glue writes this prefix into
 * an MDB_RESERVE buffer and then appends the body chunk by chunk: the
 * result equals dsg_entry_encode().  e->body is not used.
 * Errors as dsg_entry_encode().
 */
int dsg_entry_encode_prefix(uint8_t *buf, size_t cap, const dsg_entry_t *e);

/*
 * Decodes and validates buf[0 .. len); the views of e point into buf.
 * Returns DSG_ENTRY_OK or DSG_ENTRY_ESHORT (truncated), DSG_ENTRY_EMAGIC,
 * DSG_ENTRY_EVERSION, DSG_ENTRY_ELEN (absurd lengths, trailing bytes).
 * On error e is left untouched.
 */
int dsg_entry_decode(const uint8_t *buf, size_t len, dsg_entry_t *e);

const char *dsg_entry_strerror(int rc);


#endif /* DSG_ENTRY_H */
