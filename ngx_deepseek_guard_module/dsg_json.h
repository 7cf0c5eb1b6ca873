/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * dsg_json: canonical form of a JSON text, used to build cache keys from
 * request bodies: two requests that differ only in object key order or in
 * insignificant whitespace get the same canonical text (and so the same
 * cache key); array order is significant and kept.
 *
 * Canonical form: jansson's compact encoding (no whitespace), object keys
 * sorted bytewise, non-ASCII characters as raw UTF-8, escapes normalized
 * ("\u00e9" and "é" are equal, "\/" becomes "/"), reals re-printed by
 * jansson (1.0, 1.00 and 10e-1 all become 1.0; 1 and 1.0 stay distinct:
 * integer and real are different JSON types to jansson).
 *
 * Inputs rejected with DSG_JSON_EPARSE (the glue must then not cache, or
 * key on the raw bytes): invalid JSON or UTF-8, trailing garbage, nesting
 * deeper than jansson's limit (2048), integers outside the 64-bit signed
 * range, and objects with a duplicate key.  Duplicates are rejected
 * because parsers disagree on them (first wins, last wins, both kept):
 * the upstream may see a different request than the one the key was
 * built from, which could let one request be answered from another's
 * cache entry.
 *
 * The parse allocates (jansson's own allocator); the output goes to the
 * caller's buffer.  No global state: jansson's hash seed is initialized
 * by jansson itself on first use.
 */


#ifndef DSG_JSON_H
#define DSG_JSON_H


#include <stddef.h>
#include <stdint.h>


#define DSG_JSON_OK         0
#define DSG_JSON_EPARSE    -1   /* invalid or rejected input */
#define DSG_JSON_ESPACE    -2   /* cap too small: *outlen = size needed */
#define DSG_JSON_ENOMEM    -3   /* jansson could not allocate */
#define DSG_JSON_ELIMIT    -4   /* prescan: too many values or too deep */

/* the bounds the glue gives dsg_json_prescan() */
#define DSG_JSON_MAX_VALUES  65536
#define DSG_JSON_MAX_DEPTH   64


/*
 * Canonicalizes in[0 .. len) (any JSON value, not only objects; "\u0000"
 * in strings is allowed) into out[0 .. cap).  The output is not
 * NUL-terminated; *outlen is its length.  On DSG_JSON_ESPACE *outlen is
 * the capacity needed and out is undefined.
 */
int dsg_json_canonical(const char *in, size_t len, char *out, size_t cap,
    size_t *outlen);

/*
 * A cheap bound before dsg_json_canonical(), whose parse costs jansson
 * about a hundred bytes of heap per value: one pass over the bytes, no
 * allocation, counting the values an input would make (every '[', '{',
 * ',' and ':' outside strings, plus one) and its nesting depth.
 * DSG_JSON_ELIMIT when either exceeds its bound; DSG_JSON_OK otherwise
 * (the input may still be invalid JSON: the parse decides that).
 */
int dsg_json_prescan(const char *in, size_t len, size_t max_values,
    size_t max_depth);

/*
 * The output cap a chat request sets: its top-level
 * "max_completion_tokens" when that is a positive integer, else its
 * "max_tokens" when that is one, else 0.  One pass over the bytes, no
 * allocation, no tree (jansson has no streaming interface, and a whole
 * tree of a 1 MB body costs tens of ms): strings are skipped with their
 * escapes, nesting deeper than DSG_JSON_MAX_DEPTH is DSG_JSON_ELIMIT, a
 * truncated object DSG_JSON_EPARSE (*max_tokens 0).  Names are compared
 * as raw bytes and the last duplicate wins.  Not a validator: a body that
 * is not JSON may still give a value (the upstream refuses such a body).
 * A top level that is not an object: DSG_JSON_OK and 0.
 */
int dsg_json_max_tokens(const char *in, size_t len, uint64_t *max_tokens);

/*
 * Whether a chat request may be given "stream_options":{"include_usage":
 * true}: a JSON object whose "stream" is true and that has no
 * "stream_options" of its own (an upstream such as DeepSeek refuses
 * stream_options without stream: true, and a client's own choice is
 * kept).  *at is then the offset just after the object's '{', where the
 * member can be inserted; 0 when it may not.  The same one-pass scan and
 * errors as dsg_json_max_tokens().
 */
int dsg_json_stream_usage(const char *in, size_t len, size_t *at);

const char *dsg_json_strerror(int rc);


#endif /* DSG_JSON_H */
