/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The one header that sees both worlds: nginx types and the pure-C core.
 */


#ifndef NGX_HTTP_DEEPSEEK_GUARD_MODULE_H
#define NGX_HTTP_DEEPSEEK_GUARD_MODULE_H


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "dsg_bucket.h"
#include "dsg_queue.h"
#include "dsg_fleet.h"
#include "dsg_tokens.h"


#define NGX_HTTP_DSG_ADMITTED      1
#define NGX_HTTP_DSG_QUEUED        2
#define NGX_HTTP_DSG_REJECTED      3
#define NGX_HTTP_DSG_DRY_RUN       4
#define NGX_HTTP_DSG_CACHED        5
#define NGX_HTTP_DSG_STALE         6

/* deepseek_guard_cache_credentials */
#define NGX_HTTP_DSG_CRED_SEPARATE  0
#define NGX_HTTP_DSG_CRED_SHARED    1

/* queue wait histogram upper bounds, in ms; the last bucket is +Inf */
#define NGX_HTTP_DSG_WAIT_BUCKETS  10


typedef struct {
    ngx_str_t                    name;
    uint32_t                     reserve;       /* percent */
    uint32_t                     queue;         /* places per zone */
    ngx_msec_t                   queue_timeout;
} ngx_http_deepseek_guard_class_t;


/* one line of deepseek_guard_classify_keys: a value and its class */
typedef struct {
    uint64_t                     hash;      /* XXH3-64 of key */
    ngx_str_t                    key;
    ngx_str_t                    name;      /* the class, as written */
    ngx_uint_t                   index;     /* the class, once resolved */
    u_char                      *file;
    ngx_uint_t                   line;
} ngx_http_deepseek_guard_class_key_t;


typedef struct {
    ngx_array_t                  keys;      /* sorted by hash */
    ngx_uint_t                   resolved;
} ngx_http_deepseek_guard_class_keys_t;


/* per zone and class counters, in shared memory */
typedef struct {
    ngx_atomic_t                 admitted;
    ngx_atomic_t                 queued;
    ngx_atomic_t                 rejected_429;
    ngx_atomic_t                 rejected_503;
    ngx_atomic_t                 rejected_other;
    ngx_atomic_t                 dry_run;
    ngx_atomic_t                 timeouts;
    ngx_atomic_t                 inflight;      /* gauge */
    ngx_atomic_t                 depth;         /* gauge: waiting now */
    ngx_atomic_t                 wait_count;
    ngx_atomic_t                 wait_sum_ms;
    ngx_atomic_t                 wait_bucket[NGX_HTTP_DSG_WAIT_BUCKETS + 1];
    /* the waits announced in rejections (Retry-After), log phase */
    ngx_atomic_t                 retry_count;
    ngx_atomic_t                 retry_sum_ms;
    ngx_atomic_t                 retry_last_ms; /* gauge: the latest one */
    /* token budgets (tokens=): reserved at admission, then settled */
    ngx_atomic_t                 tokens_reserved;
    ngx_atomic_t                 tokens_refunded;
    ngx_atomic_t                 tokens_charged;
    ngx_atomic_t                 tokens_used;
    ngx_atomic_t                 tokens_rejected;
} ngx_http_deepseek_guard_counters_t;


/* tokens=: the output a reservation expects when max_tokens does not cap it */
#define NGX_HTTP_DSG_TOKENS_OUTPUT  1024
#define NGX_HTTP_DSG_UNSET64        ((uint64_t) -1)


/* the estimate error histogram: actual / estimated prompt, in percent */
#define NGX_HTTP_DSG_EST_BUCKETS  7


typedef struct {
    ngx_rbtree_node_t            node;       /* node.key: digest[0..7] */
    ngx_queue_t                  lru;
    u_char                       digest[4];  /* digest[8..11] */
    uint32_t                     holders;    /* leases on this key */
    dsg_limit_state_t            state;
    void                        *waiters;    /* its queue, NULL: none */
} ngx_http_deepseek_guard_node_t;


