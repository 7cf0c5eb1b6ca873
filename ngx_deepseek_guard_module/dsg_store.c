/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * LMDB response cache.  The tables are described in dsg_store.h.
 *
 * Invariants (kept by every write transaction, which changes all four
 * tables of a digest D together or not at all):
 *
 *   I1  entries[D] exists  <=>  meta[D] exists.
 *   I2  meta[D] = {E, A, L}  <=>  expiry[be64(E) || D] and
 *       atime[be64(A) || D] exist, and L is the length of entries[D].
 *   I3  an expiry or atime row exists only for a digest whose meta
 *       names that very time.
 *
 * Readers of the indexes do not trust them blindly: the sweep and the
 * eviction drop a row whose meta disagrees (a "stale" row) instead of
 * deleting the entry, and a malformed row or meta is deleted, so a
 * damaged index can neither make them loop nor remove a live entry.
 *
 * Codes: internal functions return a raw code, an LMDB/errno code or a
 * DSG_STORE_* code (the ranges do not overlap: LMDB codes are -30799 ..
 * -30780, errno values are positive); dsg_store_rc() is the one place
 * that maps raw codes to DSG_STORE_* codes.
 *
 * Retries, each in one place: dsg_store_begin() on MDB_MAP_RESIZED;
 * dsg_store_write_full() on a full map for the housekeeping writes (a
 * bump, a smaller batch, once); dsg_store_put() evicts and retries once.
 *
 * Page reuse in LMDB: pages freed by the transaction with id T go to the
 * freelist under key T and may be reused only by a writer whose oldest
 * visible snapshot is newer than T, i.e. from transaction T + 2 on (the
 * meta page of T - 1 stays a valid fallback until T + 1 commits), and
 * not at all while a reader still holds a snapshot older than T.  So an
 * eviction does not help the very next transaction: after evicting, the
 * store commits one tiny "bump" transaction before retrying.  And every
 * read pins: a worker descheduled in the middle of a get keeps all the
 * pages freed since from reuse, the others may find the map full for
 * that long.  Reads are therefore as short as can be (the read txn is
 * reset at the end of every call) and the map needs headroom: the sweep
 * keeps the live data under a high-water mark, and a put never takes
 * the last pages (the reserve below).
 */


#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <lmdb.h>

#include "dsg_store.h"


/* bumped when the tables change incompatibly: old files are recreated */
#define DSG_STORE_FORMAT        1

#define DSG_STORE_MAXDBS        4
#define DSG_STORE_IDX_SIZE      (8 + DSG_STORE_KEY_SIZE)
#define DSG_STORE_META_SIZE     24

/* records of the "meta" table that are not digests (length != 32) */
#define DSG_STORE_FORMAT_KEY    "dsg:format"
#define DSG_STORE_GEN_KEY       "dsg:gen"

/* the sweep evicts above HIGH percent of the map, down to LOW percent */
#define DSG_STORE_HIGH_PCT      90
#define DSG_STORE_LOW_PCT       80

/*
 * Eviction batches.  In a map that is really full only the few pages
 * freed by older commits are available, and every entry deleted takes
 * some (copies of its leaf pages in four tables), while the pages it
 * frees are not reusable before two more commits.  So dsg_store_put()
 * evicts in committed batches that start small and grow; a transaction
 * that still finds the map full is retried with a small batch.
 */
#define DSG_STORE_FIRST_BATCH   2
#define DSG_STORE_SMALL_BATCH   1
#define DSG_STORE_BATCH_MAX     64
#define DSG_STORE_EVICT_TXNS    24

/*
 * Rows removed by one transaction of the sweep, of each kind (expired,
 * evicted).  Without MDB_WRITEMAP every page a write transaction dirties
 * is a malloc()ed copy, and LMDB keeps the single-page copies on a free
 * list of its environment (me_dpages) until the environment is closed:
 * the largest transaction a worker ever ran sets how much heap it holds
 * for good.  Removing a row dirties a leaf in each of the four tables,
 * so a sweep that evicted 256 rows in one transaction could pin a
 * megabyte or more per worker, and grow it in steps, whenever a sweep
 * happened to touch more leaves than any before.  Batches of 32 rows (64
 * with the put's eviction) bound that to a few hundred kilobytes,
 * reached early in a worker's life.
 */
#define DSG_STORE_TXN_ROWS      32

/* index rows and meta of one digest, roughly, in bytes: see cost() */
#define DSG_STORE_ROW_COST      160

/*
 * The reserve, in pages: 1/64 of the map within these bounds.  Any
 * write, even a delete, takes fresh pages for its copies-on-write (a
 * path per table, the freelist record: DSG_STORE_COW_PAGES at most with
 * millions of entries) and the pages it frees are reusable only two
 * commits later.  A map filled to its last page cannot even delete: the
 * sweep and the evictions fail as the puts do, and as the file is sound
 * a restart does not cure it.  So a put is started only if it leaves
 * the reserve free, and evicts first when it would not.
 */
#define DSG_STORE_RESERVE_MIN   16
#define DSG_STORE_RESERVE_MAX   4096
#define DSG_STORE_COW_PAGES     24

/*
 * Environment flags.
 *
 * MDB_NOSYNC | MDB_NOMETASYNC: commits do not fsync.  This is a cache
 * and loses little by it: a crash of a worker loses nothing (its
 * committed pages are in the OS page cache and reach the file anyway);
 * an OS crash or power loss may lose the last commits, or, as LMDB's
 * ordering of data pages before the meta page relies on the skipped
 * fsync, leave a torn file.  A lost write is only a cache miss.  A torn
 * file is found at the next open (MDB_INVALID, MDB_CORRUPTED, ...) and
 * recreated with DSG_STORE_RECREATE; damage found later is reported as
 * DSG_STORE_ECORRUPT (the glue serves uncached) and every value is
 * validated by the entry codec, including a full key compare, before it
 * is served.  dsg_store_sync(), called by the glue periodically, bounds
 * the window of loss.  (MDB_NOMETASYNC is implied by MDB_NOSYNC and
 * given for the reader.)
 *
 * MDB_NOTLS: a read transaction belongs to its MDB_txn, not to the
 * thread, so one reset transaction is kept and renewed for every read.
 * MDB_NORDAHEAD: values are read at random; read-ahead in a map larger
 * than RAM would only push useful pages out of the page cache.
 * No MDB_WRITEMAP: the map stays read-only, so a stray write through a
 * pointer into it faults instead of silently corrupting the cache.
 */
#define DSG_STORE_ENV_FLAGS                                                  \
    (MDB_NOTLS | MDB_NORDAHEAD | MDB_NOSYNC | MDB_NOMETASYNC)


struct dsg_store_s {
    MDB_env    *env;
    MDB_txn    *rtxn;           /* reset read txn, renewed by each read */
    MDB_dbi     entries;
    MDB_dbi     meta;
    MDB_dbi     expiry;
    MDB_dbi     atime;
    uint64_t    map_size;       /* the map size this process uses */
    uint64_t    page_size;
    int         last_rc;        /* raw code of the last error */
    uint64_t    put_full;
    uint64_t    put_evicted;
    unsigned    detached;       /* dsg_store_detach(): the env is st's */
    unsigned    lent;           /* detached handles out, and pins */

    /* dsg_store_pin(): read txns held, and reset ones kept for renewal */
    unsigned    npins;
    unsigned    nspare;
    MDB_txn    *pins[DSG_STORE_PINS];
    MDB_txn    *spare[DSG_STORE_PINS];

    /* what dsg_store_reopen() needs */
    char       *dir;
    uint64_t    want_map_size;
    unsigned    max_readers;
    dev_t       dev;            /* data.mdb as opened */
    ino_t       ino;
};


typedef struct {
    uint64_t    expires_ms;
    uint64_t    atime_ms;
    uint64_t    len;
} dsg_store_meta_t;


