/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Unit tests of dsg_store, the LMDB cache.
 *
 * Check forks a child per test and an LMDB environment must never cross
 * a fork, so every test opens its stores itself, in its own directory
 * made by mkdtemp() inside the test.  The checked teardown (in the
 * child) removes that directory; as a failing assertion ends the child
 * at once, the per-test directories live under a parent directory made
 * and removed, whatever happens, by the unchecked fixture of the runner.
 */


#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <pthread.h>
#include <unistd.h>
#include <check.h>

#include <lmdb.h>

#include "dsg_store.h"


Suite *dsg_store_suite(void);


#define T_MB       (1024 * 1024)
#define T_FAR      4000000000000ULL     /* an expiry far in the future */


static char  t_parent[256];
static char  t_dir[PATH_MAX];


typedef struct {
    unsigned  seed;
    unsigned  calls;
    int       fail;
} t_fill_t;


static int
t_rm(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void) remove(path);
    return 0;
}


static void
t_rm_tree(const char *path)
{
    if (path[0] != '\0') {
        (void) nftw(path, t_rm, 16, FTW_DEPTH | FTW_PHYS);
    }
}


static void
t_parent_setup(void)
{
    snprintf(t_parent, sizeof(t_parent), "%s/dsg_store_XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");

    if (mkdtemp(t_parent) == NULL) {
        perror("mkdtemp");
        abort();
    }
}


static void
t_parent_teardown(void)
{
    t_rm_tree(t_parent);
    t_parent[0] = '\0';
}


static void
t_teardown(void)
{
    t_rm_tree(t_dir);
    t_dir[0] = '\0';
}


/* a fresh directory of this test */

static const char *
t_mkdir(void)
{
    ck_assert_uint_ne(t_parent[0], '\0');

    snprintf(t_dir, sizeof(t_dir), "%s/t_XXXXXX", t_parent);
    ck_assert_ptr_nonnull(mkdtemp(t_dir));

    return t_dir;
}


static void
t_path(char *buf, size_t size, const char *dir, const char *file)
{
    snprintf(buf, size, "%s/%s", dir, file);
}


static uint64_t
t_file_size(const char *dir)
{
    char         path[PATH_MAX];
    struct stat  sb;

    t_path(path, sizeof(path), dir, "data.mdb");
    ck_assert_int_eq(stat(path, &sb), 0);

    return (uint64_t) sb.st_size;
}


/* splitmix64: a reproducible stream of well mixed bits */

static uint64_t
t_mix(uint64_t *x)
{
    uint64_t  z;

    z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;

    return z ^ (z >> 31);
}


/* key i: 32 random-looking bytes, like the SHA-256 digests of the glue */

static void
t_key(uint8_t *key, unsigned i)
{
    int       j;
    uint64_t  x, v;

    x = i;

    for (j = 0; j < DSG_STORE_KEY_SIZE; j += 8) {
        v = t_mix(&x);
        memcpy(key + j, &v, 8);
    }
}


static void
t_pattern(uint8_t *p, size_t len, unsigned seed)
{
    size_t  j;

    for (j = 0; j < len; j++) {
        p[j] = (uint8_t) (seed * 2654435761u + j * 31 + (j >> 9));
    }
}


static int
t_fill(void *ctx, uint8_t *dst, size_t len)
{
    t_fill_t  *f = ctx;

    f->calls++;

    if (f->fail) {
        return -1;
    }

    t_pattern(dst, len, f->seed);

    return 0;
}


static void *
t_alloc(void *ctx, size_t n)
{
    (*(unsigned *) ctx)++;
    return malloc(n);
}


static void *
t_alloc_fail(void *ctx, size_t n)
{
    return NULL;
}


static dsg_store_t *
t_open(const char *dir, uint64_t map_size)
{
    int           rc, recreated;
    dsg_store_t  *st;

    recreated = -1;
    rc = dsg_store_open(&st, dir, map_size, 126, DSG_STORE_RECREATE,
                        &recreated);
    ck_assert_msg(rc == DSG_STORE_OK, "open: %s", dsg_store_strerror(rc));
    ck_assert_int_eq(recreated, 0);
    ck_assert_ptr_nonnull(st);

    return st;
}


/* stores value "seed" of len bytes under key i */

static int
t_put_seed(dsg_store_t *st, unsigned i, unsigned seed, size_t len,
    uint64_t expires, uint64_t now)
{
    uint8_t   key[DSG_STORE_KEY_SIZE];
    t_fill_t  f;

    t_key(key, i);

    f.seed = seed;
    f.calls = 0;
    f.fail = 0;

    return dsg_store_put(st, key, expires, now, len, t_fill, &f);
}


static int
t_put(dsg_store_t *st, unsigned i, size_t len, uint64_t expires,
    uint64_t now)
{
    return t_put_seed(st, i, i, len, expires, now);
}


/* gets key i; if found, checks it is value "seed" of len bytes */

static int
t_get_seed(dsg_store_t *st, unsigned i, unsigned seed, size_t len)
{
    int        rc;
    size_t     n;
    uint8_t    key[DSG_STORE_KEY_SIZE], *val, *want;
    unsigned   allocs;

    t_key(key, i);
    allocs = 0;

    rc = dsg_store_get(st, key, t_alloc, &allocs, &val, &n);

    if (rc != DSG_STORE_OK) {
        ck_assert_ptr_null(val);
        ck_assert_uint_eq(allocs, 0);
        return rc;
    }

    ck_assert_uint_eq(n, len);
    ck_assert_uint_eq(allocs, len ? 1 : 0);

    if (len != 0) {
        want = malloc(len);
        ck_assert_ptr_nonnull(want);
        t_pattern(want, len, seed);
        ck_assert_mem_eq(val, want, len);
        free(want);
    }

    free(val);

    return rc;
}


static int
t_get(dsg_store_t *st, unsigned i, size_t len)
{
    return t_get_seed(st, i, i, len);
}


static void
t_stat(dsg_store_t *st, dsg_store_stat_t *s)
{
    ck_assert_int_eq(dsg_store_stat(st, s), DSG_STORE_OK);
}


