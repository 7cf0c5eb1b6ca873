/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The live status page, "deepseek_guard_status;" in a location: a content
 * handler, as stub_status, that serves one self-contained HTML page (its
 * CSS, its script and uPlot inline: it makes no request to any other
 * host) which polls the numbers of the metrics endpoint about once a
 * second and draws them.
 *
 *   GET <location>                the page
 *   GET <location>?format=json    the JSON of deepseek_guard_metrics: what
 *                                 the page polls by default, so the page
 *                                 needs no other location
 *   GET <location>?format=prometheus   the text exposition
 *
 * The page also takes ?src=<path> (another location that serves the JSON,
 * same origin only) and ?interval=<ms> (the poll interval, default 1000).
 * The Content-Security-Policy of the page lets it connect to its own
 * origin only, and run only its own inline script and styles.
 *
 * The page is built by ./build.sh from status/page.html and the uPlot of
 * status/package-lock.json (status/gen-page.pl) into
 * build/status/ngx_http_deepseek_guard_status_page.h.
 */


#include "ngx_http_deepseek_guard_module.h"

#include "ngx_http_deepseek_guard_status_page.h"


static ngx_int_t ngx_http_deepseek_guard_status_handler(
    ngx_http_request_t *r);


static ngx_str_t  ngx_http_deepseek_guard_status_type =
    ngx_string("text/html; charset=utf-8");

static ngx_str_t  ngx_http_deepseek_guard_csp_key =
    ngx_string("Content-Security-Policy");

static ngx_str_t  ngx_http_deepseek_guard_csp =
    ngx_string("default-src 'none'; script-src 'unsafe-inline'; "
               "style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'");

static ngx_str_t  ngx_http_deepseek_guard_cache_control_key =
    ngx_string("Cache-Control");

static ngx_str_t  ngx_http_deepseek_guard_no_cache = ngx_string("no-cache");


/* deepseek_guard_status; */

char *
ngx_http_deepseek_guard_status_page(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler == ngx_http_deepseek_guard_status_handler) {
        return "is duplicate";
    }

    clcf->handler = ngx_http_deepseek_guard_status_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_status_handler(ngx_http_request_t *r)
{
    ngx_int_t     rc;
    ngx_str_t     v;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    /* the numbers the page polls */

    if (ngx_http_arg(r, (u_char *) "format", 6, &v) == NGX_OK) {
        return ngx_http_deepseek_guard_metrics_handler(r);
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    r->headers_out.content_type = ngx_http_deepseek_guard_status_type;
    r->headers_out.content_type_len = ngx_http_deepseek_guard_status_type.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n =
                             sizeof(ngx_http_deepseek_guard_status_html) - 1;

    if (ngx_http_deepseek_guard_add_header(r,
                                    &ngx_http_deepseek_guard_csp_key,
                                    ngx_http_deepseek_guard_csp.data,
                                    ngx_http_deepseek_guard_csp.len)
        != NGX_OK
        || ngx_http_deepseek_guard_add_header(r,
                                &ngx_http_deepseek_guard_cache_control_key,
                                ngx_http_deepseek_guard_no_cache.data,
                                ngx_http_deepseek_guard_no_cache.len)
           != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* the page is in the module's read-only data: never written to */

    b->pos = (u_char *) ngx_http_deepseek_guard_status_html;
    b->last = b->pos + sizeof(ngx_http_deepseek_guard_status_html) - 1;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
