/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Ordering decisions for a cross-worker priority queue.
 *
 * Pure C: no nginx headers, no global state, no clock, no allocation, no
 * logging.  The slots are a plain array in shared memory (all zero: all
 * free); the caller serializes access to it (the zone's mutex).
 *
 * A zone's slots are grouped by class: class k owns the contiguous range
 * [first[k], first[k] + len[k]) (len 0: the class never queues), classes in
 * index order, so a lower slot range means a higher priority.  A waiter
 * waits for one key (slot.key, e.g. the key node's offset in shared memory):
 * ordering only applies among waiters of the same key.  Among them, a higher
 * class (lower index) goes first, then the smaller ticket (FIFO); tickets
 * come from a per-zone monotonic 64-bit counter kept by the caller.
 */


#ifndef DSG_QUEUE_H
#define DSG_QUEUE_H


#include <stdint.h>

#include "dsg_bucket.h"


#define DSG_QUEUE_MAX_SLOTS  65535       /* per zone; fits a uint16_t count */

#define DSG_SLOT_FREE        0
#define DSG_SLOT_WAITING     1


typedef struct {
    uint32_t  pid;                       /* worker that owns the waiter */
    uint32_t  state;                     /* DSG_SLOT_FREE / DSG_SLOT_WAITING */
    uint32_t  cls;
    uint32_t  pad;
    uint64_t  ticket;
    uint64_t  deadline_ms;
    uint64_t  key;
} dsg_slot_t;


typedef struct {
    uint32_t  nclasses;
    uint32_t  first[DSG_MAX_CLASSES];
    uint32_t  len[DSG_MAX_CLASSES];
    uint32_t  total;                     /* slots in the array */
} dsg_queue_layout_t;


/*
 * qlen[k]: slots of class k.  DSG_OK, or DSG_EINVAL if nclasses is not in
 * 1..DSG_MAX_CLASSES or the total exceeds DSG_QUEUE_MAX_SLOTS.
 */
int dsg_queue_layout_init(dsg_queue_layout_t *l, const uint32_t *qlen,
    uint32_t nclasses);

/* marks every slot free: for a new zone (zeroed memory is free as well) */
void dsg_queue_init(const dsg_queue_layout_t *l, dsg_slot_t *slots);

/*
 * Takes a free slot in class cls's range and fills it; returns its index,
 * or -1 if the range is full (or empty, or cls >= nclasses).
 */
int dsg_queue_take(const dsg_queue_layout_t *l, dsg_slot_t *slots,
    uint32_t cls, uint32_t pid, uint64_t ticket, uint64_t deadline_ms,
    uint64_t key);

/* frees slot idx; idempotent, ignores idx < 0 */
void dsg_queue_free(dsg_slot_t *slots, int idx);

/*
 * Waiting slots of the same key ahead of waiting slot idx: a higher class,
 * or the same class and a smaller ticket.  0: idx is at the head.
 */
uint32_t dsg_queue_ahead(const dsg_queue_layout_t *l, const dsg_slot_t *slots,
    int idx);

/*
 * For a request not queued yet: waiting slots of the same key with a class
 * <= cls (all of them would be ahead of it).
 */
uint32_t dsg_queue_ahead_of_new(const dsg_queue_layout_t *l,
    const dsg_slot_t *slots, uint32_t cls, uint64_t key);

/* the head of key's queue (what dsg_queue_ahead() says is 0), or -1 */
int dsg_queue_head(const dsg_queue_layout_t *l, const dsg_slot_t *slots,
    uint64_t key);

/* waiting slots of class cls */
uint32_t dsg_queue_depth(const dsg_queue_layout_t *l, const dsg_slot_t *slots,
    uint32_t cls);

/*
 * The first waiting slot of pid at index >= from, or -1: lets the caller
 * visit a dead worker's waiters (e.g. to fix per-key counts) before
 * freeing them.
 */
int dsg_queue_next_of_pid(const dsg_queue_layout_t *l,
    const dsg_slot_t *slots, uint32_t pid, int from);


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
