/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * dsg_store: the LMDB response cache, keyed by a 32-byte digest of the
 * cache key text (the glue's: XXH3-128 under two seeds).  Values are
 * opaque bytes (dsg_entry encoded).
 *
 * One store per directory and per process: open it in each worker AFTER
 * fork (an LMDB environment must never cross a fork) and close it at
 * worker exit.  Every call is synchronous and short; none may be made
 * from inside a callback (alloc, fill) of another.  A store is not
 * thread-safe (nginx workers are single-threaded); dsg_store_detach()
 * gives another thread (a store in nginx's thread pool) a handle of its
 * own on the same environment.  All times are
 * milliseconds passed in by the caller; the store reads no clock and
 * logs nothing: it returns DSG_STORE_* codes and the glue logs them.
 *
 * Files: <dir>/data.mdb and <dir>/lock.mdb.  Tables (LMDB named DBIs):
 *
 *   entries  digest(32)                     -> value (the cached entry)
 *   meta     digest(32)                     -> expires_ms, atime_ms, len
 *   expiry   be64(expires_ms) || digest(32) -> empty  (sweep: oldest first)
 *   atime    be64(atime_ms)   || digest(32) -> empty  (eviction: LRU first)
 *
 * "meta" lets a replace, delete or touch find the index rows of a digest
 * without reading its value (possibly a megabyte of overflow pages) and
 * lets touch update the access time without rewriting the value.
 */


#ifndef DSG_STORE_H
#define DSG_STORE_H


#include <stddef.h>
#include <stdint.h>


#define DSG_STORE_KEY_SIZE     32

/* values pinned at once per store (dsg_store_pin()) */
#define DSG_STORE_PINS         16

/* dsg_store_open() flags */
#define DSG_STORE_RECREATE     0x0001   /* remove and recreate a bad file */
#define DSG_STORE_REPLACE      0x0002   /* dsg_store_reopen(): the file is bad */

/*
 * Return codes.  Every LMDB or system error is mapped, in one function,
 * to one of these; the raw code of the last failure is kept in the store
 * (dsg_store_last_error()) and, for system errors, also left in errno.
 */
#define DSG_STORE_OK            0
#define DSG_STORE_NOTFOUND     -1   /* no such key: a cache miss */
#define DSG_STORE_EFULL        -2   /* no room even after eviction */
#define DSG_STORE_ETOOBIG      -3   /* value larger than half the map */
#define DSG_STORE_ECORRUPT     -4   /* file corrupt or incompatible */
#define DSG_STORE_EMAPSIZE     -5   /* file larger than the map size */
#define DSG_STORE_ELIMIT       -6   /* an LMDB limit: readers, txn size */
#define DSG_STORE_ENOMEM       -7   /* malloc or the alloc callback failed */
#define DSG_STORE_EINVAL       -8   /* bad argument or API misuse */
#define DSG_STORE_EFILL        -9   /* the fill callback failed */
#define DSG_STORE_EIO         -10   /* system error (errno is set) */


typedef struct dsg_store_s  dsg_store_t;
typedef struct dsg_store_pin_s  dsg_store_pin_t;

typedef void *(*dsg_store_alloc_pt)(void *ctx, size_t n);
typedef int (*dsg_store_fill_pt)(void *ctx, uint8_t *dst, size_t len);


typedef struct {
    uint64_t  entries;          /* rows in "entries" */
    uint64_t  map_size;         /* bytes */
    uint64_t  page_size;        /* bytes */
    uint64_t  used_bytes;       /* (last_pgno + 1) * page_size: the high-
                                   water extent of data.mdb, never shrinks */
    uint64_t  free_bytes;       /* pages on LMDB's freelist, inside
                                   used_bytes, to be reused */
    uint64_t  data_bytes;       /* used_bytes - free_bytes: live data */
    uint64_t  overflow_pages;   /* ms_overflow_pages summed over tables */
    uint64_t  btree_pages;      /* branch + leaf pages summed over tables */
    unsigned  readers;          /* reader slots held by live processes */
    unsigned  max_readers;

    /* counters of this process since dsg_store_open() */
    uint64_t  put_full;         /* puts that found the map full, or
                                   nearly (see dsg_store_put()) */
    uint64_t  put_evicted;      /* entries evicted by those puts */
} dsg_store_stat_t;


/*
 * Opens (creating dir and the files if needed) the store in dir.
 *
 * map_size: the LMDB map size, the most the file may grow to; it is
 * rounded down to a page multiple by LMDB.  max_readers: reader slots
 * (one per worker process is used; 0 means LMDB's default, 126).
 *
 * With DSG_STORE_RECREATE, a file that does not open (MDB_INVALID,
 * MDB_VERSION_MISMATCH, MDB_CORRUPTED, MDB_PANIC, MDB_PAGE_NOTFOUND,
 * MDB_INCOMPATIBLE, a store of another format) or that is larger than
 * map_size is removed with its lock file and created anew; *recreated
 * (may be NULL) is then 1.  Without the flag these are DSG_STORE_ECORRUPT
 * and DSG_STORE_EMAPSIZE.  All opens of dir are serialized with flock()
 * on it, so workers starting together recreate a bad file once.  A
 * process (e.g. of the old generation during a reload) that still has
 * the removed file open keeps using it, unlinked, until it exits:
 * wasteful but safe.  Whoever creates dir must leave it writable by the
 * worker user (the files are created 0600 by the opening process).
 * Stale reader slots of dead processes are freed (mdb_reader_check).
 */
int dsg_store_open(dsg_store_t **st, const char *dir, uint64_t map_size,
    unsigned max_readers, unsigned flags, int *recreated);

void dsg_store_close(dsg_store_t *st);

/*
 * Closes *st and opens its directory again with the same parameters,
 * under the same flock() as dsg_store_open().  For a store found bad
 * while in use (DSG_STORE_ECORRUPT from a read, a put or a sweep), pass
 * DSG_STORE_REPLACE: if data.mdb is still the file *st had open, it is
 * removed with its lock file and created anew (*recreated = 1); if
 * another process replaced it meanwhile, that new file is opened (the
 * workers that found the same damage replace it once).  Without
 * DSG_STORE_REPLACE, e.g. after dsg_store_replaced(), the file is simply
 * opened again (and recreated if it does not open, with
 * DSG_STORE_RECREATE).  The counters of dsg_store_stat() carry over.
 * On failure *st is freed and set to NULL.
 */
int dsg_store_reopen(dsg_store_t **st, unsigned flags, int *recreated);

/*
 * 1 if data.mdb in the store's directory is no longer the file st has
 * open (another process replaced it: reopen to share its entries), 0 if
 * it is, or if there is no data.mdb at all (someone removed the files:
 * st keeps its open, unlinked file until a reload, as at any start).
 */
int dsg_store_replaced(const dsg_store_t *st);

/*
 * Looks key up and copies its value into alloc(ctx, len) (e.g. the
 * request pool); *val is NULL when len is 0.  No LMDB transaction or page
 * reference outlives the call.
 * DSG_STORE_OK, DSG_STORE_NOTFOUND, DSG_STORE_ENOMEM or an error.
 */
int dsg_store_get(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE],
    dsg_store_alloc_pt alloc, void *ctx, uint8_t **val, size_t *len);

/*
 * Looks key up and leaves its value in the map, to be sent without a
 * copy: *val stays valid, and no writer changes the pages under it, until
 * dsg_store_unpin(st, *pin).  A pin is an LMDB read transaction of its
 * own (a reader slot; writers cannot reuse pages freed while it lasts),
 * so pins are few (DSG_STORE_PINS at once) and must be short.  While a
 * pin or a detached handle is out, st does not adopt a map size grown by
 * another process (its transactions fail with DSG_STORE_ELIMIT until
 * they are all back).  DSG_STORE_OK, DSG_STORE_NOTFOUND, DSG_STORE_ELIMIT
 * (no pin free, or LMDB's reader table full: copy with dsg_store_get())
 * or an error.  dsg_store_close() ends the pins still out.
 */
int dsg_store_pin(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE],
    dsg_store_pin_t **pin, const uint8_t **val, size_t *len);
