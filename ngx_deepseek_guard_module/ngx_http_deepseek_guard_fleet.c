/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Fleet zones (deepseek_guard_fleet, deepseek_guard_zone ... fleet=on):
 * the directive, the fleet's shared state and the agent, one worker per
 * node that syncs every fleet key's share with Redis every interval.
 *
 * Nothing on the request path talks to Redis: requests admit against the
 * share in shared memory (dsg_fleet.h), the agent refreshes it in the
 * background over one non-blocking nginx connection.  hiredis is only the
 * RESP codec: its reader parses the replies, its formatter writes the
 * commands.  The Redis side is one Lua script (below) run with EVAL, on
 * Redis's own clock.  The whole model, bounds and failure modes:
 * docs/fleet.md.
 */


#include "ngx_http_deepseek_guard_module.h"

#include <hiredis/hiredis.h>


#define NGX_HTTP_DSG_FLEET_BATCH   100     /* keys per EVAL */
#define NGX_HTTP_DSG_FLEET_READ    4096

#define NGX_HTTP_DSG_FLEET_AUTH    1
#define NGX_HTTP_DSG_FLEET_PING    2
#define NGX_HTTP_DSG_FLEET_EVAL    3


/* one command of a sync and what its reply is for */
typedef struct {
    ngx_uint_t                       kind;
    ngx_http_deepseek_guard_zone_t  *zone;
    ngx_uint_t                       nkeys;
    u_char                          *digests;    /* 12 bytes a key */
    dsg_fleet_ask_t                 *asks;
} ngx_http_deepseek_guard_cmd_t;


/* the agent, in the worker that was elected; one per process */
typedef struct {
    ngx_http_deepseek_guard_fleet_t  *fleet;
    ngx_event_t                      tick;
    ngx_log_t                        quiet;     /* for nginx's own messages */
    ngx_peer_connection_t            peer;
    ngx_connection_t                *c;
    ngx_uint_t                       connected;
    ngx_uint_t                       fresh;     /* no AUTH sent on it yet */
    ngx_uint_t                       agent;
    ngx_uint_t                       told;      /* the fallback was logged */
    redisReader                     *reader;
    ngx_pool_t                      *pool;      /* the sync in flight */
    ngx_array_t                      cmds;
    ngx_uint_t                       next;      /* the next reply's cmd */
    ngx_buf_t                       *out;
    ngx_msec_t                       sent;
    ngx_str_t                        node;
} ngx_http_deepseek_guard_agent_t;


static ngx_int_t ngx_http_deepseek_guard_fleet_init_shm(
    ngx_shm_zone_t *shm_zone, void *data);
static void ngx_http_deepseek_guard_fleet_tick(ngx_event_t *ev);
static ngx_uint_t ngx_http_deepseek_guard_fleet_elect(
    ngx_http_deepseek_guard_agent_t *a);
static ngx_int_t ngx_http_deepseek_guard_fleet_connect(
    ngx_http_deepseek_guard_agent_t *a);
static ngx_int_t ngx_http_deepseek_guard_fleet_sync(
    ngx_http_deepseek_guard_agent_t *a);
static ngx_int_t ngx_http_deepseek_guard_fleet_plan(
    ngx_http_deepseek_guard_agent_t *a, ngx_http_deepseek_guard_zone_t *z,
    ngx_array_t *strs);
static ngx_int_t ngx_http_deepseek_guard_fleet_format(
    ngx_http_deepseek_guard_agent_t *a, ngx_array_t *strs, int argc,
    const char **argv, const size_t *argvlen);
static void ngx_http_deepseek_guard_fleet_write(ngx_event_t *wev);
static void ngx_http_deepseek_guard_fleet_read(ngx_event_t *rev);
static ngx_int_t ngx_http_deepseek_guard_fleet_reply(
    ngx_http_deepseek_guard_agent_t *a, redisReply *reply);
static void ngx_http_deepseek_guard_fleet_apply(
    ngx_http_deepseek_guard_agent_t *a, ngx_http_deepseek_guard_cmd_t *cmd,
    redisReply *reply);
static void ngx_http_deepseek_guard_fleet_done(
    ngx_http_deepseek_guard_agent_t *a);
static void ngx_http_deepseek_guard_fleet_fail(
    ngx_http_deepseek_guard_agent_t *a, ngx_err_t err, const char *fmt,
    const char *detail);
static void ngx_http_deepseek_guard_fleet_close(
    ngx_http_deepseek_guard_agent_t *a);


static ngx_http_deepseek_guard_agent_t  ngx_http_deepseek_guard_agent;


/*
 * The Redis side, one key per KEYS entry (a hash: "ms" the last refill on
 * Redis's clock, "l<i>" tier i's level in units, "n:<node>" a node's
 * record "ms,held...,wanted...").
 *
 * ARGV: node, ttl ms, tiers, cost, capped, rated, then by tier (gain,
 * capacity, cap), then by key and tier (want, back, claim, wanted slots).
 * Returns by key and tier (granted units, held slots, fair share).
 *
 * Tokens: the buckets refill, what a node gives back is added to tiers
 * 0..i (nested as dsg_bucket.h's), then each tier's want is granted in
 * whole requests from the lowest level of tiers 0..i, the highest
 * priority tier first.  Slots: a node gets what it wants within what the
 * other nodes do not hold; if another node wants more than it holds, no
 * more than its fair share (cap in proportion to what each wants); never
 * less than its claim, which it may already be using.  Records of nodes
 * not heard of for ttl ms are dropped.
 */

