/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Shared helpers of the fuzz targets in t/fuzz/: a reader that turns the
 * fuzzer's bytes into integers (zeros once the input is exhausted, so
 * every input is a valid program), and an assertion that aborts with a
 * message (a crash to libFuzzer, a failure to the replay runner).
 *
 * Each target defines LLVMFuzzerTestOneInput() and is built twice by
 * build.sh: with clang -fsanitize=fuzzer (the fuzzer) and with gcc and
 * t/fuzz/replay.c (a plain executable replaying corpus and regression
 * files, no clang needed).
 */


#ifndef DSG_FUZZ_H
#define DSG_FUZZ_H


#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


#define FUZZ_ASSERT(cond)                                                    \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n",            \
                    __FILE__, __LINE__, #cond);                              \
            abort();                                                         \
        }                                                                    \
    } while (0)


typedef struct {
    const uint8_t  *p;
    size_t          n;
} fz_t;


static inline int
fz_empty(const fz_t *f)
{
    return f->n == 0;
}


static inline uint8_t
fz_u8(fz_t *f)
{
    uint8_t  v;

    if (f->n == 0) {
        return 0;
    }

    v = *f->p++;
    f->n--;

    return v;
}


/* nbytes (0..8) little-endian bytes */

static inline uint64_t
fz_uint(fz_t *f, unsigned nbytes)
{
    unsigned  i;
    uint64_t  v;

    v = 0;

    for (i = 0; i < nbytes; i++) {
        v |= (uint64_t) fz_u8(f) << (8 * i);
    }

    return v;
}


/*
 * A 64-bit value of an interesting shape: small, around a limit, or raw;
 * the selector byte picks the shape so that mutations of one byte move
 * between them.
 */

static inline uint64_t
fz_pick(fz_t *f, uint64_t limit)
{
    uint8_t  sel;

    sel = fz_u8(f);

    switch (sel & 7) {
    case 0:
        return 0;
    case 1:
        return 1 + (sel >> 3);
    case 2:
        return fz_uint(f, 1);
    case 3:
        return fz_uint(f, 2);
    case 4:
        return limit - (sel >> 3);               /* at or under the limit */
    case 5:
        return limit + 1 + (sel >> 3);           /* just over it */
    case 6:
        return fz_uint(f, 4);
    default:
        return fz_uint(f, 8);
    }
}


/* the rest of the input */

static inline const uint8_t *
fz_rest(fz_t *f, size_t *len)
{
    const uint8_t  *p;

    p = f->p;
    *len = f->n;
    f->p += f->n;
    f->n = 0;

    return p;
}


/* up to want bytes of the input */

static inline const uint8_t *
fz_bytes(fz_t *f, size_t want, size_t *len)
{
    const uint8_t  *p;

    if (want > f->n) {
        want = f->n;
    }

    p = f->p;
    *len = want;
    f->p += want;
    f->n -= want;

    return p;
}


#endif /* DSG_FUZZ_H */
