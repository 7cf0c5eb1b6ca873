/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The metrics endpoint: every zone's and cache's counters in the
 * Prometheus text format or as JSON.  What each one means, and alert
 * rules: docs/metrics.md.
 */


#include "ngx_http_deepseek_guard_module.h"


/*
 * The metrics endpoint, "deepseek_guard_metrics;" in a location: a content
 * handler, as stub_status, that serves the counters of every zone and cache
 * of the http block in the Prometheus text exposition format 0.0.4, or the
 * same numbers as JSON with "?format=json" or "Accept: application/json"
 * ("?format=prometheus" forces the text format).  Every metric, its labels
 * and the alert rules: docs/metrics.md (t/90-docs.t checks it against a
 * live exposition).
 *
 * Every number lives in shared memory: the counters add up all workers and
 * survive "nginx -s reload" with their zone.  They are read without the
 * zone's lock, one atomic word at a time, so a scrape is not a snapshot of
 * a single instant, but every counter is monotonic from scrape to scrape.
 */


typedef struct {
    u_char                      *pos;      /* NULL: only measuring */
    u_char                      *end;
    size_t                       size;
} ngx_http_deepseek_guard_out_t;


typedef struct {
    ngx_str_t                    name;
    size_t                       offset;
    char                        *type;     /* cache metrics: gauge, counter */
    char                        *help;
} ngx_http_deepseek_guard_field_t;


static ngx_uint_t ngx_http_deepseek_guard_metrics_json(ngx_http_request_t *r);
static void ngx_http_deepseek_guard_text(ngx_http_deepseek_guard_out_t *o,
    ngx_http_deepseek_guard_main_conf_t *mcf);
static void ngx_http_deepseek_guard_json(ngx_http_deepseek_guard_out_t *o,
    ngx_http_deepseek_guard_main_conf_t *mcf);
static void ngx_http_deepseek_guard_fleet_text(
    ngx_http_deepseek_guard_out_t *o, ngx_http_deepseek_guard_main_conf_t *mcf);
static void ngx_http_deepseek_guard_out(ngx_http_deepseek_guard_out_t *o,
    u_char *s, size_t len);
static void ngx_http_deepseek_guard_out_num(ngx_http_deepseek_guard_out_t *o,
    uint64_t n);
static void ngx_http_deepseek_guard_out_value(
    ngx_http_deepseek_guard_out_t *o, uint64_t n);
static void ngx_http_deepseek_guard_out_secs(ngx_http_deepseek_guard_out_t *o,
    uint64_t ms);
static u_char *ngx_http_deepseek_guard_secs(u_char *p, uint64_t ms);
static void ngx_http_deepseek_guard_out_esc(ngx_http_deepseek_guard_out_t *o,
    ngx_str_t *s, ngx_uint_t json);
static void ngx_http_deepseek_guard_family(ngx_http_deepseek_guard_out_t *o,
    char *name, char *type, char *help);
static void ngx_http_deepseek_guard_tokens_text(
    ngx_http_deepseek_guard_out_t *o,
    ngx_http_deepseek_guard_main_conf_t *mcf);
static void ngx_http_deepseek_guard_series(ngx_http_deepseek_guard_out_t *o,
    char *name, char *key, ngx_str_t *val, ngx_str_t *cls, char *lname,
    ngx_str_t *lval);


#define ngx_http_deepseek_guard_read(base, off)                              \
    (*(ngx_atomic_t *) ((u_char *) (base) + (off)))

#define ngx_http_deepseek_guard_out_lit(o, s)                                \
    ngx_http_deepseek_guard_out(o, (u_char *) s, sizeof(s) - 1)

#define ngx_http_deepseek_guard_out_cstr(o, s)                               \
    ngx_http_deepseek_guard_out(o, (u_char *) (s), ngx_strlen((s)))


static ngx_http_deepseek_guard_field_t  ngx_http_deepseek_guard_decisions[] = {

    { ngx_string("admitted"),
      offsetof(ngx_http_deepseek_guard_counters_t, admitted), NULL, NULL },

    { ngx_string("queued"),
      offsetof(ngx_http_deepseek_guard_counters_t, queued), NULL, NULL },

    { ngx_string("rejected_429"),
      offsetof(ngx_http_deepseek_guard_counters_t, rejected_429),
      NULL, NULL },

    { ngx_string("rejected_503"),
      offsetof(ngx_http_deepseek_guard_counters_t, rejected_503),
      NULL, NULL },

    { ngx_string("rejected_other"),
      offsetof(ngx_http_deepseek_guard_counters_t, rejected_other),
      NULL, NULL },

    { ngx_string("dry_run"),
      offsetof(ngx_http_deepseek_guard_counters_t, dry_run), NULL, NULL },

    { ngx_string("queue_timeout"),
      offsetof(ngx_http_deepseek_guard_counters_t, timeouts), NULL, NULL },

    { ngx_null_string, 0, NULL, NULL }
};


/* tokens= zones: deepseek_guard_tokens_total{kind} */
static ngx_http_deepseek_guard_field_t  ngx_http_deepseek_guard_token_kinds[] = {

    { ngx_string("reserved"),
      offsetof(ngx_http_deepseek_guard_counters_t, tokens_reserved),
      NULL, NULL },

    { ngx_string("refunded"),
      offsetof(ngx_http_deepseek_guard_counters_t, tokens_refunded),
      NULL, NULL },

    { ngx_string("charged"),
      offsetof(ngx_http_deepseek_guard_counters_t, tokens_charged),
      NULL, NULL },

    { ngx_string("used"),
      offsetof(ngx_http_deepseek_guard_counters_t, tokens_used), NULL, NULL },

    { ngx_null_string, 0, NULL, NULL }
};


