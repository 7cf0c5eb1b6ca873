/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fuzz target of dsg_store, the LMDB response cache: programs of put,
 * get, del, touch, sweep and stat on 16 colliding keys, compared with a
 * model (a table of the live values and their expiry):
 *
 *  - get returns exactly the last value put (through the alloc callback,
 *    which may fail: DSG_STORE_ENOMEM), NOTFOUND after a del or a sweep;
 *  - del and touch say NOTFOUND exactly for absent keys;
 *  - a put whose fill callback fails changes nothing (DSG_STORE_EFILL);
 *  - sweep removes exactly the entries with expires + keep_stale < now,
 *    at most max_items of them, oldest expiry first (ties: digest order),
 *    and evicts nothing in a map far from full;
 *  - stat counts the live entries.
 *
 * The store lives in a private directory under $TMPDIR (default /tmp),
 * opened once per process and emptied (del of the 16 keys) before each
 * input, so every input starts from the same state.
 */


#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dsg_store.h"
#include "fuzz.h"


typedef unsigned __int128  u128;


#define NKEYS     16
#define MAX_VAL   2048
#define MAP_SIZE  (64 * 1024 * 1024)


typedef struct {
    int       live;
    uint64_t  expires;
    size_t    len;
    uint8_t   val[MAX_VAL];
} slot_t;


typedef struct {
    const uint8_t  *src;
    size_t          len;
    int             fail;
    unsigned        calls;
} fill_t;


static dsg_store_t  *store;
static char          dir[256];
static slot_t        model[NKEYS];


static void
cleanup(void)
{
    char  path[300];

    dsg_store_close(store);
    store = NULL;

    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/lock.mdb", dir);
    unlink(path);
    rmdir(dir);
}


int LLVMFuzzerInitialize(int *argc, char ***argv);

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int          rc;
    const char  *tmp;

    tmp = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/dsg-fuzz-store-XXXXXX",
             tmp ? tmp : "/tmp");

    FUZZ_ASSERT(mkdtemp(dir) != NULL);

    rc = dsg_store_open(&store, dir, MAP_SIZE, 0, 0, NULL);
    if (rc != DSG_STORE_OK) {
        fprintf(stderr, "dsg_store_open(%s): %s\n", dir,
                dsg_store_strerror(rc));
        abort();
    }

    atexit(cleanup);

    return 0;
}


static void
key_of(unsigned i, uint8_t key[DSG_STORE_KEY_SIZE])
{
    unsigned  j;

    /* digest order differs from index order: ties in the sweep matter */

    for (j = 0; j < DSG_STORE_KEY_SIZE; j++) {
        key[j] = (uint8_t) ((i * 37 + j * 11) ^ 0x5a);
    }
}


static int
fill(void *ctx, uint8_t *dst, size_t len)
{
    fill_t  *f = ctx;

    f->calls++;

    if (f->fail) {
        return -1;
    }

    FUZZ_ASSERT(len == f->len);

    if (len != 0) {
        memcpy(dst, f->src, len);
    }

    return 0;
}


static void *
alloc_ok(void *ctx, size_t n)
{
    void  **p = ctx;

    *p = malloc(n ? n : 1);

    return *p;
}


static void *
alloc_fail(void *ctx, size_t n)
{
    return NULL;
}


/* the model's sweep: expected count of expired entries */