static char  ngx_http_deepseek_guard_fleet_lua[] =
"local tm = redis.call('TIME')\n"
"local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)\n"
"local me, ttl = 'n:' .. ARGV[1], tonumber(ARGV[2])\n"
"local nt, cost = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
"local capped, rated = ARGV[5] == '1', ARGV[6] == '1'\n"
"local gain, capa, cap = {}, {}, {}\n"
"local a, life = 7, ttl\n"
"for i = 1, nt do\n"
"  gain[i], capa[i], cap[i] = tonumber(ARGV[a]), tonumber(ARGV[a + 1]),\n"
"                             tonumber(ARGV[a + 2])\n"
"  a = a + 3\n"
"  if rated and gain[i] > 0 then\n"
"    local f = math.ceil(capa[i] / gain[i])\n"
"    if f > life then life = f end\n"
"  end\n"
"end\n"
"local function num(x) return string.format('%.0f', x) end\n"
"local out = {}\n"
"for k = 1, #KEYS do\n"
"  local h = redis.call('HGETALL', KEYS[k])\n"
"  local m = {}\n"
"  for i = 1, #h, 2 do m[h[i]] = h[i + 1] end\n"
"  local want, back, claim, ws = {}, {}, {}, {}\n"
"  for i = 1, nt do\n"
"    want[i], back[i] = tonumber(ARGV[a]), tonumber(ARGV[a + 1])\n"
"    claim[i], ws[i] = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])\n"
"    a = a + 4\n"
"  end\n"
"  local set, got, held, fair = {}, {}, {}, {}\n"
"  if rated then\n"
"    local last = tonumber(m['ms']) or now\n"
"    local el = now - last\n"
"    if el < 0 then el = 0 end\n"
"    local lv = {}\n"
"    for i = 1, nt do\n"
"      local l = tonumber(m['l' .. i])\n"
"      if l == nil then l = capa[i] else l = math.min(capa[i], l + el * gain[i]) end\n"
"      lv[i] = l\n"
"    end\n"
"    for i = 1, nt do\n"
"      if back[i] > 0 then\n"
"        for j = 1, i do lv[j] = math.min(capa[j], lv[j] + back[i]) end\n"
"      end\n"
"    end\n"
"    for i = 1, nt do\n"
"      local av = lv[1]\n"
"      for j = 2, i do if lv[j] < av then av = lv[j] end end\n"
"      local g = math.min(want[i], math.floor(av / cost) * cost)\n"
"      if g < 0 then g = 0 end\n"
"      for j = 1, i do lv[j] = lv[j] - g end\n"
"      got[i] = g\n"
"    end\n"
"    set[#set + 1] = 'ms'\n"
"    set[#set + 1] = num(now)\n"
"    for i = 1, nt do\n"
"      set[#set + 1] = 'l' .. i\n"
"      set[#set + 1] = num(lv[i])\n"
"    end\n"
"  end\n"
"  if capped then\n"
"    local oh, ow, starved = {}, {}, {}\n"
"    for i = 1, nt do oh[i], ow[i], starved[i] = 0, 0, false end\n"
"    for f, v in pairs(m) do\n"
"      if string.sub(f, 1, 2) == 'n:' and f ~= me then\n"
"        local r = {}\n"
"        for x in string.gmatch(v, '[^,]+') do r[#r + 1] = tonumber(x) end\n"
"        if r[1] == nil or now - r[1] > ttl then\n"
"          redis.call('HDEL', KEYS[k], f)\n"
"        else\n"
"          for i = 1, nt do\n"
"            local hh, ww = r[1 + i] or 0, r[1 + nt + i] or 0\n"
"            oh[i], ow[i] = oh[i] + hh, ow[i] + ww\n"
"            if ww > hh then starved[i] = true end\n"
"          end\n"
"        end\n"
"      end\n"
"    end\n"
"    local rec = {num(now)}\n"
"    for i = 1, nt do\n"
"      local fs = cap[i]\n"
"      if starved[i] and ws[i] > 0 then\n"
"        fs = math.max(1, math.floor(cap[i] * ws[i] / (ws[i] + ow[i])))\n"
"      end\n"
"      local g = math.min(ws[i], cap[i] - oh[i], fs)\n"
"      if g < claim[i] then g = claim[i] end\n"
"      held[i], fair[i] = g, fs\n"
"      rec[1 + i] = num(g)\n"
"      rec[1 + nt + i] = num(ws[i])\n"
"    end\n"
"    set[#set + 1] = me\n"
"    set[#set + 1] = table.concat(rec, ',')\n"
"  end\n"
"  if #set > 0 then redis.call('HSET', KEYS[k], unpack(set)) end\n"
"  redis.call('PEXPIRE', KEYS[k], life + ttl)\n"
"  for i = 1, nt do\n"
"    out[#out + 1] = got[i] or 0\n"
"    out[#out + 1] = held[i] or 0\n"
"    out[#out + 1] = fair[i] or 0\n"
"  end\n"
"end\n"
"return out\n";


/*
 * deepseek_guard_fleet redis=<host>:<port> [password=<p>] [prefix=<p>]
 *     [interval=<time>] [nodes=<n>] [node=<name>];
 */