/* the estimate error histogram's bounds, actual / estimated prompt */
static char  *ngx_http_deepseek_guard_est_le[] = {
    "0.5", "0.8", "0.9", "1.1", "1.25", "2", "4", "+Inf"
};


static ngx_http_deepseek_guard_field_t  ngx_http_deepseek_guard_lookups[] = {

    { ngx_string("hit"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, hits), NULL, NULL },

    { ngx_string("miss"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, misses), NULL, NULL },

    { ngx_string("expired"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, expired), NULL, NULL },

    { ngx_string("stale"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, stale), NULL, NULL },

    { ngx_string("coalesced"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, coalesced), NULL, NULL },

    { ngx_string("bypass"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, bypass), NULL, NULL },

    { ngx_null_string, 0, NULL, NULL }
};


/* the cache's other numbers: deepseek_guard_cache_<name> */

/* deepseek_guard_fleet: the node's agent, labelled with the redis address */
static ngx_http_deepseek_guard_field_t  ngx_http_deepseek_guard_fleet_nums[] = {

    { ngx_string("up"),
      offsetof(ngx_http_deepseek_guard_fleet_sh_t, up), "gauge",
      "1: fleet zones admit against their fleet share; 0: Redis cannot be "
      "reached, they use their static share." },

    { ngx_string("fallbacks_total"),
      offsetof(ngx_http_deepseek_guard_fleet_sh_t, fallbacks), "counter",
      "Times the node fell back to the static share." },

    { ngx_string("syncs_total"),
      offsetof(ngx_http_deepseek_guard_fleet_sh_t, syncs), "counter",
      "Syncs with Redis answered in full." },

    { ngx_string("errors_total"),
      offsetof(ngx_http_deepseek_guard_fleet_sh_t, errors), "counter",
      "Syncs or connections that failed (refused, timed out, error "
      "replies)." },

    { ngx_string("commands_total"),
      offsetof(ngx_http_deepseek_guard_fleet_sh_t, commands), "counter",
      "Redis commands sent by the node's agent." },

    { ngx_null_string, 0, NULL, NULL }
};


/* fleet=on zones: the node's share as of its last sync */
static ngx_http_deepseek_guard_field_t  ngx_http_deepseek_guard_share_nums[] = {

    { ngx_string("share_requests"),
      offsetof(ngx_http_deepseek_guard_shctx_t, fleet_requests), "gauge",
      "Requests the node holds of the fleet's rate, granted not spent." },

    { ngx_string("share_slots"),
      offsetof(ngx_http_deepseek_guard_shctx_t, fleet_slots), "gauge",
      "In-flight slots the node holds of the fleet's cap." },

    { ngx_string("demand_requests"),
      offsetof(ngx_http_deepseek_guard_shctx_t, fleet_demand), "gauge",
      "Requests the node asked the fleet for in its last sync." },

    { ngx_string("keys"),
      offsetof(ngx_http_deepseek_guard_shctx_t, fleet_keys), "gauge",
      "Keys synced in the last sync." },

    { ngx_null_string, 0, NULL, NULL }
};


static ngx_http_deepseek_guard_field_t  ngx_http_deepseek_guard_cache_nums[] = {

    { ngx_string("stores_total"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, stores), "counter",
      "Responses stored in the cache." },

    { ngx_string("store_failures_total"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, store_failures),
      "counter",
      "Responses that could not be stored (map full, LMDB errors)." },

    { ngx_string("thread_stores_total"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, thread_stores),
      "counter",
      "Of stores_total, those written by the thread pool (threads=)." },

    { ngx_string("not_cacheable_total"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, not_cacheable),
      "counter",
      "Responses of misses not stored: status, Cache-Control, Set-Cookie, "
      "size, incomplete stream." },

    { ngx_string("evictions_total"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, evictions), "counter",
      "Entries removed to make room (max_size)." },

    { ngx_string("expirations_total"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, expirations), "counter",
      "Expired entries removed after inactive." },

    { ngx_string("recreated_total"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, recreated), "counter",
      "Cache data files found corrupt or incompatible and recreated." },

    { ngx_string("entries"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, entries), "gauge",
      "Entries in the cache (refreshed every second)." },

    { ngx_string("bytes"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, bytes), "gauge",
      "Bytes of the live entries (refreshed every second)." },

    { ngx_string("file_bytes"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, file_bytes), "gauge",
      "Used extent of the data file (refreshed every second)." },

    { ngx_string("capacity_bytes"),
      offsetof(ngx_http_deepseek_guard_cache_sh_t, capacity), "gauge",
      "Map size of the cache, max_size (refreshed every second)." },

    { ngx_null_string, 0, NULL, NULL }
};


static ngx_str_t  ngx_http_deepseek_guard_codes[] = {
    ngx_string("1xx"),
    ngx_string("2xx"),
    ngx_string("3xx"),
    ngx_string("4xx"),
    ngx_string("5xx")
};


/* deepseek_guard_metrics; */