START_TEST(test_store_put_get)
{
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    ck_assert_int_eq(t_put(st, 1, 100, T_FAR, 1000), DSG_STORE_OK);
    ck_assert_int_eq(t_put(st, 2, 5000, T_FAR, 1000), DSG_STORE_OK);
    ck_assert_int_eq(t_put(st, 3, 1024 * 1024, T_FAR, 1000), DSG_STORE_OK);

    ck_assert_int_eq(t_get(st, 1, 100), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 2, 5000), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 3, 1024 * 1024), DSG_STORE_OK);

    /* a zero-length value is a value */
    ck_assert_int_eq(t_put(st, 4, 0, T_FAR, 1000), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 4, 0), DSG_STORE_OK);

    /* gets hold no transaction: many in a row, interleaved with puts */
    ck_assert_int_eq(t_get(st, 1, 100), DSG_STORE_OK);
    ck_assert_int_eq(t_put(st, 5, 10, T_FAR, 1000), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 5, 10), DSG_STORE_OK);

    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_overwrite)
{
    unsigned          exp, evi;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    ck_assert_int_eq(t_put_seed(st, 1, 100, 100, 1000, 10), DSG_STORE_OK);
    ck_assert_int_eq(t_put_seed(st, 1, 200, 50000, 5000, 20),
                     DSG_STORE_OK);
    ck_assert_int_eq(t_get_seed(st, 1, 200, 50000), DSG_STORE_OK);

    /* and back to a small value */
    ck_assert_int_eq(t_put_seed(st, 1, 300, 10, 5000, 30), DSG_STORE_OK);
    ck_assert_int_eq(t_get_seed(st, 1, 300, 10), DSG_STORE_OK);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 1);

    /*
     * The old expiry row went with the old value: a sweep between the
     * old and the new expiry keeps the entry, one after the new removes it.
     */
    ck_assert_int_eq(dsg_store_sweep(st, 2000, 0, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 0);
    ck_assert_uint_eq(evi, 0);
    ck_assert_int_eq(t_get_seed(st, 1, 300, 10), DSG_STORE_OK);

    ck_assert_int_eq(dsg_store_sweep(st, 6000, 0, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 1);
    ck_assert_int_eq(t_get(st, 1, 10), DSG_STORE_NOTFOUND);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 0);

    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_missing)
{
    uint8_t           key[DSG_STORE_KEY_SIZE];
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    /* in an empty store */
    ck_assert_int_eq(t_get(st, 7, 1), DSG_STORE_NOTFOUND);

    ck_assert_int_eq(t_put(st, 1, 100, T_FAR, 1), DSG_STORE_OK);

    ck_assert_int_eq(t_get(st, 7, 1), DSG_STORE_NOTFOUND);

    t_key(key, 7);
    ck_assert_int_eq(dsg_store_del(st, key), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(dsg_store_touch(st, key, 1, 5), DSG_STORE_OK);

    /* del removes; a second del finds nothing */
    t_key(key, 1);
    ck_assert_int_eq(dsg_store_del(st, key), DSG_STORE_OK);
    ck_assert_int_eq(dsg_store_del(st, key), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 1, 100), DSG_STORE_NOTFOUND);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 0);

    /* NOTFOUND is not an error: nothing recorded */
    ck_assert_int_eq(dsg_store_last_error(st), 0);

    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_sweep_expired)
{
    unsigned          i, exp, evi;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    ck_assert_int_eq(t_put(st, 1, 100, 1000, 1), DSG_STORE_OK);
    ck_assert_int_eq(t_put(st, 2, 100, 5000, 2), DSG_STORE_OK);
    ck_assert_int_eq(t_put(st, 3, 9000, 3000, 3), DSG_STORE_OK);

    /* nothing expired yet (expires_ms == now is not past) */
    ck_assert_int_eq(dsg_store_sweep(st, 1000, 0, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 0);

    ck_assert_int_eq(dsg_store_sweep(st, 3500, 0, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 2);
    ck_assert_uint_eq(evi, 0);

    ck_assert_int_eq(t_get(st, 1, 100), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 3, 9000), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 2, 100), DSG_STORE_OK);

    /* max_items bounds one sweep */
    for (i = 10; i < 20; i++) {
        ck_assert_int_eq(t_put(st, i, 300, 4000 + i, i), DSG_STORE_OK);
    }

    ck_assert_int_eq(dsg_store_sweep(st, 4500, 0, 3, &exp, NULL),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 3);

    /* oldest expiry first */
    ck_assert_int_eq(t_get(st, 10, 300), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 12, 300), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 13, 300), DSG_STORE_OK);

    ck_assert_int_eq(dsg_store_sweep(st, 4500, 0, 100, &exp, NULL),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 7);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 1);

    /*
     * more rows than one transaction of the sweep takes (32): one call
     * still removes max_items of them, in several transactions
     */
    for (i = 100; i < 200; i++) {
        ck_assert_int_eq(t_put(st, i, 100, 6000 + i, i), DSG_STORE_OK);
    }

    ck_assert_int_eq(dsg_store_sweep(st, 7000, 0, 70, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 70);
    ck_assert_uint_eq(evi, 0);
    /* entry 2 (expired at 5000) went first, then 100 .. 168 */
    ck_assert_int_eq(t_get(st, 2, 100), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 168, 100), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 169, 100), DSG_STORE_OK);

    ck_assert_int_eq(dsg_store_sweep(st, 7000, 0, 1000, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 31);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 0);

    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_sweep_stale_grace)
{
    unsigned      exp, evi;
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    ck_assert_int_eq(t_put(st, 1, 100, 1000, 1), DSG_STORE_OK);

    /* expired, but kept for stale serving for 5 s */
    ck_assert_int_eq(dsg_store_sweep(st, 2000, 5000, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 0);
    ck_assert_int_eq(t_get(st, 1, 100), DSG_STORE_OK);

    /* expires + grace == now: still kept */
    ck_assert_int_eq(dsg_store_sweep(st, 6000, 5000, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 0);
    ck_assert_int_eq(t_get(st, 1, 100), DSG_STORE_OK);

    ck_assert_int_eq(dsg_store_sweep(st, 6001, 5000, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 1);
    ck_assert_int_eq(t_get(st, 1, 100), DSG_STORE_NOTFOUND);

    /* a grace longer than the clock: no underflow, nothing removed */
    ck_assert_int_eq(t_put(st, 2, 100, 0, 1), DSG_STORE_OK);
    ck_assert_int_eq(dsg_store_sweep(st, 10, UINT64_MAX, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 0);
    ck_assert_int_eq(dsg_store_sweep(st, UINT64_MAX, 0, 100, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 1);

    dsg_store_close(st);
}
END_TEST


/*
 * A 1 MB map fed 10 MB of distinct 20 KB values: every put either stores
 * (evicting the least recently stored entries when the map is full) or
 * reports EFULL; the file never outgrows the map.
 */

START_TEST(test_store_map_full_eviction)
{
    int               rc;
    size_t            len;
    unsigned          i, n, ok, full, last_ok[4], k;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, T_MB);

    len = 20 * 1024;
    n = 10 * T_MB / len;
    ok = 0;
    full = 0;
    k = 0;

    for (i = 0; i < n; i++) {
        rc = t_put(st, i, len, T_FAR, 1000 + i);

        ck_assert_msg(rc == DSG_STORE_OK || rc == DSG_STORE_EFULL,
                      "put %u: %s (%s)", i, dsg_store_strerror(rc),
                      dsg_store_strerror(dsg_store_last_error(st)));

        if (rc == DSG_STORE_OK) {
            ok++;
            last_ok[k++ % 4] = i;

        } else {
            full++;
        }

        ck_assert_uint_le(t_file_size(dir), T_MB);
    }

    t_stat(st, &s);

    printf("dsg_store: 1 MB map, %u puts of 20 KB: %u stored, %u EFULL, "
           "%u full maps, %u evicted, %u entries left, file %u KB\n",
           n, ok, full, (unsigned) s.put_full, (unsigned) s.put_evicted,
           (unsigned) s.entries, (unsigned) (t_file_size(dir) / 1024));

    ck_assert_uint_ge(ok, n * 9 / 10);
    ck_assert_uint_gt(s.put_full, 0);
    ck_assert_uint_gt(s.put_evicted, 0);
    ck_assert_uint_le(s.used_bytes, T_MB);
    ck_assert_uint_gt(s.entries, 10);

    /* the newest stored entries are there */
    for (i = 0; i < 4; i++) {
        ck_assert_int_eq(t_get(st, last_ok[i], len), DSG_STORE_OK);
    }

    ck_assert_int_eq(t_get(st, n - 1, len), DSG_STORE_OK);

    /* the oldest are gone */
    for (i = 0; i < 100; i++) {
        ck_assert_int_eq(t_get(st, i, len), DSG_STORE_NOTFOUND);
    }

    dsg_store_close(st);
}
END_TEST


/* a touched entry survives the eviction of entries stored after it */

START_TEST(test_store_touch)
{
    int           rc;
    size_t        len;
    uint8_t       key[DSG_STORE_KEY_SIZE];
    unsigned      i;
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();
    st = t_open(dir, T_MB);

    len = 20 * 1024;
    t_key(key, 0);

    for (i = 0; i < 200; i++) {
        rc = t_put(st, i, len, T_FAR, 1000 + 2 * i);
        ck_assert(rc == DSG_STORE_OK || rc == DSG_STORE_EFULL);

        /* the glue touches entry 0 on its hits */
        rc = dsg_store_touch(st, key, 1, 1001 + 2 * i);
        ck_assert_int_eq(rc, DSG_STORE_OK);
    }

    ck_assert_int_eq(t_get(st, 0, len), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 1, len), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 199, len), DSG_STORE_OK);

    /* touching to the same time is a no-op */
    ck_assert_int_eq(dsg_store_touch(st, key, 1, 1001 + 2 * 199), DSG_STORE_OK);

    dsg_store_close(st);
}
END_TEST


/*
 * two keys at once, as the glue touches a second of hits; a key no longer
 * stored is passed over, the other survives as entry 0 does above
 */

START_TEST(test_store_touch_many)
{
    int           rc;
    size_t        len;
    uint8_t       keys[2 * DSG_STORE_KEY_SIZE];
    unsigned      i;
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();
    st = t_open(dir, T_MB);

    len = 20 * 1024;
    t_key(keys, 0);
    t_key(keys + DSG_STORE_KEY_SIZE, 100000);   /* never stored */

    ck_assert_int_eq(dsg_store_touch(st, keys, 0, 1), DSG_STORE_OK);
    ck_assert_int_eq(dsg_store_touch(st, NULL, 1, 1),
                     DSG_STORE_EINVAL);

    for (i = 0; i < 200; i++) {
        rc = t_put(st, i, len, T_FAR, 1000 + 2 * i);
        ck_assert(rc == DSG_STORE_OK || rc == DSG_STORE_EFULL);

        rc = dsg_store_touch(st, keys, 2, 1001 + 2 * i);
        ck_assert_int_eq(rc, DSG_STORE_OK);
    }

    ck_assert_int_eq(t_get(st, 0, len), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 1, len), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 199, len), DSG_STORE_OK);

    dsg_store_close(st);
}
END_TEST