void dsg_store_unpin(dsg_store_t *st, dsg_store_pin_t *pin);
unsigned dsg_store_pins(const dsg_store_t *st);

/*
 * Stores a value of len bytes under key, replacing an older one: the
 * value is reserved inside LMDB and fill(ctx, dst, len) writes all len
 * bytes of it (no intermediate copy); it returns 0, or non-zero to abort
 * the put (DSG_STORE_EFILL, nothing changed).  expires_ms orders the
 * expiry sweep, now_ms the eviction.
 *
 * Room: a put that would leave less than a small reserve of free pages
 * (1/64 of the map, 16 to 4096 pages, kept so that deletes can always
 * run) first evicts entries, least recently stored or touched first,
 * about max(2 * len, 5% of the map); a put that meets MDB_MAP_FULL all
 * the same evicts and retries once, so fill may be called twice.
 * DSG_STORE_OK, DSG_STORE_EFULL (still full: serve uncached),
 * DSG_STORE_ETOOBIG (len > map_size / 2), DSG_STORE_EFILL or an error.
 */
int dsg_store_put(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE],
    uint64_t expires_ms, uint64_t now_ms, size_t len, dsg_store_fill_pt fill,
    void *ctx);

/*
 * A handle on st's environment for one other thread at a time, for
 * dsg_store_put() there while st goes on being used here: it has its own
 * read transaction, counters and last error, and never adopts a map size
 * grown by another process (mdb_env_set_mapsize() needs every transaction
 * of the process ended; such a put fails with DSG_STORE_ELIMIT, the next
 * write of st adopts the size).  NULL: out of memory.  The thread ends
 * with dsg_store_detached_end(h) (its read transaction); st's thread
 * then calls dsg_store_attach(st, h), which adds h's counters to st's
 * and frees h.  st must not be closed or reopened in between: the
 * environment is shared.
 */
