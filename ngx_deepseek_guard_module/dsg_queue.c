/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#include "dsg_queue.h"


typedef int dsg_queue_placeholder_t;