/*
 * The sweep evicts, least recently used first, once the live data passes
 * 90% of the map, without waiting for a put to find the map full.
 */

START_TEST(test_store_sweep_high_water)
{
    int               rc;
    size_t            len;
    unsigned          i, n, exp, evi;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 4 * T_MB);

    len = 8 * 1024;

    for (i = 0; i < 10000; i++) {
        rc = t_put(st, i, len, T_FAR, 1000 + i);
        ck_assert_int_eq(rc, DSG_STORE_OK);

        t_stat(st, &s);

        if (s.data_bytes > s.map_size / 100 * 92) {
            break;
        }
    }

    n = i + 1;

    /* got there before any put found the map full */
    ck_assert_uint_eq(s.put_full, 0);
    ck_assert_uint_gt(s.data_bytes, s.map_size / 100 * 90);

    /* nothing expired; bounded by max_items */
    ck_assert_int_eq(dsg_store_sweep(st, 5000, 0, 5, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, 0);
    ck_assert_uint_eq(evi, 5);

    ck_assert_int_eq(dsg_store_sweep(st, 5000, 0, 1000, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_gt(evi, 0);

    /*
     * down to the low-water mark (80%), though that takes more rows than
     * one of the sweep's transactions removes
     */
    t_stat(st, &s);
    ck_assert_uint_le(s.data_bytes, s.map_size / 100 * 82);
    ck_assert_uint_gt(evi, 32);
    ck_assert_uint_eq(s.entries, n - 5 - evi);

    /* least recently used first */
    ck_assert_int_eq(t_get(st, 0, len), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 4 + evi, len), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 5 + evi, len), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, n - 1, len), DSG_STORE_OK);

    /* below the mark now: a sweep evicts nothing */
    ck_assert_int_eq(dsg_store_sweep(st, 5000, 0, 1000, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(evi, 0);

    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_too_big)
{
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, T_MB);

    ck_assert_int_eq(t_put(st, 1, 600 * 1024, T_FAR, 1), DSG_STORE_ETOOBIG);
    ck_assert_int_eq(t_put(st, 1, 2 * T_MB, T_FAR, 1), DSG_STORE_ETOOBIG);
    ck_assert_int_eq(t_put(st, 1, SIZE_MAX, T_FAR, 1), DSG_STORE_ETOOBIG);
    ck_assert_int_eq(t_get(st, 1, 0), DSG_STORE_NOTFOUND);

    /* just under half the map fits an empty store */
    ck_assert_int_eq(t_put(st, 2, 400 * 1024, T_FAR, 1), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 2, 400 * 1024), DSG_STORE_OK);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 1);

    dsg_store_close(st);
}
END_TEST


static void
t_write_garbage(const char *dir, const char *file, size_t len)
{
    int       fd;
    char      path[PATH_MAX];
    size_t    i;
    uint8_t  *buf;

    buf = malloc(len);
    ck_assert_ptr_nonnull(buf);

    for (i = 0; i < len; i++) {
        buf[i] = (uint8_t) (i * 7919 + (i >> 7) * 13 + 1);
    }

    t_path(path, sizeof(path), dir, file);

    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ne(fd, -1);
    ck_assert_int_eq(write(fd, buf, len), (ssize_t) len);
    ck_assert_int_eq(close(fd), 0);

    free(buf);
}


START_TEST(test_store_corrupt_recreate)
{
    int           rc, recreated;
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();

    /* a garbage data.mdb: refused without the flag */
    t_write_garbage(dir, "data.mdb", 64 * 1024);

    st = (dsg_store_t *) &rc;
    rc = dsg_store_open(&st, dir, 4 * T_MB, 126, 0, &recreated);
    ck_assert_int_eq(rc, DSG_STORE_ECORRUPT);
    ck_assert_ptr_null(st);
    ck_assert_int_eq(recreated, 0);

    rc = dsg_store_open(&st, dir, 4 * T_MB, 126, DSG_STORE_RECREATE,
                        &recreated);
    ck_assert_int_eq(rc, DSG_STORE_OK);
    ck_assert_int_eq(recreated, 1);

    ck_assert_int_eq(t_put(st, 1, 3000, T_FAR, 1), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 1, 3000), DSG_STORE_OK);

    dsg_store_close(st);

    /* the new file is good: the next open keeps it */
    st = t_open(dir, 4 * T_MB);
    ck_assert_int_eq(t_get(st, 1, 3000), DSG_STORE_OK);
    dsg_store_close(st);

    /*
     * A garbage lock file, with no process using it, is simply rebuilt by
     * LMDB (the first opener owns it): no recreation, no data lost.
     */
    t_write_garbage(dir, "lock.mdb", 8192);

    rc = dsg_store_open(&st, dir, 4 * T_MB, 126, 0, &recreated);
    ck_assert_int_eq(rc, DSG_STORE_OK);
    ck_assert_int_eq(recreated, 0);
    ck_assert_int_eq(t_get(st, 1, 3000), DSG_STORE_OK);
    ck_assert_int_eq(t_put(st, 2, 10, T_FAR, 1), DSG_STORE_OK);
    dsg_store_close(st);

    /* a truncated data file (a torn copy) */
    t_write_garbage(dir, "data.mdb", 100);

    rc = dsg_store_open(&st, dir, 4 * T_MB, 126, DSG_STORE_RECREATE,
                        &recreated);
    ck_assert_int_eq(rc, DSG_STORE_OK);
    ck_assert_int_eq(recreated, 1);
    ck_assert_int_eq(t_get(st, 1, 3000), DSG_STORE_NOTFOUND);
    dsg_store_close(st);
}
END_TEST