/* which index row the caller of dsg_store_remove() holds */
typedef enum {
    DSG_STORE_ROW_ANY = 0,
    DSG_STORE_ROW_EXPIRY,
    DSG_STORE_ROW_ATIME
} dsg_store_row_e;


typedef int (*dsg_store_op_pt)(dsg_store_t *st, MDB_txn *txn, void *data);


typedef struct {
    const uint8_t      *key;
    uint64_t            expires_ms;
    uint64_t            now_ms;
    size_t              len;
    dsg_store_fill_pt   fill;
    void               *ctx;
} dsg_store_put_t;


typedef struct {
    const uint8_t      *key;
    uint64_t            now_ms;
    unsigned            n;          /* keys at key */
} dsg_store_touch_t;


typedef struct {
    uint64_t            want;       /* bytes to free by eviction */
    unsigned            max;        /* most rows to visit */
    unsigned            visited;
    unsigned            evicted;
    uint64_t            freed;
} dsg_store_evict_t;


typedef struct {
    uint64_t            now_ms;
    uint64_t            keep_stale_ms;
    unsigned            max;
    uint64_t            data_bytes; /* live data before the sweep */
    unsigned            evicting;   /* an earlier batch evicted: go on */
    unsigned            expired;
    unsigned            evicted;
} dsg_store_sweep_t;


static int dsg_store_rc(dsg_store_t *st, int rc);
static int dsg_store_recreatable(int rc);
static void dsg_store_put64(uint8_t *p, uint64_t v);
static uint64_t dsg_store_get64(const uint8_t *p);
static void dsg_store_idx_key(uint8_t *buf, uint64_t ms, const uint8_t *key);
static uint64_t dsg_store_cost(const dsg_store_t *st, uint64_t len);
static int dsg_store_begin(dsg_store_t *st, int rdonly, MDB_txn **txn);
static void dsg_store_refresh(dsg_store_t *st);
static int dsg_store_write(dsg_store_t *st, dsg_store_op_pt op, void *data);
static int dsg_store_write_full(dsg_store_t *st, dsg_store_op_pt op,
    void *data, unsigned *max);
static int dsg_store_meta_get(dsg_store_t *st, MDB_txn *txn,
    const uint8_t *key, dsg_store_meta_t *m);
static int dsg_store_meta_put(dsg_store_t *st, MDB_txn *txn,
    const uint8_t *key, const dsg_store_meta_t *m);
static int dsg_store_del_row(MDB_txn *txn, MDB_dbi dbi, uint64_t ms,
    const uint8_t *key);
static int dsg_store_index(dsg_store_t *st, MDB_txn *txn,
    const uint8_t *key, const dsg_store_meta_t *m);
static int dsg_store_unindex(dsg_store_t *st, MDB_txn *txn,
    const uint8_t *key, const dsg_store_meta_t *m);
static int dsg_store_remove(dsg_store_t *st, MDB_txn *txn,
    const uint8_t *key, dsg_store_row_e row, uint64_t row_ms,
    uint64_t *freed);
static int dsg_store_evict(dsg_store_t *st, MDB_txn *txn,
    dsg_store_evict_t *ev);
static int dsg_store_put_op(dsg_store_t *st, MDB_txn *txn, void *data);
static int dsg_store_del_op(dsg_store_t *st, MDB_txn *txn, void *data);
static int dsg_store_touch_op(dsg_store_t *st, MDB_txn *txn, void *data);
static int dsg_store_touch_many_op(dsg_store_t *st, MDB_txn *txn,
    void *data);
static int dsg_store_evict_op(dsg_store_t *st, MDB_txn *txn, void *data);
static int dsg_store_bump_op(dsg_store_t *st, MDB_txn *txn, void *data);
static int dsg_store_sweep_op(dsg_store_t *st, MDB_txn *txn, void *data);
static int dsg_store_make_room(dsg_store_t *st, uint64_t want);
static uint64_t dsg_store_reserve(const dsg_store_t *st);
static int dsg_store_avail(dsg_store_t *st, uint64_t want,
    uint64_t *avail);
static int dsg_store_pages(dsg_store_t *st, uint64_t *used,
    uint64_t *free_pages);
static int dsg_store_count_reader(const char *msg, void *ctx);
static int dsg_store_check_size(const char *path, uint64_t map_size);
static int dsg_store_open_env(dsg_store_t *st, const char *dir,
    uint64_t map_size, unsigned max_readers);
static int dsg_store_open_tables(dsg_store_t *st);
static void dsg_store_close_env(dsg_store_t *st);
static int dsg_store_unlink(const char *path);
static int dsg_store_lock_open(dsg_store_t *st, unsigned flags,
    int *recreated);


/*
 * The error mapper.  DSG_STORE_* codes pass through; the raw code of
 * every error (not of a mere NOTFOUND) is remembered in st, and errno is
 * set for system errors so that the glue can log it.
 */

static int
dsg_store_rc(dsg_store_t *st, int rc)
{
    int  code;

    if (rc == MDB_SUCCESS) {
        return DSG_STORE_OK;
    }

    if (rc <= DSG_STORE_NOTFOUND && rc >= DSG_STORE_EIO) {
        code = rc;

    } else {
        switch (rc) {

        case MDB_NOTFOUND:
            return DSG_STORE_NOTFOUND;

        case MDB_MAP_FULL:
            code = DSG_STORE_EFULL;
            break;

        case MDB_INVALID:
        case MDB_VERSION_MISMATCH:
        case MDB_CORRUPTED:
        case MDB_PANIC:
        case MDB_PAGE_NOTFOUND:
        case MDB_INCOMPATIBLE:

        /*
         * every transaction here is fresh and single-threaded, with no
         * child: LMDB blocks one only after a page error met inside it,
         * which is what a read of zeroed pages returns
         */
        case MDB_BAD_TXN:
            code = DSG_STORE_ECORRUPT;
            break;

        case MDB_MAP_RESIZED:
        case MDB_READERS_FULL:
        case MDB_TLS_FULL:
        case MDB_TXN_FULL:
        case MDB_CURSOR_FULL:
        case MDB_PAGE_FULL:
        case MDB_DBS_FULL:
            code = DSG_STORE_ELIMIT;
            break;

        case MDB_KEYEXIST:
        case MDB_BAD_RSLOT:
        case MDB_BAD_VALSIZE:
        case MDB_BAD_DBI:
        case EINVAL:
            code = DSG_STORE_EINVAL;
            break;

        case ENOMEM:
            code = DSG_STORE_ENOMEM;
            break;

        default:
            code = DSG_STORE_EIO;
            break;
        }
    }

    if (rc > 0) {
        errno = rc;
    }

    if (st != NULL) {
        st->last_rc = rc;
    }

    return code;
}


/* a failure to open that removing the files cures */

static int
dsg_store_recreatable(int rc)
{
    int  code;

    code = dsg_store_rc(NULL, rc);

    return code == DSG_STORE_ECORRUPT || code == DSG_STORE_EMAPSIZE;
}


/* index keys are big-endian so that LMDB's bytewise order is time order */

static void
dsg_store_put64(uint8_t *p, uint64_t v)
{
    int  i;

    for (i = 7; i >= 0; i--) {
        p[i] = (uint8_t) v;
        v >>= 8;
    }
}


static uint64_t
dsg_store_get64(const uint8_t *p)
{
    int       i;
    uint64_t  v;

    v = 0;

    for (i = 0; i < 8; i++) {
        v = (v << 8) | p[i];
    }

    return v;
}


static void
dsg_store_idx_key(uint8_t *buf, uint64_t ms, const uint8_t *key)
{
    dsg_store_put64(buf, ms);
    memcpy(buf + 8, key, DSG_STORE_KEY_SIZE);
}


/*
 * Bytes a value of len bytes is estimated to take, for eviction targets.
 * LMDB moves a value to overflow pages of its own (a 16-byte page header
 * and the value, rounded up to whole pages) once its leaf node would
 * take about half a page; smaller values share leaf pages.
 */

