/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#ifndef DSG_QUEUE_H
#define DSG_QUEUE_H


#endif /* DSG_QUEUE_H */