/* the operator shrank the cache below the size of the file */

START_TEST(test_store_map_shrunk)
{
    int           rc, recreated;
    unsigned      i;
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();
    st = t_open(dir, 8 * T_MB);

    for (i = 0; i < 30; i++) {
        ck_assert_int_eq(t_put(st, i, 100 * 1024, T_FAR, i), DSG_STORE_OK);
    }

    dsg_store_close(st);

    ck_assert_uint_gt(t_file_size(dir), T_MB);

    rc = dsg_store_open(&st, dir, T_MB, 126, 0, &recreated);
    ck_assert_int_eq(rc, DSG_STORE_EMAPSIZE);
    ck_assert_int_eq(recreated, 0);

    /* the same size again is fine */
    st = t_open(dir, 8 * T_MB);
    ck_assert_int_eq(t_get(st, 29, 100 * 1024), DSG_STORE_OK);
    dsg_store_close(st);

    rc = dsg_store_open(&st, dir, T_MB, 126, DSG_STORE_RECREATE, &recreated);
    ck_assert_int_eq(rc, DSG_STORE_OK);
    ck_assert_int_eq(recreated, 1);
    ck_assert_int_eq(t_get(st, 29, 100 * 1024), DSG_STORE_NOTFOUND);
    ck_assert_uint_le(t_file_size(dir), T_MB);
    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_reopen)
{
    unsigned          i;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    for (i = 0; i < 20; i++) {
        ck_assert_int_eq(t_put(st, i, 1000 + i * 500, 9000 + i, i),
                         DSG_STORE_OK);
    }

    ck_assert_int_eq(dsg_store_sync(st), DSG_STORE_OK);
    dsg_store_close(st);

    st = t_open(dir, 16 * T_MB);

    for (i = 0; i < 20; i++) {
        ck_assert_int_eq(t_get(st, i, 1000 + i * 500), DSG_STORE_OK);
    }

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 20);

    /* the indexes persisted too */
    ck_assert_int_eq(dsg_store_sweep(st, 9010, 0, 100, NULL, NULL),
                     DSG_STORE_OK);
    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 10);
    ck_assert_int_eq(t_get(st, 9, 1000 + 9 * 500), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_get(st, 10, 1000 + 10 * 500), DSG_STORE_OK);

    dsg_store_close(st);
}
END_TEST


/* zeroes data.mdb from byte "from" to its end, as a bad disk might */

static void
t_zero_from(const char *dir, off_t from)
{
    int          fd;
    char         path[PATH_MAX], zero[4096];
    off_t        off, size;
    struct stat  sb;

    t_path(path, sizeof(path), dir, "data.mdb");
    fd = open(path, O_WRONLY);
    ck_assert_int_ne(fd, -1);
    ck_assert_int_eq(fstat(fd, &sb), 0);

    memset(zero, 0, sizeof(zero));
    size = sb.st_size;

    for (off = from; off < size; off += sizeof(zero)) {
        ck_assert_int_eq(pwrite(fd, zero, sizeof(zero), off),
                         (ssize_t) sizeof(zero));
    }

    ck_assert_int_eq(close(fd), 0);
}


/*
 * Data pages zeroed under a running "worker", meta pages intact.  Another
 * worker starting meanwhile (a child) finds the file bad and recreates
 * it; the first one, told by dsg_store_replaced() or by a failed read,
 * reopens with DSG_STORE_REPLACE and opens that new file instead of
 * removing it again.  Damaged again, the file it has open is recreated.
 */

START_TEST(test_store_replace_running)
{
    int           rc, recreated, status;
    pid_t         pid;
    unsigned      i;
    const char   *dir;
    dsg_store_t  *st, *c;

    dir = t_mkdir();
    st = t_open(dir, 4 * T_MB);

    for (i = 0; i < 40; i++) {
        ck_assert_int_eq(t_put(st, i, 3000, T_FAR, i), DSG_STORE_OK);
    }

    ck_assert_int_eq(dsg_store_sync(st), DSG_STORE_OK);
    ck_assert_int_eq(dsg_store_replaced(st), 0);

    t_zero_from(dir, 16384);

    rc = t_get(st, 7, 3000);
    ck_assert_msg(rc == DSG_STORE_ECORRUPT, "get: %d, %s", rc,
                  dsg_store_strerror(dsg_store_last_error(st)));

    pid = fork();
    ck_assert_int_ne(pid, -1);

    if (pid == 0) {
        rc = dsg_store_open(&c, dir, 4 * T_MB, 126, DSG_STORE_RECREATE,
                            &recreated);
        if (rc != DSG_STORE_OK || !recreated
            || t_get(c, 7, 3000) != DSG_STORE_NOTFOUND
            || t_put(c, 100, 2000, T_FAR, 1) != DSG_STORE_OK
            || dsg_store_sync(c) != DSG_STORE_OK)
        {
            _exit(1);
        }

        dsg_store_close(c);
        _exit(0);
    }

    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);

    /* the child's new file is opened, not recreated once more */
    ck_assert_int_eq(dsg_store_replaced(st), 1);
    ck_assert_int_eq(dsg_store_reopen(&st, DSG_STORE_REPLACE, &recreated),
                     DSG_STORE_OK);
    ck_assert_int_eq(recreated, 0);
    ck_assert_int_eq(dsg_store_replaced(st), 0);
    ck_assert_int_eq(t_get(st, 100, 2000), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 7, 3000), DSG_STORE_NOTFOUND);

    for (i = 200; i < 240; i++) {
        ck_assert_int_eq(t_put(st, i, 3000, T_FAR, i), DSG_STORE_OK);
    }

    /* a plain reopen keeps a good file */
    ck_assert_int_eq(dsg_store_reopen(&st, 0, &recreated), DSG_STORE_OK);
    ck_assert_int_eq(recreated, 0);
    ck_assert_int_eq(t_get(st, 201, 3000), DSG_STORE_OK);

    /* damaged again: the file this store has open is replaced */
    ck_assert_int_eq(dsg_store_sync(st), DSG_STORE_OK);
    t_zero_from(dir, 16384);
    ck_assert_int_eq(t_get(st, 201, 3000), DSG_STORE_ECORRUPT);
    ck_assert_int_eq(dsg_store_reopen(&st, DSG_STORE_REPLACE, &recreated),
                     DSG_STORE_OK);
    ck_assert_int_eq(recreated, 1);
    ck_assert_int_eq(t_get(st, 201, 3000), DSG_STORE_NOTFOUND);
    ck_assert_int_eq(t_put(st, 300, 3000, T_FAR, 3), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 300, 3000), DSG_STORE_OK);

    /* files removed behind its back: keep the open one, nothing to open */
    t_rm_tree(dir);
    ck_assert_int_eq(dsg_store_replaced(st), 0);
    ck_assert_int_eq(t_get(st, 300, 3000), DSG_STORE_OK);

    /* a reopen that cannot open frees the store */
    ck_assert_int_ne(dsg_store_reopen(&st, DSG_STORE_RECREATE, &recreated),
                     DSG_STORE_OK);
    ck_assert_ptr_null(st);

    ck_assert_int_eq(dsg_store_reopen(NULL, 0, NULL), DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_replaced(NULL), 0);
}
END_TEST


