/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Variables for access logs.
 */


#include "ngx_http_deepseek_guard_module.h"


static ngx_int_t ngx_http_deepseek_guard_status_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_class_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_num_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_deepseek_guard_zone_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);


#define NGX_HTTP_DSG_VAR_WAIT    0
#define NGX_HTTP_DSG_VAR_RETRY   1


static ngx_http_variable_t  ngx_http_deepseek_guard_vars[] = {

    { ngx_string("deepseek_guard_status"), NULL,
      ngx_http_deepseek_guard_status_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_class"), NULL,
      ngx_http_deepseek_guard_class_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_wait_ms"), NULL,
      ngx_http_deepseek_guard_num_variable, NGX_HTTP_DSG_VAR_WAIT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_retry_after_ms"), NULL,
      ngx_http_deepseek_guard_num_variable, NGX_HTTP_DSG_VAR_RETRY,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("deepseek_guard_zone"), NULL,
      ngx_http_deepseek_guard_zone_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_str_t  ngx_http_deepseek_guard_status_names[] = {
    ngx_null_string,
    ngx_string("ADMITTED"),
    ngx_string("QUEUED"),
    ngx_string("REJECTED"),
    ngx_string("DRY_RUN"),
    ngx_string("CACHED"),
    ngx_string("STALE")
};


ngx_int_t
ngx_http_deepseek_guard_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_deepseek_guard_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_status_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                      *s;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->status == 0
        || ctx->status > NGX_HTTP_DSG_STALE)
    {
        v->not_found = 1;
        return NGX_OK;
    }

    s = &ngx_http_deepseek_guard_status_names[ctx->status];

    /* admitted after a wait in the queue */
    if (ctx->status == NGX_HTTP_DSG_ADMITTED && ctx->wait_ms) {
        s = &ngx_http_deepseek_guard_status_names[NGX_HTTP_DSG_QUEUED];
    }

    v->len = s->len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = s->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_class_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_deepseek_guard_ctx_t        *ctx;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->holds == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_deepseek_guard_module);
    c = &((ngx_http_deepseek_guard_class_t *) mcf->classes.elts)[ctx->cls];

    v->len = c->name.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = c->name.data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_num_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                         *p;
    uint64_t                        n;
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->status == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    if (data == NGX_HTTP_DSG_VAR_WAIT) {
        n = ctx->slot >= 0 ? ngx_current_msec - ctx->enqueued : ctx->wait_ms;

    } else {
        if (ctx->status != NGX_HTTP_DSG_REJECTED) {
            v->not_found = 1;
            return NGX_OK;
        }

        n = ctx->retry_ms;
    }

    p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_sprintf(p, "%uL", n) - p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_zone_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_deepseek_guard_ctx_t  *ctx;

    ctx = ngx_http_deepseek_guard_get_ctx(r);

    if (ctx == NULL || ctx->reject_zone == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = ctx->reject_zone->shm_zone->shm.name.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = ctx->reject_zone->shm_zone->shm.name.data;

    return NGX_OK;
}