char *
ngx_http_deepseek_guard_fleet(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_deepseek_guard_main_conf_t  *mcf = conf;

    ngx_int_t                         n;
    ngx_str_t                        *value, s, name;
    ngx_url_t                         u;
    ngx_uint_t                        i;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    if (mcf->fleet) {
        return "is duplicate";
    }

    fleet = ngx_pcalloc(cf->pool, sizeof(ngx_http_deepseek_guard_fleet_t));
    if (fleet == NULL) {
        return NGX_CONF_ERROR;
    }

    fleet->interval = 100;
    fleet->nodes = 1;
    ngx_str_set(&fleet->prefix, "dsg");
    fleet->file = cf->conf_file->file.name.data;
    fleet->line = cf->conf_file->line;

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "redis=", 6) == 0) {
            ngx_memzero(&u, sizeof(ngx_url_t));
            u.url.data = value[i].data + 6;
            u.url.len = value[i].len - 6;
            u.default_port = 6379;

            if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid redis address \"%V\"%s%s",
                                   &u.url, u.err ? ": " : "",
                                   u.err ? u.err : "");
                return NGX_CONF_ERROR;
            }

            fleet->addr = u.addrs[0];
            continue;
        }

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            fleet->password.data = value[i].data + 9;
            fleet->password.len = value[i].len - 9;
            continue;
        }

        if (ngx_strncmp(value[i].data, "prefix=", 7) == 0) {
            fleet->prefix.data = value[i].data + 7;
            fleet->prefix.len = value[i].len - 7;

            if (ngx_http_deepseek_guard_check_name(cf, &fleet->prefix,
                                                   "prefix")
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "node=", 5) == 0) {
            fleet->node.data = value[i].data + 5;
            fleet->node.len = value[i].len - 5;

            if (ngx_http_deepseek_guard_check_name(cf, &fleet->node, "node")
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "interval=", 9) == 0) {
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            n = ngx_parse_time(&s, 0);
            if (n == NGX_ERROR || n < 10 || n > 60000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid interval \"%V\": from 10ms to "
                                   "60s", &s);
                return NGX_CONF_ERROR;
            }

            fleet->interval = (ngx_msec_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "nodes=", 6) == 0) {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (n == NGX_ERROR || n < 1 || n > 10000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid nodes \"%V\": from 1 to 10000",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            fleet->nodes = (ngx_uint_t) n;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (fleet->addr.sockaddr == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis=\" is required");
        return NGX_CONF_ERROR;
    }

    if (ngx_array_init(&fleet->zones, cf->pool, 4,
                       sizeof(ngx_http_deepseek_guard_zone_t *))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    ngx_str_set(&name, "deepseek_guard_fleet");

    fleet->shm_zone = ngx_shared_memory_add(cf, &name, 8 * ngx_pagesize,
                                            &ngx_http_deepseek_guard_module);
    if (fleet->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    fleet->shm_zone->init = ngx_http_deepseek_guard_fleet_init_shm;
    fleet->shm_zone->data = fleet;

    mcf->fleet = fleet;

    return NGX_CONF_OK;
}


/* the fleet zones, each with its fallback share; after the classes */

ngx_int_t
ngx_http_deepseek_guard_fleet_init_main(ngx_conf_t *cf,
    ngx_http_deepseek_guard_main_conf_t *mcf)
{
    int                                rc;
    uint32_t                           reserve[DSG_MAX_CLASSES];
    ngx_uint_t                         i, k, t;
    ngx_shm_zone_t                   **zones;
    ngx_http_deepseek_guard_zone_t    *z, **zp;
    ngx_http_deepseek_guard_class_t   *c;

    c = mcf->classes.elts;

    for (k = 0; k < mcf->classes.nelts; k++) {
        reserve[k] = c[k].reserve;
    }

    zones = mcf->zones.elts;

    for (i = 0; i < mcf->zones.nelts; i++) {
        z = zones[i]->data;

        if (!z->fleet_on) {
            continue;
        }

        if (mcf->fleet == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_zone \"%V\" is fleet=on but there "
                          "is no deepseek_guard_fleet in %s:%ui",
                          &zones[i]->shm.name, z->file, z->line);
            return NGX_ERROR;
        }

        /* Lua numbers are doubles: every level must be exact in one */

        for (t = 0; t < z->limit.ntiers; t++) {
            if (z->limit.capacity[t] + z->limit.cost
                + z->limit.gain[t] * mcf->fleet->interval
                >= (1ULL << 52))
            {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "deepseek_guard_zone \"%V\": rate and burst "
                              "too large for fleet=on in %s:%ui",
                              &zones[i]->shm.name, z->file, z->line);
                return NGX_ERROR;
            }
        }

        rc = dsg_fleet_fallback_conf(&z->fallback, &z->limit, reserve,
                                     (uint32_t) mcf->fleet->nodes);
        if (rc != DSG_OK) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "deepseek_guard_zone \"%V\": no static share for "
                          "nodes=%ui (the rate's period would exceed a day) "
                          "in %s:%ui", &zones[i]->shm.name,
                          mcf->fleet->nodes, z->file, z->line);
            return NGX_ERROR;
        }

        z->fleet = mcf->fleet;

        zp = ngx_array_push(&mcf->fleet->zones);
        if (zp == NULL) {
            return NGX_ERROR;
        }

        *zp = z;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_deepseek_guard_fleet_init_shm(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_deepseek_guard_fleet_t  *ofleet = data;

    ngx_slab_pool_t                  *shpool;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = shm_zone->data;

    if (ofleet) {
        fleet->sh = ofleet->sh;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        fleet->sh = shpool->data;
        return NGX_OK;
    }

    fleet->sh = ngx_slab_calloc(shpool,
                                sizeof(ngx_http_deepseek_guard_fleet_sh_t));
    if (fleet->sh == NULL) {
        return NGX_ERROR;
    }

    shpool->data = fleet->sh;

    return NGX_OK;
}