START_TEST(test_store_stat)
{
    int               dead;
    long              ps;
    unsigned          i;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 0);
    ck_assert_uint_eq(s.overflow_pages, 0);

    for (i = 0; i < 50; i++) {
        ck_assert_int_eq(t_put(st, i, 10 * 1024, T_FAR, i), DSG_STORE_OK);
    }

    ck_assert_int_eq(t_get(st, 3, 10 * 1024), DSG_STORE_OK);

    t_stat(st, &s);

    ps = sysconf(_SC_PAGESIZE);

    ck_assert_uint_eq(s.entries, 50);
    ck_assert_uint_eq(s.map_size, 16 * T_MB);
    ck_assert_uint_eq(s.page_size, (uint64_t) ps);
    /* 10 KB + a page header takes 3 overflow pages of 4 KB */
    ck_assert_uint_eq(s.overflow_pages,
                      50 * ((10 * 1024 + 16 + ps - 1) / ps));
    ck_assert_uint_gt(s.btree_pages, 0);
    ck_assert_uint_ge(s.used_bytes, s.overflow_pages * s.page_size);
    ck_assert_uint_le(s.used_bytes, s.map_size);
    ck_assert_uint_le(s.used_bytes, t_file_size(dir) + s.page_size);
    ck_assert_uint_le(s.free_bytes, s.used_bytes);
    ck_assert_uint_eq(s.data_bytes, s.used_bytes - s.free_bytes);
    ck_assert_uint_ge(s.max_readers, 126);
    /* this process holds one reader slot */
    ck_assert_uint_eq(s.readers, 1);
    ck_assert_uint_eq(s.put_full, 0);

    ck_assert_int_eq(dsg_store_reader_check(st, &dead), DSG_STORE_OK);
    ck_assert_int_eq(dead, 0);
    ck_assert_int_eq(dsg_store_reader_check(st, NULL), DSG_STORE_OK);

    dsg_store_close(st);
}
END_TEST


/*
 * dsg_store_detach(): puts through a detached handle in another thread,
 * while this thread reads through the store, as the glue's thread pool
 * stores do; then enough 1 MB puts to need eviction (the detached handle's
 * own read transaction), and the counters folded back by attach.
 */

typedef struct {
    dsg_store_t  *h;
    unsigned      first;
    unsigned      n;
    size_t        len;
    int           rc[40];
    volatile int  done;
} t_detached_t;


static void *
t_detached_run(void *arg)
{
    unsigned       i;
    t_detached_t  *d = arg;

    for (i = 0; i < d->n; i++) {
        d->rc[i] = t_put(d->h, d->first + i, d->len, T_FAR, 2000 + i);
    }

    dsg_store_detached_end(d->h);
    __atomic_store_n(&d->done, 1, __ATOMIC_RELEASE);

    return NULL;
}


START_TEST(test_store_detached)
{
    unsigned          i, reads;
    pthread_t         tid;
    const char       *dir;
    dsg_store_t      *st, *h;
    t_detached_t      d;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    ck_assert_ptr_null(dsg_store_detach(NULL));
    ck_assert_int_eq(t_put(st, 0, 4096, T_FAR, 1000), DSG_STORE_OK);

    /* 20 puts of 256 KB in the thread, reads here meanwhile */

    h = dsg_store_detach(st);
    ck_assert_ptr_nonnull(h);
    ck_assert_ptr_null(dsg_store_detach(h));

    memset(&d, 0, sizeof(d));
    d.h = h;
    d.first = 1;
    d.n = 20;
    d.len = 256 * 1024;

    ck_assert_int_eq(pthread_create(&tid, NULL, t_detached_run, &d), 0);

    reads = 0;
    while (!__atomic_load_n(&d.done, __ATOMIC_ACQUIRE)) {
        ck_assert_int_eq(t_get(st, 0, 4096), DSG_STORE_OK);
        reads++;
    }

    ck_assert_int_eq(pthread_join(tid, NULL), 0);
    dsg_store_attach(st, h);

    for (i = 0; i < d.n; i++) {
        ck_assert_int_eq(d.rc[i], DSG_STORE_OK);
        ck_assert_int_eq(t_get(st, d.first + i, d.len), DSG_STORE_OK);
    }

    ck_assert_uint_gt(reads, 0);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 21);
    ck_assert_uint_eq(s.put_full, 0);

    /* 30 puts of 1 MB into a 16 MB map: they evict, from the thread */

    h = dsg_store_detach(st);
    ck_assert_ptr_nonnull(h);

    memset(&d, 0, sizeof(d));
    d.h = h;
    d.first = 100;
    d.n = 30;
    d.len = T_MB;

    ck_assert_int_eq(pthread_create(&tid, NULL, t_detached_run, &d), 0);
    ck_assert_int_eq(pthread_join(tid, NULL), 0);
    dsg_store_attach(st, h);

    for (i = 0; i < d.n; i++) {
        ck_assert_int_eq(d.rc[i], DSG_STORE_OK);
    }

    /* the newest is there, whole; the evictions are st's counters now */
    ck_assert_int_eq(t_get(st, d.first + d.n - 1, d.len), DSG_STORE_OK);

    t_stat(st, &s);
    ck_assert_uint_gt(s.put_full, 0);
    ck_assert_uint_gt(s.put_evicted, 0);
    ck_assert_uint_lt(s.entries, 51);

    /* the store's own writes go on as before */
    ck_assert_int_eq(t_put(st, 7, 100, T_FAR, 5000), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 7, 100), DSG_STORE_OK);

    dsg_store_close(st);
}
END_TEST


/* pins value i: checks it is value "seed" of len bytes */

static dsg_store_pin_t *
t_pin(dsg_store_t *st, unsigned i, unsigned seed, size_t len,
    const uint8_t **val)
{
    int               rc;
    size_t            n;
    uint8_t           key[DSG_STORE_KEY_SIZE], *want;
    dsg_store_pin_t  *pin;

    t_key(key, i);

    rc = dsg_store_pin(st, key, &pin, val, &n);
    ck_assert_msg(rc == DSG_STORE_OK, "pin: %s", dsg_store_strerror(rc));
    ck_assert_ptr_nonnull(pin);
    ck_assert_uint_eq(n, len);

    want = malloc(len);
    ck_assert_ptr_nonnull(want);
    t_pattern(want, len, seed);
    ck_assert_mem_eq(*val, want, len);
    free(want);

    return pin;
}


static void
t_pinned_is(const uint8_t *val, unsigned seed, size_t len)
{
    uint8_t  *want;

    want = malloc(len);
    ck_assert_ptr_nonnull(want);
    t_pattern(want, len, seed);
    ck_assert_mem_eq(val, want, len);
    free(want);
}