/* one admitted request in one zone; survives its worker in shared memory */
typedef struct {
    ngx_queue_t                  queue;
    ngx_http_deepseek_guard_node_t  *node;
    ngx_pid_t                    pid;
    uint32_t                     cls;
    uint32_t                     record;     /* dsg_limit_record() */
    uint32_t                     fleet;      /* charged to the fleet share */
    uint32_t                     trecord;    /* dsg_tokens_record() */
    ngx_msec_t                   start;
    uint64_t                     treserved;  /* tokens reserved, 0: none */
} ngx_http_deepseek_guard_lease_t;


/* a chunk of queue places; chunks are added, never freed (docs/design.md) */
typedef struct ngx_http_deepseek_guard_places_s
    ngx_http_deepseek_guard_places_t;

struct ngx_http_deepseek_guard_places_s {
    ngx_http_deepseek_guard_places_t  *next;
    ngx_uint_t                   n;
    dsg_waiter_t                *waiters;   /* n of them: whole slab pages */
};


typedef struct {
    ngx_rbtree_t                 rbtree;
    ngx_rbtree_node_t            sentinel;
    ngx_queue_t                  lru;
    ngx_queue_t                  leases;
    ngx_queue_t                  spare;        /* freed leases, kept */
    ngx_uint_t                   nspare;
    uint64_t                     ticket;
    uint64_t                     ewma_us;      /* mean in-flight duration */
    ngx_uint_t                   nodes;
    ngx_uint_t                   evicted;
    ngx_uint_t                   reaped;
    dsg_pool_t                   pool;         /* queue places */
    ngx_http_deepseek_guard_places_t  *places;
    /* keys that could not be allocated, and the alerts that said so */
    ngx_atomic_t                 nomem;
    ngx_atomic_t                 nomem_told;
    ngx_atomic_t                 nomem_sec;
    ngx_http_deepseek_guard_counters_t  counters[DSG_MAX_CLASSES];
    ngx_atomic_t                 responses[5];  /* 1xx .. 5xx, log phase */
    /* fleet=on: the node's share as of the last sync (gauges) */
    ngx_atomic_t                 fleet_requests;
    ngx_atomic_t                 fleet_slots;
    ngx_atomic_t                 fleet_keys;
    ngx_atomic_t                 fleet_demand;
    /* tokens=: the prompt estimator's correction (ppm, under the mutex) */
    uint32_t                     tokens_ratio;
    ngx_atomic_t                 tokens_est[NGX_HTTP_DSG_EST_BUCKETS + 1];
    ngx_atomic_t                 tokens_est_sum;   /* permille */
} ngx_http_deepseek_guard_shctx_t;


/* deepseek_guard_fleet: the node's agent and counters, in shared memory */
typedef struct {
    ngx_atomic_t                 agent;        /* its worker's pid, 0: none */
    ngx_atomic_t                 beat;         /* ms of its last tick */
    ngx_atomic_t                 up;           /* 1: synced, 0: fallback */
    ngx_atomic_t                 fallbacks;
    ngx_atomic_t                 syncs;
    ngx_atomic_t                 errors;
    ngx_atomic_t                 commands;
    ngx_atomic_t                 rtt_sum_ms;
    ngx_atomic_t                 rtt_count;
} ngx_http_deepseek_guard_fleet_sh_t;


typedef struct {
    ngx_addr_t                   addr;         /* redis= */
    ngx_str_t                    password;
    ngx_str_t                    prefix;
    ngx_str_t                    node;         /* empty: host:master pid */
    ngx_msec_t                   interval;
    ngx_uint_t                   nodes;
    ngx_array_t                  zones;        /* of fleet=on zone pointers */
    ngx_shm_zone_t              *shm_zone;
    ngx_http_deepseek_guard_fleet_sh_t  *sh;
    u_char                      *file;
    ngx_uint_t                   line;
} ngx_http_deepseek_guard_fleet_t;


