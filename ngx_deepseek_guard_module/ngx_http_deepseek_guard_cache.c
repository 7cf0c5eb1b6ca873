/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "ngx_http_deepseek_guard_module.h"


ngx_int_t
ngx_http_deepseek_guard_cache_overload(ngx_http_request_t *r)
{
    return NGX_DECLINED;
}
