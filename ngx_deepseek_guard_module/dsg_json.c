/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "dsg_json.h"


typedef int dsg_json_placeholder_t;