typedef struct {
    ngx_http_deepseek_guard_shctx_t  *sh;
    ngx_slab_pool_t             *shpool;
    ngx_shm_zone_t              *shm_zone;
    ngx_http_complex_value_t     key;
    ngx_int_t                    key_index;    /* lone variable, or -1 */
    uint64_t                     seed;         /* of the key digest */
    ngx_flag_t                   key_const;    /* key has no variable */
    u_char                       key_digest[16];  /* its digest, if so */
    uint64_t                     rate;         /* requests per period */
    uint64_t                     period;       /* ms */
    uint64_t                     burst;
    uint32_t                     inflight;
    ngx_uint_t                   status;       /* 429: quota, never queued */
    dsg_limit_conf_t             limit;
    dsg_queue_layout_t           layout;
    ngx_flag_t                   fleet_on;     /* fleet=on */
    ngx_http_deepseek_guard_fleet_t  *fleet;
    dsg_limit_conf_t             fallback;     /* the share without Redis */
    uint64_t                     tokens;       /* tokens=, per period */
    uint64_t                     tokens_period;
    uint64_t                     tokens_burst; /* tokens_burst=, 0: tokens */
    uint64_t                     tokens_expect;   /* tokens_output= */
    dsg_tokens_conf_t            tconf;
    u_char                      *file;
    ngx_uint_t                   line;

    /* the constant parts of a rejection, rendered at configuration time */
    ngx_str_t                    body_head;    /* JSON body up to the ms */
    ngx_str_t                    body_tail;    /* JSON body after the ms */
    ngx_str_t                    policy;       /* RateLimit-Policy value */
    ngx_str_t                    ratelimit;    /* RateLimit value up to t= */
    ngx_str_t                    tbody_head;   /* the same for tokens */
    ngx_str_t                    tbody_big;    /* a reservation too large */
    /* by class: the warning up to the ms */
    ngx_str_t                    reject_log[DSG_MAX_CLASSES];
} ngx_http_deepseek_guard_zone_t;


/* one coalescing lock: the request filling an entry, in shared memory */
typedef struct {
    u_char                       digest[32];
    ngx_pid_t                    pid;       /* 0: free */
    uint32_t                     waiters;
    uint64_t                     deadline;
} ngx_http_deepseek_guard_lock_t;


typedef struct {
    ngx_atomic_t                 hits;
    ngx_atomic_t                 misses;
    ngx_atomic_t                 expired;
    ngx_atomic_t                 stale;
    ngx_atomic_t                 coalesced;
    ngx_atomic_t                 bypass;
    ngx_atomic_t                 stores;
    ngx_atomic_t                 store_failures;
    ngx_atomic_t                 not_cacheable;
    ngx_atomic_t                 evictions;
    ngx_atomic_t                 expirations;
    ngx_atomic_t                 entries;       /* gauge */
    ngx_atomic_t                 bytes;         /* gauge: live data */
    ngx_atomic_t                 file_bytes;    /* gauge: data.mdb extent */
    ngx_atomic_t                 capacity;      /* gauge: map size */
    ngx_atomic_t                 recreated;
    ngx_atomic_t                 thread_stores; /* committed by a thread */
    uint64_t                     last_sweep;
    ngx_uint_t                   nlocks;
    ngx_http_deepseek_guard_lock_t  locks[1];
} ngx_http_deepseek_guard_cache_sh_t;


typedef struct {
    ngx_str_t                    name;
    ngx_path_t                  *path;
    ngx_shm_zone_t              *shm_zone;
    ngx_http_deepseek_guard_cache_sh_t  *sh;
    ngx_slab_pool_t             *shpool;
    uint64_t                     max_size;
    ngx_msec_t                   inactive;  /* expired entries kept so long */
    void                        *store;     /* dsg_store_t, per worker */
    uint64_t                     put_evicted;   /* this worker's, seen */
    u_char                      *touched;   /* this worker's hits, digests */
    ngx_uint_t                   ntouched;
#if (NGX_THREADS)
    ngx_thread_pool_t           *thread_pool;   /* threads=: large stores */
#endif
    size_t                       threads_min;
    ngx_uint_t                   pending;   /* this worker's stores there */
    unsigned                     repair;    /* deferred until none pending */
    u_char                      *file;
    ngx_uint_t                   line;
} ngx_http_deepseek_guard_cache_t;


