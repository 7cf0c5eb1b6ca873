/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * What every part of the glue uses: name checks, the wall clock, header
 * lists, the one park/resume helper of waiting requests, and the set of
 * dead workers' pids.
 */


#include "ngx_http_deepseek_guard_module.h"

/* the park timer's period while requests are parked */
#define NGX_HTTP_DSG_PARK_MS  3


static void ngx_http_deepseek_guard_park_handler(ngx_event_t *ev);
static void ngx_http_deepseek_guard_deadline_handler(ngx_event_t *ev);


/* parked requests the timer asks, and sleeping ones it does not */
static ngx_queue_t  ngx_http_deepseek_guard_parked;
static ngx_queue_t  ngx_http_deepseek_guard_sleeping;
static ngx_uint_t   ngx_http_deepseek_guard_nparked;
static ngx_uint_t   ngx_http_deepseek_guard_nsleeping;
static ngx_event_t  ngx_http_deepseek_guard_park_ev;
static ngx_http_deepseek_guard_pickup_pt  ngx_http_deepseek_guard_pickup_h;

/* this worker, as queue records name their owner (with its pid) */
uint32_t    ngx_http_deepseek_guard_owner;

/* queue wait histogram upper bounds, in ms (metrics) */

ngx_msec_t  ngx_http_deepseek_guard_wait_bounds[]
    = { 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 10000 };


/* wall clock ms: entries outlive the process, so not ngx_current_msec */

uint64_t
ngx_http_deepseek_guard_now_ms(void)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    return (uint64_t) tp->sec * 1000 + tp->msec;
}


/*
 * The elements of a header list one by one: *part starts at the list's
 * first part and *i at 0; NULL after the last.
 */

ngx_table_elt_t *
ngx_http_deepseek_guard_header_next(ngx_list_part_t **part, ngx_uint_t *i)
{
    while (*i >= (*part)->nelts) {
        if ((*part)->next == NULL) {
            return NULL;
        }

        *part = (*part)->next;
        *i = 0;
    }

    return (ngx_table_elt_t *) (*part)->elts + (*i)++;
}


/*
 * Zone, class and cache names go into JSON bodies, RateLimit headers and
 * Prometheus labels as they are: restricted to characters none of these
 * has to escape.
 */

