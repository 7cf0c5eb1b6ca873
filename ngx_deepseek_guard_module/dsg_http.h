/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * dsg_http: the HTTP header rules of the cache, as pure functions over
 * header values (bytes and lengths, nothing NUL-terminated): list tokens
 * (Vary, Accept-Encoding), Accept-Encoding's gzip test and the directives
 * of Cache-Control a shared cache obeys.
 */


#ifndef DSG_HTTP_H
#define DSG_HTTP_H


#include <stddef.h>
#include <stdint.h>


/* Cache-Control of a response; a seconds field is -1 when absent */
typedef struct {
    unsigned        no_store:1;
    unsigned        private_:1;
    unsigned        public_:1;
    unsigned        must_revalidate:1;
    int64_t         max_age;
    int64_t         s_maxage;
} dsg_http_cc_t;


/* a cache-control field with nothing said: every flag 0, ages -1 */
void dsg_http_cc_init(dsg_http_cc_t *cc);

/*
 * Adds the directives of one Cache-Control field value to cc (a response
 * may send several fields).  Unknown directives are ignored; a malformed
 * age counts as 0 (RFC 9111 4.2.1: invalid freshness is stale).
 */
void dsg_http_cc_parse(const char *v, size_t len, dsg_http_cc_t *cc);

/*
 * The next element of a comma-separated list from *pos to end: its token
 * (without parameters after ';' and without blanks) in tok and toklen, its
 * parameters in par and parlen.  Returns 0 at the end of the list.  Empty
 * elements are skipped.
 */
int dsg_http_list_next(const char **pos, const char *end, const char **tok,
    size_t *toklen, const char **par, size_t *parlen);

/*
 * 1 if an Accept-Encoding value lists gzip (or x-gzip) with a q-value that
 * is not zero, else 0.
 */
int dsg_http_accepts_gzip(const char *v, size_t len);

/* 1 if a Vary value lists "*": the response can never be reused */
int dsg_http_vary_star(const char *v, size_t len);


#endif /* DSG_HTTP_H */
