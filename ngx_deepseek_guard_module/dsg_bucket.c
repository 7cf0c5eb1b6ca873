/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "dsg_bucket.h"


typedef int dsg_bucket_placeholder_t;
