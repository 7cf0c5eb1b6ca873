/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "dsg_entry.h"


typedef int dsg_entry_placeholder_t;
