/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#ifndef DSG_STORE_H
#define DSG_STORE_H


#endif /* DSG_STORE_H */
