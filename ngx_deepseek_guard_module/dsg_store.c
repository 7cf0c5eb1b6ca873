/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "dsg_store.h"


typedef int dsg_store_placeholder_t;
