/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "ngx_http_deepseek_guard_module.h"