char *
ngx_http_deepseek_guard_metrics(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_deepseek_guard_loc_conf_t *lcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    if (lcf->metrics != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    lcf->metrics = 1;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_deepseek_guard_metrics_handler;

    return NGX_CONF_OK;
}


/* also the status page's ?format= (ngx_http_deepseek_guard_status.c) */

ngx_int_t
ngx_http_deepseek_guard_metrics_handler(ngx_http_request_t *r)
{
    ngx_int_t                             rc;
    ngx_buf_t                            *b;
    ngx_uint_t                            json;
    ngx_chain_t                           out;
    ngx_http_deepseek_guard_out_t         o;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_deepseek_guard_module);
    json = ngx_http_deepseek_guard_metrics_json(r);

    /*
     * the size first, every number at its widest: a counter that grows
     * before the second pass still fits
     */

    ngx_memzero(&o, sizeof(ngx_http_deepseek_guard_out_t));

    if (json) {
        ngx_http_deepseek_guard_json(&o, mcf);

    } else {
        ngx_http_deepseek_guard_text(&o, mcf);
    }

    b = ngx_create_temp_buf(r->pool, o.size + 1);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    o.pos = b->last;
    o.end = b->end;

    if (json) {
        ngx_http_deepseek_guard_json(&o, mcf);
        ngx_str_set(&r->headers_out.content_type, "application/json");

    } else {
        ngx_http_deepseek_guard_text(&o, mcf);
        ngx_str_set(&r->headers_out.content_type,
                    "text/plain; version=0.0.4; charset=utf-8");
    }

    b->last = o.pos;

    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;

    if (b->last == b->pos) {
        /* no zone and no cache: an empty exposition */
        r->header_only = 1;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* ?format=json|prometheus, else Accept: application/json */

static ngx_uint_t
ngx_http_deepseek_guard_metrics_json(ngx_http_request_t *r)
{
    ngx_str_t         v;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    if (ngx_http_arg(r, (u_char *) "format", 6, &v) == NGX_OK) {
        return (v.len == 4
                && ngx_strncasecmp(v.data, (u_char *) "json", 4) == 0);
    }

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == sizeof("Accept") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "Accept",
                               sizeof("Accept") - 1) == 0
            && ngx_strlcasestrn(h[i].value.data,
                                h[i].value.data + h[i].value.len,
                                (u_char *) "application/json",
                                sizeof("application/json") - 2)
               != NULL)
        {
            return 1;
        }
    }

    return 0;
}


/* the token budgets' families, where a zone has one (tokens=) */

static void
ngx_http_deepseek_guard_tokens_text(ngx_http_deepseek_guard_out_t *o,
    ngx_http_deepseek_guard_main_conf_t *mcf)
{
    uint64_t                          sum;
    ngx_str_t                         le;
    ngx_uint_t                        i, k, b, any;
    ngx_shm_zone_t                  **zones;
    ngx_http_deepseek_guard_zone_t   *z;
    ngx_http_deepseek_guard_class_t  *cls;
    ngx_http_deepseek_guard_field_t  *f;

    zones = mcf->zones.elts;
    cls = mcf->classes.elts;
    any = 0;

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;
        any |= (z->tokens != 0);
    }

    if (!any) {
        return;
    }

    ngx_http_deepseek_guard_family(o, "deepseek_guard_tokens_total",
        "counter",
        "Tokens of the token budgets by zone, class and kind: reserved at "
        "admission, refunded and charged at settlement, used as settled.");

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        if (z->tokens == 0) {
            continue;
        }

        for (k = 0; k < mcf->classes.nelts; k++) {
            for (f = ngx_http_deepseek_guard_token_kinds; f->name.len; f++) {
                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_tokens_total", "zone",
                    &zones[i]->shm.name, &cls[k].name, "kind", &f->name);
                ngx_http_deepseek_guard_out_value(o,
                    ngx_http_deepseek_guard_read(&z->sh->counters[k],
                                                 f->offset));
            }
        }
    }

    ngx_http_deepseek_guard_family(o,
        "deepseek_guard_tokens_rejected_total", "counter",
        "Requests refused by a token budget (also in requests_total).");

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        if (z->tokens == 0) {
            continue;
        }

        for (k = 0; k < mcf->classes.nelts; k++) {
            ngx_http_deepseek_guard_series(o,
                "deepseek_guard_tokens_rejected_total", "zone",
                &zones[i]->shm.name, &cls[k].name, NULL, NULL);
            ngx_http_deepseek_guard_out_value(o,
                                       z->sh->counters[k].tokens_rejected);
        }
    }

    ngx_http_deepseek_guard_family(o,
        "deepseek_guard_tokens_estimate_ratio", "histogram",
        "The upstream's prompt tokens over the prompt estimate, per "
        "settled request with usage.");

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        if (z->tokens == 0) {
            continue;
        }

        sum = 0;

        for (b = 0; b <= NGX_HTTP_DSG_EST_BUCKETS; b++) {
            sum += z->sh->tokens_est[b];
            le.data = (u_char *) ngx_http_deepseek_guard_est_le[b];
            le.len = ngx_strlen(le.data);

            ngx_http_deepseek_guard_series(o,
                "deepseek_guard_tokens_estimate_ratio_bucket", "zone",
                &zones[i]->shm.name, NULL, "le", &le);
            ngx_http_deepseek_guard_out_value(o, sum);
        }

        /* permille shown with 3 decimals, as the seconds are */
        ngx_http_deepseek_guard_series(o,
            "deepseek_guard_tokens_estimate_ratio_sum", "zone",
            &zones[i]->shm.name, NULL, NULL, NULL);
        ngx_http_deepseek_guard_out_secs(o, z->sh->tokens_est_sum);
        ngx_http_deepseek_guard_out_lit(o, "\n");

        ngx_http_deepseek_guard_series(o,
            "deepseek_guard_tokens_estimate_ratio_count", "zone",
            &zones[i]->shm.name, NULL, NULL, NULL);
        ngx_http_deepseek_guard_out_value(o, sum);
    }

    ngx_http_deepseek_guard_family(o,
        "deepseek_guard_tokens_estimate_correction", "gauge",
        "The prompt estimator's learned factor (1: the byte weights as "
        "they are).");

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        if (z->tokens == 0) {
            continue;
        }

        ngx_http_deepseek_guard_series(o,
            "deepseek_guard_tokens_estimate_correction", "zone",
            &zones[i]->shm.name, NULL, NULL, NULL);
        /* ppm shown with 3 decimals, as the seconds are */
        ngx_http_deepseek_guard_out_secs(o, z->sh->tokens_ratio
                                            ? z->sh->tokens_ratio / 1000
                                            : 1000);
        ngx_http_deepseek_guard_out_lit(o, "\n");
    }
}


