/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#ifndef NGX_HTTP_DEEPSEEK_GUARD_MODULE_H
#define NGX_HTTP_DEEPSEEK_GUARD_MODULE_H


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


extern ngx_module_t  ngx_http_deepseek_guard_module;


#endif /* NGX_HTTP_DEEPSEEK_GUARD_MODULE_H */
