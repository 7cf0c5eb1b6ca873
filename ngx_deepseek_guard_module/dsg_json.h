/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#ifndef DSG_JSON_H
#define DSG_JSON_H


#endif /* DSG_JSON_H */