/* the Prometheus text exposition format, version 0.0.4 */

static void
ngx_http_deepseek_guard_text(ngx_http_deepseek_guard_out_t *o,
    ngx_http_deepseek_guard_main_conf_t *mcf)
{
    u_char                                buf[NGX_INT64_LEN + 8];
    uint64_t                              n, sum;
    ngx_str_t                            *zname, le;
    ngx_uint_t                            i, k, b, ncls;
    ngx_shm_zone_t                      **zones;
    ngx_http_deepseek_guard_zone_t       *z;
    ngx_http_deepseek_guard_cache_t     **caches, *c;
    ngx_http_deepseek_guard_class_t      *cls;
    ngx_http_deepseek_guard_field_t      *f;
    ngx_http_deepseek_guard_counters_t   *cnt;

    zones = mcf->zones.elts;
    cls = mcf->classes.elts;
    ncls = mcf->classes.nelts;

    if (mcf->zones.nelts) {

        ngx_http_deepseek_guard_family(o, "deepseek_guard_requests_total",
            "counter",
            "Admission decisions by zone, class and decision.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;
            zname = &zones[i]->shm.name;

            for (k = 0; k < ncls; k++) {
                for (f = ngx_http_deepseek_guard_decisions; f->name.len; f++)
                {
                    ngx_http_deepseek_guard_series(o,
                        "deepseek_guard_requests_total", "zone", zname,
                        &cls[k].name, "decision", &f->name);
                    ngx_http_deepseek_guard_out_value(o,
                        ngx_http_deepseek_guard_read(&z->sh->counters[k],
                                                     f->offset));
                }
            }
        }

        ngx_http_deepseek_guard_family(o, "deepseek_guard_inflight", "gauge",
            "Admitted requests not finished yet.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;

            for (k = 0; k < ncls; k++) {
                ngx_http_deepseek_guard_series(o, "deepseek_guard_inflight",
                    "zone", &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_value(o,
                                          z->sh->counters[k].inflight);
            }
        }

        ngx_http_deepseek_guard_family(o, "deepseek_guard_queue_depth",
            "gauge", "Requests waiting in the queue now.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;

            for (k = 0; k < ncls; k++) {
                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_queue_depth", "zone",
                    &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_value(o, z->sh->counters[k].depth);
            }
        }

        ngx_http_deepseek_guard_family(o, "deepseek_guard_queue_capacity",
            "gauge", "Waiter places of the class in the zone (queue=).");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;

            for (k = 0; k < ncls; k++) {
                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_queue_capacity", "zone",
                    &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_value(o,
                    z->status == NGX_HTTP_TOO_MANY_REQUESTS ? 0
                                                            : cls[k].queue);
            }
        }

        ngx_http_deepseek_guard_family(o, "deepseek_guard_queue_wait_seconds",
            "histogram",
            "Time spent in the queue by requests that left it.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;

            for (k = 0; k < ncls; k++) {
                cnt = &z->sh->counters[k];
                sum = 0;

                for (b = 0; b <= NGX_HTTP_DSG_WAIT_BUCKETS; b++) {
                    sum += cnt->wait_bucket[b];

                    if (b < NGX_HTTP_DSG_WAIT_BUCKETS) {
                        le.data = buf;
                        le.len = ngx_http_deepseek_guard_secs(buf,
                                     ngx_http_deepseek_guard_wait_bounds[b])
                                 - buf;

                    } else {
                        ngx_str_set(&le, "+Inf");
                    }

                    ngx_http_deepseek_guard_series(o,
                        "deepseek_guard_queue_wait_seconds_bucket", "zone",
                        &zones[i]->shm.name, &cls[k].name, "le", &le);
                    ngx_http_deepseek_guard_out_value(o, sum);
                }

                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_queue_wait_seconds_sum", "zone",
                    &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_secs(o, cnt->wait_sum_ms);
                ngx_http_deepseek_guard_out_lit(o, "\n");

                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_queue_wait_seconds_count", "zone",
                    &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_value(o, sum);
            }
        }

        ngx_http_deepseek_guard_family(o, "deepseek_guard_retry_after_seconds",
            "summary",
            "Waits announced in rejections (Retry-After, retry-after-ms).");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;

            for (k = 0; k < ncls; k++) {
                cnt = &z->sh->counters[k];

                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_retry_after_seconds_sum", "zone",
                    &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_secs(o, cnt->retry_sum_ms);
                ngx_http_deepseek_guard_out_lit(o, "\n");

                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_retry_after_seconds_count", "zone",
                    &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_value(o, cnt->retry_count);
            }
        }

        ngx_http_deepseek_guard_family(o,
            "deepseek_guard_retry_after_last_seconds", "gauge",
            "The wait announced in the latest rejection, 0 if none yet.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;

            for (k = 0; k < ncls; k++) {
                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_retry_after_last_seconds", "zone",
                    &zones[i]->shm.name, &cls[k].name, NULL, NULL);
                ngx_http_deepseek_guard_out_secs(o,
                                           z->sh->counters[k].retry_last_ms);
                ngx_http_deepseek_guard_out_lit(o, "\n");
            }
        }

        ngx_http_deepseek_guard_tokens_text(o, mcf);

        ngx_http_deepseek_guard_family(o, "deepseek_guard_zone_keys",
            "gauge", "Keys tracked in the zone.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;
            ngx_http_deepseek_guard_series(o, "deepseek_guard_zone_keys",
                "zone", &zones[i]->shm.name, NULL, NULL, NULL);
            ngx_http_deepseek_guard_out_value(o,
                                        *(volatile ngx_uint_t *) &z->sh->nodes);
        }

        ngx_http_deepseek_guard_family(o,
            "deepseek_guard_zone_evictions_total", "counter",
            "Idle keys evicted from the zone to make room for new keys.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;
            ngx_http_deepseek_guard_series(o,
                "deepseek_guard_zone_evictions_total", "zone",
                &zones[i]->shm.name, NULL, NULL, NULL);
            ngx_http_deepseek_guard_out_value(o,
                                      *(volatile ngx_uint_t *) &z->sh->evicted);
        }

        ngx_http_deepseek_guard_family(o, "deepseek_guard_zone_reaped_total",
            "counter",
            "In-flight slots and queue places freed after a worker died.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;
            ngx_http_deepseek_guard_series(o,
                "deepseek_guard_zone_reaped_total", "zone",
                &zones[i]->shm.name, NULL, NULL, NULL);
            ngx_http_deepseek_guard_out_value(o,
                                       *(volatile ngx_uint_t *) &z->sh->reaped);
        }

        ngx_http_deepseek_guard_family(o,
            "deepseek_guard_zone_inflight_limit", "gauge",
            "The zone's in-flight cap (inflight=), 0 if none.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;
            ngx_http_deepseek_guard_series(o,
                "deepseek_guard_zone_inflight_limit", "zone",
                &zones[i]->shm.name, NULL, NULL, NULL);
            ngx_http_deepseek_guard_out_value(o, z->inflight);
        }

        ngx_http_deepseek_guard_family(o, "deepseek_guard_responses_total",
            "counter",
            "Responses by status class of the requests of locations that "
            "apply the zone.");

        for (i = 0; i < mcf->zones.nelts; i++) {
            z = zones[i]->data;

            for (k = 0; k < 5; k++) {
                ngx_http_deepseek_guard_series(o,
                    "deepseek_guard_responses_total", "zone",
                    &zones[i]->shm.name, NULL, "code",
                    &ngx_http_deepseek_guard_codes[k]);
                ngx_http_deepseek_guard_out_value(o, z->sh->responses[k]);
            }
        }
    }

    ngx_http_deepseek_guard_fleet_text(o, mcf);

    if (mcf->caches.nelts == 0) {
        return;
    }

    caches = mcf->caches.elts;

    ngx_http_deepseek_guard_family(o, "deepseek_guard_cache_requests_total",
        "counter", "Cache lookups by outcome.");

    for (i = 0; i < mcf->caches.nelts; i++) {
        c = caches[i];

        for (f = ngx_http_deepseek_guard_lookups; f->name.len; f++) {
            ngx_http_deepseek_guard_series(o,
                "deepseek_guard_cache_requests_total", "cache", &c->name,
                NULL, "status", &f->name);
            n = c->sh ? ngx_http_deepseek_guard_read(c->sh, f->offset) : 0;
            ngx_http_deepseek_guard_out_value(o, n);
        }
    }

    for (f = ngx_http_deepseek_guard_cache_nums; f->name.len; f++) {
        ngx_http_deepseek_guard_out_lit(o, "# HELP deepseek_guard_cache_");
        ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
        ngx_http_deepseek_guard_out_lit(o, " ");
        ngx_http_deepseek_guard_out_cstr(o, f->help);
        ngx_http_deepseek_guard_out_lit(o, "\n# TYPE deepseek_guard_cache_");
        ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
        ngx_http_deepseek_guard_out_lit(o, " ");
        ngx_http_deepseek_guard_out_cstr(o, f->type);
        ngx_http_deepseek_guard_out_lit(o, "\n");

        for (i = 0; i < mcf->caches.nelts; i++) {
            c = caches[i];

            ngx_http_deepseek_guard_out_lit(o, "deepseek_guard_cache_");
            ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
            ngx_http_deepseek_guard_out_lit(o, "{cache=\"");
            ngx_http_deepseek_guard_out_esc(o, &c->name, 0);
            ngx_http_deepseek_guard_out_lit(o, "\"} ");
            n = c->sh ? ngx_http_deepseek_guard_read(c->sh, f->offset) : 0;
            ngx_http_deepseek_guard_out_value(o, n);
        }
    }
}


