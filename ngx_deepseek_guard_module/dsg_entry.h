/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#ifndef DSG_ENTRY_H
#define DSG_ENTRY_H


#endif /* DSG_ENTRY_H */