/* 1: admissions use the fleet share; 0: the static one */

ngx_uint_t
ngx_http_deepseek_guard_fleet_up(ngx_http_deepseek_guard_fleet_t *fleet)
{
    return fleet->sh->up != 0;
}


ngx_int_t
ngx_http_deepseek_guard_fleet_init_process(ngx_cycle_t *cycle)
{
    u_char                               *p;
    ngx_http_deepseek_guard_agent_t      *a;
    ngx_http_deepseek_guard_fleet_t      *fleet;
    ngx_http_deepseek_guard_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_deepseek_guard_module);
    if (mcf == NULL || mcf->fleet == NULL || mcf->fleet->zones.nelts == 0
        || ngx_process != NGX_PROCESS_WORKER)
    {
        return NGX_OK;
    }

    fleet = mcf->fleet;
    a = &ngx_http_deepseek_guard_agent;

    ngx_memzero(a, sizeof(ngx_http_deepseek_guard_agent_t));
    a->fleet = fleet;

    /* nginx's own connect() and recv() messages: the agent says it once */
    a->quiet = *cycle->log;
    a->quiet.log_level = NGX_LOG_CRIT;

    if (fleet->node.len) {
        a->node = fleet->node;

    } else {
        /* the host and the master's pid: one node across reloads */
        p = ngx_pnalloc(cycle->pool, cycle->hostname.len + NGX_INT_T_LEN + 1);
        if (p == NULL) {
            return NGX_ERROR;
        }

        a->node.data = p;
        a->node.len = ngx_sprintf(p, "%V:%P", &cycle->hostname, getppid())
                      - p;
    }

    a->tick.handler = ngx_http_deepseek_guard_fleet_tick;
    a->tick.log = cycle->log;
    a->tick.data = a;
    a->tick.cancelable = 1;

    ngx_add_timer(&a->tick, 1);

    return NGX_OK;
}


void
ngx_http_deepseek_guard_fleet_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_deepseek_guard_agent_t  *a;

    a = &ngx_http_deepseek_guard_agent;

    if (a->fleet == NULL) {
        return;
    }

    ngx_http_deepseek_guard_fleet_close(a);

    if (a->agent) {
        (void) ngx_atomic_cmp_set(&a->fleet->sh->agent, ngx_pid, 0);
        a->agent = 0;
    }
}


static void
ngx_http_deepseek_guard_fleet_tick(ngx_event_t *ev)
{
    ngx_http_deepseek_guard_agent_t  *a = ev->data;

    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = a->fleet;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        /* a worker of the next generation takes over */
        ngx_http_deepseek_guard_fleet_close(a);

        if (a->agent) {
            (void) ngx_atomic_cmp_set(&fleet->sh->agent, ngx_pid, 0);
            a->agent = 0;
        }

        return;
    }

    ngx_add_timer(ev, fleet->interval);

    if (!ngx_http_deepseek_guard_fleet_elect(a)) {
        return;
    }

    fleet->sh->beat = ngx_current_msec;

    if (a->sent) {
        if (ngx_current_msec - a->sent < fleet->interval) {
            return;
        }

        ngx_http_deepseek_guard_fleet_fail(a, 0, "%s", "timed out");
    }

    if (a->c == NULL && ngx_http_deepseek_guard_fleet_connect(a) != NGX_OK) {
        return;
    }

    if (ngx_http_deepseek_guard_fleet_sync(a) != NGX_OK) {
        ngx_http_deepseek_guard_fleet_fail(a, 0, "%s",
                                           "could not prepare a sync");
        return;
    }

    if (a->connected) {
        ngx_http_deepseek_guard_fleet_write(a->c->write);
    }
}


/*
 * One agent per node: the worker in fleet->sh->agent while it beats; a
 * worker takes over when the agent's pid is gone or silent for three
 * intervals and a second, or left on exit (a reload)
 */

static ngx_uint_t
ngx_http_deepseek_guard_fleet_elect(ngx_http_deepseek_guard_agent_t *a)
{
    ngx_pid_t                         pid;
    ngx_msec_t                        silent;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = a->fleet;
    pid = (ngx_pid_t) fleet->sh->agent;

    if (pid == ngx_pid) {
        a->agent = 1;
        return 1;
    }

    if (a->agent) {
        /* taken over while this worker was stuck: start afresh */
        ngx_http_deepseek_guard_fleet_close(a);
        a->agent = 0;
    }

    silent = ngx_current_msec - (ngx_msec_t) fleet->sh->beat;

    if (pid != 0 && silent < 3 * fleet->interval + 1000
        && (kill(pid, 0) == 0 || ngx_errno != NGX_ESRCH))
    {
        return 0;
    }

    if (!ngx_atomic_cmp_set(&fleet->sh->agent, (ngx_atomic_uint_t) pid,
                            (ngx_atomic_uint_t) ngx_pid))
    {
        return 0;
    }

    fleet->sh->beat = ngx_current_msec;
    a->agent = 1;
    a->told = 0;

    ngx_log_error(NGX_LOG_INFO, a->tick.log, 0,
                  "deepseek_guard: fleet: this worker syncs the node \"%V\" "
                  "with redis %V", &a->node, &fleet->addr.name);

    return 1;
}


