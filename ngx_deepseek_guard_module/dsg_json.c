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

    default:
        return "unknown JSON error";
    }
}
