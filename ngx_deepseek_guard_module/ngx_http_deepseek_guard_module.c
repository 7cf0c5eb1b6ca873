/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Wiring: the module and its directives, the configuration's create and
 * merge, the phase handlers and filters, the worker's timers (malloc_trim
 * and the one reaper of dead workers' leases, queue places and fill
 * locks).  The layers below: docs/design.md.
 */


#include "ngx_http_deepseek_guard_module.h"

#include <xxhash.h>


#define NGX_HTTP_DSG_REAP_MS  1000

#if (NGX_HAVE_MALLOC_TRIM)
#include <malloc.h>
#endif


static char *ngx_http_deepseek_guard_class(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_deepseek_guard_classify_keys(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_deepseek_guard_class_key(ngx_conf_t *cf,
    ngx_command_t *dummy, void *conf);
static int ngx_libc_cdecl ngx_http_deepseek_guard_cmp_keys(const void *one,
    const void *two);
static char *ngx_http_deepseek_guard_resolve_keys(ngx_conf_t *cf,
    ngx_http_deepseek_guard_main_conf_t *mcf,
    ngx_http_deepseek_guard_class_keys_t *ck);
static char *ngx_http_deepseek_guard_classify(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static void *ngx_http_deepseek_guard_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_deepseek_guard_init_main_conf(ngx_conf_t *cf,
    void *conf);
static void *ngx_http_deepseek_guard_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_deepseek_guard_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_deepseek_guard_preconf(ngx_conf_t *cf);
static ngx_int_t ngx_http_deepseek_guard_init(ngx_conf_t *cf);
static char *ngx_http_deepseek_guard_malloc_trim(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_deepseek_guard_init_process(ngx_cycle_t *cycle);
static void ngx_http_deepseek_guard_exit_process(ngx_cycle_t *cycle);


static ngx_conf_enum_t  ngx_http_deepseek_guard_log_levels[] = {
    { ngx_string("info"), NGX_LOG_INFO },
    { ngx_string("notice"), NGX_LOG_NOTICE },
    { ngx_string("warn"), NGX_LOG_WARN },
    { ngx_string("error"), NGX_LOG_ERR },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_deepseek_guard_commands[] = {

    { ngx_string("deepseek_guard_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_deepseek_guard_zone,
      0,
      0,
      NULL },

    { ngx_string("deepseek_guard_class"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_deepseek_guard_class,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_malloc_trim"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_deepseek_guard_malloc_trim,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_fleet"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_deepseek_guard_fleet,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_deepseek_guard,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_classify"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_deepseek_guard_classify,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_classify_keys"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_BLOCK
                        |NGX_CONF_TAKE12,
      ngx_http_deepseek_guard_classify_keys,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_dry_run"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, dry_run),
      NULL },

    { ngx_string("deepseek_guard_ratelimit_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, ratelimit_headers),
      NULL },

    { ngx_string("deepseek_guard_openai_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, openai_headers),
      NULL },

    { ngx_string("deepseek_guard_tokens_stream_usage"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, stream_usage),
      NULL },

    { ngx_string("deepseek_guard_log_level"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, log_level),
      &ngx_http_deepseek_guard_log_levels },

    { ngx_string("deepseek_guard_cache_path"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_deepseek_guard_cache_path,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_cache"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_deepseek_guard_cache,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_cache_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_deepseek_guard_cache_key_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, cache_key),
      NULL },

    { ngx_string("deepseek_guard_cache_valid"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_deepseek_guard_cache_valid,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_cache_bypass"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_set_predicate_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, cache_bypass),
      NULL },

    { ngx_string("deepseek_guard_cache_use_stale"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_conf_set_bitmask_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, use_stale),
      &ngx_http_deepseek_guard_use_stale_masks },

    { ngx_string("deepseek_guard_cache_lock_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, lock_timeout),
      NULL },

    { ngx_string("deepseek_guard_cache_max_entry_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, max_entry_size),
      NULL },

    { ngx_string("deepseek_guard_cache_json_canonical"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, json_canonical),
      NULL },

    { ngx_string("deepseek_guard_cache_status_header"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, status_header),
      NULL },

    { ngx_string("deepseek_guard_cache_methods"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_conf_set_bitmask_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, methods),
      &ngx_http_deepseek_guard_methods_masks },

    { ngx_string("deepseek_guard_cache_credentials"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_deepseek_guard_loc_conf_t, credentials),
      &ngx_http_deepseek_guard_credentials_enum },

    { ngx_string("deepseek_guard_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_deepseek_guard_metrics,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("deepseek_guard_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_deepseek_guard_status_page,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_deepseek_guard_module_ctx = {
    ngx_http_deepseek_guard_preconf,       /* preconfiguration */
    ngx_http_deepseek_guard_init,          /* postconfiguration */

    ngx_http_deepseek_guard_create_main_conf, /* create main configuration */
    ngx_http_deepseek_guard_init_main_conf,   /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_deepseek_guard_create_loc_conf,  /* create location conf */
    ngx_http_deepseek_guard_merge_loc_conf    /* merge location configuration */
};


ngx_module_t  ngx_http_deepseek_guard_module = {
    NGX_MODULE_V1,
    &ngx_http_deepseek_guard_module_ctx,   /* module context */
    ngx_http_deepseek_guard_commands,      /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_deepseek_guard_cache_init_module, /* init module */
    ngx_http_deepseek_guard_init_process,  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_deepseek_guard_exit_process,  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


#if (NGX_HAVE_MALLOC_TRIM)

/*
 * deepseek_guard_malloc_trim: every interval, each worker hands the whole
 * free pages of its malloc heap back to the kernel.  glibc returns memory
 * on free() only from the top of the heap; a burst of requests raises the
 * heap, and one allocation that outlives the burst (a keepalive
 * connection, a buffer of LMDB's) pins every free page under it, so the
 * burst's high-water mark stays resident for the life of the worker.
 * malloc_trim(0) releases free pages anywhere in the heap (madvise);
 * nothing live moves.  It walks the free lists of the worker's one arena
 * and madvise()s each run of free pages: the worker is busy for well under
 * a millisecond per few megabytes of heap (docs/operations.md).
 */

static ngx_event_t  ngx_http_deepseek_guard_trim_ev;


static void
ngx_http_deepseek_guard_trim_handler(ngx_event_t *ev)
{
    int                                   released;
    ngx_http_deepseek_guard_main_conf_t  *mcf = ev->data;
#if (NGX_DEBUG)
    struct timespec                       t0, t1;

    (void) clock_gettime(CLOCK_MONOTONIC, &t0);
#endif

    released = malloc_trim(0);

#if (NGX_DEBUG)
    (void) clock_gettime(CLOCK_MONOTONIC, &t1);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ev->log, 0,
                   "deepseek_guard malloc_trim: %s in %l us",
                   released ? "released memory" : "nothing to release",
                   (long) ((t1.tv_sec - t0.tv_sec) * 1000000
                           + (t1.tv_nsec - t0.tv_nsec) / 1000));
#else
    (void) released;
#endif

    ngx_add_timer(ev, mcf->malloc_trim);
}

#endif


/*
 * The one reaper: once a second, every worker looks for pids that hold
 * in-flight leases, queue places or fill locks, in every zone and cache,
 * and releases what the dead ones (kill -9, a crash) held.  Any number of
 * pids: old and new workers during a reload, worker_processes auto.
 */

static ngx_event_t  ngx_http_deepseek_guard_reap_ev;


static void
ngx_http_deepseek_guard_reap_handler(ngx_event_t *ev)
{
    ngx_uint_t                            i;
    ngx_pool_t                           *pool;
    ngx_array_t                          *pids;
    ngx_shm_zone_t                      **zones;
    ngx_http_deepseek_guard_cache_t     **caches;
    ngx_http_deepseek_guard_main_conf_t  *mcf = ev->data;

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, ev->log);
    if (pool == NULL) {
        goto next;
    }

    pids = ngx_array_create(pool, 64, sizeof(ngx_pid_t));
    if (pids == NULL) {
        goto done;
    }

    zones = mcf->zones.elts;
    caches = mcf->caches.elts;

    for (i = 0; i < mcf->zones.nelts; i++) {
        ngx_http_deepseek_guard_zone_pids(zones[i]->data, pids);
    }

    for (i = 0; i < mcf->caches.nelts; i++) {
        ngx_http_deepseek_guard_cache_pids(caches[i], pids);
    }

    ngx_http_deepseek_guard_pids_dead(pids);

    if (pids->nelts == 0) {
        goto done;
    }

    for (i = 0; i < mcf->zones.nelts; i++) {
        ngx_http_deepseek_guard_zone_reap(zones[i]->data, pids, ev->log);
    }

    for (i = 0; i < mcf->caches.nelts; i++) {
        ngx_http_deepseek_guard_cache_reap(caches[i], pids, ev->log);
    }

    /* capacity freed: this worker's parked requests may go on */
    ngx_http_deepseek_guard_wake(0);

done:

    ngx_destroy_pool(pool);

next:

    ngx_add_timer(ev, NGX_HTTP_DSG_REAP_MS);
}


static ngx_int_t
ngx_http_deepseek_guard_init_process(ngx_cycle_t *cycle)
{
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_deepseek_guard_module);

    ngx_http_deepseek_guard_park_init(cycle,
                                      ngx_http_deepseek_guard_pickup);

    if (mcf != NULL && (mcf->zones.nelts || mcf->caches.nelts)) {
        ngx_http_deepseek_guard_reap_ev.handler =
                                        ngx_http_deepseek_guard_reap_handler;
        ngx_http_deepseek_guard_reap_ev.log = cycle->log;
        ngx_http_deepseek_guard_reap_ev.data = mcf;
        ngx_http_deepseek_guard_reap_ev.cancelable = 1;

        ngx_add_timer(&ngx_http_deepseek_guard_reap_ev, NGX_HTTP_DSG_REAP_MS);
    }

#if (NGX_HAVE_MALLOC_TRIM)
    if (mcf != NULL && mcf->malloc_trim > 0) {
        ngx_http_deepseek_guard_trim_ev.handler =
                                        ngx_http_deepseek_guard_trim_handler;
        ngx_http_deepseek_guard_trim_ev.log = cycle->log;
        ngx_http_deepseek_guard_trim_ev.data = mcf;
        ngx_http_deepseek_guard_trim_ev.cancelable = 1;

        ngx_add_timer(&ngx_http_deepseek_guard_trim_ev, mcf->malloc_trim);
    }
#else
    (void) mcf;
#endif

    if (ngx_http_deepseek_guard_fleet_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_deepseek_guard_cache_init_process(cycle);
}


static char *
ngx_http_deepseek_guard_malloc_trim(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_deepseek_guard_main_conf_t *mcf = conf;

    ngx_str_t   *value;
    ngx_msec_t   interval;

    if (mcf->malloc_trim != NGX_CONF_UNSET_MSEC) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        mcf->malloc_trim = 0;
        return NGX_CONF_OK;
    }

    interval = ngx_parse_time(&value[1], 0);

    if (interval == (ngx_msec_t) NGX_ERROR || interval == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid interval \"%V\": \"off\" or a time "
                           "over 0 expected", &value[1]);
        return NGX_CONF_ERROR;
    }

#if (NGX_HAVE_MALLOC_TRIM)
    mcf->malloc_trim = interval;
    return NGX_CONF_OK;
#else
    return "is not supported on this platform (no malloc_trim())";
#endif
}


static void
ngx_http_deepseek_guard_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_deepseek_guard_fleet_exit_process(cycle);
    ngx_http_deepseek_guard_cache_exit_process(cycle);
    ngx_http_deepseek_guard_sha_free();
}


static void *
ngx_http_deepseek_guard_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_deepseek_guard_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&mcf->classes, cf->pool, 4,
                       sizeof(ngx_http_deepseek_guard_class_t))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_array_init(&mcf->zones, cf->pool, 4, sizeof(ngx_shm_zone_t *))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_array_init(&mcf->caches, cf->pool, 2,
                       sizeof(ngx_http_deepseek_guard_cache_t *))
        != NGX_OK)
    {
        return NULL;
    }

    mcf->malloc_trim = NGX_CONF_UNSET_MSEC;

    return mcf;
}


static char *
ngx_http_deepseek_guard_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_deepseek_guard_main_conf_t *mcf = conf;

    ngx_http_deepseek_guard_class_t  *c;

    ngx_conf_init_msec_value(mcf->malloc_trim, 0);

    if (mcf->classes.nelts == 0) {
        /* no classes declared: one implicit class that never queues */
        c = ngx_array_push(&mcf->classes);
        if (c == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(c, sizeof(ngx_http_deepseek_guard_class_t));
        ngx_str_set(&c->name, "default");
    }

    if (ngx_http_deepseek_guard_limit_init_main(cf, mcf) != NGX_OK
        || ngx_http_deepseek_guard_fleet_init_main(cf, mcf) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_deepseek_guard_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_deepseek_guard_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_deepseek_guard_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->zones = NULL;
     *     conf->classify = NULL;
     *     conf->default_class = { 0, NULL };
     */

    conf->default_index = NGX_CONF_UNSET_UINT;
    conf->dry_run = NGX_CONF_UNSET;
    conf->ratelimit_headers = NGX_CONF_UNSET;
    conf->openai_headers = NGX_CONF_UNSET;
    conf->stream_usage = NGX_CONF_UNSET;
    conf->log_level = NGX_CONF_UNSET_UINT;
    conf->metrics = NGX_CONF_UNSET;
    conf->cache_key = NULL;
    conf->cache_valid = NULL;
    conf->cache_bypass = NGX_CONF_UNSET_PTR;
    conf->lock_timeout = NGX_CONF_UNSET_MSEC;
    conf->max_entry_size = NGX_CONF_UNSET_SIZE;
    conf->json_canonical = NGX_CONF_UNSET;
    conf->credentials = NGX_CONF_UNSET_UINT;

    return conf;
}


static char *
ngx_http_deepseek_guard_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_deepseek_guard_loc_conf_t *prev = parent;
    ngx_http_deepseek_guard_loc_conf_t *conf = child;

    ngx_uint_t                            i;
    ngx_shm_zone_t                      **zones;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    if (conf->zones == NULL) {
        conf->zones = prev->zones;
        conf->zfile = prev->zfile;
        conf->zline = prev->zline;
    }

    if (conf->zones) {
        zones = conf->zones->elts;

        for (i = 0; i < conf->zones->nelts; i++) {
            if (zones[i]->data == NULL) {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "deepseek_guard: unknown zone \"%V\" in %s:%ui",
                              &zones[i]->shm.name, conf->zfile, conf->zline);
                return NGX_CONF_ERROR;
            }

            if (((ngx_http_deepseek_guard_zone_t *) zones[i]->data)->tokens) {
                conf->tokens = 1;
            }
        }
    }

    if (conf->classify == NULL) {
        conf->classify = prev->classify;
        conf->classify_index = prev->classify_index;
        conf->class_keys = prev->class_keys;
        conf->default_class = prev->default_class;
        conf->file = prev->file;
        conf->line = prev->line;
    }

    ngx_conf_merge_value(conf->dry_run, prev->dry_run, 0);
    ngx_conf_merge_value(conf->ratelimit_headers, prev->ratelimit_headers, 0);
    ngx_conf_merge_value(conf->openai_headers, prev->openai_headers, 0);
    ngx_conf_merge_value(conf->stream_usage, prev->stream_usage, 0);
    ngx_conf_merge_uint_value(conf->log_level, prev->log_level, NGX_LOG_WARN);
    ngx_conf_merge_value(conf->metrics, prev->metrics, 0);

    ngx_conf_merge_ptr_value(conf->cache_bypass, prev->cache_bypass, NULL);

    if (ngx_http_deepseek_guard_cache_merge(cf, prev, conf) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_deepseek_guard_module);
    c = mcf->classes.elts;

    if (conf->class_keys && !conf->class_keys->resolved
        && ngx_http_deepseek_guard_resolve_keys(cf, mcf, conf->class_keys)
           != NGX_CONF_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (conf->default_class.len == 0) {
        /* without a default, unknown values go to the lowest class */
        conf->default_index = mcf->classes.nelts - 1;
        return NGX_CONF_OK;
    }

    for (i = 0; i < mcf->classes.nelts; i++) {
        if (c[i].name.len == conf->default_class.len
            && ngx_strncasecmp(c[i].name.data, conf->default_class.data,
                               c[i].name.len) == 0)
        {
            conf->default_index = i;
            return NGX_CONF_OK;
        }
    }

    ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                  "deepseek_guard_classify: undeclared class \"%V\" "
                  "in %s:%ui", &conf->default_class, conf->file, conf->line);

    return NGX_CONF_ERROR;
}


/*
 * deepseek_guard_class <name> [reserve=<N>%] [queue=<N>] [queue_timeout=<t>];
 * classes are ordered by declaration, the first one is the highest
 */

static char *
ngx_http_deepseek_guard_class(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_deepseek_guard_main_conf_t *mcf = conf;

    size_t                            len;
    ngx_int_t                         n;
    ngx_str_t                        *value, s;
    ngx_uint_t                        i, k, sum;
    ngx_http_deepseek_guard_class_t  *c;

    value = cf->args->elts;

    if (ngx_http_deepseek_guard_check_name(cf, &value[1], "class")
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    c = mcf->classes.elts;
    for (i = 0; i < mcf->classes.nelts; i++) {
        if (c[i].name.len == value[1].len
            && ngx_strncmp(c[i].name.data, value[1].data, value[1].len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "class \"%V\" is duplicate", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    if (mcf->classes.nelts >= DSG_MAX_CLASSES) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many classes, at most %d are supported",
                           DSG_MAX_CLASSES);
        return NGX_CONF_ERROR;
    }

    c = ngx_array_push(&mcf->classes);
    if (c == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(c, sizeof(ngx_http_deepseek_guard_class_t));
    c->name = value[1];
    c->queue_timeout = 10000;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "reserve=", 8) == 0) {
            len = value[i].len - 8;
            if (len > 0 && value[i].data[value[i].len - 1] == '%') {
                len--;
            }

            n = ngx_atoi(value[i].data + 8, len);
            if (n == NGX_ERROR || n > 99) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid reserve \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            c->reserve = (uint32_t) n;

            /* the lowest class must keep a share */
            for (sum = 0, k = 0; k < mcf->classes.nelts; k++) {
                sum += ((ngx_http_deepseek_guard_class_t *)
                        mcf->classes.elts)[k].reserve;
            }

            if (sum > 99) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "reserved shares of all classes add up to "
                                   "%ui%%, must be less than 100%%", sum);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "queue=", 6) == 0) {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (n == NGX_ERROR || n > 65535) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid queue size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            c->queue = (uint32_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "queue_timeout=", 14) == 0) {
            s.data = value[i].data + 14;
            s.len = value[i].len - 14;

            n = ngx_parse_time(&s, 0);
            if (n == NGX_ERROR || n == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid queue_timeout \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            c->queue_timeout = (ngx_msec_t) n;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* deepseek_guard_classify <value> [default=<class>]; */

static char *
ngx_http_deepseek_guard_classify(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    ngx_str_t                         *value;
    ngx_http_compile_complex_value_t   ccv;

    if (lcf->classify != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    lcf->classify = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
    if (lcf->classify == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = lcf->classify;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    lcf->classify_index = ngx_http_deepseek_guard_lone_variable(cf,
                                                            lcf->classify);

    if (cf->args->nelts == 3) {
        if (ngx_strncmp(value[2].data, "default=", 8) != 0
            || value[2].len == 8)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }

        lcf->default_class.data = value[2].data + 8;
        lcf->default_class.len = value[2].len - 8;
    }

    lcf->file = cf->conf_file->file.name.data;
    lcf->line = cf->conf_file->line;

    return NGX_CONF_OK;
}


/*
 * deepseek_guard_classify_keys <value> [default=<class>] {
 *     <key> <class>;
 *     default <class>;
 *     include <file>;
 * }
 *
 * The class of a request from a table of exact values (API keys): the bytes
 * as they are, no lowercasing, no regular expression.  Looked up by XXH3-64
 * in a sorted array, the whole value compared: a fraction of what a map
 * costs (docs/directives.md).
 */

static char *
ngx_http_deepseek_guard_classify_keys(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    char                                  *rv;
    ngx_uint_t                             i;
    ngx_conf_t                             save;
    ngx_http_deepseek_guard_class_key_t   *k;
    ngx_http_deepseek_guard_class_keys_t  *ck;

    if (lcf->classify != NULL) {
        return "is duplicate";
    }

    /* the value and default= as deepseek_guard_classify takes them */
    rv = ngx_http_deepseek_guard_classify(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    ck = ngx_pcalloc(cf->pool, sizeof(ngx_http_deepseek_guard_class_keys_t));
    if (ck == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_array_init(&ck->keys, cf->pool, 16,
                       sizeof(ngx_http_deepseek_guard_class_key_t))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    lcf->class_keys = ck;

    save = *cf;
    cf->handler = ngx_http_deepseek_guard_class_key;
    cf->handler_conf = conf;

    rv = ngx_conf_parse(cf, NULL);

    *cf = save;

    if (rv != NGX_CONF_OK) {
        return rv;
    }

    if (ck->keys.nelts == 0) {
        return "has no keys";
    }

    ngx_qsort(ck->keys.elts, ck->keys.nelts,
              sizeof(ngx_http_deepseek_guard_class_key_t),
              ngx_http_deepseek_guard_cmp_keys);

    k = ck->keys.elts;

    for (i = 1; i < ck->keys.nelts; i++) {
        if (k[i].hash == k[i - 1].hash
            && k[i].key.len == k[i - 1].key.len
            && ngx_memcmp(k[i].key.data, k[i - 1].key.data, k[i].key.len)
               == 0)
        {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_classify_keys: duplicate key "
                          "\"%V\" in %s:%ui, first in %s:%ui",
                          &k[i].key, k[i].file, k[i].line,
                          k[i - 1].file, k[i - 1].line);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


/* one line inside deepseek_guard_classify_keys { } */

static char *
ngx_http_deepseek_guard_class_key(ngx_conf_t *cf, ngx_command_t *dummy,
    void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    ngx_str_t                            *value;
    ngx_http_deepseek_guard_class_key_t  *k;

    value = cf->args->elts;

    if (cf->args->nelts == 2
        && value[0].len == 7 && ngx_strncmp(value[0].data, "include", 7) == 0)
    {
        return ngx_conf_include(cf, dummy, conf);
    }

    if (cf->args->nelts != 2) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid number of parameters in "
                           "deepseek_guard_classify_keys, "
                           "\"<key> <class>;\" expected");
        return NGX_CONF_ERROR;
    }

    if (value[0].len == 7 && ngx_strncmp(value[0].data, "default", 7) == 0) {
        if (lcf->default_class.len) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "deepseek_guard_classify_keys: "
                               "duplicate default");
            return NGX_CONF_ERROR;
        }

        lcf->default_class = value[1];
        lcf->file = cf->conf_file->file.name.data;
        lcf->line = cf->conf_file->line;
        return NGX_CONF_OK;
    }

    if (value[0].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "deepseek_guard_classify_keys: empty key "
                           "(an empty value always has the default class)");
        return NGX_CONF_ERROR;
    }

    k = ngx_array_push(&lcf->class_keys->keys);
    if (k == NULL) {
        return NGX_CONF_ERROR;
    }

    k->hash = XXH3_64bits(value[0].data, value[0].len);
    k->key = value[0];
    k->name = value[1];
    k->index = 0;
    k->file = cf->conf_file->file.name.data;
    k->line = cf->conf_file->line;

    return NGX_CONF_OK;
}


static int ngx_libc_cdecl
ngx_http_deepseek_guard_cmp_keys(const void *one, const void *two)
{
    const ngx_http_deepseek_guard_class_key_t  *a = one, *b = two;

    if (a->hash != b->hash) {
        return a->hash < b->hash ? -1 : 1;
    }

    if (a->key.len != b->key.len) {
        return a->key.len < b->key.len ? -1 : 1;
    }

    return ngx_memcmp(a->key.data, b->key.data, a->key.len);
}


/* the class names of a key table, once every class is declared */

static char *
ngx_http_deepseek_guard_resolve_keys(ngx_conf_t *cf,
    ngx_http_deepseek_guard_main_conf_t *mcf,
    ngx_http_deepseek_guard_class_keys_t *ck)
{
    ngx_uint_t                            i, j;
    ngx_http_deepseek_guard_class_t      *c;
    ngx_http_deepseek_guard_class_key_t  *k;

    c = mcf->classes.elts;
    k = ck->keys.elts;

    for (i = 0; i < ck->keys.nelts; i++) {

        for (j = 0; j < mcf->classes.nelts; j++) {
            if (c[j].name.len == k[i].name.len
                && ngx_strncasecmp(c[j].name.data, k[i].name.data,
                                   c[j].name.len) == 0)
            {
                break;
            }
        }

        if (j == mcf->classes.nelts) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_classify_keys: undeclared class "
                          "\"%V\" in %s:%ui", &k[i].name, k[i].file,
                          k[i].line);
            return NGX_CONF_ERROR;
        }

        k[i].index = j;
    }

    ck->resolved = 1;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_preconf(ngx_conf_t *cf)
{
    return ngx_http_deepseek_guard_add_variables(cf);
}


static ngx_int_t
ngx_http_deepseek_guard_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_deepseek_guard_access_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_deepseek_guard_precontent_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_deepseek_guard_log_handler;

    /* the cache's capture filters, then the token budgets' (run first) */
    if (ngx_http_deepseek_guard_cache_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_deepseek_guard_tokens_init(cf);
}