static uint64_t
dsg_store_cost(const dsg_store_t *st, uint64_t len)
{
    uint64_t  ps, bytes;

    ps = st->page_size;

    if (len + DSG_STORE_KEY_SIZE + 8 > ps / 2) {
        bytes = (len + 16 + ps - 1) / ps * ps;

    } else {
        bytes = len + DSG_STORE_KEY_SIZE + 8;
    }

    return bytes + DSG_STORE_ROW_COST;
}


/*
 * Begins a write transaction, or renews the read transaction.  The one
 * retry of LMDB errors: MDB_MAP_RESIZED means another process committed
 * beyond this process's map (it runs with a larger map size, e.g. the
 * other generation during an nginx reload): adopt the size recorded in
 * the file and try once more.  No write txn is active here, as
 * mdb_env_set_mapsize() requires; the read txn is at most reset.
 */

static int
dsg_store_begin(dsg_store_t *st, int rdonly, MDB_txn **txn)
{
    int  rc, attempt;

    for (attempt = 0; /* void */; attempt++) {

        if (!rdonly) {
            rc = mdb_txn_begin(st->env, NULL, 0, txn);

        } else if (st->rtxn != NULL) {
            rc = mdb_txn_renew(st->rtxn);

            if (rc != MDB_SUCCESS) {
                /* do not renew a handle LMDB failed to renew: drop it */
                mdb_txn_abort(st->rtxn);
                st->rtxn = NULL;
            }

        } else {
            rc = mdb_txn_begin(st->env, NULL, MDB_RDONLY, &st->rtxn);
            if (rc != MDB_SUCCESS) {
                st->rtxn = NULL;
            }
        }

        if (rc == MDB_SUCCESS) {
            if (rdonly) {
                *txn = st->rtxn;
            }

            return MDB_SUCCESS;
        }

        /*
         * mdb_env_set_mapsize() remaps: not while a thread writes through
         * a detached handle or a pinned value is being sent from the map
         */
        if (rc != MDB_MAP_RESIZED || attempt > 0 || st->detached
            || st->lent)
        {
            return rc;
        }

        rc = mdb_env_set_mapsize(st->env, 0);
        if (rc != MDB_SUCCESS) {
            return rc;
        }

        dsg_store_refresh(st);
    }
}


static void
dsg_store_refresh(dsg_store_t *st)
{
    MDB_envinfo  info;

    if (mdb_env_info(st->env, &info) == MDB_SUCCESS) {
        st->map_size = info.me_mapsize;
    }
}


/* runs op in one write transaction: commit if op returns 0, else abort */

static int
dsg_store_write(dsg_store_t *st, dsg_store_op_pt op, void *data)
{
    int       rc;
    MDB_txn  *txn;

    rc = dsg_store_begin(st, 0, &txn);
    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    rc = op(st, txn, data);

    if (rc == MDB_SUCCESS) {
        /* ends the transaction whatever the outcome */
        rc = mdb_txn_commit(txn);

    } else {
        mdb_txn_abort(txn);
    }

    return dsg_store_rc(st, rc);
}


/*
 * dsg_store_write() for the housekeeping transactions (evict, sweep, del,
 * touch), which free more pages than they take but still need a few
 * fresh ones for their copies-on-write.  The one retry on a full map:
 * the pages freed by the newest commits are not reusable yet (see the
 * top of this file), so commit a tiny bump, cut the batch of an op that
 * has one (*max, may be NULL) to DSG_STORE_SMALL_BATCH and try once
 * more.  The bump needs fewer pages than any other write.
 */

static int
dsg_store_write_full(dsg_store_t *st, dsg_store_op_pt op, void *data,
    unsigned *max)
{
    int  rc;

    rc = dsg_store_write(st, op, data);
    if (rc != DSG_STORE_EFULL) {
        return rc;
    }

    rc = dsg_store_write(st, dsg_store_bump_op, NULL);
    if (rc != DSG_STORE_OK) {
        return rc;
    }

    if (max != NULL && *max > DSG_STORE_SMALL_BATCH) {
        *max = DSG_STORE_SMALL_BATCH;
    }

    return dsg_store_write(st, op, data);
}


/* MDB_NOTFOUND, or MDB_CORRUPTED for a malformed record */

static int
dsg_store_meta_get(dsg_store_t *st, MDB_txn *txn, const uint8_t *key,
    dsg_store_meta_t *m)
{
    int       rc;
    MDB_val   k, v;
    uint8_t  *p;

    k.mv_size = DSG_STORE_KEY_SIZE;
    k.mv_data = (void *) key;

    rc = mdb_get(txn, st->meta, &k, &v);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    if (v.mv_size != DSG_STORE_META_SIZE) {
        return MDB_CORRUPTED;
    }

    p = v.mv_data;

    m->expires_ms = dsg_store_get64(p);
    m->atime_ms = dsg_store_get64(p + 8);
    m->len = dsg_store_get64(p + 16);

    return MDB_SUCCESS;
}


static int
dsg_store_meta_put(dsg_store_t *st, MDB_txn *txn, const uint8_t *key,
    const dsg_store_meta_t *m)
{
    uint8_t  buf[DSG_STORE_META_SIZE];
    MDB_val  k, v;

    dsg_store_put64(buf, m->expires_ms);
    dsg_store_put64(buf + 8, m->atime_ms);
    dsg_store_put64(buf + 16, m->len);

    k.mv_size = DSG_STORE_KEY_SIZE;
    k.mv_data = (void *) key;
    v.mv_size = sizeof(buf);
    v.mv_data = buf;

    return mdb_put(txn, st->meta, &k, &v, 0);
}


/* deletes one index row; a missing row is not an error */

static int
dsg_store_del_row(MDB_txn *txn, MDB_dbi dbi, uint64_t ms, const uint8_t *key)
{
    int      rc;
    uint8_t  buf[DSG_STORE_IDX_SIZE];
    MDB_val  k;

    dsg_store_idx_key(buf, ms, key);

    k.mv_size = sizeof(buf);
    k.mv_data = buf;

    rc = mdb_del(txn, dbi, &k, NULL);

    return (rc == MDB_NOTFOUND) ? MDB_SUCCESS : rc;
}


static int
dsg_store_index(dsg_store_t *st, MDB_txn *txn, const uint8_t *key,
    const dsg_store_meta_t *m)
{
    int      rc;
    uint8_t  buf[DSG_STORE_IDX_SIZE];
    MDB_val  k, v;

    /* an empty value; mv_data must still point somewhere */
    v.mv_size = 0;
    v.mv_data = buf;

    k.mv_size = sizeof(buf);
    k.mv_data = buf;

    dsg_store_idx_key(buf, m->expires_ms, key);

    rc = mdb_put(txn, st->expiry, &k, &v, 0);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    dsg_store_idx_key(buf, m->atime_ms, key);

    return mdb_put(txn, st->atime, &k, &v, 0);
}


static int
dsg_store_unindex(dsg_store_t *st, MDB_txn *txn, const uint8_t *key,
    const dsg_store_meta_t *m)
{
    int  rc;

    rc = dsg_store_del_row(txn, st->expiry, m->expires_ms, key);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    return dsg_store_del_row(txn, st->atime, m->atime_ms, key);
}


/*
 * Removes the entry of key with its meta and index rows.  A caller that
 * found key through an index row passes which row and its time: when the
 * meta names another time the row is stale (I3), the entry is live and
 * is kept, and MDB_NOTFOUND is returned.  *freed grows by the estimated
 * bytes released.
 */