ngx_int_t
ngx_http_deepseek_guard_check_name(ngx_conf_t *cf, ngx_str_t *name,
    const char *what)
{
    u_char      c;
    ngx_uint_t  i;

    for (i = 0; i < name->len; i++) {
        c = name->data[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.')
        {
            continue;
        }

        break;
    }

    if (name->len == 0 || name->len > 64 || i < name->len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid %s name \"%V\": 1 to 64 letters, "
                           "digits, \"_\", \"-\" or \".\"", what, name);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * The "name:size" of a shared zone: value is the whole argument (for the
 * messages), skip the length of a prefix such as "keys_zone=".
 */

char *
ngx_http_deepseek_guard_parse_zone(ngx_conf_t *cf, ngx_str_t *value,
    size_t skip, const char *what, ngx_str_t *name, ssize_t *size)
{
    u_char     *p;
    ngx_str_t   s;

    name->data = value->data + skip;

    p = (u_char *) ngx_strchr(name->data, ':');
    if (p == NULL || p == name->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid %s \"%V\", expected <name>:<size>",
                           what, value);
        return NGX_CONF_ERROR;
    }

    name->len = p - name->data;

    if (ngx_http_deepseek_guard_check_name(cf, name, what) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    s.data = p + 1;
    s.len = value->data + value->len - s.data;

    *size = ngx_parse_size(&s);
    if (*size == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid %s size \"%V\"", what, value);
        return NGX_CONF_ERROR;
    }

    if (*size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is too small", value);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * The worker's parked requests, one list and one timer for both reasons a
 * request waits: the park timer asks each one's resume handler whether it
 * can go on.  Capacity freed or a fill lock released in this worker wakes
 * the timer at once; what other workers free is seen at the next tick.
 *
 * A queue waiter that is not the head of its key's queue sleeps: the
 * timer does not ask it (asking every waiter on every tick costs
 * O(waiters) per tick, for nothing but one answer).  It is roused by the
 * pickup, which the timer runs while some sleep and which finds the
 * waiters that became heads in shared memory, or by its deadline.
 */

void
ngx_http_deepseek_guard_park_init(ngx_cycle_t *cycle,
    ngx_http_deepseek_guard_pickup_pt pickup)
{
    ngx_queue_init(&ngx_http_deepseek_guard_parked);
    ngx_queue_init(&ngx_http_deepseek_guard_sleeping);
    ngx_http_deepseek_guard_nparked = 0;
    ngx_http_deepseek_guard_nsleeping = 0;
    ngx_http_deepseek_guard_pickup_h = pickup;
    ngx_http_deepseek_guard_owner = (uint32_t) ngx_random()
                                    ^ (uint32_t) ngx_current_msec;

    ngx_http_deepseek_guard_park_ev.handler =
                                       ngx_http_deepseek_guard_park_handler;
    ngx_http_deepseek_guard_park_ev.log = cycle->log;
    ngx_http_deepseek_guard_park_ev.data = &ngx_http_deepseek_guard_park_ev;

    /*
     * not cancelable: a worker shutting down gracefully (reload) exits as
     * soon as only cancelable timers are left; the worker must stay until
     * its parked requests go on or time out.  The timer is armed only
     * while some are parked, so an idle worker still exits at once.
     */

    ngx_http_deepseek_guard_park_ev.cancelable = 0;
}


void
ngx_http_deepseek_guard_park(ngx_http_deepseek_guard_park_t *p,
    ngx_http_request_t *r, ngx_http_deepseek_guard_resume_pt resume)
{
    p->request = r;
    p->resume = resume;

    if (!p->parked) {
        p->parked = 1;
        p->sleeping = 0;
        ngx_queue_insert_tail(&ngx_http_deepseek_guard_parked, &p->link);
        ngx_http_deepseek_guard_nparked++;
    }

    /* a client that goes away finalizes the request: its cleanup unparks */

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    ngx_http_deepseek_guard_wake(NGX_HTTP_DSG_PARK_MS);
}


/* the timer stops asking p until it is roused */

void
ngx_http_deepseek_guard_park_sleep(ngx_http_deepseek_guard_park_t *p)
{
    if (!p->parked || p->sleeping) {
        return;
    }

    p->sleeping = 1;
    ngx_queue_remove(&p->link);
    ngx_queue_insert_tail(&ngx_http_deepseek_guard_sleeping, &p->link);
    ngx_http_deepseek_guard_nsleeping++;
}


void
ngx_http_deepseek_guard_park_rouse(ngx_http_deepseek_guard_park_t *p)
{
    if (!p->parked || !p->sleeping) {
        return;
    }

    p->sleeping = 0;
    ngx_queue_remove(&p->link);
    ngx_queue_insert_tail(&ngx_http_deepseek_guard_parked, &p->link);
    ngx_http_deepseek_guard_nsleeping--;

    ngx_http_deepseek_guard_wake(0);
}


/* rouses p after ms, asleep or not, so that its resume sees its deadline */

void
ngx_http_deepseek_guard_park_deadline(ngx_http_deepseek_guard_park_t *p,
    ngx_msec_t ms)
{
    p->deadline.handler = ngx_http_deepseek_guard_deadline_handler;
    p->deadline.data = p;
    p->deadline.log = p->request->connection->log;

    ngx_add_timer(&p->deadline, ms);
}


static void
ngx_http_deepseek_guard_deadline_handler(ngx_event_t *ev)
{
    ngx_http_deepseek_guard_park_rouse(ev->data);
}


void
ngx_http_deepseek_guard_unpark(ngx_http_deepseek_guard_park_t *p)
{
    if (p->deadline.timer_set) {
        ngx_del_timer(&p->deadline);
    }

    if (!p->parked) {
        return;
    }

    if (p->sleeping) {
        p->sleeping = 0;
        ngx_http_deepseek_guard_nsleeping--;
    }

    p->parked = 0;
    ngx_queue_remove(&p->link);
    ngx_http_deepseek_guard_nparked--;
}


/* runs the park timer within delay ms, unless it runs sooner anyway */

void
ngx_http_deepseek_guard_wake(ngx_msec_t delay)
{
    ngx_event_t  *ev;

    if (ngx_http_deepseek_guard_nparked == 0) {
        return;
    }

    ev = &ngx_http_deepseek_guard_park_ev;

    if (ev->timer_set && ev->timer.key <= ngx_current_msec + delay) {
        return;
    }

    if (ev->timer_set) {
        ngx_del_timer(ev);
    }

    ngx_add_timer(ev, delay);
}


static void
ngx_http_deepseek_guard_park_handler(ngx_event_t *ev)
{
    ngx_int_t                        rc;
    ngx_queue_t                     *q, *next;
    ngx_connection_t                *c;
    ngx_http_request_t              *r;
    ngx_http_deepseek_guard_park_t  *p;

    if (ngx_http_deepseek_guard_nsleeping && ngx_http_deepseek_guard_pickup_h) {
        ngx_http_deepseek_guard_pickup_h((ngx_cycle_t *) ngx_cycle);
    }

    for (q = ngx_queue_head(&ngx_http_deepseek_guard_parked);
         q != ngx_queue_sentinel(&ngx_http_deepseek_guard_parked);
         q = next)
    {
        next = ngx_queue_next(q);
        p = ngx_queue_data(q, ngx_http_deepseek_guard_park_t, link);
        r = p->request;
        c = r->connection;

        rc = p->resume(r);

        if (rc == NGX_AGAIN) {
            continue;
        }

        ngx_http_deepseek_guard_unpark(p);

        if (rc == NGX_OK) {
            r->read_event_handler = ngx_http_block_reading;
            r->write_event_handler = ngx_http_core_run_phases;
            ngx_http_core_run_phases(r);
        }

        ngx_http_run_posted_requests(c);
    }

    ngx_http_deepseek_guard_wake(NGX_HTTP_DSG_PARK_MS);
}


/*
 * The pids that hold something in shared memory (leases, queue places,
 * fill locks), each once, this worker's left out: gathered under a zone's
 * mutex into an array of the reaper's own pool, then checked without it.
 */

ngx_int_t
ngx_http_deepseek_guard_pid_add(ngx_array_t *pids, ngx_pid_t pid)
{
    ngx_pid_t  *p;

    if (pid == 0 || pid == ngx_pid
        || ngx_http_deepseek_guard_pid_in(pids, pid))
    {
        return NGX_OK;
    }

    p = ngx_array_push(pids);
    if (p == NULL) {
        return NGX_ERROR;
    }

    *p = pid;

    return NGX_OK;
}


/* the pid's place in the set, from 1; 0: not in it */

ngx_uint_t
ngx_http_deepseek_guard_pid_in(ngx_array_t *pids, ngx_pid_t pid)
{
    ngx_uint_t   i;
    ngx_pid_t   *p;

    p = pids->elts;

    for (i = 0; i < pids->nelts; i++) {
        if (p[i] == pid) {
            return i + 1;
        }
    }

    return 0;
}


/* keeps the pids of processes that no longer exist */

void
ngx_http_deepseek_guard_pids_dead(ngx_array_t *pids)
{
    ngx_uint_t   i, n;
    ngx_pid_t   *p;

    p = pids->elts;
    n = 0;

    for (i = 0; i < pids->nelts; i++) {
        if (kill(p[i], 0) == -1 && ngx_errno == NGX_ESRCH) {
            p[n++] = p[i];
        }
    }

    pids->nelts = n;
}


/*
 * The index of the variable a complex value consists of, when it is that
 * variable alone ("$name"); NGX_ERROR for anything else (text around it,
 * several variables, a capture, "${name}").
 */

ngx_int_t
ngx_http_deepseek_guard_lone_variable(ngx_conf_t *cf,
    ngx_http_complex_value_t *cv)
{
    u_char      ch;
    ngx_str_t   name;
    ngx_uint_t  i;

    if (cv->lengths == NULL || cv->value.len < 2
        || cv->value.data[0] != '$')
    {
        return NGX_ERROR;
    }

    name.data = cv->value.data + 1;
    name.len = cv->value.len - 1;

    if (name.data[0] >= '0' && name.data[0] <= '9') {
        return NGX_ERROR;
    }

    for (i = 0; i < name.len; i++) {
        ch = name.data[i];

        if ((ch >= 'A' && ch <= 'Z')
            || (ch >= 'a' && ch <= 'z')
            || (ch >= '0' && ch <= '9')
            || ch == '_')
        {
            continue;
        }

        return NGX_ERROR;
    }

    return ngx_http_get_variable_index(cf, &name);
}


/*
 * What ngx_http_complex_value() computes, without its script run and its
 * copy when the value is a lone variable (index from lone_variable()): the
 * variable flushed if it is not cacheable, then read; not found is empty.
 * The value points into the variable's own memory.
 */

ngx_int_t
ngx_http_deepseek_guard_value(ngx_http_request_t *r,
    ngx_http_complex_value_t *cv, ngx_int_t index, ngx_str_t *value)
{
    ngx_http_variable_value_t  *vv;

    if (index == NGX_ERROR) {
        return ngx_http_complex_value(r, cv, value);
    }

    vv = ngx_http_get_flushed_variable(r, index);

    if (vv == NULL || vv->not_found) {
        ngx_str_null(value);
        return NGX_OK;
    }

    value->data = vv->data;
    value->len = vv->len;

    return NGX_OK;
}


/*
 * n in decimal, what ngx_sprintf(p, "%uL", n) writes, without its format
 * walk: the request path's numbers (Retry-After, retry-after-ms)
 */

u_char *
ngx_http_deepseek_guard_uint(u_char *p, uint64_t n)
{
    u_char    *end;
    uint64_t   m;

    end = p + 1;

    for (m = n; m >= 10; m /= 10) {
        end++;
    }

    p = end;

    do {
        *--p = (u_char) ('0' + n % 10);
        n /= 10;
    } while (n);

    return end;
}


/* a response header whose name and value outlive the request's headers */

ngx_int_t
ngx_http_deepseek_guard_add_header(ngx_http_request_t *r, ngx_str_t *name,
    u_char *value, size_t len)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = *name;
    h->value.data = value;
    h->value.len = len;
#if (nginx_version >= 1023000)
    h->next = NULL;
#endif

    return NGX_OK;
}