/* the same numbers as JSON */

static void
ngx_http_deepseek_guard_fleet_text(ngx_http_deepseek_guard_out_t *o,
    ngx_http_deepseek_guard_main_conf_t *mcf)
{
    u_char                            name[64], *p;
    ngx_uint_t                        i;
    ngx_http_deepseek_guard_zone_t  **zp, *z;
    ngx_http_deepseek_guard_field_t  *f;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = mcf->fleet;

    if (fleet == NULL || fleet->zones.nelts == 0) {
        return;
    }

    for (f = ngx_http_deepseek_guard_fleet_nums; f->name.len; f++) {
        p = ngx_sprintf(name, "deepseek_guard_fleet_%V%Z", &f->name);
        ngx_http_deepseek_guard_family(o, (char *) name, f->type, f->help);
        ngx_http_deepseek_guard_series(o, (char *) name, "redis",
                                       &fleet->addr.name, NULL, NULL, NULL);
        ngx_http_deepseek_guard_out_value(o,
                               ngx_http_deepseek_guard_read(fleet->sh,
                                                            f->offset));
        (void) p;
    }

    ngx_http_deepseek_guard_family(o, "deepseek_guard_fleet_sync_seconds",
        "summary", "Round trips of the syncs with Redis.");

    ngx_http_deepseek_guard_series(o, "deepseek_guard_fleet_sync_seconds_sum",
                                   "redis", &fleet->addr.name, NULL, NULL,
                                   NULL);
    ngx_http_deepseek_guard_out_secs(o, fleet->sh->rtt_sum_ms);
    ngx_http_deepseek_guard_out_lit(o, "\n");

    ngx_http_deepseek_guard_series(o,
                                   "deepseek_guard_fleet_sync_seconds_count",
                                   "redis", &fleet->addr.name, NULL, NULL,
                                   NULL);
    ngx_http_deepseek_guard_out_value(o, fleet->sh->rtt_count);

    zp = fleet->zones.elts;

    for (f = ngx_http_deepseek_guard_share_nums; f->name.len; f++) {
        p = ngx_sprintf(name, "deepseek_guard_fleet_%V%Z", &f->name);
        ngx_http_deepseek_guard_family(o, (char *) name, f->type, f->help);

        for (i = 0; i < fleet->zones.nelts; i++) {
            z = zp[i];
            ngx_http_deepseek_guard_series(o, (char *) name, "zone",
                                           &z->shm_zone->shm.name, NULL,
                                           NULL, NULL);
            ngx_http_deepseek_guard_out_value(o,
                                   ngx_http_deepseek_guard_read(z->sh,
                                                                f->offset));
        }
    }
}