/*
 * A pinned value is the bytes stored when it was pinned, whatever is
 * written meanwhile: replaced, deleted, evicted, its pages freed and the
 * map filled again many times over.  At most DSG_STORE_PINS at once; a
 * map size grown by another process is adopted only once no pin is out;
 * close ends the pins still out.
 */

START_TEST(test_store_pin)
{
    int               rc, status;
    pid_t             pid;
    size_t            n;
    unsigned          i, ok, full;
    uint8_t           key[DSG_STORE_KEY_SIZE];
    const char       *dir;
    dsg_store_t      *st, *big;
    const uint8_t    *val, *v2;
    dsg_store_pin_t  *pin, *p2, *pins[DSG_STORE_PINS];

    dir = t_mkdir();
    st = t_open(dir, 8 * T_MB);

    ck_assert_int_eq(t_put(st, 1, 256 * 1024, T_FAR, 1000), DSG_STORE_OK);
    ck_assert_int_eq(t_put(st, 2, 3000, T_FAR, 1000), DSG_STORE_OK);

    pin = t_pin(st, 1, 1, 256 * 1024, &val);
    p2 = t_pin(st, 2, 2, 3000, &v2);
    ck_assert_uint_eq(dsg_store_pins(st), 2);

    /*
     * replaced, deleted, then 60 puts of 256 KB through an 8 MB map: the
     * free room is used up and, as pages freed while a pin lasts cannot
     * be reused, the rest are EFULL (the cost of a long pin)
     */

    ck_assert_int_eq(t_put_seed(st, 1, 77, 256 * 1024, T_FAR, 2000),
                     DSG_STORE_OK);
    t_key(key, 2);
    ck_assert_int_eq(dsg_store_del(st, key), DSG_STORE_OK);

    ok = 0;
    full = 0;

    for (i = 0; i < 60; i++) {
        rc = t_put(st, 100 + i, 256 * 1024, T_FAR, 3000 + i);
        ck_assert(rc == DSG_STORE_OK || rc == DSG_STORE_EFULL);
        ok += (rc == DSG_STORE_OK);
        full += (rc == DSG_STORE_EFULL);
    }

    ck_assert_uint_ge(ok, 10);
    ck_assert_uint_gt(full, 0);

    t_pinned_is(val, 1, 256 * 1024);
    t_pinned_is(v2, 2, 3000);

    dsg_store_unpin(st, pin);
    dsg_store_unpin(st, p2);
    dsg_store_unpin(st, p2);            /* not pinned: nothing happens */
    ck_assert_uint_eq(dsg_store_pins(st), 0);

    /* unpinned: the freed pages are reused, puts evict and succeed */

    for (i = 0; i < 60; i++) {
        ck_assert_int_eq(t_put(st, 200 + i, 256 * 1024, T_FAR, 5000 + i),
                         DSG_STORE_OK);
    }

    ck_assert_int_eq(t_get(st, 2, 3000), DSG_STORE_NOTFOUND);
    rc = t_get_seed(st, 1, 77, 256 * 1024);
    ck_assert(rc == DSG_STORE_OK || rc == DSG_STORE_NOTFOUND);

    /* missing: not pinned */

    t_key(key, 2);
    ck_assert_int_eq(dsg_store_pin(st, key, &pin, &val, &n),
                     DSG_STORE_NOTFOUND);
    ck_assert_ptr_null(pin);
    ck_assert_uint_eq(dsg_store_pins(st), 0);

    /* DSG_STORE_PINS at once, then ELIMIT; spares are renewed */

    ck_assert_int_eq(t_put(st, 3, 40000, T_FAR, 9000), DSG_STORE_OK);

    for (i = 0; i < DSG_STORE_PINS; i++) {
        pins[i] = t_pin(st, 3, 3, 40000, &val);
    }

    t_key(key, 3);
    ck_assert_int_eq(dsg_store_pin(st, key, &pin, &val, &n),
                     DSG_STORE_ELIMIT);
    ck_assert_int_eq(t_get(st, 3, 40000), DSG_STORE_OK);

    for (i = 0; i < DSG_STORE_PINS; i++) {
        dsg_store_unpin(st, pins[i]);
    }

    for (i = 0; i < 3 * DSG_STORE_PINS; i++) {
        dsg_store_unpin(st, t_pin(st, 3, 3, 40000, &val));
    }

    /*
     * another process grows the map: not adopted while a pin is out (the
     * remap would move the pinned bytes), adopted at the next write after
     */

    pin = t_pin(st, 3, 3, 40000, &val);

    pid = fork();
    ck_assert_int_ne(pid, -1);

    if (pid == 0) {
        if (dsg_store_open(&big, dir, 32 * T_MB, 126, 0, NULL)
            != DSG_STORE_OK)
        {
            _exit(1);
        }

        for (i = 0; i < 60; i++) {
            if (t_put(big, 500 + i, 256 * 1024, T_FAR, 20000 + i)
                != DSG_STORE_OK)
            {
                _exit(2);
            }
        }

        dsg_store_close(big);
        _exit(0);
    }

    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    ck_assert_int_eq(t_put(st, 4, 1000, T_FAR, 30000), DSG_STORE_ELIMIT);
    t_pinned_is(val, 3, 40000);

    dsg_store_unpin(st, pin);
    ck_assert_int_eq(t_put(st, 4, 1000, T_FAR, 30000), DSG_STORE_OK);
    ck_assert_int_eq(t_get(st, 559, 256 * 1024), DSG_STORE_OK);

    /* close with pins out: ended (ASan and valgrind see no leak) */

    (void) t_pin(st, 3, 3, 40000, &val);
    (void) t_pin(st, 4, 4, 1000, &val);
    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_callbacks_fail)
{
    size_t        n;
    uint8_t       key[DSG_STORE_KEY_SIZE], *val;
    t_fill_t      f;
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();
    st = t_open(dir, 16 * T_MB);

    t_key(key, 1);

    /* a failing fill stores nothing */
    f.seed = 1;
    f.calls = 0;
    f.fail = 1;

    ck_assert_int_eq(dsg_store_put(st, key, T_FAR, 1, 5000, t_fill, &f),
                     DSG_STORE_EFILL);
    ck_assert_uint_eq(f.calls, 1);
    ck_assert_int_eq(t_get(st, 1, 5000), DSG_STORE_NOTFOUND);

    /* nor does it damage the value it was to replace */
    ck_assert_int_eq(t_put(st, 1, 5000, T_FAR, 1), DSG_STORE_OK);
    ck_assert_int_eq(dsg_store_put(st, key, T_FAR, 2, 300, t_fill, &f),
                     DSG_STORE_EFILL);
    ck_assert_int_eq(t_get(st, 1, 5000), DSG_STORE_OK);

    /* a failing alloc */
    val = (uint8_t *) &n;
    ck_assert_int_eq(dsg_store_get(st, key, t_alloc_fail, NULL, &val, &n),
                     DSG_STORE_ENOMEM);
    ck_assert_ptr_null(val);

    /* and the store still works */
    ck_assert_int_eq(t_get(st, 1, 5000), DSG_STORE_OK);

    dsg_store_close(st);
}
END_TEST