static ngx_int_t
ngx_http_deepseek_guard_fleet_connect(ngx_http_deepseek_guard_agent_t *a)
{
    ngx_int_t                         rc;
    ngx_err_t                         err;
    ngx_connection_t                 *c;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = a->fleet;

    ngx_memzero(&a->peer, sizeof(ngx_peer_connection_t));
    a->peer.sockaddr = fleet->addr.sockaddr;
    a->peer.socklen = fleet->addr.socklen;
    a->peer.name = &fleet->addr.name;
    a->peer.get = ngx_event_get_peer;
    a->peer.log = &a->quiet;
    a->peer.log_error = NGX_ERROR_ERR;

    ngx_set_errno(0);

    rc = ngx_event_connect_peer(&a->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        err = ngx_socket_errno;
        if (a->peer.connection) {
            ngx_close_connection(a->peer.connection);
            a->peer.connection = NULL;
        }

        ngx_http_deepseek_guard_fleet_fail(a, err, "%s", "connect() failed");
        return NGX_ERROR;
    }

    c = a->peer.connection;
    c->data = a;
    c->log = &a->quiet;
    c->read->log = &a->quiet;
    c->write->log = &a->quiet;
    c->read->handler = ngx_http_deepseek_guard_fleet_read;
    c->write->handler = ngx_http_deepseek_guard_fleet_write;
    c->read->cancelable = 1;
    c->write->cancelable = 1;

    a->c = c;
    a->connected = (rc == NGX_OK);
    a->fresh = 1;

    a->reader = redisReaderCreate();
    if (a->reader == NULL) {
        ngx_http_deepseek_guard_fleet_fail(a, 0, "%s", "out of memory");
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Plans every fleet key of every fleet zone and writes the commands:
 * AUTH on a new connection with a password, one EVAL per zone and 100
 * keys, or a PING when no key has anything to say (Redis is still
 * watched, for the fallback)
 */

static ngx_int_t
ngx_http_deepseek_guard_fleet_sync(ngx_http_deepseek_guard_agent_t *a)
{
    size_t                            len;
    ngx_uint_t                        i;
    ngx_array_t                       strs;
    ngx_http_deepseek_guard_cmd_t    *cmd;
    ngx_http_deepseek_guard_zone_t  **zp;
    ngx_http_deepseek_guard_fleet_t  *fleet;
    const char                       *argv[2];
    size_t                            argl[2];
    ngx_str_t                        *s;
    u_char                           *p;

    fleet = a->fleet;

    a->pool = ngx_create_pool(16384, a->tick.log);
    if (a->pool == NULL) {
        return NGX_ERROR;
    }

    if (ngx_array_init(&a->cmds, a->pool, 8,
                       sizeof(ngx_http_deepseek_guard_cmd_t))
        != NGX_OK
        || ngx_array_init(&strs, a->pool, 8, sizeof(ngx_str_t)) != NGX_OK)
    {
        return NGX_ERROR;
    }

    a->next = 0;

    if (a->fresh && fleet->password.len) {
        cmd = ngx_array_push(&a->cmds);
        if (cmd == NULL) {
            return NGX_ERROR;
        }

        ngx_memzero(cmd, sizeof(ngx_http_deepseek_guard_cmd_t));
        cmd->kind = NGX_HTTP_DSG_FLEET_AUTH;

        argv[0] = "AUTH";
        argl[0] = 4;
        argv[1] = (const char *) fleet->password.data;
        argl[1] = fleet->password.len;

        if (ngx_http_deepseek_guard_fleet_format(a, &strs, 2, argv, argl)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    a->fresh = 0;

    zp = fleet->zones.elts;

    for (i = 0; i < fleet->zones.nelts; i++) {
        if (ngx_http_deepseek_guard_fleet_plan(a, zp[i], &strs) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    cmd = a->cmds.elts;

    if (a->cmds.nelts == 0
        || cmd[a->cmds.nelts - 1].kind != NGX_HTTP_DSG_FLEET_EVAL)
    {
        cmd = ngx_array_push(&a->cmds);
        if (cmd == NULL) {
            return NGX_ERROR;
        }

        ngx_memzero(cmd, sizeof(ngx_http_deepseek_guard_cmd_t));
        cmd->kind = NGX_HTTP_DSG_FLEET_PING;

        argv[0] = "PING";
        argl[0] = 4;

        if (ngx_http_deepseek_guard_fleet_format(a, &strs, 1, argv, argl)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    /* the commands into one buffer */

    s = strs.elts;
    len = 0;

    for (i = 0; i < strs.nelts; i++) {
        len += s[i].len;
    }

    a->out = ngx_create_temp_buf(a->pool, len);
    if (a->out == NULL) {
        return NGX_ERROR;
    }

    p = a->out->last;

    for (i = 0; i < strs.nelts; i++) {
        p = ngx_cpymem(p, s[i].data, s[i].len);
    }

    a->out->last = p;

    (void) ngx_atomic_fetch_add(&fleet->sh->commands,
                                (ngx_atomic_int_t) a->cmds.nelts);

    a->sent = ngx_current_msec;
    if (a->sent == 0) {
        a->sent = 1;
    }

    return NGX_OK;
}


/* one zone's keys: plans them under the zone's mutex, then the EVALs */

static ngx_int_t
ngx_http_deepseek_guard_fleet_plan(ngx_http_deepseek_guard_agent_t *a,
    ngx_http_deepseek_guard_zone_t *z, ngx_array_t *strs)
{
    u_char                           *digests, *d, *p, *buf;
    uint64_t                          now, requests, demand, slots, cap;
    ngx_uint_t                        i, k, t, max, n, nt, from, argc, quiet;
    ngx_queue_t                      *q;
    const char                      **argv;
    size_t                           *argl;
    dsg_fleet_ask_t                  *asks;
    dsg_fleet_key_t                  *fk;
    ngx_http_deepseek_guard_cmd_t    *cmd;
    ngx_http_deepseek_guard_node_t   *node;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = a->fleet;
    now = ngx_current_msec;
    nt = z->limit.ntiers;

    /*
     * room for twice the keys of the last sync, allocated before the lock;
     * keys beyond it (least recently used) wait for the next sync
     */

    max = ngx_min(z->sh->nodes, 2 * z->sh->fleet_keys + 256) + 16;

    digests = ngx_pnalloc(a->pool, max * 12);
    asks = ngx_palloc(a->pool, max * sizeof(dsg_fleet_ask_t));
    if (digests == NULL || asks == NULL) {
        return NGX_ERROR;
    }

    n = 0;
    requests = 0;
    slots = 0;
    demand = 0;

    ngx_shmtx_lock(&z->shpool->mutex);

    quiet = 0;

    for (q = ngx_queue_head(&z->sh->lru);
         q != ngx_queue_sentinel(&z->sh->lru) && n < max;
         q = ngx_queue_next(q))
    {
        node = ngx_queue_data(q, ngx_http_deepseek_guard_node_t, lru);
        fk = ngx_http_deepseek_guard_fleet_key(node);

        if (!dsg_fleet_plan(&z->limit, fk, &node->state, now,
                            fleet->interval, &asks[n]))
        {
            /*
             * the list is in order of use: after 64 keys in a row that
             * were quiet for long (they gave everything back when they
             * went quiet), the rest are older still; a zone of many idle
             * keys costs a sync no more than its active ones
             */

            if (now > fk->seen_ms
                && now - fk->seen_ms
                   > 2 * (uint64_t) DSG_FLEET_LINGER * fleet->interval
                && ++quiet == 64)
            {
                break;
            }

            continue;
        }

        quiet = 0;

        d = digests + n * 12;
        ngx_memcpy(d, &node->node.key, 8);
        ngx_memcpy(d + 8, node->digest, 4);

        for (t = 0; t < nt; t++) {
            if (fk->wallet[t] > 0) {
                requests += (uint64_t) fk->wallet[t];
            }

            demand += asks[n].want[t];
        }

        slots += fk->held[0];
        n++;
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (z->limit.n) {
        requests /= z->limit.cost;
        demand /= z->limit.cost;
    }

    z->sh->fleet_requests = requests;
    z->sh->fleet_slots = slots;
    z->sh->fleet_keys = n;
    z->sh->fleet_demand = demand;

    /* EVAL script nkeys keys... node ttl nt cost capped rated tiers... */

    for (from = 0; from < n; from += NGX_HTTP_DSG_FLEET_BATCH) {
        k = ngx_min(n - from, NGX_HTTP_DSG_FLEET_BATCH);

        argc = 3 + k + 6 + nt * 3 + k * nt * 4;

        argv = ngx_palloc(a->pool, argc * sizeof(char *));
        argl = ngx_palloc(a->pool, argc * sizeof(size_t));
        buf = ngx_pnalloc(a->pool, argc * (NGX_INT64_LEN + 1)
                                   + k * (z->shm_zone->shm.name.len
                                          + fleet->prefix.len + 26)
                                   + a->node.len);
        if (argv == NULL || argl == NULL || buf == NULL) {
            return NGX_ERROR;
        }

        p = buf;
        argc = 0;

#define ngx_http_dsg_arg(s, l)                                                \
        argv[argc] = (const char *) (s); argl[argc++] = (l)

#define ngx_http_dsg_num(fmt, v)                                              \
        d = p; p = ngx_sprintf(p, fmt, v); ngx_http_dsg_arg(d, p - d)

        ngx_http_dsg_arg("EVAL", 4);
        ngx_http_dsg_arg(ngx_http_deepseek_guard_fleet_lua,
                         sizeof(ngx_http_deepseek_guard_fleet_lua) - 1);
        ngx_http_dsg_num("%ui", k);

        for (i = from; i < from + k; i++) {
            d = p;
            p = ngx_sprintf(p, "%V:%V:", &fleet->prefix,
                            &z->shm_zone->shm.name);
            p = ngx_hex_dump(p, digests + i * 12, 12);
            ngx_http_dsg_arg(d, p - d);
        }

        ngx_http_dsg_arg(a->node.data, a->node.len);
        ngx_http_dsg_num("%M", (ngx_msec_t) ngx_max(10 * fleet->interval,
                                                     2000));
        ngx_http_dsg_num("%ui", nt);
        ngx_http_dsg_num("%uL", z->limit.cost);
        ngx_http_dsg_arg(z->limit.inflight ? "1" : "0", 1);
        ngx_http_dsg_arg(z->limit.n ? "1" : "0", 1);

        for (t = 0; t < nt; t++) {
            /*
             * the fleet's bucket holds one interval of refill at least:
             * the nodes take tokens once an interval, a bucket of one
             * request would lose the rest (docs/fleet.md, the bounds)
             */
            cap = z->limit.cost + z->limit.gain[t] * fleet->interval;
            if (cap < z->limit.capacity[t]) {
                cap = z->limit.capacity[t];
            }

            ngx_http_dsg_num("%uL", z->limit.gain[t]);
            ngx_http_dsg_num("%uL", cap);
            ngx_http_dsg_num("%uD", z->limit.cap[t]);
        }

        for (i = from; i < from + k; i++) {
            for (t = 0; t < nt; t++) {
                ngx_http_dsg_num("%uL", asks[i].want[t]);
                ngx_http_dsg_num("%uL", asks[i].back[t]);
                ngx_http_dsg_num("%uD", asks[i].claim[t]);
                ngx_http_dsg_num("%uD", asks[i].wslots[t]);
            }
        }

#undef ngx_http_dsg_num
#undef ngx_http_dsg_arg

        cmd = ngx_array_push(&a->cmds);
        if (cmd == NULL) {
            return NGX_ERROR;
        }

        cmd->kind = NGX_HTTP_DSG_FLEET_EVAL;
        cmd->zone = z;
        cmd->nkeys = k;
        cmd->digests = digests + from * 12;
        cmd->asks = asks + from;

        if (ngx_http_deepseek_guard_fleet_format(a, strs, (int) argc, argv,
                                                 argl)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* a command in RESP, copied into the sync's pool */

static ngx_int_t
ngx_http_deepseek_guard_fleet_format(ngx_http_deepseek_guard_agent_t *a,
    ngx_array_t *strs, int argc, const char **argv, const size_t *argvlen)
{
    int         len;
    char       *cmd;
    ngx_str_t  *s;

    len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    if (len < 0) {
        return NGX_ERROR;
    }

    s = ngx_array_push(strs);
    if (s == NULL) {
        redisFreeCommand(cmd);
        return NGX_ERROR;
    }

    s->len = (size_t) len;
    s->data = ngx_pnalloc(a->pool, s->len);
    if (s->data == NULL) {
        redisFreeCommand(cmd);
        return NGX_ERROR;
    }

    ngx_memcpy(s->data, cmd, s->len);
    redisFreeCommand(cmd);

    return NGX_OK;
}


static void
ngx_http_deepseek_guard_fleet_write(ngx_event_t *wev)
{
    int                               err;
    ssize_t                           n;
    socklen_t                         len;
    ngx_connection_t                 *c;
    ngx_http_deepseek_guard_agent_t  *a;

    c = wev->data;
    a = c->data;

    if (!a->connected) {
        err = 0;
        len = sizeof(int);

        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len)
            == -1)
        {
            err = ngx_socket_errno;
        }

        if (err) {
            ngx_http_deepseek_guard_fleet_fail(a, err, "%s",
                                               "connect() failed");
            return;
        }

        a->connected = 1;
    }

    while (a->out && a->out->pos < a->out->last) {
        n = c->send(c, a->out->pos, a->out->last - a->out->pos);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_deepseek_guard_fleet_fail(a, ngx_socket_errno, "%s",
                                               "send() failed");
            return;
        }

        a->out->pos += n;
    }

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_deepseek_guard_fleet_fail(a, 0, "%s", "event failed");
    }
}


static void
ngx_http_deepseek_guard_fleet_read(ngx_event_t *rev)
{
    u_char                            buf[NGX_HTTP_DSG_FLEET_READ];
    ssize_t                           n;
    redisReply                       *reply;
    ngx_connection_t                 *c;
    ngx_http_deepseek_guard_agent_t  *a;

    c = rev->data;
    a = c->data;

    for ( ;; ) {
        n = c->recv(c, buf, sizeof(buf));

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0) {
            ngx_http_deepseek_guard_fleet_fail(a, 0, "%s",
                                               "closed the connection");
            return;
        }

        if (n == NGX_ERROR) {
            /* a connect() that failed shows here first */
            ngx_http_deepseek_guard_fleet_fail(a, ngx_socket_errno, "%s",
                                               a->connected
                                               ? "recv() failed"
                                               : "connect() failed");
            return;
        }

        if (a->pool == NULL) {
            ngx_http_deepseek_guard_fleet_fail(a, 0, "%s",
                                               "sent an unasked reply");
            return;
        }

        if (redisReaderFeed(a->reader, (const char *) buf, (size_t) n)
            != REDIS_OK)
        {
            ngx_http_deepseek_guard_fleet_fail(a, 0, "%s", "out of memory");
            return;
        }

        for ( ;; ) {
            reply = NULL;

            if (redisReaderGetReply(a->reader, (void **) &reply) != REDIS_OK)
            {
                ngx_http_deepseek_guard_fleet_fail(a, 0,
                                               "protocol error: %s",
                                               a->reader->errstr);
                return;
            }

            if (reply == NULL) {
                break;
            }

            if (ngx_http_deepseek_guard_fleet_reply(a, reply) != NGX_OK) {
                /* failed and closed: the reader is gone */
                return;
            }

            if (a->pool == NULL) {
                break;
            }
        }
    }

    if (a->c && ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_deepseek_guard_fleet_fail(a, 0, "%s", "event failed");
    }
}


/* one reply, in order; frees it.  NGX_ERROR: the sync failed */

static ngx_int_t
ngx_http_deepseek_guard_fleet_reply(ngx_http_deepseek_guard_agent_t *a,
    redisReply *reply)
{
    u_char                          msg[256];
    ngx_http_deepseek_guard_cmd_t  *cmd;

    if (a->next >= a->cmds.nelts) {
        freeReplyObject(reply);
        ngx_http_deepseek_guard_fleet_fail(a, 0, "%s",
                                           "sent an unasked reply");
        return NGX_ERROR;
    }

    cmd = (ngx_http_deepseek_guard_cmd_t *) a->cmds.elts + a->next++;

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_cpystrn(msg, (u_char *) reply->str,
                    ngx_min(sizeof(msg), reply->len + 1));
        freeReplyObject(reply);

        ngx_http_deepseek_guard_fleet_fail(a, 0,
                         cmd->kind == NGX_HTTP_DSG_FLEET_AUTH
                         ? "AUTH failed: %s"
                         : cmd->kind == NGX_HTTP_DSG_FLEET_PING
                         ? "PING failed: %s" : "EVAL failed: %s",
                         (const char *) msg);
        return NGX_ERROR;
    }

    if (cmd->kind == NGX_HTTP_DSG_FLEET_EVAL) {
        if (reply->type != REDIS_REPLY_ARRAY
            || reply->elements
               != cmd->nkeys * cmd->zone->limit.ntiers * 3)
        {
            freeReplyObject(reply);
            ngx_http_deepseek_guard_fleet_fail(a, 0, "%s",
                                               "unexpected EVAL reply");
            return NGX_ERROR;
        }

        ngx_http_deepseek_guard_fleet_apply(a, cmd, reply);
    }

    freeReplyObject(reply);

    if (a->next == a->cmds.nelts) {
        ngx_http_deepseek_guard_fleet_done(a);
    }

    return NGX_OK;
}


/* the fleet's answer for one EVAL's keys, under the zone's mutex */

static void
ngx_http_deepseek_guard_fleet_apply(ngx_http_deepseek_guard_agent_t *a,
    ngx_http_deepseek_guard_cmd_t *cmd, redisReply *reply)
{
    ngx_uint_t                       i, t, nt, e;
    redisReply                      *r;
    dsg_fleet_grant_t                g;
    ngx_http_deepseek_guard_zone_t  *z;
    ngx_http_deepseek_guard_node_t  *node;

    z = cmd->zone;
    nt = z->limit.ntiers;

    ngx_shmtx_lock(&z->shpool->mutex);

    for (i = 0; i < cmd->nkeys; i++) {
        ngx_memzero(&g, sizeof(dsg_fleet_grant_t));

        for (t = 0; t < nt; t++) {
            e = (i * nt + t) * 3;

            r = reply->element[e];
            g.granted[t] = (r->type == REDIS_REPLY_INTEGER && r->integer > 0)
                           ? (uint64_t) r->integer : 0;

            r = reply->element[e + 1];
            g.held[t] = (r->type == REDIS_REPLY_INTEGER && r->integer > 0)
                        ? (uint32_t) r->integer : 0;

            r = reply->element[e + 2];
            g.fair[t] = (r->type == REDIS_REPLY_INTEGER && r->integer > 0)
                        ? (uint32_t) r->integer : 0;
        }

        /* a key evicted meanwhile loses its grant: never more admitted */

        node = ngx_http_deepseek_guard_find(z, cmd->digests + i * 12);
        if (node) {
            dsg_fleet_apply(&z->limit, ngx_http_deepseek_guard_fleet_key(node),
                            &cmd->asks[i], &g);
        }
    }

    ngx_shmtx_unlock(&z->shpool->mutex);
}


static void
ngx_http_deepseek_guard_fleet_done(ngx_http_deepseek_guard_agent_t *a)
{
    ngx_msec_t                        rtt;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = a->fleet;

    ngx_time_update();
    rtt = ngx_current_msec - a->sent;

    (void) ngx_atomic_fetch_add(&fleet->sh->syncs, 1);
    (void) ngx_atomic_fetch_add(&fleet->sh->rtt_count, 1);
    (void) ngx_atomic_fetch_add(&fleet->sh->rtt_sum_ms,
                                (ngx_atomic_int_t) rtt);

    a->sent = 0;
    ngx_destroy_pool(a->pool);
    a->pool = NULL;
    a->out = NULL;

    if (!fleet->sh->up) {
        fleet->sh->up = 1;

        if (a->told) {
            ngx_log_error(NGX_LOG_NOTICE, a->tick.log, 0,
                          "deepseek_guard: fleet: redis %V answers again; "
                          "fleet zones use their fleet share",
                          &fleet->addr.name);
            a->told = 0;
        }
    }

    /* the grants may admit waiters of this worker now */
    ngx_http_deepseek_guard_wake(0);
}


/*
 * A sync failed: the connection goes, the zones fall back to their static
 * share, once logged per episode; the next tick connects again
 */

static void
ngx_http_deepseek_guard_fleet_fail(ngx_http_deepseek_guard_agent_t *a,
    ngx_err_t err, const char *fmt, const char *detail)
{
    u_char                            reason[320], *p;
    ngx_http_deepseek_guard_fleet_t  *fleet;

    fleet = a->fleet;

    /* the reason first: detail may point into the reader closed below */
    p = ngx_snprintf(reason, sizeof(reason) - 1, fmt, detail);
    *p = '\0';

    ngx_http_deepseek_guard_fleet_close(a);

    (void) ngx_atomic_fetch_add(&fleet->sh->errors, 1);

    if (fleet->sh->up) {
        fleet->sh->up = 0;
        (void) ngx_atomic_fetch_add(&fleet->sh->fallbacks, 1);
    }

    if (a->told) {
        return;
    }

    a->told = 1;

    ngx_log_error(NGX_LOG_ERR, a->tick.log, err,
                  "deepseek_guard: fleet: redis %V: %s; fleet zones fall "
                  "back to their static share", &fleet->addr.name, reason);
}


static void
ngx_http_deepseek_guard_fleet_close(ngx_http_deepseek_guard_agent_t *a)
{
    if (a->c) {
        ngx_close_connection(a->c);
        a->c = NULL;
    }

    a->connected = 0;

    if (a->reader) {
        redisReaderFree(a->reader);
        a->reader = NULL;
    }

    if (a->pool) {
        ngx_destroy_pool(a->pool);
        a->pool = NULL;
    }

    a->out = NULL;
    a->sent = 0;
}