static void
ngx_http_deepseek_guard_json(ngx_http_deepseek_guard_out_t *o,
    ngx_http_deepseek_guard_main_conf_t *mcf)
{
    uint64_t                              sum;
    ngx_uint_t                            i, k, b, ncls;
    ngx_shm_zone_t                      **zones;
    ngx_http_deepseek_guard_zone_t       *z;
    ngx_http_deepseek_guard_cache_t     **caches, *c;
    ngx_http_deepseek_guard_class_t      *cls;
    ngx_http_deepseek_guard_field_t      *f;
    ngx_http_deepseek_guard_counters_t   *cnt;
    ngx_http_deepseek_guard_zone_t      **zp;
    ngx_http_deepseek_guard_fleet_t      *fleet;

    zones = mcf->zones.elts;
    cls = mcf->classes.elts;
    ncls = mcf->classes.nelts;

    ngx_http_deepseek_guard_out_lit(o, "{\"zones\":[");

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        ngx_http_deepseek_guard_out_cstr(o, i ? ",{\"zone\":\""
                                              : "{\"zone\":\"");
        ngx_http_deepseek_guard_out_esc(o, &zones[i]->shm.name, 1);
        ngx_http_deepseek_guard_out_lit(o, "\",\"keys\":");
        ngx_http_deepseek_guard_out_num(o,
                                        *(volatile ngx_uint_t *) &z->sh->nodes);
        ngx_http_deepseek_guard_out_lit(o, ",\"evictions\":");
        ngx_http_deepseek_guard_out_num(o,
                                      *(volatile ngx_uint_t *) &z->sh->evicted);
        ngx_http_deepseek_guard_out_lit(o, ",\"reaped\":");
        ngx_http_deepseek_guard_out_num(o,
                                       *(volatile ngx_uint_t *) &z->sh->reaped);
        ngx_http_deepseek_guard_out_lit(o, ",\"inflight_limit\":");
        ngx_http_deepseek_guard_out_num(o, z->inflight);
        ngx_http_deepseek_guard_out_lit(o, ",\"responses\":{");

        for (k = 0; k < 5; k++) {
            ngx_http_deepseek_guard_out_cstr(o, k ? ",\"" : "\"");
            ngx_http_deepseek_guard_out(o,
                                        ngx_http_deepseek_guard_codes[k].data,
                                        ngx_http_deepseek_guard_codes[k].len);
            ngx_http_deepseek_guard_out_lit(o, "\":");
            ngx_http_deepseek_guard_out_num(o, z->sh->responses[k]);
        }

        ngx_http_deepseek_guard_out_lit(o, "},\"classes\":[");

        for (k = 0; k < ncls; k++) {
            cnt = &z->sh->counters[k];

            ngx_http_deepseek_guard_out_cstr(o, k ? ",{\"class\":\""
                                                 : "{\"class\":\"");
            ngx_http_deepseek_guard_out_esc(o, &cls[k].name, 1);
            ngx_http_deepseek_guard_out_lit(o, "\",\"requests\":{");

            for (f = ngx_http_deepseek_guard_decisions; f->name.len; f++) {
                ngx_http_deepseek_guard_out_cstr(o,
                    f == ngx_http_deepseek_guard_decisions ? "\"" : ",\"");
                ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
                ngx_http_deepseek_guard_out_lit(o, "\":");
                ngx_http_deepseek_guard_out_num(o,
                             ngx_http_deepseek_guard_read(cnt, f->offset));
            }

            ngx_http_deepseek_guard_out_lit(o, "},\"inflight\":");
            ngx_http_deepseek_guard_out_num(o, cnt->inflight);
            ngx_http_deepseek_guard_out_lit(o, ",\"queue_depth\":");
            ngx_http_deepseek_guard_out_num(o, cnt->depth);
            ngx_http_deepseek_guard_out_lit(o, ",\"queue_capacity\":");
            ngx_http_deepseek_guard_out_num(o,
                    z->status == NGX_HTTP_TOO_MANY_REQUESTS ? 0
                                                            : cls[k].queue);

            /* the buckets first: count is their total, as in the text */

            ngx_http_deepseek_guard_out_lit(o,
                                         ",\"queue_wait\":{\"buckets\":{");

            sum = 0;

            for (b = 0; b <= NGX_HTTP_DSG_WAIT_BUCKETS; b++) {
                sum += cnt->wait_bucket[b];

                ngx_http_deepseek_guard_out_cstr(o, b ? ",\"" : "\"");

                if (b < NGX_HTTP_DSG_WAIT_BUCKETS) {
                    ngx_http_deepseek_guard_out_secs(o,
                                    ngx_http_deepseek_guard_wait_bounds[b]);

                } else {
                    ngx_http_deepseek_guard_out_lit(o, "+Inf");
                }

                ngx_http_deepseek_guard_out_lit(o, "\":");
                ngx_http_deepseek_guard_out_num(o, sum);
            }

            ngx_http_deepseek_guard_out_lit(o, "},\"count\":");
            ngx_http_deepseek_guard_out_num(o, sum);
            ngx_http_deepseek_guard_out_lit(o, ",\"sum_seconds\":");
            ngx_http_deepseek_guard_out_secs(o, cnt->wait_sum_ms);

            ngx_http_deepseek_guard_out_lit(o,
                                         "},\"retry_after\":{\"count\":");
            ngx_http_deepseek_guard_out_num(o, cnt->retry_count);
            ngx_http_deepseek_guard_out_lit(o, ",\"sum_seconds\":");
            ngx_http_deepseek_guard_out_secs(o, cnt->retry_sum_ms);
            ngx_http_deepseek_guard_out_lit(o, ",\"last_seconds\":");
            ngx_http_deepseek_guard_out_secs(o, cnt->retry_last_ms);
            ngx_http_deepseek_guard_out_lit(o, "}}");
        }

        ngx_http_deepseek_guard_out_lit(o, "]}");
    }

    ngx_http_deepseek_guard_out_lit(o, "],\"caches\":[");

    caches = mcf->caches.elts;

    for (i = 0; i < mcf->caches.nelts; i++) {
        c = caches[i];

        ngx_http_deepseek_guard_out_cstr(o, i ? ",{\"cache\":\""
                                             : "{\"cache\":\"");
        ngx_http_deepseek_guard_out_esc(o, &c->name, 1);
        ngx_http_deepseek_guard_out_lit(o, "\",\"requests\":{");

        for (f = ngx_http_deepseek_guard_lookups; f->name.len; f++) {
            ngx_http_deepseek_guard_out_cstr(o,
                    f == ngx_http_deepseek_guard_lookups ? "\"" : ",\"");
            ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
            ngx_http_deepseek_guard_out_lit(o, "\":");
            ngx_http_deepseek_guard_out_num(o, c->sh
                         ? ngx_http_deepseek_guard_read(c->sh, f->offset) : 0);
        }

        ngx_http_deepseek_guard_out_lit(o, "}");

        /* JSON names without "_total" */

        for (f = ngx_http_deepseek_guard_cache_nums; f->name.len; f++) {
            ngx_http_deepseek_guard_out_lit(o, ",\"");

            if (f->name.len > 6
                && ngx_strcmp(f->name.data + f->name.len - 6, "_total") == 0)
            {
                ngx_http_deepseek_guard_out(o, f->name.data,
                                            f->name.len - 6);

            } else {
                ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
            }

            ngx_http_deepseek_guard_out_lit(o, "\":");
            ngx_http_deepseek_guard_out_num(o, c->sh
                         ? ngx_http_deepseek_guard_read(c->sh, f->offset) : 0);
        }

        ngx_http_deepseek_guard_out_lit(o, "}");
    }

    ngx_http_deepseek_guard_out_lit(o, "]");

    fleet = mcf->fleet;

    if (fleet && fleet->zones.nelts) {
        ngx_http_deepseek_guard_out_lit(o, ",\"fleet\":{\"redis\":\"");
        ngx_http_deepseek_guard_out_esc(o, &fleet->addr.name, 1);
        ngx_http_deepseek_guard_out_lit(o, "\"");

        for (f = ngx_http_deepseek_guard_fleet_nums; f->name.len; f++) {
            ngx_http_deepseek_guard_out_lit(o, ",\"");
            ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
            ngx_http_deepseek_guard_out_lit(o, "\":");
            ngx_http_deepseek_guard_out_num(o,
                       ngx_http_deepseek_guard_read(fleet->sh, f->offset));
        }

        ngx_http_deepseek_guard_out_lit(o, ",\"sync_ms_sum\":");
        ngx_http_deepseek_guard_out_num(o, fleet->sh->rtt_sum_ms);
        ngx_http_deepseek_guard_out_lit(o, ",\"sync_count\":");
        ngx_http_deepseek_guard_out_num(o, fleet->sh->rtt_count);
        ngx_http_deepseek_guard_out_lit(o, ",\"zones\":[");

        zp = fleet->zones.elts;

        for (i = 0; i < fleet->zones.nelts; i++) {
            z = zp[i];
            ngx_http_deepseek_guard_out_cstr(o, i ? ",{\"zone\":\""
                                                  : "{\"zone\":\"");
            ngx_http_deepseek_guard_out_esc(o, &z->shm_zone->shm.name, 1);
            ngx_http_deepseek_guard_out_lit(o, "\"");

            for (f = ngx_http_deepseek_guard_share_nums; f->name.len; f++) {
                ngx_http_deepseek_guard_out_lit(o, ",\"");
                ngx_http_deepseek_guard_out(o, f->name.data, f->name.len);
                ngx_http_deepseek_guard_out_lit(o, "\":");
                ngx_http_deepseek_guard_out_num(o,
                               ngx_http_deepseek_guard_read(z->sh, f->offset));
            }

            ngx_http_deepseek_guard_out_lit(o, "}");
        }

        ngx_http_deepseek_guard_out_lit(o, "]}");
    }

    ngx_http_deepseek_guard_out_lit(o, "}\n");
}