START_TEST(test_store_args)
{
    int           rc, recreated;
    char          path[PATH_MAX];
    size_t        n;
    uint8_t       key[DSG_STORE_KEY_SIZE], *val;
    const char   *dir;
    dsg_store_t  *st;

    dir = t_mkdir();

    ck_assert_int_eq(dsg_store_open(NULL, dir, T_MB, 0, 0, NULL),
                     DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_open(&st, NULL, T_MB, 0, 0, NULL),
                     DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_open(&st, dir, 0, 0, 0, NULL),
                     DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_open(&st, dir, T_MB, 0, 0x100, NULL),
                     DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_open(&st, "", T_MB, 0, 0, NULL),
                     DSG_STORE_EINVAL);

    /* not a directory: a system error, errno says which */
    t_path(path, sizeof(path), dir, "file");
    t_write_garbage(dir, "file", 10);
    errno = 0;
    rc = dsg_store_open(&st, path, T_MB, 0, DSG_STORE_RECREATE, &recreated);
    ck_assert_int_eq(rc, DSG_STORE_EIO);
    ck_assert_int_eq(errno, ENOTDIR);

    /* a missing directory is created */
    t_path(path, sizeof(path), dir, "sub");
    rc = dsg_store_open(&st, path, T_MB, 0, 0, NULL);
    ck_assert_int_eq(rc, DSG_STORE_OK);

    ck_assert_int_eq(dsg_store_get(st, NULL, t_alloc, NULL, &val, &n),
                     DSG_STORE_EINVAL);
    t_key(key, 1);
    ck_assert_int_eq(dsg_store_put(st, key, 1, 1, 10, NULL, NULL),
                     DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_del(st, NULL), DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_touch(st, NULL, 1, 1), DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_stat(st, NULL), DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_last_error(st), EINVAL);

    dsg_store_close(st);
    dsg_store_close(NULL);

    ck_assert_int_eq(dsg_store_sync(NULL), DSG_STORE_EINVAL);
    ck_assert_int_eq(dsg_store_sweep(NULL, 1, 1, 1, NULL, NULL),
                     DSG_STORE_EINVAL);
}
END_TEST


START_TEST(test_store_strerror)
{
    int          rc, j;
    const char  *a, *b;

    for (rc = DSG_STORE_EIO; rc <= DSG_STORE_OK; rc++) {
        a = dsg_store_strerror(rc);
        ck_assert_ptr_nonnull(a);

        for (j = DSG_STORE_EIO; j < rc; j++) {
            b = dsg_store_strerror(j);
            ck_assert_str_ne(a, b);
        }
    }

    /* raw LMDB and errno codes, as from dsg_store_last_error() */
    ck_assert_ptr_nonnull(strstr(dsg_store_strerror(MDB_MAP_FULL),
                                 "MDB_MAP_FULL"));
    ck_assert_ptr_nonnull(strstr(dsg_store_strerror(MDB_CORRUPTED),
                                 "MDB_CORRUPTED"));
    ck_assert_str_eq(dsg_store_strerror(ENOSPC), strerror(ENOSPC));
    ck_assert_ptr_nonnull(dsg_store_strerror(-12345));
}
END_TEST


/*
 * Mixed sizes up to 1 MB in an 8 MB map, with deletes, touches and
 * sweeps in between: every call succeeds or reports EFULL, every value
 * read back is intact, and the expiry index covers exactly the entries.
 */

START_TEST(test_store_mixed_stress)
{
    int               rc;
    size_t            len, sizes[400];
    uint8_t           key[DSG_STORE_KEY_SIZE];
    uint64_t          x, r, now;
    unsigned          i, n, present, ok, full, exp, evi;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();
    st = t_open(dir, 8 * T_MB);

    n = sizeof(sizes) / sizeof(sizes[0]);
    x = 42;
    ok = 0;
    full = 0;
    now = 1000;

    for (i = 0; i < n; i++) {
        r = t_mix(&x);

        switch (r % 8) {
        case 0:
            len = 512 * 1024 + r % (512 * 1024);
            break;
        case 1:
        case 2:
            len = 64 * 1024 + r % (128 * 1024);
            break;
        default:
            len = 1024 + r % (16 * 1024);
            break;
        }

        sizes[i] = len;
        now += 10;

        rc = t_put(st, i, len, now + (r >> 32) % 100000, now);
        ck_assert_msg(rc == DSG_STORE_OK || rc == DSG_STORE_EFULL,
                      "put %u of %zu: %s", i, len, dsg_store_strerror(rc));

        if (rc == DSG_STORE_OK) {
            ok++;

        } else {
            full++;
            sizes[i] = 0;
        }

        ck_assert_uint_le(t_file_size(dir), 8 * T_MB);

        if (i % 7 == 3) {
            t_key(key, i - 3);
            rc = dsg_store_del(st, key);
            ck_assert(rc == DSG_STORE_OK || rc == DSG_STORE_NOTFOUND);
        }

        if (i % 5 == 1) {
            t_key(key, i / 2);
            rc = dsg_store_touch(st, key, 1, now);
            ck_assert(rc == DSG_STORE_OK || rc == DSG_STORE_NOTFOUND);
        }

        if (i % 50 == 49) {
            ck_assert_int_eq(dsg_store_sweep(st, now, 20000, 20, &exp, &evi),
                             DSG_STORE_OK);
        }
    }

    /* every key is either absent or exactly the value last stored */
    present = 0;

    for (i = 0; i < n; i++) {
        rc = t_get(st, i, sizes[i]);
        ck_assert(rc == DSG_STORE_OK || rc == DSG_STORE_NOTFOUND);

        if (rc == DSG_STORE_OK) {
            ck_assert_uint_ne(sizes[i], 0);
            present++;
        }
    }

    t_stat(st, &s);

    printf("dsg_store: 8 MB map, %u mixed puts (1 KB - 1 MB): %u stored, "
           "%u EFULL, %u full maps, %u evicted, %u present\n",
           n, ok, full, (unsigned) s.put_full, (unsigned) s.put_evicted,
           present);

    ck_assert_uint_eq(s.entries, present);
    ck_assert_uint_gt(present, 0);
    ck_assert_uint_ge(ok, n * 3 / 4);

    /* all expire: the sweep finds every entry through the expiry index */
    ck_assert_int_eq(dsg_store_sweep(st, UINT64_MAX, 0, 100000, &exp, &evi),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, present);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 0);

    dsg_store_close(st);
}
END_TEST


/*
 * The life of a worker process of test_store_workers, in a forked child
 * of the test (the store is opened after the fork, as in nginx): open
 * (maybe recreating), then put, read back, sweep.  No ck_assert here:
 * Check's messages from a grandchild would be misattributed.  Exits with
 * bit 0 set on any failure, bit 1 if this worker recreated the file.
 *
 * Four writers overfill a 4 MB map on purpose, so EFULL is a legitimate
 * answer of put and sweep: a worker descheduled inside a read (there are
 * more workers than CPUs) pins every page freed after its snapshot.
 */