typedef struct {
    ngx_array_t                  classes;   /* of classes, by priority */
    ngx_array_t                  caches;    /* of cache pointers */
    ngx_array_t                  zones;     /* ngx_shm_zone_t * */
    ngx_uint_t                   default_class_set;
    ngx_msec_t                   malloc_trim;   /* interval, 0: off */
    ngx_http_deepseek_guard_fleet_t  *fleet;    /* deepseek_guard_fleet */
} ngx_http_deepseek_guard_main_conf_t;


typedef struct {
    ngx_array_t                 *zones;     /* ngx_shm_zone_t * */
    ngx_http_complex_value_t    *classify;
    ngx_int_t                    classify_index;  /* lone variable, or -1 */
    ngx_http_deepseek_guard_class_keys_t  *class_keys;  /* or NULL */
    ngx_uint_t                   tokens;    /* a zone has a token budget */
    ngx_str_t                    default_class;
    ngx_uint_t                   default_index;
    ngx_flag_t                   dry_run;
    ngx_flag_t                   ratelimit_headers;
    ngx_flag_t                   openai_headers;    /* x-ratelimit-* */
    ngx_flag_t                   stream_usage;  /* ask streams for usage */
    ngx_uint_t                   log_level;
    ngx_flag_t                   metrics;
    u_char                      *file;       /* where default_class was set */
    ngx_uint_t                   line;
    u_char                      *zfile;      /* where the zones were used */
    ngx_uint_t                   zline;

    /* cache */
    ngx_http_deepseek_guard_cache_t  *cache;
    ngx_str_t                    cache_name;
    u_char                      *cfile;
    ngx_uint_t                   cline;
    ngx_http_complex_value_t    *cache_key;
    ngx_array_t                 *cache_valid;
    ngx_array_t                 *cache_bypass;
    ngx_uint_t                   use_stale;
    ngx_msec_t                   lock_timeout;
    size_t                       max_entry_size;
    ngx_flag_t                   json_canonical;
    ngx_str_t                    status_header;
    ngx_uint_t                   methods;
    ngx_uint_t                   credentials;   /* NGX_HTTP_DSG_CRED_* */
    ngx_uint_t                   key_has_auth;  /* key names credentials */
} ngx_http_deepseek_guard_loc_conf_t;


/* what a request holds in one zone; zone NULL: empty key, not limited */
typedef struct {
    ngx_http_deepseek_guard_zone_t  *zone;
    ngx_rbtree_node_t           *node;
    void                        *lease;     /* in-flight lease, NULL if none */
    ngx_uint_t                   charged;
    uint64_t                     treserve;  /* tokens this zone reserves */
    u_char                       digest[16];
} ngx_http_deepseek_guard_hold_t;


/*
 * A request parked until something in shared memory changes: a place in
 * the admission queue, or the fill lock of the entry it wants.  The
 * worker's one park timer calls resume: NGX_AGAIN, keep waiting; NGX_OK,
 * run the phases again; NGX_DONE, resume finalized the request.
 */
typedef ngx_int_t (*ngx_http_deepseek_guard_resume_pt)(ngx_http_request_t *r);

/* the park timer's call into the queue: rouse the waiters now at a head */
typedef void (*ngx_http_deepseek_guard_pickup_pt)(ngx_cycle_t *cycle);

typedef struct {
    ngx_queue_t                  link;
    ngx_http_request_t          *request;
    ngx_http_deepseek_guard_resume_pt  resume;
    ngx_uint_t                   parked;
    ngx_uint_t                   sleeping;
    ngx_event_t                  deadline;
} ngx_http_deepseek_guard_park_t;


typedef struct ngx_http_deepseek_guard_ctx_s  ngx_http_deepseek_guard_ctx_t;

struct ngx_http_deepseek_guard_ctx_s {
    ngx_http_request_t          *request;
    ngx_uint_t                   status;      /* NGX_HTTP_DSG_* */
    ngx_uint_t                   cls;
    ngx_uint_t                   decided;
    ngx_uint_t                   nholds;
    ngx_http_deepseek_guard_hold_t  *holds;