static int
dsg_store_remove(dsg_store_t *st, MDB_txn *txn, const uint8_t *key,
    dsg_store_row_e row, uint64_t row_ms, uint64_t *freed)
{
    int               rc;
    MDB_val           k;
    dsg_store_meta_t  m;

    rc = dsg_store_meta_get(st, txn, key, &m);

    if (rc == MDB_SUCCESS) {
        if ((row == DSG_STORE_ROW_EXPIRY && m.expires_ms != row_ms)
            || (row == DSG_STORE_ROW_ATIME && m.atime_ms != row_ms))
        {
            return MDB_NOTFOUND;
        }

        rc = dsg_store_unindex(st, txn, key, &m);
        if (rc != MDB_SUCCESS) {
            return rc;
        }

        *freed += dsg_store_cost(st, m.len);

    } else if (rc == MDB_CORRUPTED) {
        /* a malformed meta: its rows cannot be found, drop what we can */
        m.len = 0;

    } else if (rc == MDB_NOTFOUND) {
        /* no meta (I1 broken): still drop an orphan value, report none */
        k.mv_size = DSG_STORE_KEY_SIZE;
        k.mv_data = (void *) key;

        rc = mdb_del(txn, st->entries, &k, NULL);

        return (rc == MDB_SUCCESS) ? MDB_NOTFOUND : rc;

    } else {
        return rc;
    }

    k.mv_size = DSG_STORE_KEY_SIZE;
    k.mv_data = (void *) key;

    rc = mdb_del(txn, st->entries, &k, NULL);
    if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
        return rc;
    }

    return mdb_del(txn, st->meta, &k, NULL);
}


/*
 * Evicts least recently used entries, oldest atime row first, until
 * ev->want bytes are freed or ev->max rows were visited.  Every visited
 * row is deleted; its entry only when the row is current.
 */

static int
dsg_store_evict(dsg_store_t *st, MDB_txn *txn, dsg_store_evict_t *ev)
{
    int          rc;
    uint8_t      key[DSG_STORE_KEY_SIZE];
    uint64_t     ms;
    MDB_val      k, v;
    MDB_cursor  *cur;

    rc = mdb_cursor_open(txn, st->atime, &cur);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    for ( /* void */ ; ev->visited < ev->max && ev->freed < ev->want;
         ev->visited++)
    {

        rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
        if (rc != MDB_SUCCESS) {
            break;
        }

        if (k.mv_size != DSG_STORE_IDX_SIZE) {
            /* a malformed row: drop it */
            rc = mdb_cursor_del(cur, 0);
            if (rc != MDB_SUCCESS) {
                break;
            }

            continue;
        }

        /* copy out: the page under k changes with the deletes below */
        ms = dsg_store_get64(k.mv_data);
        memcpy(key, (uint8_t *) k.mv_data + 8, DSG_STORE_KEY_SIZE);

        rc = mdb_cursor_del(cur, 0);
        if (rc != MDB_SUCCESS) {
            break;
        }

        rc = dsg_store_remove(st, txn, key, DSG_STORE_ROW_ATIME, ms,
                              &ev->freed);

        if (rc == MDB_SUCCESS) {
            ev->evicted++;

        } else if (rc != MDB_NOTFOUND) {
            break;
        }
    }

    mdb_cursor_close(cur);

    return (rc == MDB_NOTFOUND) ? MDB_SUCCESS : rc;
}


static int
dsg_store_put_op(dsg_store_t *st, MDB_txn *txn, void *data)
{
    dsg_store_put_t  *p = data;

    int               rc;
    MDB_val           k, v;
    dsg_store_meta_t  m;

    /* replacing: drop the rows of the old value first (I2) */

    rc = dsg_store_meta_get(st, txn, p->key, &m);

    if (rc == MDB_SUCCESS) {
        rc = dsg_store_unindex(st, txn, p->key, &m);
        if (rc != MDB_SUCCESS) {
            return rc;
        }

    } else if (rc != MDB_NOTFOUND && rc != MDB_CORRUPTED) {
        return rc;
    }

    /*
     * The value first: it is the big allocation, so a full map is most
     * often found before fill() has run.
     */

    k.mv_size = DSG_STORE_KEY_SIZE;
    k.mv_data = (void *) p->key;
    v.mv_size = p->len;
    v.mv_data = NULL;

    rc = mdb_put(txn, st->entries, &k, &v, MDB_RESERVE);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    if (p->fill(p->ctx, v.mv_data, p->len) != 0) {
        return DSG_STORE_EFILL;
    }

    m.expires_ms = p->expires_ms;
    m.atime_ms = p->now_ms;
    m.len = p->len;

    rc = dsg_store_index(st, txn, p->key, &m);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    return dsg_store_meta_put(st, txn, p->key, &m);
}


static int
dsg_store_del_op(dsg_store_t *st, MDB_txn *txn, void *data)
{
    uint64_t  freed;

    freed = 0;

    return dsg_store_remove(st, txn, data, DSG_STORE_ROW_ANY, 0, &freed);
}


static int
dsg_store_touch_op(dsg_store_t *st, MDB_txn *txn, void *data)
{
    dsg_store_touch_t  *t = data;

    int                 rc;
    uint8_t             buf[DSG_STORE_IDX_SIZE];
    MDB_val             k, v;
    dsg_store_meta_t    m;

    rc = dsg_store_meta_get(st, txn, t->key, &m);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    if (m.atime_ms == t->now_ms) {
        return MDB_SUCCESS;
    }

    rc = dsg_store_del_row(txn, st->atime, m.atime_ms, t->key);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    m.atime_ms = t->now_ms;

    dsg_store_idx_key(buf, m.atime_ms, t->key);

    k.mv_size = sizeof(buf);
    k.mv_data = buf;
    v.mv_size = 0;
    v.mv_data = buf;

    rc = mdb_put(txn, st->atime, &k, &v, 0);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    return dsg_store_meta_put(st, txn, t->key, &m);
}


static int
dsg_store_evict_op(dsg_store_t *st, MDB_txn *txn, void *data)
{
    dsg_store_evict_t  *ev = data;

    /* counts of an aborted attempt must not leak into a retry */
    ev->visited = 0;
    ev->evicted = 0;
    ev->freed = 0;

    return dsg_store_evict(st, txn, ev);
}


/* a tiny real commit, to let the next writer reuse the pages just freed */

static int
dsg_store_bump_op(dsg_store_t *st, MDB_txn *txn, void *data)
{
    int       rc;
    uint8_t   buf[8];
    uint64_t  gen;
    MDB_val   k, v;

    k.mv_size = sizeof(DSG_STORE_GEN_KEY) - 1;
    k.mv_data = DSG_STORE_GEN_KEY;

    rc = mdb_get(txn, st->meta, &k, &v);

    if (rc == MDB_SUCCESS && v.mv_size == sizeof(buf)) {
        gen = dsg_store_get64(v.mv_data) + 1;

    } else if (rc == MDB_SUCCESS || rc == MDB_NOTFOUND) {
        gen = 1;

    } else {
        return rc;
    }

    dsg_store_put64(buf, gen);

    v.mv_size = sizeof(buf);
    v.mv_data = buf;

    return mdb_put(txn, st->meta, &k, &v, 0);
}