static void
t_worker(const char *dir, unsigned w, int die)
{
    int           rc, recreated, fail;
    size_t        len, n;
    uint8_t       key[DSG_STORE_KEY_SIZE], *val, *want;
    unsigned      i, id, allocs;
    dsg_store_t  *st;

    rc = dsg_store_open(&st, dir, 4 * T_MB, 126, DSG_STORE_RECREATE,
                        &recreated);
    if (rc != DSG_STORE_OK) {
        _exit(1);
    }

    fail = 0;
    want = malloc(16 * 1024);

    for (i = 0; i < 150 && want != NULL; i++) {
        id = 1000 * (w + 1) + i;
        len = 4000 + 37 * i;

        rc = t_put(st, id, len, T_FAR, 1000 + i);
        if (rc != DSG_STORE_OK && rc != DSG_STORE_EFULL) {
            fail = 1;
        }

        /* the value just stored, intact, or nothing */
        t_key(key, id);
        rc = dsg_store_get(st, key, t_alloc, &allocs, &val, &n);

        if (rc == DSG_STORE_OK) {
            t_pattern(want, len, id);

            if (n != len || memcmp(val, want, len) != 0) {
                fail = 1;
            }

            free(val);

        } else if (rc != DSG_STORE_NOTFOUND) {
            fail = 1;
        }

        if (i % 25 == 0) {
            rc = dsg_store_sweep(st, 1000 + i, 0, 10, NULL, NULL);
            if (rc != DSG_STORE_OK && rc != DSG_STORE_EFULL) {
                fail = 1;
            }
        }
    }

    if (want == NULL) {
        fail = 1;
    }

    free(want);

    /* a worker that dies keeps its reader slot: no close, no atexit */
    if (!die) {
        dsg_store_close(st);
    }

    _exit(fail + (recreated ? 2 : 0));
}


START_TEST(test_store_workers)
{
    int               status, recreated_by;
    pid_t             pids[4];
    unsigned          w, i, present, exp;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    dir = t_mkdir();

    /* the workers start together on a garbage file */
    t_write_garbage(dir, "data.mdb", 64 * 1024);

    for (w = 0; w < 4; w++) {
        pids[w] = fork();
        ck_assert_int_ne(pids[w], -1);

        if (pids[w] == 0) {
            t_worker(dir, w, w == 3);
        }
    }

    recreated_by = 0;

    for (w = 0; w < 4; w++) {
        ck_assert_int_eq(waitpid(pids[w], &status, 0), pids[w]);
        ck_assert(WIFEXITED(status));
        ck_assert_msg((WEXITSTATUS(status) & 1) == 0, "worker %u failed", w);

        if (WEXITSTATUS(status) & 2) {
            recreated_by++;
        }
    }

    /* opens are serialized: the first recreated, the others used it */
    ck_assert_int_eq(recreated_by, 1);

    ck_assert_uint_le(t_file_size(dir), 4 * T_MB);

    /* the dead worker's reader slot is freed by the open */
    st = t_open(dir, 4 * T_MB);

    t_stat(st, &s);
    ck_assert_uint_eq(s.readers, 1);

    present = 0;

    for (w = 0; w < 4; w++) {
        for (i = 0; i < 150; i++) {
            if (t_get(st, 1000 * (w + 1) + i, 4000 + 37 * i)
                == DSG_STORE_OK)
            {
                present++;
            }
        }
    }

    /* the four tables agree: entries, and the expiry index covers them */
    ck_assert_uint_gt(present, 100);
    ck_assert_uint_eq(s.entries, present);

    ck_assert_int_eq(dsg_store_sweep(st, UINT64_MAX, 0, 100000, &exp, NULL),
                     DSG_STORE_OK);
    ck_assert_uint_eq(exp, present);

    t_stat(st, &s);
    ck_assert_uint_eq(s.entries, 0);

    dsg_store_close(st);
}
END_TEST


/*
 * Not a check: the space figures that tell whether values need chunking.
 * 1000 values each of 1 KB, 10 KB and 100 KB, and 100 of 1 MB.
 */

static int
t_cmp_double(const void *a, const void *b)
{
    double  x = *(const double *) a, y = *(const double *) b;

    return (x > y) - (x < y);
}


START_TEST(test_store_measure)
{
    size_t            sizes[] = { 1024, 10 * 1024, 100 * 1024, T_MB }, len;
    double            us[1000];
    unsigned          i, j, count;
    struct timespec   t0, t1;
    uint64_t          fsize;
    const char       *dir;
    dsg_store_t      *st;
    dsg_store_stat_t  s;

    for (j = 0; j < sizeof(sizes) / sizeof(sizes[0]); j++) {
        len = sizes[j];

        dir = t_mkdir();
        st = t_open(dir, 512 * T_MB);

        /* and, for scale, 100 values of 1 MB */
        count = (len < T_MB) ? 1000 : 100;

        /*
         * how long one store holds the event loop: each put is one write
         * transaction (MDB_NOSYNC, so no fsync); figures are under ASan,
         * a plain build is faster
         */

        for (i = 0; i < count; i++) {
            clock_gettime(CLOCK_MONOTONIC, &t0);
            ck_assert_int_eq(t_put(st, i, len, T_FAR, i), DSG_STORE_OK);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            us[i] = (t1.tv_sec - t0.tv_sec) * 1000000.0
                    + (t1.tv_nsec - t0.tv_nsec) / 1000.0;
        }

        qsort(us, count, sizeof(double), t_cmp_double);

        printf("dsg_store: %4u x %7zu B: put latency p50 %.0f us, "
               "p99 %.0f us, max %.0f us\n", count, len, us[count / 2],
               us[count * 99 / 100], us[count - 1]);

        t_stat(st, &s);
        fsize = t_file_size(dir);

        ck_assert_uint_eq(s.entries, count);

        printf("dsg_store: %4u x %7zu B: overflow pages %6llu, "
               "btree pages %4llu, free pages %3llu, file %9llu B, "
               "%7.0f B/value (%.3fx)\n",
               count, len, (unsigned long long) s.overflow_pages,
               (unsigned long long) s.btree_pages,
               (unsigned long long) (s.free_bytes / s.page_size),
               (unsigned long long) fsize,
               (double) fsize / count, (double) fsize / count / len);

        dsg_store_close(st);
        t_teardown();
    }
}
END_TEST


Suite *
dsg_store_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("dsg_store");
    tc = tcase_create("lmdb");

    tcase_add_unchecked_fixture(tc, t_parent_setup, t_parent_teardown);
    tcase_add_checked_fixture(tc, NULL, t_teardown);
    tcase_set_timeout(tc, 120);

    tcase_add_test(tc, test_store_put_get);
    tcase_add_test(tc, test_store_overwrite);
    tcase_add_test(tc, test_store_missing);
    tcase_add_test(tc, test_store_sweep_expired);
    tcase_add_test(tc, test_store_sweep_stale_grace);
    tcase_add_test(tc, test_store_map_full_eviction);
    tcase_add_test(tc, test_store_touch);
    tcase_add_test(tc, test_store_touch_many);
    tcase_add_test(tc, test_store_sweep_high_water);
    tcase_add_test(tc, test_store_too_big);
    tcase_add_test(tc, test_store_corrupt_recreate);
    tcase_add_test(tc, test_store_map_shrunk);
    tcase_add_test(tc, test_store_pin);
    tcase_add_test(tc, test_store_reopen);
    tcase_add_test(tc, test_store_replace_running);
    tcase_add_test(tc, test_store_stat);
    tcase_add_test(tc, test_store_callbacks_fail);
    tcase_add_test(tc, test_store_detached);
    tcase_add_test(tc, test_store_args);
    tcase_add_test(tc, test_store_strerror);
    tcase_add_test(tc, test_store_mixed_stress);
    tcase_add_test(tc, test_store_workers);
    tcase_add_test(tc, test_store_measure);

    suite_add_tcase(s, tc);

    return s;
}