    /* queue places and fill-lock waits */
    ngx_http_deepseek_guard_park_t  park;
    dsg_waiter_t                *waiter;      /* NULL: not queued */
    ngx_uint_t                   slot_zone;   /* index into holds */
    ngx_msec_t                   enqueued;
    ngx_msec_t                   deadline;
    ngx_msec_t                   wait_ms;
    ngx_msec_t                   admitted_at;
    uint64_t                     retry_ms;
    ngx_http_deepseek_guard_zone_t  *reject_zone;
    ngx_uint_t                   reject_tokens;  /* 1: budget, 2: too big */
    /* a refused newcomer's expected wait, estimated under try()'s lock */
    uint64_t                     expected;
    uint32_t                     ahead;

    /* the cache's per-request state */
    struct ngx_http_deepseek_guard_cache_ctx_s  *cache;

    /* token budgets: the request's estimate and the upstream's usage */
    struct ngx_http_deepseek_guard_tokens_ctx_s  *tokens;
};


extern ngx_module_t  ngx_http_deepseek_guard_module;
extern ngx_module_t  ngx_http_proxy_module;


/*
 * Calls run one way: module -> request -> {limit -> zone,
 * cache_filter -> cache, metrics} -> common -> dsg_* (docs/design.md;
 * t/91-layers.t checks it on the object files).
 */

/* ngx_http_deepseek_guard_request.c */
ngx_int_t ngx_http_deepseek_guard_access_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_deepseek_guard_precontent_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_deepseek_guard_log_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_deepseek_guard_add_variables(ngx_conf_t *cf);

/* ngx_http_deepseek_guard_limit.c */
ngx_int_t ngx_http_deepseek_guard_limit_init_main(ngx_conf_t *cf,
    ngx_http_deepseek_guard_main_conf_t *mcf);
ngx_int_t ngx_http_deepseek_guard_admit(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t *blocked,
    uint64_t *retry_ms);
ngx_int_t ngx_http_deepseek_guard_recheck(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t *blocked,
    uint64_t *retry_ms);
ngx_uint_t ngx_http_deepseek_guard_release(ngx_http_deepseek_guard_ctx_t *ctx);
void ngx_http_deepseek_guard_unadmit(ngx_http_deepseek_guard_ctx_t *ctx);
void ngx_http_deepseek_guard_pickup(ngx_cycle_t *cycle);
void ngx_http_deepseek_guard_refused(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked,
    uint64_t retry_ms);
ngx_int_t ngx_http_deepseek_guard_reject(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_uint_t blocked);

/* ngx_http_deepseek_guard_zone.c */
char *ngx_http_deepseek_guard_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_deepseek_guard(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
void ngx_http_deepseek_guard_digest(ngx_http_deepseek_guard_zone_t *z,
    ngx_str_t *key, u_char *digest);
ngx_http_deepseek_guard_node_t *ngx_http_deepseek_guard_find(
    ngx_http_deepseek_guard_zone_t *z, u_char *digest);
ngx_http_deepseek_guard_node_t *ngx_http_deepseek_guard_lookup(
    ngx_http_deepseek_guard_zone_t *z, u_char *digest, ngx_uint_t *nomem);
ngx_http_deepseek_guard_lease_t *ngx_http_deepseek_guard_lease_alloc(
    ngx_http_deepseek_guard_zone_t *z, ngx_http_deepseek_guard_node_t *node,
    ngx_uint_t cls);
void ngx_http_deepseek_guard_lease_free(ngx_http_deepseek_guard_zone_t *z,
    ngx_http_deepseek_guard_lease_t *lease);
ngx_uint_t ngx_http_deepseek_guard_spare_drop(
    ngx_http_deepseek_guard_zone_t *z);
void ngx_http_deepseek_guard_zone_pids(ngx_http_deepseek_guard_zone_t *z,
    ngx_array_t *pids);
void ngx_http_deepseek_guard_zone_reap(ngx_http_deepseek_guard_zone_t *z,
    ngx_array_t *dead, ngx_log_t *log);
void ngx_http_deepseek_guard_dequeue_locked(ngx_http_deepseek_guard_zone_t *z,
    dsg_waiter_t *w, ngx_http_deepseek_guard_ctx_t **mine);

/* ngx_http_deepseek_guard_cache_filter.c */
ngx_uint_t ngx_http_deepseek_guard_cache_active(ngx_http_request_t *r);
ngx_int_t ngx_http_deepseek_guard_cache_access(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx);
void ngx_http_deepseek_guard_cache_drop(ngx_http_deepseek_guard_ctx_t *ctx);
ngx_int_t ngx_http_deepseek_guard_cache_filler(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx);
ngx_int_t ngx_http_deepseek_guard_cache_overload(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx);
ngx_int_t ngx_http_deepseek_guard_cache_serve(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx);
ngx_int_t ngx_http_deepseek_guard_cache_init(ngx_conf_t *cf);
char *ngx_http_deepseek_guard_cache_merge(ngx_conf_t *cf,
    ngx_http_deepseek_guard_loc_conf_t *prev,
    ngx_http_deepseek_guard_loc_conf_t *conf);
ngx_int_t ngx_http_deepseek_guard_body_sha_variable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_http_variable_value_t *v);
ngx_int_t ngx_http_deepseek_guard_auth_sha_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
ngx_int_t ngx_http_deepseek_guard_cache_status_variable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_http_variable_value_t *v);