static int
dsg_store_sweep_op(dsg_store_t *st, MDB_txn *txn, void *data)
{
    dsg_store_sweep_t  *sw = data;

    int                 rc;
    uint8_t             key[DSG_STORE_KEY_SIZE];
    uint64_t            ms, limit, freed, high, low;
    unsigned            visited;
    MDB_val             k, v;
    MDB_cursor         *cur;
    dsg_store_evict_t   ev;

    /* counts of an aborted attempt must not leak into a retry */
    sw->expired = 0;
    sw->evicted = 0;
    freed = 0;

    /* expired: expires_ms + keep_stale_ms < now_ms, overflow-safe */

    if (sw->now_ms > sw->keep_stale_ms) {
        limit = sw->now_ms - sw->keep_stale_ms;

        rc = mdb_cursor_open(txn, st->expiry, &cur);
        if (rc != MDB_SUCCESS) {
            return rc;
        }

        for (visited = 0; visited < sw->max; visited++) {

            rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
            if (rc != MDB_SUCCESS) {
                break;
            }

            if (k.mv_size != DSG_STORE_IDX_SIZE) {
                rc = mdb_cursor_del(cur, 0);
                if (rc != MDB_SUCCESS) {
                    break;
                }

                continue;
            }

            ms = dsg_store_get64(k.mv_data);

            if (ms >= limit) {
                break;
            }

            memcpy(key, (uint8_t *) k.mv_data + 8, DSG_STORE_KEY_SIZE);

            rc = mdb_cursor_del(cur, 0);
            if (rc != MDB_SUCCESS) {
                break;
            }

            rc = dsg_store_remove(st, txn, key, DSG_STORE_ROW_EXPIRY, ms,
                                  &freed);

            if (rc == MDB_SUCCESS) {
                sw->expired++;

            } else if (rc != MDB_NOTFOUND) {
                break;
            }
        }

        mdb_cursor_close(cur);

        if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
            return rc;
        }
    }

    /*
     * over the high-water mark: evict down to the low-water mark, in as
     * many batches of this sweep as it takes
     */

    high = st->map_size / 100 * DSG_STORE_HIGH_PCT;
    low = st->map_size / 100 * DSG_STORE_LOW_PCT;

    if (sw->data_bytes <= freed
        || sw->data_bytes - freed <= (sw->evicting ? low : high))
    {
        return MDB_SUCCESS;
    }

    ev.want = sw->data_bytes - freed - low;
    ev.max = sw->max;
    ev.visited = 0;
    ev.evicted = 0;
    ev.freed = 0;

    rc = dsg_store_evict(st, txn, &ev);

    sw->evicted = ev.evicted;

    return rc;
}


/*
 * Frees about want bytes for dsg_store_put(): evicts in committed
 * batches of growing size, then commits a bump so that the put retried
 * next may reuse the pages freed by the last batch.
 */

static int
dsg_store_make_room(dsg_store_t *st, uint64_t want)
{
    int                rc;
    unsigned           batch, txns, evicted;
    uint64_t           freed;
    dsg_store_evict_t  ev;

    freed = 0;
    evicted = 0;
    batch = DSG_STORE_FIRST_BATCH;

    for (txns = 0; txns < DSG_STORE_EVICT_TXNS && freed < want; txns++) {
        ev.want = want - freed;
        ev.max = batch;

        rc = dsg_store_write_full(st, dsg_store_evict_op, &ev, &ev.max);

        if (rc == DSG_STORE_EFULL && evicted != 0) {
            /* the room made so far may do */
            break;
        }

        if (rc != DSG_STORE_OK) {
            return rc;
        }

        if (ev.evicted == 0 && ev.visited < ev.max) {
            /* nothing left to evict */
            break;
        }

        freed += ev.freed;
        evicted += ev.evicted;

        batch = (ev.max < DSG_STORE_BATCH_MAX / 4) ? ev.max * 4
                                                   : DSG_STORE_BATCH_MAX;
    }

    if (evicted == 0) {
        return DSG_STORE_EFULL;
    }

    st->put_evicted += evicted;

    /* a failed bump only makes the retry likelier to fail: go on */
    (void) dsg_store_write(st, dsg_store_bump_op, NULL);

    return DSG_STORE_OK;
}


static uint64_t
dsg_store_reserve(const dsg_store_t *st)
{
    uint64_t  pages;

    pages = st->map_size / st->page_size / 64;

    if (pages < DSG_STORE_RESERVE_MIN) {
        return DSG_STORE_RESERVE_MIN;
    }

    return (pages > DSG_STORE_RESERVE_MAX) ? DSG_STORE_RESERVE_MAX : pages;
}


/*
 * Free pages, as *avail: those past the end of the file's extent, read
 * from the meta page without a transaction; only when they are fewer
 * than want, the freelist is counted too (a read transaction).
 */

static int
dsg_store_avail(dsg_store_t *st, uint64_t want, uint64_t *avail)
{
    int          rc;
    uint64_t     maxpg, used, free_pages;
    MDB_envinfo  info;

    rc = mdb_env_info(st->env, &info);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    maxpg = info.me_mapsize / st->page_size;
    used = (uint64_t) info.me_last_pgno + 1;

    *avail = (maxpg > used) ? maxpg - used : 0;

    if (*avail >= want) {
        return MDB_SUCCESS;
    }

    rc = dsg_store_pages(st, &used, &free_pages);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    *avail = ((maxpg > used) ? maxpg - used : 0) + free_pages;

    return MDB_SUCCESS;
}


/*
 * Pages in use by the file ((last_pgno + 1)) and pages on the freelist.
 * The freelist table (FREE_DBI, 0) may only be read in a read txn; its
 * values are ID lists whose first word is the count.
 */

static int
dsg_store_pages(dsg_store_t *st, uint64_t *used, uint64_t *free_pages)
{
    int          rc;
    size_t       n;
    MDB_txn     *txn;
    MDB_val      k, v;
    MDB_cursor  *cur;
    MDB_envinfo  info;

    *used = 0;
    *free_pages = 0;

    rc = dsg_store_begin(st, 1, &txn);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    rc = mdb_cursor_open(txn, 0, &cur);

    if (rc == MDB_SUCCESS) {
        while ((rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) == MDB_SUCCESS) {
            if (v.mv_size >= sizeof(n)) {
                memcpy(&n, v.mv_data, sizeof(n));
                *free_pages += n;
            }
        }

        mdb_cursor_close(cur);

        if (rc == MDB_NOTFOUND) {
            rc = MDB_SUCCESS;
        }
    }

    if (rc == MDB_SUCCESS) {
        rc = mdb_env_info(st->env, &info);
        *used = (uint64_t) info.me_last_pgno + 1;
    }

    mdb_txn_reset(txn);

    return rc;
}


/* mdb_reader_list() callback: one line per live reader slot */

static int
dsg_store_count_reader(const char *msg, void *ctx)
{
    unsigned  *n = ctx;

    while (*msg == ' ') {
        msg++;
    }

    if (*msg >= '0' && *msg <= '9') {
        (*n)++;
    }

    return 0;
}


static int
dsg_store_check_size(const char *path, uint64_t map_size)
{
    struct stat  sb;

    if (stat(path, &sb) == -1) {
        return (errno == ENOENT) ? MDB_SUCCESS : errno;
    }

    if ((uint64_t) sb.st_size > map_size) {
        return DSG_STORE_EMAPSIZE;
    }

    return MDB_SUCCESS;
}


static int
dsg_store_open_env(dsg_store_t *st, const char *dir, uint64_t map_size,
    unsigned max_readers)
{
    int          rc, dead;
    char         path[PATH_MAX];
    MDB_stat     ms;
    struct stat  sb;
    MDB_envinfo  info;

    rc = mdb_env_create(&st->env);
    if (rc != MDB_SUCCESS) {
        st->env = NULL;
        return rc;
    }

    rc = mdb_env_set_mapsize(st->env, map_size);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    if (max_readers != 0) {
        rc = mdb_env_set_maxreaders(st->env, max_readers);
        if (rc != MDB_SUCCESS) {
            return rc;
        }
    }

    rc = mdb_env_set_maxdbs(st->env, DSG_STORE_MAXDBS);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    rc = mdb_env_open(st->env, dir, DSG_STORE_ENV_FLAGS, 0600);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    /* slots of workers that died holding a read txn pin old pages */
    rc = mdb_reader_check(st->env, &dead);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    rc = mdb_env_info(st->env, &info);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    /* LMDB grows the map to hold the data already in the file */
    if (info.me_mapsize > map_size) {
        return DSG_STORE_EMAPSIZE;
    }

    rc = mdb_env_stat(st->env, &ms);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    st->map_size = info.me_mapsize;
    st->page_size = ms.ms_psize;

    /*
     * a file cut short (a copy, a restore, truncate) keeps meta pages that
     * point past its end: LMDB would read those pages through the map and
     * the process would die of SIGBUS, at every start; call it corrupt
     */

    if (snprintf(path, sizeof(path), "%s/data.mdb", dir)
        >= (int) sizeof(path))
    {
        return EINVAL;
    }

    if (stat(path, &sb) == 0
        && (uint64_t) sb.st_size
           < ((uint64_t) info.me_last_pgno + 1) * ms.ms_psize)
    {
        return MDB_CORRUPTED;
    }

    rc = dsg_store_open_tables(st);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    rc = mdb_txn_begin(st->env, NULL, MDB_RDONLY, &st->rtxn);
    if (rc != MDB_SUCCESS) {
        st->rtxn = NULL;
        return rc;
    }

    mdb_txn_reset(st->rtxn);

    return MDB_SUCCESS;
}