static void
ngx_http_deepseek_guard_out(ngx_http_deepseek_guard_out_t *o, u_char *s,
    size_t len)
{
    if (o->pos == NULL) {
        o->size += len;
        return;
    }

    /* cannot happen: the first pass measured every number at its widest */
    len = ngx_min(len, (size_t) (o->end - o->pos));

    o->pos = ngx_cpymem(o->pos, s, len);
}


static void
ngx_http_deepseek_guard_out_num(ngx_http_deepseek_guard_out_t *o, uint64_t n)
{
    u_char  buf[NGX_INT64_LEN];

    if (o->pos == NULL) {
        o->size += NGX_INT64_LEN;
        return;
    }

    ngx_http_deepseek_guard_out(o, buf, ngx_sprintf(buf, "%uL", n) - buf);
}


/* the value that ends a sample line */

static void
ngx_http_deepseek_guard_out_value(ngx_http_deepseek_guard_out_t *o,
    uint64_t n)
{
    ngx_http_deepseek_guard_out_num(o, n);
    ngx_http_deepseek_guard_out_lit(o, "\n");
}


/* milliseconds as seconds: 5 -> 0.005, 250 -> 0.25, 1000 -> 1 */

static void
ngx_http_deepseek_guard_out_secs(ngx_http_deepseek_guard_out_t *o,
    uint64_t ms)
{
    u_char  buf[NGX_INT64_LEN + 8];

    if (o->pos == NULL) {
        o->size += NGX_INT64_LEN + 4;
        return;
    }

    ngx_http_deepseek_guard_out(o, buf,
                                ngx_http_deepseek_guard_secs(buf, ms) - buf);
}