/* ngx_http_deepseek_guard_cache.c */
ngx_int_t ngx_http_deepseek_guard_cache_init_module(ngx_cycle_t *cycle);
ngx_int_t ngx_http_deepseek_guard_cache_init_process(ngx_cycle_t *cycle);
void ngx_http_deepseek_guard_cache_exit_process(ngx_cycle_t *cycle);
void ngx_http_deepseek_guard_sha_free(void);
char *ngx_http_deepseek_guard_cache_path(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_deepseek_guard_cache(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_deepseek_guard_cache_valid(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_deepseek_guard_cache_key_slot(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
void ngx_http_deepseek_guard_cache_pids(ngx_http_deepseek_guard_cache_t *cache,
    ngx_array_t *pids);
void ngx_http_deepseek_guard_cache_reap(ngx_http_deepseek_guard_cache_t *cache,
    ngx_array_t *dead, ngx_log_t *log);
extern ngx_conf_bitmask_t  ngx_http_deepseek_guard_use_stale_masks[];
extern ngx_conf_bitmask_t  ngx_http_deepseek_guard_methods_masks[];
extern ngx_conf_enum_t     ngx_http_deepseek_guard_credentials_enum[];

/* ngx_http_deepseek_guard_fleet.c */
char *ngx_http_deepseek_guard_fleet(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_deepseek_guard_fleet_init_main(ngx_conf_t *cf,
    ngx_http_deepseek_guard_main_conf_t *mcf);
ngx_int_t ngx_http_deepseek_guard_fleet_init_process(ngx_cycle_t *cycle);
void ngx_http_deepseek_guard_fleet_exit_process(ngx_cycle_t *cycle);
ngx_uint_t ngx_http_deepseek_guard_fleet_up(
    ngx_http_deepseek_guard_fleet_t *fleet);

/* the key's fleet share, after its node (fleet=on zones only) */
#define ngx_http_deepseek_guard_fleet_key(n)                                  \
    ((dsg_fleet_key_t *) ((ngx_http_deepseek_guard_node_t *) (n) + 1))

/* ngx_http_deepseek_guard_tokens.c */
ngx_int_t ngx_http_deepseek_guard_tokens_prepare(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx);
uint64_t ngx_http_deepseek_guard_tokens_reserve(
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_http_deepseek_guard_zone_t *z);
void ngx_http_deepseek_guard_tokens_settle(ngx_http_deepseek_guard_ctx_t *ctx,
    ngx_http_deepseek_guard_zone_t *z, ngx_http_deepseek_guard_lease_t *lease,
    ngx_uint_t refund);
ngx_int_t ngx_http_deepseek_guard_tokens_init(ngx_conf_t *cf);
void ngx_http_deepseek_guard_tokens_finish(ngx_http_deepseek_guard_ctx_t *ctx);
ngx_int_t ngx_http_deepseek_guard_tokens_variable(ngx_http_request_t *r,
    ngx_http_deepseek_guard_ctx_t *ctx, ngx_http_variable_value_t *v,
    uintptr_t data);

/* the key's token bucket, after its node (tokens= zones only) */
#define ngx_http_deepseek_guard_tokens_state(n)                               \
    ((dsg_tokens_state_t *) ((ngx_http_deepseek_guard_node_t *) (n) + 1))

/* ngx_http_deepseek_guard_metrics.c */
char *ngx_http_deepseek_guard_metrics(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_deepseek_guard_metrics_handler(ngx_http_request_t *r);

/* ngx_http_deepseek_guard_status.c */
char *ngx_http_deepseek_guard_status_page(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/* ngx_http_deepseek_guard_common.c */
ngx_int_t ngx_http_deepseek_guard_check_name(ngx_conf_t *cf, ngx_str_t *name,
    const char *what);
char *ngx_http_deepseek_guard_parse_zone(ngx_conf_t *cf, ngx_str_t *value,
    size_t skip, const char *what, ngx_str_t *name, ssize_t *size);
uint64_t ngx_http_deepseek_guard_now_ms(void);
/*
 * A header name against a name as the RFCs write it: the bytes first (what
 * HTTP/1.1 clients and upstreams send), case-insensitively only when they
 * differ.  Two compares of a dozen bytes, where ngx_strncasecmp() alone
 * lowers every byte of both.
 */

static ngx_inline ngx_uint_t
ngx_http_deepseek_guard_name_eq(u_char *name, u_char *s, size_t len)
{
    return ngx_memcmp(name, s, len) == 0
           || ngx_strncasecmp(name, s, len) == 0;
}


/* ngx_strlchr() by libc's memchr(): a stored header block is scanned on
 * every hit, and memchr() looks at many bytes at a time */

static ngx_inline u_char *
ngx_http_deepseek_guard_chr(u_char *p, u_char *last, u_char c)
{
    return (p < last) ? memchr(p, c, last - p) : NULL;
}


ngx_int_t ngx_http_deepseek_guard_lone_variable(ngx_conf_t *cf,
    ngx_http_complex_value_t *cv);
ngx_int_t ngx_http_deepseek_guard_value(ngx_http_request_t *r,
    ngx_http_complex_value_t *cv, ngx_int_t index, ngx_str_t *value);
u_char *ngx_http_deepseek_guard_uint(u_char *p, uint64_t n);
ngx_int_t ngx_http_deepseek_guard_add_header(ngx_http_request_t *r,
    ngx_str_t *name, u_char *value, size_t len);
ngx_table_elt_t *ngx_http_deepseek_guard_header_next(ngx_list_part_t **part,
    ngx_uint_t *i);
void ngx_http_deepseek_guard_park(ngx_http_deepseek_guard_park_t *p,
    ngx_http_request_t *r, ngx_http_deepseek_guard_resume_pt resume);
void ngx_http_deepseek_guard_unpark(ngx_http_deepseek_guard_park_t *p);
void ngx_http_deepseek_guard_wake(ngx_msec_t delay);
void ngx_http_deepseek_guard_park_init(ngx_cycle_t *cycle,
    ngx_http_deepseek_guard_pickup_pt pickup);
void ngx_http_deepseek_guard_park_sleep(ngx_http_deepseek_guard_park_t *p);
void ngx_http_deepseek_guard_park_rouse(ngx_http_deepseek_guard_park_t *p);
void ngx_http_deepseek_guard_park_deadline(ngx_http_deepseek_guard_park_t *p,
    ngx_msec_t ms);
ngx_int_t ngx_http_deepseek_guard_pid_add(ngx_array_t *pids, ngx_pid_t pid);
void ngx_http_deepseek_guard_pids_dead(ngx_array_t *pids);
ngx_uint_t ngx_http_deepseek_guard_pid_in(ngx_array_t *pids, ngx_pid_t pid);

extern ngx_msec_t  ngx_http_deepseek_guard_wait_bounds[];
extern uint32_t    ngx_http_deepseek_guard_owner;


#endif /* NGX_HTTP_DEEPSEEK_GUARD_MODULE_H */