/* opens (creates) the tables and checks the format record */

static int
dsg_store_open_tables(dsg_store_t *st)
{
    int       rc;
    uint8_t   buf[4];
    MDB_txn  *txn;
    MDB_val   k, v;
    MDB_stat  ms;

    rc = mdb_txn_begin(st->env, NULL, 0, &txn);
    if (rc != MDB_SUCCESS) {
        return rc;
    }

    rc = mdb_dbi_open(txn, "entries", MDB_CREATE, &st->entries);
    if (rc != MDB_SUCCESS) {
        goto failed;
    }

    rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &st->meta);
    if (rc != MDB_SUCCESS) {
        goto failed;
    }

    rc = mdb_dbi_open(txn, "expiry", MDB_CREATE, &st->expiry);
    if (rc != MDB_SUCCESS) {
        goto failed;
    }

    rc = mdb_dbi_open(txn, "atime", MDB_CREATE, &st->atime);
    if (rc != MDB_SUCCESS) {
        goto failed;
    }

    buf[0] = (uint8_t) (DSG_STORE_FORMAT >> 24);
    buf[1] = (uint8_t) (DSG_STORE_FORMAT >> 16);
    buf[2] = (uint8_t) (DSG_STORE_FORMAT >> 8);
    buf[3] = (uint8_t) DSG_STORE_FORMAT;

    k.mv_size = sizeof(DSG_STORE_FORMAT_KEY) - 1;
    k.mv_data = DSG_STORE_FORMAT_KEY;

    rc = mdb_get(txn, st->meta, &k, &v);

    if (rc == MDB_SUCCESS) {
        if (v.mv_size != sizeof(buf) || memcmp(v.mv_data, buf, 4) != 0) {
            rc = DSG_STORE_ECORRUPT;
            goto failed;
        }

    } else if (rc == MDB_NOTFOUND) {
        /* a new file; a filled one without the record is foreign */
        rc = mdb_stat(txn, st->entries, &ms);
        if (rc != MDB_SUCCESS) {
            goto failed;
        }

        if (ms.ms_entries != 0) {
            rc = DSG_STORE_ECORRUPT;
            goto failed;
        }

        v.mv_size = sizeof(buf);
        v.mv_data = buf;

        rc = mdb_put(txn, st->meta, &k, &v, 0);
        if (rc != MDB_SUCCESS) {
            goto failed;
        }

    } else {
        goto failed;
    }

    return mdb_txn_commit(txn);

failed:

    mdb_txn_abort(txn);

    return rc;
}


static void
dsg_store_close_env(dsg_store_t *st)
{
    /* pins still out belong to a caller that is exiting: ended with it */
    while (st->npins) {
        mdb_txn_abort(st->pins[--st->npins]);
        st->lent--;
    }

    while (st->nspare) {
        mdb_txn_abort(st->spare[--st->nspare]);
    }

    if (st->rtxn != NULL) {
        mdb_txn_abort(st->rtxn);
        st->rtxn = NULL;
    }

    if (st->env != NULL) {
        mdb_env_close(st->env);
        st->env = NULL;
    }
}


static int
dsg_store_unlink(const char *path)
{
    if (unlink(path) == -1 && errno != ENOENT) {
        return errno;
    }

    return MDB_SUCCESS;
}


int
dsg_store_open(dsg_store_t **stp, const char *dir, uint64_t map_size,
    unsigned max_readers, unsigned flags, int *recreated)
{
    int           rc;
    size_t        n;
    dsg_store_t  *st;

    if (recreated != NULL) {
        *recreated = 0;
    }

    if (stp == NULL) {
        return dsg_store_rc(NULL, EINVAL);
    }

    *stp = NULL;

    if (dir == NULL || map_size == 0 || (flags & ~DSG_STORE_RECREATE)) {
        return dsg_store_rc(NULL, EINVAL);
    }

    n = strlen(dir);

    if (n == 0 || n + sizeof("/data.mdb") > PATH_MAX) {
        return dsg_store_rc(NULL, EINVAL);
    }

    if (mkdir(dir, 0700) == -1 && errno != EEXIST) {
        return dsg_store_rc(NULL, errno);
    }

    st = calloc(1, sizeof(dsg_store_t));
    if (st == NULL) {
        return dsg_store_rc(NULL, ENOMEM);
    }

    st->dir = strdup(dir);
    if (st->dir == NULL) {
        free(st);
        return dsg_store_rc(NULL, ENOMEM);
    }

    st->want_map_size = map_size;
    st->max_readers = max_readers;

    rc = dsg_store_lock_open(st, flags, recreated);

    if (rc != MDB_SUCCESS) {
        dsg_store_close(st);
        return dsg_store_rc(NULL, rc);
    }

    *stp = st;

    return DSG_STORE_OK;
}


int
dsg_store_reopen(dsg_store_t **stp, unsigned flags, int *recreated)
{
    int           rc;
    dsg_store_t  *st;

    if (recreated != NULL) {
        *recreated = 0;
    }

    if (stp == NULL || *stp == NULL
        || (flags & ~(DSG_STORE_RECREATE | DSG_STORE_REPLACE)))
    {
        return dsg_store_rc(NULL, EINVAL);
    }

    st = *stp;

    /* one environment per file and process: the old one goes first */
    dsg_store_close_env(st);

    rc = dsg_store_lock_open(st, flags, recreated);

    if (rc != MDB_SUCCESS) {
        *stp = NULL;
        dsg_store_close(st);
        return dsg_store_rc(NULL, rc);
    }

    return DSG_STORE_OK;
}


int
dsg_store_replaced(const dsg_store_t *st)
{
    char         data[PATH_MAX];
    struct stat  sb;

    if (st == NULL || st->env == NULL) {
        return 0;
    }

    (void) snprintf(data, sizeof(data), "%s/data.mdb", st->dir);

    if (stat(data, &sb) == -1) {
        return 0;
    }

    return sb.st_dev != st->dev || sb.st_ino != st->ino;
}


/*
 * Opens st->dir under an exclusive flock() of the directory, so that the
 * workers opening together, or finding the same damage together, remove
 * and recreate a bad file once.
 */

