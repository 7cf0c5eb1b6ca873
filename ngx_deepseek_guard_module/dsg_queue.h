/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * A cross-worker priority queue: who waits for a key, in which order, and
 * which waiter may try next.
 *
 * Pure C: no nginx headers, no global state, no clock, no allocation, no
 * logging.  Every structure lives in shared memory, mapped at the same
 * address in every worker (nginx's shared zones are), so the links are
 * plain pointers; the caller serializes access (the zone's mutex) and
 * provides the memory: the waiter records, added to a pool once, and a
 * dsg_waitq_t per key that has waiters.
 *
 * Order.  Waiters of one key are ordered by class (0 first), then by
 * arrival (FIFO: a waiter goes to the tail of its class; the caller's
 * ticket is kept for tests and debugging, it does not decide the order).
 * Only the head of a key's queue may be admitted, so only the head needs
 * to try: every other waiter is DORMANT and costs nothing
 * until it becomes the head.  A waiter is
 *
 *   ACTIVE   its owner tries it on every tick (the head, as its owner
 *            knows it, or the head it was when it was queued);
 *   DORMANT  not the head: its owner leaves it alone;
 *   READY    became the head while DORMANT: it sits on the pool's ready
 *            list until its owner picks it up and makes it ACTIVE.
 *
 * An ACTIVE waiter that finds it is no longer the head (a higher class
 * arrived) goes back to DORMANT (dsg_queue_sleep).  Every operation is
 * O(1) or O(DSG_MAX_CLASSES); picking up is O(waiters on the ready list).
 */


#ifndef DSG_QUEUE_H
#define DSG_QUEUE_H


#include <stdint.h>

#include "dsg_bucket.h"


#define DSG_QUEUE_MAX_SLOTS  65535       /* per zone and configuration */

#define DSG_WAITER_FREE      0
#define DSG_WAITER_DORMANT   1
#define DSG_WAITER_READY     2
#define DSG_WAITER_ACTIVE    3


typedef struct dsg_waiter_s  dsg_waiter_t;

struct dsg_waiter_s {
    dsg_waiter_t  *next;                 /* in its class, or the free list */
    dsg_waiter_t  *prev;
    dsg_waiter_t  *rnext;                /* in the ready list */
    dsg_waiter_t  *rprev;
    void          *key;                  /* caller's: what it waits for */
    void          *data;                 /* caller's: only the owner reads */
    uint32_t       owner;                /* caller's: which worker */
    uint32_t       pid;
    uint32_t       ticket;               /* caller's: arrival, for tests */
    uint16_t       cls;
    uint16_t       state;                /* DSG_WAITER_* */
};                                       /* 64 bytes on 64-bit machines */


/* one key's waiters, by class */
typedef struct {
    dsg_waiter_t  *head[DSG_MAX_CLASSES];
    dsg_waiter_t  *tail[DSG_MAX_CLASSES];
    uint32_t       count[DSG_MAX_CLASSES];
    uint32_t       total;
} dsg_waitq_t;


/* a zone's waiter records: the free ones and the READY ones */
typedef struct {
    dsg_waiter_t  *free;
    dsg_waiter_t  *ready;
    uint32_t       nfree;
    uint32_t       nready;
    uint32_t       size;                 /* records ever added */
} dsg_pool_t;


/* the queue lengths of a configuration's classes */
typedef struct {
    uint32_t  nclasses;
    uint32_t  len[DSG_MAX_CLASSES];
    uint32_t  total;
} dsg_queue_layout_t;


/*
 * qlen[k]: places of class k.  DSG_OK, or DSG_EINVAL if nclasses is not in
 * 1..DSG_MAX_CLASSES or the total exceeds DSG_QUEUE_MAX_SLOTS.
 */
int dsg_queue_layout_init(dsg_queue_layout_t *l, const uint32_t *qlen,
    uint32_t nclasses);

/* adds n zeroed records to the pool's free list */
void dsg_pool_add(dsg_pool_t *p, dsg_waiter_t *w, uint32_t n);

/*
 * Queues a waiter of class cls at the tail of its class in q: a free
 * record, filled in.  It is ACTIVE if it is the head of q (its owner, the
 * caller, tries it at once), DORMANT otherwise.  NULL: no free record, or
 * cls >= DSG_MAX_CLASSES.
 */
dsg_waiter_t *dsg_queue_push(dsg_pool_t *p, dsg_waitq_t *q, uint32_t cls,
    uint32_t ticket, uint32_t pid, uint32_t owner, void *key, void *data);

/*
 * Takes w out of q (admitted, gone or dead) and frees its record.  If that
 * made another waiter the head and it was DORMANT, it becomes READY and is
 * returned (its owner is to pick it up), else NULL.
 */
dsg_waiter_t *dsg_queue_remove(dsg_pool_t *p, dsg_waitq_t *q,
    dsg_waiter_t *w);

/* q's head, or NULL */
dsg_waiter_t *dsg_queue_head(const dsg_waitq_t *q);

/*
 * An ACTIVE waiter that is not the head any more becomes DORMANT: returns
 * 1.  The head stays ACTIVE: 0.
 */
int dsg_queue_sleep(dsg_waitq_t *q, dsg_waiter_t *w);

/* a READY waiter becomes ACTIVE (its owner has it now) */
void dsg_queue_activate(dsg_pool_t *p, dsg_waiter_t *w);

/*
 * Picks up to n READY waiters of owner off the ready list, makes them
 * ACTIVE and stores them in out[]; returns how many.
 */
uint32_t dsg_queue_pickup(dsg_pool_t *p, uint32_t owner, dsg_waiter_t **out,
    uint32_t n);

/* waiters of q a new class cls waiter would queue behind */
uint32_t dsg_queue_ahead_of_new(const dsg_waitq_t *q, uint32_t cls);


/*
 * ceil((ahead + 1) * mean_service_ms / max(capacity, 1)), saturating.
 * With a mean kept in us, pass (mean_us + 999) / 1000.
 */
uint64_t dsg_expected_wait_ms(uint32_t ahead, uint64_t mean_service_ms,
    uint32_t capacity);

/*
 * Exponentially weighted moving average, alpha = 1/8, rounded, in integer
 * math.  *ewma_us == 0 means "no sample yet": the first sample sets it;
 * once set to a non-zero value, it never goes back to 0.
 */
void dsg_ewma_update(uint64_t *ewma_us, uint64_t sample_us);


#endif /* DSG_QUEUE_H */