dsg_store_t *dsg_store_detach(dsg_store_t *st);
void dsg_store_detached_end(dsg_store_t *h);
void dsg_store_attach(dsg_store_t *st, dsg_store_t *h);

/* DSG_STORE_OK, DSG_STORE_NOTFOUND or an error */
int dsg_store_del(dsg_store_t *st, const uint8_t key[DSG_STORE_KEY_SIZE]);

/*
 * Marks n keys (n * DSG_STORE_KEY_SIZE bytes at keys) as used at now_ms:
 * moves them to the young end of the eviction order, in one write
 * transaction; keys no longer stored are passed over.  The glue gathers a
 * worker's hits and touches them once a second.
 * DSG_STORE_OK or an error.
 */
int dsg_store_touch(dsg_store_t *st, const uint8_t *keys, unsigned n,
    uint64_t now_ms);

/*
 * Housekeeping, in write transactions of at most DSG_STORE_TXN_ROWS rows
 * of each kind (see dsg_store.c: it bounds the memory LMDB keeps):
 *  - removes up to max_items entries with expires_ms + keep_stale_ms <
 *    now_ms (entries stay keep_stale_ms past their expiry so they can be
 *    served stale), oldest expiry first;
 *  - then, if the live data exceeds 90% of the map, evicts up to
 *    max_items more, least recently used first, aiming at 80%.
 * *expired and *evicted (either may be NULL) get the counts of what was
 * committed, also when a later transaction fails.
 * DSG_STORE_EFULL: even a small batch found no free page (the map is
 * full, or a reader in another worker pins the pages freed lately); a
 * transient state, try again at the next sweep.
 */
int dsg_store_sweep(dsg_store_t *st, uint64_t now_ms, uint64_t keep_stale_ms,
    unsigned max_items, unsigned *expired, unsigned *evicted);

int dsg_store_stat(dsg_store_t *st, dsg_store_stat_t *out);

/* Flushes data.mdb to disk (the store runs with MDB_NOSYNC). */
int dsg_store_sync(dsg_store_t *st);

/* Frees the reader slots of dead processes; *dead (may be NULL): count. */
int dsg_store_reader_check(dsg_store_t *st, int *dead);

/* The raw LMDB or errno code behind the last error returned by st. */
int dsg_store_last_error(const dsg_store_t *st);

/*
 * Text of a DSG_STORE_* code, and also of a raw LMDB or errno code (as
 * returned by dsg_store_last_error()).  Never NULL.
 */
const char *dsg_store_strerror(int rc);


#endif /* DSG_STORE_H */