static int
dsg_store_lock_open(dsg_store_t *st, unsigned flags, int *recreated)
{
    int               rc, fd, err, same;
    char              data[PATH_MAX], lock[PATH_MAX];
    struct stat       sb;
    mdb_filehandle_t  dfd;

    (void) snprintf(data, sizeof(data), "%s/data.mdb", st->dir);
    (void) snprintf(lock, sizeof(lock), "%s/lock.mdb", st->dir);

    if (flags & DSG_STORE_REPLACE) {
        flags |= DSG_STORE_RECREATE;
    }

    fd = open(st->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd == -1) {
        return errno;
    }

    while ((rc = flock(fd, LOCK_EX)) == -1 && errno == EINTR) {
        /* void */
    }

    if (rc == -1) {
        rc = errno;
        goto done;
    }

    /* the damaged file this store had open, if nobody replaced it yet */
    same = (flags & DSG_STORE_REPLACE)
           && stat(data, &sb) == 0
           && sb.st_dev == st->dev && sb.st_ino == st->ino;

    if (same) {
        rc = MDB_CORRUPTED;

    } else {
        rc = dsg_store_check_size(data, st->want_map_size);

        if (rc == MDB_SUCCESS) {
            rc = dsg_store_open_env(st, st->dir, st->want_map_size,
                                    st->max_readers);
        }
    }

    if (rc != MDB_SUCCESS && (flags & DSG_STORE_RECREATE)
        && dsg_store_recreatable(rc))
    {
        dsg_store_close_env(st);

        rc = dsg_store_unlink(data);

        if (rc == MDB_SUCCESS) {
            rc = dsg_store_unlink(lock);
        }

        if (rc == MDB_SUCCESS) {
            rc = dsg_store_open_env(st, st->dir, st->want_map_size,
                                    st->max_readers);

            if (rc == MDB_SUCCESS && recreated != NULL) {
                *recreated = 1;
            }
        }
    }

    if (rc == MDB_SUCCESS) {
        rc = mdb_env_get_fd(st->env, &dfd);

        if (rc == MDB_SUCCESS) {
            rc = (fstat(dfd, &sb) == -1) ? errno : MDB_SUCCESS;
        }

        if (rc == MDB_SUCCESS) {
            st->dev = sb.st_dev;
            st->ino = sb.st_ino;
        }
    }

done:

    /* closing the descriptor releases the lock */
    err = errno;
    (void) close(fd);
    errno = err;

    if (rc != MDB_SUCCESS) {
        dsg_store_close_env(st);
    }

    return rc;
}


void
dsg_store_close(dsg_store_t *st)
{
    if (st == NULL) {
        return;
    }

    dsg_store_close_env(st);
    free(st->dir);
    free(st);
}


int
dsg_store_get(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE],
    dsg_store_alloc_pt alloc, void *ctx, uint8_t **val, size_t *len)
{
    int       rc;
    void     *p;
    MDB_txn  *txn;
    MDB_val   k, v;

    if (st == NULL || key == NULL || alloc == NULL || val == NULL
        || len == NULL)
    {
        return dsg_store_rc(st, EINVAL);
    }

    *val = NULL;
    *len = 0;

    rc = dsg_store_begin(st, 1, &txn);
    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    k.mv_size = DSG_STORE_KEY_SIZE;
    k.mv_data = (void *) key;

    rc = mdb_get(txn, st->entries, &k, &v);

    if (rc == MDB_SUCCESS && v.mv_size != 0) {
        p = alloc(ctx, v.mv_size);

        if (p == NULL) {
            rc = DSG_STORE_ENOMEM;

        } else {
            memcpy(p, v.mv_data, v.mv_size);
            *val = p;
            *len = v.mv_size;
        }
    }

    /* v points into the map: nothing of it is used past this point */
    mdb_txn_reset(txn);

    return dsg_store_rc(st, rc);
}


/* an active read txn for a pin: a spare one renewed, or a new one */

static int
dsg_store_pin_txn(dsg_store_t *st, MDB_txn **txn)
{
    int  rc;

    while (st->nspare) {
        *txn = st->spare[--st->nspare];

        rc = mdb_txn_renew(*txn);
        if (rc == MDB_SUCCESS) {
            return MDB_SUCCESS;
        }

        mdb_txn_abort(*txn);

        if (rc != MDB_BAD_RSLOT) {
            return rc;
        }
    }

    return mdb_txn_begin(st->env, NULL, MDB_RDONLY, txn);
}


static void
dsg_store_pin_end(dsg_store_t *st, MDB_txn *txn)
{
    if (st->nspare < DSG_STORE_PINS) {
        mdb_txn_reset(txn);
        st->spare[st->nspare++] = txn;

    } else {
        mdb_txn_abort(txn);
    }
}


int
dsg_store_pin(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE],
    dsg_store_pin_t **pin, const uint8_t **val, size_t *len)
{
    int       rc;
    MDB_txn  *txn;
    MDB_val   k, v;

    if (st == NULL || key == NULL || pin == NULL || val == NULL
        || len == NULL || st->detached)
    {
        return dsg_store_rc(st, EINVAL);
    }

    *pin = NULL;
    *val = NULL;
    *len = 0;

    if (st->env == NULL || st->npins == DSG_STORE_PINS) {
        return DSG_STORE_ELIMIT;
    }

    rc = dsg_store_pin_txn(st, &txn);
    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    k.mv_size = DSG_STORE_KEY_SIZE;
    k.mv_data = (void *) key;

    rc = mdb_get(txn, st->entries, &k, &v);

    if (rc != MDB_SUCCESS || v.mv_size == 0) {
        dsg_store_pin_end(st, txn);
        return (rc == MDB_SUCCESS) ? DSG_STORE_NOTFOUND : dsg_store_rc(st, rc);
    }

    st->pins[st->npins++] = txn;
    st->lent++;

    *pin = (dsg_store_pin_t *) txn;
    *val = v.mv_data;
    *len = v.mv_size;

    return DSG_STORE_OK;
}


void
dsg_store_unpin(dsg_store_t *st, dsg_store_pin_t *pin)
{
    unsigned  i;

    if (st == NULL || pin == NULL) {
        return;
    }

    for (i = 0; i < st->npins; i++) {
        if (st->pins[i] == (MDB_txn *) pin) {
            st->pins[i] = st->pins[--st->npins];
            st->lent--;
            dsg_store_pin_end(st, (MDB_txn *) pin);
            return;
        }
    }
}


unsigned
dsg_store_pins(const dsg_store_t *st)
{
    return (st != NULL) ? st->npins : 0;
}


int
dsg_store_put(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE],
    uint64_t expires_ms, uint64_t now_ms, size_t len, dsg_store_fill_pt fill,
    void *ctx)
{
    int              rc, evicted;
    uint64_t         want, need, avail;
    dsg_store_put_t  p;

    if (st == NULL || key == NULL || fill == NULL) {
        return dsg_store_rc(st, EINVAL);
    }

    if (len > st->map_size / 2) {
        return dsg_store_rc(st, DSG_STORE_ETOOBIG);
    }

    p.key = key;
    p.expires_ms = expires_ms;
    p.now_ms = now_ms;
    p.len = len;
    p.fill = fill;
    p.ctx = ctx;

    /* evict max(2 * value, 5% of the map, what the reserve lacks) */

    want = dsg_store_cost(st, len) * 2;

    if (want < st->map_size / 20) {
        want = st->map_size / 20;
    }

    /* would the put eat into the reserve?  then make room first */

    need = (dsg_store_cost(st, len) + st->page_size - 1) / st->page_size
           + DSG_STORE_COW_PAGES + dsg_store_reserve(st);

    rc = dsg_store_avail(st, need, &avail);
    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    evicted = 0;

    if (avail < need) {
        st->put_full++;

        if (want < (need - avail) * st->page_size) {
            want = (need - avail) * st->page_size;
        }

        rc = dsg_store_make_room(st, want);
        if (rc != DSG_STORE_OK) {
            return rc;
        }

        evicted = 1;
    }

    rc = dsg_store_write(st, dsg_store_put_op, &p);
    if (rc != DSG_STORE_EFULL) {
        return rc;
    }

    /*
     * Full all the same (no run of free pages long enough for the value,
     * or other workers took them): evict, retry once.
     */

    if (!evicted) {
        st->put_full++;
    }

    rc = dsg_store_make_room(st, want);
    if (rc != DSG_STORE_OK) {
        return rc;
    }

    return dsg_store_write(st, dsg_store_put_op, &p);
}


