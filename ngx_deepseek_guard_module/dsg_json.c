/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


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
 * A positive integer member of a JSON object, 0 when it is absent or not
 * a positive integer (an OpenAI-compatible API refuses such a value; the
 * reservation then does not rely on it).
 */

static uint64_t
dsg_json_positive(json_t *obj, const char *name)
{
    json_t  *v;

    v = json_object_get(obj, name);

    if (!json_is_integer(v) || json_integer_value(v) <= 0) {
        return 0;
    }

    return (uint64_t) json_integer_value(v);
}


/* a request body parsed under the cache key's bounds (dsg_json_prescan) */

static int
dsg_json_load_bounded(const char *in, size_t len, json_t **root)
{
    int           rc;
    json_error_t  err;

    *root = NULL;

    if (in == NULL) {
        return DSG_JSON_EPARSE;
    }

    rc = dsg_json_prescan(in, len, DSG_JSON_MAX_VALUES, DSG_JSON_MAX_DEPTH);
    if (rc != DSG_JSON_OK) {
        return rc;
    }

    *root = json_loadb(in, len, DSG_JSON_LOAD_FLAGS, &err);
    if (*root == NULL) {
        return (json_error_code(&err) == json_error_out_of_memory)
               ? DSG_JSON_ENOMEM : DSG_JSON_EPARSE;
    }

    return DSG_JSON_OK;
}


int
dsg_json_max_tokens(const char *in, size_t len, uint64_t *max_tokens)
{
    int      rc;
    json_t  *root;

    *max_tokens = 0;

    rc = dsg_json_load_bounded(in, len, &root);
    if (rc != DSG_JSON_OK) {
        return rc;
    }

    if (json_is_object(root)) {
        *max_tokens = dsg_json_positive(root, "max_completion_tokens");

        if (*max_tokens == 0) {
            *max_tokens = dsg_json_positive(root, "max_tokens");
        }
    }

    json_decref(root);

    return DSG_JSON_OK;
}


int
dsg_json_stream_usage(const char *in, size_t len, size_t *at)
{
    int      rc;
    size_t   i;
    json_t  *root;

    *at = 0;

    rc = dsg_json_load_bounded(in, len, &root);
    if (rc != DSG_JSON_OK) {
        return rc;
    }

    rc = json_is_object(root)
         && json_is_true(json_object_get(root, "stream"))
         && json_object_get(root, "stream_options") == NULL;

    json_decref(root);

    if (!rc) {
        return DSG_JSON_OK;
    }

    /* the object's '{': the first byte that is not JSON whitespace */

    for (i = 0; i < len; i++) {
        if (in[i] == '{') {
            *at = i + 1;
            break;
        }
    }

    return DSG_JSON_OK;
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