static u_char *
ngx_http_deepseek_guard_secs(u_char *p, uint64_t ms)
{
    p = ngx_sprintf(p, "%uL", ms / 1000);

    if (ms % 1000) {
        p = ngx_sprintf(p, ".%03uL", ms % 1000);

        while (p[-1] == '0') {
            p--;
        }
    }

    return p;
}


/*
 * a label value (\\, \" and \n escaped) or the contents of a JSON string
 * (control characters escaped too)
 */

static void
ngx_http_deepseek_guard_out_esc(ngx_http_deepseek_guard_out_t *o,
    ngx_str_t *s, ngx_uint_t json)
{
    u_char      c, buf[6];
    size_t      len;
    ngx_uint_t  i;

    static u_char  hex[] = "0123456789abcdef";

    for (i = 0; i < s->len; i++) {
        c = s->data[i];

        if (c == '\\' || c == '"') {
            buf[0] = '\\';
            buf[1] = c;
            len = 2;

        } else if (c == '\n') {
            buf[0] = '\\';
            buf[1] = 'n';
            len = 2;

        } else if (json && c < 0x20) {
            buf[0] = '\\';
            buf[1] = 'u';
            buf[2] = '0';
            buf[3] = '0';
            buf[4] = hex[c >> 4];
            buf[5] = hex[c & 0xf];
            len = 6;

        } else {
            buf[0] = c;
            len = 1;
        }

        ngx_http_deepseek_guard_out(o, buf, len);
    }
}


static void
ngx_http_deepseek_guard_family(ngx_http_deepseek_guard_out_t *o, char *name,
    char *type, char *help)
{
    ngx_http_deepseek_guard_out_lit(o, "# HELP ");
    ngx_http_deepseek_guard_out_cstr(o, name);
    ngx_http_deepseek_guard_out_lit(o, " ");
    ngx_http_deepseek_guard_out_cstr(o, help);
    ngx_http_deepseek_guard_out_lit(o, "\n# TYPE ");
    ngx_http_deepseek_guard_out_cstr(o, name);
    ngx_http_deepseek_guard_out_lit(o, " ");
    ngx_http_deepseek_guard_out_cstr(o, type);
    ngx_http_deepseek_guard_out_lit(o, "\n");
}


/* name{key="val"[,class="cls"][,lname="lval"]} and a space */

static void
ngx_http_deepseek_guard_series(ngx_http_deepseek_guard_out_t *o, char *name,
    char *key, ngx_str_t *val, ngx_str_t *cls, char *lname, ngx_str_t *lval)
{
    ngx_http_deepseek_guard_out_cstr(o, name);
    ngx_http_deepseek_guard_out_lit(o, "{");
    ngx_http_deepseek_guard_out_cstr(o, key);
    ngx_http_deepseek_guard_out_lit(o, "=\"");
    ngx_http_deepseek_guard_out_esc(o, val, 0);
    ngx_http_deepseek_guard_out_lit(o, "\"");

    if (cls) {
        ngx_http_deepseek_guard_out_lit(o, ",class=\"");
        ngx_http_deepseek_guard_out_esc(o, cls, 0);
        ngx_http_deepseek_guard_out_lit(o, "\"");
    }

    if (lname) {
        ngx_http_deepseek_guard_out_lit(o, ",");
        ngx_http_deepseek_guard_out_cstr(o, lname);
        ngx_http_deepseek_guard_out_lit(o, "=\"");
        ngx_http_deepseek_guard_out_esc(o, lval, 0);
        ngx_http_deepseek_guard_out_lit(o, "\"");
    }

    ngx_http_deepseek_guard_out_lit(o, "} ");
}