dsg_store_t *
dsg_store_detach(dsg_store_t *st)
{
    dsg_store_t  *h;

    if (st == NULL || st->env == NULL || st->detached) {
        return NULL;
    }

    h = malloc(sizeof(dsg_store_t));
    if (h == NULL) {
        return NULL;
    }

    *h = *st;
    h->rtxn = NULL;
    h->lent = 0;
    h->npins = 0;
    h->nspare = 0;
    h->last_rc = 0;
    h->put_full = 0;
    h->put_evicted = 0;
    h->detached = 1;
    h->dir = NULL;

    st->lent++;

    return h;
}


void
dsg_store_detached_end(dsg_store_t *h)
{
    if (h != NULL && h->rtxn != NULL) {
        mdb_txn_abort(h->rtxn);
        h->rtxn = NULL;
    }
}


void
dsg_store_attach(dsg_store_t *st, dsg_store_t *h)
{
    if (h == NULL) {
        return;
    }

    dsg_store_detached_end(h);

    if (st != NULL) {
        st->put_full += h->put_full;
        st->put_evicted += h->put_evicted;
        st->lent--;
    }

    free(h);
}


int
dsg_store_del(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE])
{
    if (st == NULL || key == NULL) {
        return dsg_store_rc(st, EINVAL);
    }

    return dsg_store_write_full(st, dsg_store_del_op, (void *) key, NULL);
}


static int
dsg_store_touch_many_op(dsg_store_t *st, MDB_txn *txn, void *data)
{
    dsg_store_touch_t  *t = data;

    int                 rc;
    unsigned            i;
    dsg_store_touch_t   one;

    one.now_ms = t->now_ms;
    one.n = 1;

    for (i = 0; i < t->n; i++) {
        one.key = t->key + (size_t) i * DSG_STORE_KEY_SIZE;

        rc = dsg_store_touch_op(st, txn, &one);
        if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
            return rc;
        }
    }

    return MDB_SUCCESS;
}


int
dsg_store_touch(dsg_store_t *st, const uint8_t *keys, unsigned n,
    uint64_t now_ms)
{
    dsg_store_touch_t  t;

    if (st == NULL || (keys == NULL && n > 0)) {
        return dsg_store_rc(st, EINVAL);
    }

    if (n == 0) {
        return DSG_STORE_OK;
    }

    t.key = keys;
    t.n = n;
    t.now_ms = now_ms;

    return dsg_store_write_full(st, dsg_store_touch_many_op, &t, NULL);
}



int
dsg_store_sweep(dsg_store_t *st, uint64_t now_ms, uint64_t keep_stale_ms,
    unsigned max_items, unsigned *expired, unsigned *evicted)
{
    int                rc;
    unsigned           nexp, nevi;
    uint64_t           used, free_pages;
    dsg_store_sweep_t  sw;

    if (expired != NULL) {
        *expired = 0;
    }

    if (evicted != NULL) {
        *evicted = 0;
    }

    if (st == NULL) {
        return dsg_store_rc(st, EINVAL);
    }

    nexp = 0;
    nevi = 0;
    sw.evicting = 0;
    rc = DSG_STORE_OK;

    /* transactions of at most DSG_STORE_TXN_ROWS rows: see the top */

    while (max_items > 0) {

        rc = dsg_store_pages(st, &used, &free_pages);
        if (rc != MDB_SUCCESS) {
            rc = dsg_store_rc(st, rc);
            break;
        }

        sw.now_ms = now_ms;
        sw.keep_stale_ms = keep_stale_ms;
        sw.max = (max_items < DSG_STORE_TXN_ROWS) ? max_items
                                                  : DSG_STORE_TXN_ROWS;
        sw.data_bytes = (used > free_pages)
                        ? (used - free_pages) * st->page_size : 0;
        sw.expired = 0;
        sw.evicted = 0;

        rc = dsg_store_write_full(st, dsg_store_sweep_op, &sw, &sw.max);
        if (rc != DSG_STORE_OK) {
            break;
        }

        nexp += sw.expired;
        nevi += sw.evicted;
        max_items -= sw.max;

        if (sw.evicted != 0) {
            sw.evicting = 1;
        }

        if (sw.expired < sw.max && sw.evicted < sw.max) {
            /* nothing more expired, and the data is below the mark */
            break;
        }
    }

    if (expired != NULL) {
        *expired = nexp;
    }

    if (evicted != NULL) {
        *evicted = nevi;
    }

    return rc;
}


int
dsg_store_stat(dsg_store_t *st, dsg_store_stat_t *out)
{
    int           rc;
    size_t        i;
    MDB_dbi       dbis[4];
    MDB_txn      *txn;
    MDB_stat      ms;
    uint64_t      used, free_pages;
    MDB_envinfo   info;

    if (st == NULL || out == NULL) {
        return dsg_store_rc(st, EINVAL);
    }

    memset(out, 0, sizeof(dsg_store_stat_t));

    rc = dsg_store_pages(st, &used, &free_pages);
    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    rc = dsg_store_begin(st, 1, &txn);
    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    dbis[0] = st->entries;
    dbis[1] = st->meta;
    dbis[2] = st->expiry;
    dbis[3] = st->atime;

    for (i = 0; i < 4; i++) {
        rc = mdb_stat(txn, dbis[i], &ms);
        if (rc != MDB_SUCCESS) {
            break;
        }

        if (i == 0) {
            out->entries = ms.ms_entries;
        }

        out->overflow_pages += ms.ms_overflow_pages;
        out->btree_pages += ms.ms_branch_pages + ms.ms_leaf_pages;
    }

    mdb_txn_reset(txn);

    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    rc = mdb_env_info(st->env, &info);
    if (rc != MDB_SUCCESS) {
        return dsg_store_rc(st, rc);
    }

    out->map_size = info.me_mapsize;
    out->page_size = st->page_size;
    out->used_bytes = used * st->page_size;
    out->free_bytes = free_pages * st->page_size;
    out->data_bytes = (used > free_pages) ? out->used_bytes - out->free_bytes
                                          : 0;
    out->max_readers = info.me_maxreaders;
    out->put_full = st->put_full;
    out->put_evicted = st->put_evicted;

    (void) mdb_reader_list(st->env, dsg_store_count_reader, &out->readers);

    return DSG_STORE_OK;
}


int
dsg_store_sync(dsg_store_t *st)
{
    if (st == NULL) {
        return dsg_store_rc(st, EINVAL);
    }

    return dsg_store_rc(st, mdb_env_sync(st->env, 1));
}


int
dsg_store_reader_check(dsg_store_t *st, int *dead)
{
    int  n;

    if (dead != NULL) {
        *dead = 0;
    }

    if (st == NULL) {
        return dsg_store_rc(st, EINVAL);
    }

    n = 0;

    if (dead == NULL) {
        dead = &n;
    }

    return dsg_store_rc(st, mdb_reader_check(st->env, dead));
}


int
dsg_store_last_error(const dsg_store_t *st)
{
    return (st != NULL) ? st->last_rc : 0;
}


const char *
dsg_store_strerror(int rc)
{
    switch (rc) {

    case DSG_STORE_OK:
        return "ok";

    case DSG_STORE_NOTFOUND:
        return "not found";

    case DSG_STORE_EFULL:
        return "cache full even after eviction";

    case DSG_STORE_ETOOBIG:
        return "value larger than half the cache size";

    case DSG_STORE_ECORRUPT:
        return "cache file corrupt or incompatible";

    case DSG_STORE_EMAPSIZE:
        return "cache file larger than the configured size";

    case DSG_STORE_ELIMIT:
        return "LMDB limit reached (readers, transaction size, map resize)";

    case DSG_STORE_ENOMEM:
        return "out of memory";

    case DSG_STORE_EINVAL:
        return "invalid argument";

    case DSG_STORE_EFILL:
        return "cache value writer failed";

    case DSG_STORE_EIO:
        return "cache file system error";

    default:
        /* LMDB codes; mdb_strerror() also covers errno values */
        return mdb_strerror(rc);
    }
}