static unsigned
model_sweep(uint64_t now, uint64_t keep, unsigned max)
{
    int       best;
    uint8_t   kb[DSG_STORE_KEY_SIZE], kx[DSG_STORE_KEY_SIZE];
    unsigned  i, n;

    for (n = 0; n < max; n++) {
        best = -1;

        for (i = 0; i < NKEYS; i++) {
            if (!model[i].live || (u128) model[i].expires + keep >= now) {
                continue;
            }

            if (best >= 0) {
                if (model[i].expires > model[best].expires) {
                    continue;
                }

                if (model[i].expires == model[best].expires) {
                    key_of(i, kx);
                    key_of((unsigned) best, kb);

                    if (memcmp(kx, kb, sizeof(kx)) > 0) {
                        continue;
                    }
                }
            }

            best = (int) i;
        }

        if (best < 0) {
            break;
        }

        model[best].live = 0;
    }

    return n;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int               rc;
    fz_t              f;
    void             *mem;
    fill_t            fl;
    uint8_t           op, key[DSG_STORE_KEY_SIZE], *val;
    size_t            len;
    unsigned          i, k, steps, max, expired, evicted;
    uint64_t          now, keep, expires;
    dsg_store_stat_t  stat;

    if (store == NULL) {
        LLVMFuzzerInitialize(NULL, NULL);
    }

    /* the same empty store for every input */

    for (i = 0; i < NKEYS; i++) {
        key_of(i, key);
        rc = dsg_store_del(store, key);
        FUZZ_ASSERT(rc == DSG_STORE_OK || rc == DSG_STORE_NOTFOUND);
        model[i].live = 0;
    }

    f.p = data;
    f.n = size;
    now = fz_uint(&f, 4);

    for (steps = 0; steps < 64 && !fz_empty(&f); steps++) {
        op = fz_u8(&f);
        k = (op >> 4) % NKEYS;
        key_of(k, key);

        switch (op & 7) {

        case 0: case 1:                        /* put */
            now += fz_u8(&f);
            expires = (op & 8) ? now + fz_uint(&f, 2) : fz_pick(&f, now);
            fl.src = fz_bytes(&f, fz_uint(&f, 2) % (MAX_VAL + 1), &fl.len);
            fl.fail = (op & 1) && (fz_u8(&f) & 1);
            fl.calls = 0;

            rc = dsg_store_put(store, key, expires, now, fl.len, fill, &fl);

            if (fl.fail) {
                FUZZ_ASSERT(rc == DSG_STORE_EFILL);
                FUZZ_ASSERT(fl.calls >= 1);
                break;
            }

            FUZZ_ASSERT(rc == DSG_STORE_OK);
            FUZZ_ASSERT(fl.calls >= 1 && fl.calls <= 2);

            model[k].live = 1;
            model[k].expires = expires;
            model[k].len = fl.len;
            memcpy(model[k].val, fl.src, fl.len);
            break;

        case 2:                                /* get */
            mem = NULL;
            val = (uint8_t *) 1;
            len = 12345;

            if (op & 8) {
                rc = dsg_store_get(store, key, alloc_fail, NULL, &val, &len);

                if (!model[k].live) {
                    FUZZ_ASSERT(rc == DSG_STORE_NOTFOUND);
                } else {
                    FUZZ_ASSERT(rc == DSG_STORE_ENOMEM
                                || (rc == DSG_STORE_OK && len == 0
                                    && model[k].len == 0));
                }

                break;
            }

            rc = dsg_store_get(store, key, alloc_ok, &mem, &val, &len);

            if (!model[k].live) {
                FUZZ_ASSERT(rc == DSG_STORE_NOTFOUND);

            } else {
                FUZZ_ASSERT(rc == DSG_STORE_OK);
                FUZZ_ASSERT(len == model[k].len);
                FUZZ_ASSERT(len == 0 ? val == NULL
                                     : memcmp(val, model[k].val, len) == 0);
            }

            free(mem);
            break;

        case 3:                                /* del */
            rc = dsg_store_del(store, key);
            FUZZ_ASSERT(rc == (model[k].live ? DSG_STORE_OK
                                             : DSG_STORE_NOTFOUND));
            model[k].live = 0;
            break;

        case 4:                                /* touch */
            now += fz_u8(&f);
            rc = dsg_store_touch(store, key, 1, now);
            /* a key no longer stored is passed over */
            FUZZ_ASSERT(rc == DSG_STORE_OK);
            break;

        case 5:                                /* sweep */
            now += fz_uint(&f, 2);
            keep = fz_pick(&f, now);
            max = fz_u8(&f) % (NKEYS + 2);

            rc = dsg_store_sweep(store, now, keep, max, &expired, &evicted);
            FUZZ_ASSERT(rc == DSG_STORE_OK);
            FUZZ_ASSERT(expired == model_sweep(now, keep, max));
            FUZZ_ASSERT(evicted == 0);
            break;

        case 6:                                /* stat */
            rc = dsg_store_stat(store, &stat);
            FUZZ_ASSERT(rc == DSG_STORE_OK);

            for (i = 0, len = 0; i < NKEYS; i++) {
                len += model[i].live;
            }

            FUZZ_ASSERT(stat.entries == len);
            FUZZ_ASSERT(stat.map_size <= MAP_SIZE);
            FUZZ_ASSERT(stat.data_bytes <= stat.used_bytes);
            break;

        default:                               /* time passes */
            now += fz_uint(&f, 4);
            break;
        }
    }

    return 0;
}
