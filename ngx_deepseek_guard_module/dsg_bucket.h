/*
 * Copyright (C) ngx_deepseek_guard_module authors
 */


#ifndef DSG_BUCKET_H
#define DSG_BUCKET_H


#endif /* DSG_BUCKET_H */
