#!/usr/bin/python3
"""The `tokens` benchmark: what a token-budget zone (deepseek_guard_zone
tokens=N/m) costs on the request path, against a request-rate zone, and
what the body measure behind it costs by body size (issue 19, item 5).

Run by bench/run.sh (./build.sh bench tokens, bench/run.sh tokens).  It
starts two nginx processes from configurations it writes into its scratch
directory:

- the upstream: stock nginx (no load_module), 1 worker, answering every
  POST /v1/chat/completions with `return 200` of a small OpenAI-style chat
  completion with a "usage" object (prompt 20, completion 5 tokens);
- the guarded nginx: the module, 1 worker (`worker_processes 1`), one
  server (port) per variant, each `location /v1/chat/completions` proxying
  to the upstream (keepalive), client_body_buffer_size 2m and
  client_max_body_size 4m:
    rate            deepseek_guard r: `r:32m key=$http_authorization
                    rate=1000000r/s`
    tokens          deepseek_guard t: `t:32m key=$http_authorization
                    tokens=1000000000/m` (its body is read and measured
                    before admission, the answer's usage read by the body
                    filter)
    tokens+headers  the same zone t, with deepseek_guard_openai_headers on
  and /metrics on a port of its own.  The limits are so high that nothing
  is ever refused: the comparison is void if a zone refused anything in a
  window (deepseek_guard_requests_total, tokens_rejected_total) or wrk saw
  an error.

Part 1, request cost.  wrk -t1 -c50 POSTs the same chat body (300 bytes,
no "max_tokens") with Content-Type and an Authorization header cycling over
1,000 keys (a wrk Lua script, written next to the configurations), rounds
of rate, tokens, tokens+headers (the order reversed every other round), 5
rounds.  Each wrk run lasts ramp (1 s) + window (4 s) + 1 s; the window is
measured from the zone's counters (admitted + rejected, /metrics) and the
guarded worker's CPU (utime + stime from /proc/PID/stat, schedstat beside
it); the upstream's worker is not counted (its CPU is given).  req/s,
req/cpu-s, the worker's µs per request and the ratios tokens/rate (of the
medians, and per round: median, min..max).

Part 2, body size.  (a) bench/tokens_parse.c, compiled with gcc -O2 into
the scratch directory with ngx_deepseek_guard_module/dsg_tokens.c and
dsg_json.c (-ljansson): µs per call and MB/s of dsg_tokens_scan() +
dsg_tokens_estimate(), of the glue's max_tokens name test, of
dsg_json_max_tokens() and of the whole measure, on chat bodies of 1 KB,
100 KB and 1 MB (ASCII words or CJK text, with and without "max_tokens").
(b) End to end, per size: rate, tokens and tokens+max_tokens (the tokens
location with a body of the same size that names max_tokens, so that the
jansson parse runs), interleaved as in part 1, 5 rounds at 1 KB and 3 from
100 KB.  The wrk script pre-formats its requests, at most 32 MB of them: a
large body cycles over fewer keys (the count is given).

The report goes to bench/results/<YYYY-MM-DD>-tokens.md, the numbers behind
it to <YYYY-MM-DD>-tokens.json (a --quick run, or other settings, write
<YYYY-MM-DD>-tokens-partial.md.tmp and .json.tmp).
`tokens_scenario.py --render <file>.json` prints a saved report again.

Environment: BENCH_TOKENS_ROUNDS (5), BENCH_TOKENS_BIG_ROUNDS (3: rounds
for bodies of 100 KB and more), BENCH_TOKENS_RAMP_S (1),
BENCH_TOKENS_WINDOW_S (4), BENCH_TOKENS_KEYS (1000),
BENCH_TOKENS_CONNECTIONS (50), BENCH_TOKENS_BODY (300: part 1's body, in
bytes), BENCH_TOKENS_SIZES (1k,100k,1m), BENCH_TOKENS_PARSE_MS (100: ms per
micro-benchmark run), BENCH_TOKENS_PARSE_REPS (5: the fastest is reported), CC (gcc), BENCH_KEEP=1,
and bench.py's NGINX_BIN, DSG_MODULE, WRK.  Helpers are bench.py's and
fleet_scenario.py's.
"""
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B                       # noqa: E402  (bench/bench.py)
import fleet_scenario as F              # noqa: E402  (proc_ticks, tree_state, ...)

CC = os.environ.get("CC") or "gcc"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PARSE_SRC = os.path.join(B.BENCH, "tokens_parse.c")
MODDIR = os.path.join(B.REPO, "ngx_deepseek_guard_module")
WRK_BUDGET = 32 << 20                   # bytes of pre-formatted requests in wrk
DEFAULTS = {"rounds": 5, "big_rounds": 3, "ramp": 1, "window": 4, "keys": 1000,
            "conns": 50, "body": 300, "sizes": [1024, 100 * 1024, 1024 * 1024],
            "parse_ms": 100, "parse_reps": 5}
REJECTED = ("rejected_429", "rejected_503", "rejected_other", "queue_timeout")
COST_VARIANTS = ("rate", "tokens", "tokens+headers")
SIZE_VARIANTS = ("rate", "tokens", "tokens+max_tokens")
# variant: (server, zone, body names max_tokens)
VARIANTS = {"rate": ("rate", "r", False), "tokens": ("tokens", "t", False),
            "tokens+headers": ("headers", "t", False),
            "tokens+max_tokens": ("tokens", "t", True)}
UPSTREAM_ANSWER = ('{"id":"x","object":"chat.completion","choices":[{"index":0,"message":'
                   '{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
                   '"usage":{"prompt_tokens":20,"completion_tokens":5,"total_tokens":25}}')
USED_PER_REQUEST = 25


def log(msg):
    B.log(msg)


def parse_size(s):
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m:
        sys.exit("bench: BENCH_TOKENS_SIZES: sizes like 1k,100k,1m")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


def size_name(n):
    if n % (1 << 20) == 0:
        return "%d MB" % (n >> 20)
    if n % 1024 == 0:
        return "%d KB" % (n >> 10)
    return "%d B" % n


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.rounds = B.env_int("BENCH_TOKENS_ROUNDS", 1 if quick else DEFAULTS["rounds"])
        self.big_rounds = B.env_int("BENCH_TOKENS_BIG_ROUNDS",
                                    1 if quick else DEFAULTS["big_rounds"])
        self.ramp = B.env_int("BENCH_TOKENS_RAMP_S", DEFAULTS["ramp"])
        self.window = B.env_int("BENCH_TOKENS_WINDOW_S", 2 if quick else DEFAULTS["window"])
        self.keys = B.env_int("BENCH_TOKENS_KEYS", DEFAULTS["keys"])
        self.conns = B.env_int("BENCH_TOKENS_CONNECTIONS", DEFAULTS["conns"])
        self.body = B.env_int("BENCH_TOKENS_BODY", DEFAULTS["body"])
        v = os.environ.get("BENCH_TOKENS_SIZES")
        self.sizes = [parse_size(x) for x in v.split(",") if x.strip()] if v \
            else list(DEFAULTS["sizes"])
        self.parse_ms = B.env_int("BENCH_TOKENS_PARSE_MS",
                                  20 if quick else DEFAULTS["parse_ms"])
        self.parse_reps = B.env_int("BENCH_TOKENS_PARSE_REPS",
                                    1 if quick else DEFAULTS["parse_reps"])
        self.keep = os.environ.get("BENCH_KEEP") == "1"

    def rounds_for(self, size):
        return self.rounds if size < 100 * 1024 else self.big_rounds

    def is_default(self):
        return not self.quick and all(getattr(self, k) == v for k, v in DEFAULTS.items())


# ------------------------------------------------------------------ files

WORDS = ("the model answer request token budget please explain why a gateway limits "
         "each key in shared memory and how settlement works when upstream returns "
         "usage prompt completion stream of events client server latency throughput "
         "is measured with wrk against nginx worker process").split()


def chat_body(size, max_tokens):
    """A chat completion request of exactly size bytes (ASCII words in the
    user message); "max_tokens":256 or "temperature":0.7, the same length."""
    head = ('{"model":"deepseek-chat","messages":[{"role":"system","content":'
            '"You are a helpful assistant."},{"role":"user","content":"')
    tail = '"}],"stream":false,' + ('"max_tokens":256}' if max_tokens
                                    else '"temperature":0.7}')
    room = size - len(head) - len(tail)
    if room < 1:
        sys.exit("bench: a body of %d bytes is too small (at least %d)" % (
            size, len(head) + len(tail) + 1))
    rnd = random.Random(size)
    out, n = [], 0
    while n < room:
        w = rnd.choice(WORDS)
        if room - n < len(w) + 1:
            out.append(" " * (room - n))
            break
        out.append(w + " ")
        n += len(w) + 1
    body = (head + "".join(out) + tail).encode()
    assert len(body) == size, (len(body), size)
    json.loads(body)
    return body


WRK_LUA = r"""-- wrk script of the tokens scenario (bench/tokens_scenario.py writes it):
-- POST <url> with the body of a file, Content-Type: application/json and
-- Authorization: Bearer sk-bench-<tag><n>, n cycling over 1..<keys> (fewer
-- when <keys> requests would take more than <budget> bytes: they are all
-- formatted once, in init()):
--   wrk -t1 -c50 -d6s -s tokens.lua http://.../v1/chat/completions -- body.json 1000 33554432 k
local reqs = {}
local n = 0

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local body = f:read("*a")
   f:close()
   local keys = tonumber(args[2]) or 1000
   local budget = tonumber(args[3]) or 33554432
   local tag = args[4] or "k"
   local count = math.max(1, math.min(keys, math.floor(budget / (#body + 256))))
   for i = 1, count do
      reqs[i] = wrk.format("POST", nil, {
         ["Content-Type"] = "application/json",
         ["Authorization"] = "Bearer sk-bench-" .. tag .. i}, body)
   end
   -- threads start at different places of the cycle
   n = math.random(count) - 1
end

function request()
   n = n + 1
   if n > #reqs then
      n = 1
   end
   return reqs[n]
end
"""


def keys_used(S, size):
    return max(1, min(S.keys, WRK_BUDGET // (size + 256)))


UPSTREAM_CONF = r"""# the upstream of the tokens scenario (bench/tokens_scenario.py writes it):
# stock nginx, no module, a small OpenAI-style answer with a usage object
{{USER}}
worker_processes 1;
error_log {{PREFIX}}/logs/error.log warn;
pid {{PREFIX}}/nginx.pid;

events {
    worker_connections 4096;
}

http {
{{HTTP_COMMON}}
    access_log off;
    client_max_body_size 4m;
    keepalive_requests 1000000;

    server {
        listen 127.0.0.1:{{PORT}};
        server_name llm;

        location = /v1/chat/completions {
            default_type application/json;
            return 200 '{{ANSWER}}';
        }
    }
}
"""

GUARD_CONF = r"""# the guarded nginx of the tokens scenario (bench/tokens_scenario.py writes
# it): one worker, a server per variant, each proxying to the upstream
{{LOAD_MODULE}}
{{USER}}
worker_processes 1;
error_log {{PREFIX}}/logs/error.log warn;
pid {{PREFIX}}/nginx.pid;

events {
    worker_connections 4096;
}

http {
{{HTTP_COMMON}}
    access_log off;
    keepalive_requests 1000000;
    # part 2's bodies (up to 1 MB) stay in one memory buffer
    client_body_buffer_size 2m;
    client_max_body_size 4m;

    upstream llm {
        server 127.0.0.1:{{UPSTREAM_PORT}};
        keepalive 64;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";

    # so high that nothing is ever refused: what is measured is the cost
    deepseek_guard_zone r:32m key=$http_authorization rate=1000000r/s;
    deepseek_guard_zone t:32m key=$http_authorization tokens=1000000000/m;

    server {
        listen 127.0.0.1:{{PORT_RATE}};
        server_name rate;

        location = /v1/chat/completions {
            deepseek_guard r;
            proxy_pass http://llm;
        }
    }

    server {
        listen 127.0.0.1:{{PORT_TOKENS}};
        server_name tokens;

        location = /v1/chat/completions {
            deepseek_guard t;
            proxy_pass http://llm;
        }
    }

    server {
        listen 127.0.0.1:{{PORT_HEADERS}};
        server_name headers;

        location = /v1/chat/completions {
            deepseek_guard t;
            deepseek_guard_openai_headers on;
            proxy_pass http://llm;
        }
    }

    server {
        listen 127.0.0.1:{{METRICS_PORT}};
        server_name metrics;

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
}
"""


# ------------------------------------------------------------------ processes

class Ngx(B.Nginx):
    """An nginx of this scenario with exactly one worker.  The template is
    a file of the scratch directory (an absolute path: bench.py joins it to
    bench/conf/, which leaves an absolute path as it is)."""

    def __init__(self, root, name, template, subs, ports):
        super().__init__(root, name, template, subs, ports)
        self.worker = None

    def start(self):
        super().start()
        deadline = time.time() + 10
        while time.time() < deadline:
            w = self.workers()
            if len(w) == 1:
                self.worker = w[0]
                return self
            time.sleep(0.02)
        raise RuntimeError("%s: not one worker: %s" % (self.prefix, self.workers()))


def metrics(port):
    """{(name, zone, decision or kind or None): value}, summed over classes"""
    st, _, body = B.http(port, "/metrics")
    if st != 200:
        raise RuntimeError("/metrics answered %s" % st)
    out = {}
    for line in body.decode().splitlines():
        if not line.startswith("deepseek_guard_") or "{" not in line:
            continue
        name = line[:line.index("{")]
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
        k = (name, labels.get("zone"), labels.get("decision") or labels.get("kind")
             or labels.get("le"))
        out[k] = out.get(k, 0) + float(line.rsplit(None, 1)[1])
    return out


def counts(m, zone):
    adm = m.get(("deepseek_guard_requests_total", zone, "admitted"), 0)
    rej = sum(m.get(("deepseek_guard_requests_total", zone, d), 0) for d in REJECTED)
    rej += m.get(("deepseek_guard_tokens_rejected_total", zone, None), 0)
    used = m.get(("deepseek_guard_tokens_total", zone, "used"), 0)
    return adm, rej, used


class Rig:
    """The upstream, the guarded nginx and the files wrk reads."""

    def __init__(self, root):
        self.root = root
        self.up_port = B.free_port()
        self.ports = {s: B.free_port() for s in ("rate", "tokens", "headers")}
        self.mport = B.free_port()
        for name, text in (("upstream.conf", UPSTREAM_CONF), ("guard.conf", GUARD_CONF)):
            with open(os.path.join(root, name), "w") as f:
                f.write(text)
        self.lua = os.path.join(root, "tokens.lua")
        with open(self.lua, "w") as f:
            f.write(WRK_LUA)
        self.upstream = Ngx(root, "upstream", os.path.join(root, "upstream.conf"), {
            "PORT": self.up_port, "ANSWER": UPSTREAM_ANSWER}, [self.up_port])
        self.guard = Ngx(root, "guard", os.path.join(root, "guard.conf"), {
            "UPSTREAM_PORT": self.up_port, "PORT_RATE": self.ports["rate"],
            "PORT_TOKENS": self.ports["tokens"], "PORT_HEADERS": self.ports["headers"],
            "METRICS_PORT": self.mport}, list(self.ports.values()) + [self.mport])
        self.bodies = {}

    def start(self):
        self.upstream.start()
        self.guard.start()
        return self

    def stop(self):
        self.guard.stop()
        self.upstream.stop()

    def body_file(self, size, max_tokens):
        k = (size, max_tokens)
        if k not in self.bodies:
            path = os.path.join(self.root, "body-%d%s.json" % (size, "-mt" if max_tokens
                                                               else ""))
            with open(path, "wb") as f:
                f.write(chat_body(size, max_tokens))
            self.bodies[k] = path
        return self.bodies[k]

    def snap(self):
        return {"t": time.time(), "m": metrics(self.mport),
                "ticks": F.proc_ticks(self.guard.worker),
                "sched": F.proc_sched_ns(self.guard.worker),
                "up_ticks": F.proc_ticks(self.upstream.worker)}

    def check(self, variant, size):
        """One request by hand: 200, the upstream's usage in the answer, the
        x-ratelimit-* headers where they belong."""
        server, _, mt = VARIANTS[variant]
        with open(self.body_file(size, mt), "rb") as f:
            body = f.read()
        st, hdrs, rest = B.http(self.ports[server], "/v1/chat/completions", "POST", {
            "Content-Type": "application/json",
            "Authorization": "Bearer sk-bench-check"}, body)
        if st != 200 or b'"usage"' not in rest:
            raise RuntimeError("%s: %s answered %s: %r" % (variant, size_name(size), st,
                                                           rest[:200]))
        rl = {k: v for k, v in hdrs.items() if k.startswith("x-ratelimit-")}
        if (variant == "tokens+headers") != bool(rl):
            raise RuntimeError("%s: x-ratelimit headers %s" % (variant, rl))
        return rl


def wrk_cmd(S, rig, variant, size, secs):
    server, _, mt = VARIANTS[variant]
    # --timeout: a 1 MB body that jansson parses takes tens of ms of the one
    # worker, so 50 of them queued behind each other pass wrk's default 2 s
    return [B.WRK, "-t1", "-c%d" % S.conns, "-d%ds" % secs, "--timeout", "30s", "--latency",
            "-s", rig.lua,
            "http://127.0.0.1:%d/v1/chat/completions" % rig.ports[server], "--",
            rig.body_file(size, mt), str(S.keys), str(WRK_BUDGET), "k"]


def wrk_run(S, rig, variant, size, secs):
    p = subprocess.Popen(wrk_cmd(S, rig, variant, size, secs), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p


def one_run(S, rig, variant, size, rnd):
    zone = VARIANTS[variant][1]
    rig.guard.settle()
    secs = S.ramp + S.window + 1
    proc = wrk_run(S, rig, variant, size, secs)
    try:
        time.sleep(S.ramp)
        s0 = rig.snap()
        time.sleep(S.window)
        s1 = rig.snap()
    finally:
        w = F.wrk_result(proc, secs)
    dt = s1["t"] - s0["t"]
    a0, j0, u0 = counts(s0["m"], zone)
    a1, j1, u1 = counts(s1["m"], zone)
    req = (a1 - a0) + (j1 - j0)
    cpu = (s1["ticks"] - s0["ticks"]) / CLK_TCK
    sched = (s1["sched"] - s0["sched"]) / 1e9
    x = {"round": rnd, "variant": variant, "size": size, "seconds": dt, "requests": req,
         "rps": req / dt, "cpu_s": cpu, "cpu_rps": req / cpu if cpu > 0 else None,
         "sched_rps": req / sched if sched > 0 else None, "share": sched / dt,
         "us_per_req": 1e6 * sched / req if req else None,
         "up_share": (s1["up_ticks"] - s0["up_ticks"]) / CLK_TCK / dt,
         "rejected": j1 - j0, "used_per_req": (u1 - u0) / req if req and zone == "t" else None,
         "wrk_non2xx": w["non2xx"], "wrk_sock_err": w["sock_err"], "wrk_rps": w["rps"],
         "p99_ms": w["p99_ms"]}
    log("  %-17s %6s round %d: %8.0f req/s  %8.0f req/cpu-s (schedstat %8.0f, %.1f us/req)"
        "  share %.2f  upstream %.2f  rejected %d  non2xx %d  sockerr %d%s" % (
            variant, size_name(size), rnd, x["rps"], x["cpu_rps"] or 0, x["sched_rps"] or 0,
            x["us_per_req"] or 0, x["share"], x["up_share"], x["rejected"], x["wrk_non2xx"],
            x["wrk_sock_err"], "" if x["used_per_req"] is None
            else "  used/req %.2f" % x["used_per_req"]))
    return x


def interleaved(S, rig, variants, size, rounds):
    # warm-up, not recorded: keys allocated in both zones, the estimator's
    # correction learnt, caches warm
    for v in variants:
        F.wrk_result(wrk_run(S, rig, v, size, 1), 1)
    runs = []
    for rnd in range(1, rounds + 1):
        order = variants if rnd % 2 else tuple(reversed(variants))
        for v in order:
            runs.append(one_run(S, rig, v, size, rnd))
    return runs


# ------------------------------------------------------------------ parts

def part_cost(S, rig):
    log("tokens part 1: rate vs tokens vs tokens+headers, 1 worker, %d-byte body, %d keys, "
        "%d rounds of %d s (after %d s of ramp)" % (S.body, S.keys, S.rounds, S.window,
                                                   S.ramp))
    headers = {v: rig.check(v, S.body) for v in COST_VARIANTS}
    runs = interleaved(S, rig, COST_VARIANTS, S.body, S.rounds)
    return {"runs": runs, "headers": headers["tokens+headers"],
            "keys": keys_used(S, S.body)}


def part_parse(S, root):
    exe = os.path.join(root, "tokens_parse")
    cmd = [CC, "-O2", "-Wall", "-I", MODDIR, "-o", exe, PARSE_SRC,
           os.path.join(MODDIR, "dsg_tokens.c"), os.path.join(MODDIR, "dsg_json.c"),
           "-ljansson"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("tokens_parse.c does not build:\n%s" % r.stderr)
    args = [exe, "--json", "--ms", str(S.parse_ms), "--reps", str(S.parse_reps)] + \
        [str(s) for s in S.sizes]
    log("tokens part 2a: %s" % " ".join(["tokens_parse"] + args[1:]))
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("tokens_parse failed:\n%s%s" % (r.stdout, r.stderr))
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    cc = subprocess.run([CC, "--version"], capture_output=True, text=True).stdout
    jv = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libjansson4"],
                        capture_output=True, text=True).stdout.strip()
    return {"rows": rows, "cc": cc.splitlines()[0] if cc else "?", "jansson": jv or "?",
            "module_opt": module_opt(),
            "cmd": "gcc -O2 bench/tokens_parse.c ngx_deepseek_guard_module/dsg_tokens.c "
                   "ngx_deepseek_guard_module/dsg_json.c -ljansson"}


def module_opt():
    """The -O flag the module was compiled with: nginx's configure CFLAGS
    (build/nginx/objs/Makefile, as ./build.sh leaves it), if there."""
    try:
        with open(os.path.join(B.REPO, "build", "nginx", "objs", "Makefile")) as f:
            for line in f:
                if line.startswith("CFLAGS ="):
                    m = re.findall(r"(?<!\S)-O\S*", line)
                    return m[-1] if m else None
    except OSError:
        pass
    return None


def part_sizes(S, rig):
    out = []
    for size in S.sizes:
        rounds = S.rounds_for(size)
        log("tokens part 2b: %s bodies, rate vs tokens vs tokens+max_tokens, %d rounds "
            "(%d keys)" % (size_name(size), rounds, keys_used(S, size)))
        for v in SIZE_VARIANTS:
            rig.check(v, size)
        out.append({"size": size, "rounds": rounds, "keys": keys_used(S, size),
                    "runs": interleaved(S, rig, SIZE_VARIANTS, size, rounds)})
    return out


# ------------------------------------------------------------------ report

fmt, med = F.fmt, F.med


def stats(runs, variants):
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}
    sm = {v: {k: med([r[k] for r in rs]) for k in (
        "rps", "cpu_rps", "sched_rps", "us_per_req", "share", "up_share", "p99_ms",
        "used_per_req")} for v, rs in by.items()}
    return by, sm


def ratios(by, sm, a, b, k):
    """(ratio of the medians, per-round ratios)"""
    ra = sm[a][k] / sm[b][k] if sm[a][k] and sm[b][k] else None
    per = []
    for x in by[a]:
        y = [r for r in by[b] if r["round"] == x["round"]]
        if y and x[k] and y[0][k]:
            per.append(x[k] / y[0][k])
    return ra, per


def spread(xs, f="%.3f"):
    if not xs:
        return "-"
    return (f + " (" + f + ".." + f + ")") % (statistics.median(xs), min(xs), max(xs))


def void_of(runs):
    rej = sum(r["rejected"] for r in runs)
    err = sum(r["wrk_sock_err"] + r["wrk_non2xx"] for r in runs)
    if rej or err:
        return "**void**: %d rejections in the windows, %d wrk errors or non-2xx" % (rej, err)
    return None


def run_table(runs):
    lines = ["| body | round | variant | window s | requests | req/s | CPU s | req/cpu-s | "
             "schedstat req/cpu-s | µs CPU/req | nginx CPU share | upstream CPU share | "
             "wrk p99 ms | rejected | wrk non-2xx / socket errors | tokens used/req |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in runs:
        lines.append("| %s | %d | %s | %.2f | %d | %.0f | %.2f | %s | %s | %s | %.2f | %.2f | %s | "
                     "%d | %d / %d | %s |" % (
                         size_name(r["size"]), r["round"], r["variant"], r["seconds"], r["requests"], r["rps"],
                         r["cpu_s"], fmt(r["cpu_rps"]), fmt(r["sched_rps"]),
                         fmt(r["us_per_req"], "%.1f"), r["share"], r["up_share"],
                         fmt(r["p99_ms"], "%.2f"), r["rejected"], r["wrk_non2xx"],
                         r["wrk_sock_err"], fmt(r["used_per_req"], "%.2f")))
    return lines


def parse_row(rows, size, text, mt, fn):
    for r in rows:
        if r["size"] == size and r["text"] == text and r["max_tokens"] == mt \
                and r["function"] == fn:
            return r
    return None


def summarize(S, res):
    """The figures of the summary, also kept in the JSON."""
    s = {}
    by, sm = stats(res["cost"]["runs"], COST_VARIANTS)
    for v in ("tokens", "tokens+headers"):
        rc, pc = ratios(by, sm, v, "rate", "cpu_rps")
        rr, pr = ratios(by, sm, v, "rate", "rps")
        s[v] = {"ratio_cpu": rc, "ratio_cpu_rounds": pc, "ratio_rps": rr,
                "ratio_rps_rounds": pr,
                "extra_us": (sm[v]["us_per_req"] - sm["rate"]["us_per_req"])
                if sm[v]["us_per_req"] and sm["rate"]["us_per_req"] else None}
    s["rate_us"] = sm["rate"]["us_per_req"]
    s["cost_void"] = void_of(res["cost"]["runs"])
    s["sizes"] = []
    for p in res["sizes"]:
        by, sm = stats(p["runs"], SIZE_VARIANTS)
        x = {"size": p["size"], "void": void_of(p["runs"]), "rate_us": sm["rate"]["us_per_req"]}
        for v in ("tokens", "tokens+max_tokens"):
            rc, pc = ratios(by, sm, v, "rate", "cpu_rps")
            pr = parse_row(res["parse"]["rows"], p["size"], "ascii",
                           v == "tokens+max_tokens", "measure")
            x[v] = {"ratio_cpu": rc, "ratio_cpu_rounds": pc,
                    "extra_us": (sm[v]["us_per_req"] - sm["rate"]["us_per_req"])
                    if sm[v]["us_per_req"] and sm["rate"]["us_per_req"] else None,
                    "measure_us": pr["us"] if pr else None}
        s["sizes"].append(x)
    return s


def render(S, res, meta):
    s = summarize(S, res)
    res["summary"] = s
    lines = ["# Benchmark: token budgets, request cost and body measure (%s)" % meta["date"], "",
             "- commit: %s, %s" % (meta["commit"], meta["tree"]),
             "- module: sha256 %s" % meta["so"],
             "- machine: %s CPUs, %s; kernel %s" % (meta["nproc"], meta["cpu"], meta["kernel"]),
             "- %s; wrk %s; %s; jansson %s" % (meta["nginx"], meta["wrk"],
                                               res["parse"]["cc"], res["parse"]["jansson"]),
             "- load average %s at the start, %s at the end; runtime %s" % (
                 meta["load0"], meta["load1"], meta["runtime"]),
             "- `./build.sh bench tokens` (bench/tokens_scenario.py, bench/tokens_parse.c)",
             ""]

    # ---- summary
    t, th = s["tokens"], s["tokens+headers"]
    lines += ["## What it means", ""]
    if s["cost_void"]:
        lines += ["- Part 1 is %s." % s["cost_void"]]
    lines += ["- **A token-budget zone serves %s times the requests per CPU-second of a "
              "request-rate zone** on a %d-byte chat request proxied to a fast upstream "
              "(tokens/rate req/cpu-s %s, per round %s): %s µs more worker CPU per request "
              "(%s µs for the rate zone). With `deepseek_guard_openai_headers on`: %s "
              "(%s µs more)." % (
                  fmt(t["ratio_cpu"], "%.3f"), S.body, fmt(t["ratio_cpu"], "%.3f"),
                  spread(t["ratio_cpu_rounds"]), fmt(t["extra_us"], "%.1f"),
                  fmt(s["rate_us"], "%.1f"), fmt(th["ratio_cpu"], "%.3f"),
                  fmt(th["extra_us"], "%.1f")),
              "- req/s, tokens/rate: %s (tokens+headers: %s). wrk, both nginx and whatever "
              "else runs share 2 cores, so req/s follows the CPU the worker gets; req/cpu-s "
              "is the cost." % (fmt(t["ratio_rps"], "%.3f"), fmt(th["ratio_rps"], "%.3f"))]
    for x in s["sizes"]:
        a, b = x["tokens"], x["tokens+max_tokens"]
        lines.append("- %s body: tokens/rate req/cpu-s %s without `max_tokens` (%s µs more "
                     "per request; the C measure alone: %s µs), %s with it (%s µs more; the "
                     "measure with the max_tokens read: %s µs)%s." % (
                         size_name(x["size"]), fmt(a["ratio_cpu"], "%.3f"),
                         fmt(a["extra_us"], "%.0f"), fmt(a["measure_us"], "%.1f"),
                         fmt(b["ratio_cpu"], "%.3f"), fmt(b["extra_us"], "%.0f"),
                         fmt(b["measure_us"], "%.1f"),
                         "; %s" % x["void"] if x["void"] else ""))
    rows = res["parse"]["rows"]
    sc = [r["mb_s"] for r in rows if r["function"] == "scan"]
    js = [r["mb_s"] for r in rows if r["function"] == "json"]
    nm = [r["mb_s"] for r in rows if r["function"] == "names" and not r["max_tokens"]]
    if sc and js:
        lines.append("- The byte scan runs at %.0f..%.0f MB/s, the max_tokens name test "
                     "(two case-insensitive searches when neither name is there) at "
                     "%.0f..%.0f MB/s, the max_tokens read (dsg_json_max_tokens) at %.0f..%.0f MB/s: a body that names "
                     "`max_tokens` costs about %.0fx the measure of one that does not%s." % (
                         min(sc), max(sc), min(nm) if nm else 0, max(nm) if nm else 0,
                         min(js), max(js), statistics.median(
                             [r["us"] / max(1e-9, rn["us"]) for r in rows
                              if r["function"] == "measure" and r["max_tokens"]
                              for rn in rows if rn["function"] == "measure"
                              and not rn["max_tokens"] and rn["size"] == r["size"]
                              and rn["text"] == r["text"]]),
                         "".join("; the largest, %s naming it (%s): %.1f ms of CPU a body "
                                 "in the C benchmark" % (size_name(r["size"]), r["text"].upper() if
                                           r["text"] == "cjk" else "ASCII", r["us"] / 1000)
                                 for r in [max((r for r in rows if r["function"] == "measure"
                                                and r["max_tokens"]),
                                               key=lambda r: (r["size"], r["us"]))])))
    lines += ["- Noisy figures: one 2-core machine runs wrk, the guarded nginx, the upstream "
              "nginx and possibly other tests at the same time. The medians over interleaved "
              "rounds and the per-round spreads are given; a difference within the spread is "
              "not a result.", ""]

    # ---- part 1
    runs = res["cost"]["runs"]
    by, sm = stats(runs, COST_VARIANTS)
    lines += ["## 1. Request cost: token budget vs request rate", "",
              "nginx with 1 worker (`worker_processes 1`), three servers each with "
              "`location = /v1/chat/completions` and `proxy_pass` (keepalive 64) to a second, "
              "stock nginx (1 worker, no module) that answers `return 200` with a %d-byte "
              "chat completion carrying `usage` (prompt 20, completion 5 tokens). Variants: "
              "*rate* `deepseek_guard_zone r:32m key=$http_authorization rate=1000000r/s`; "
              "*tokens* `t:32m key=$http_authorization tokens=1000000000/m` (the body is "
              "read and measured before admission, the answer's usage is read by the body "
              "filter and settles the reservation); *tokens+headers* the zone `t` with "
              "`deepseek_guard_openai_headers on` (adds %s). wrk -t1 -c%d POSTs the same "
              "%d-byte chat body (no `max_tokens`; wrk `--timeout 30s`) with `Authorization: Bearer "
              "sk-bench-k1..%d`, %d rounds, the order reversed every other round. Each run: "
              "%d s of ramp, then a %d s window measured from the zone's counters (admitted "
              "+ rejected, /metrics) and the guarded worker's CPU (utime + stime, "
              "/proc/PID/stat; schedstat beside it, and *µs CPU/req* from it). The "
              "upstream's CPU is not counted (its share of a core is given)." % (
                  len(UPSTREAM_ANSWER), ", ".join("`%s`" % h for h in sorted(
                      res["cost"]["headers"])) or "x-ratelimit-* headers",
                  S.conns, S.body, res["cost"]["keys"], S.rounds, S.ramp, S.window), "",
              "| variant | req/s | req/cpu-s | req/cpu-s (schedstat) | µs CPU/req | "
              "nginx CPU share | upstream CPU share | wrk p99 ms | tokens used/req | "
              "rejections in windows |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in COST_VARIANTS:
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %d |" % (
            v, fmt(sm[v]["rps"]), fmt(sm[v]["cpu_rps"]), fmt(sm[v]["sched_rps"]),
            fmt(sm[v]["us_per_req"], "%.1f"), fmt(sm[v]["share"], "%.2f"),
            fmt(sm[v]["up_share"], "%.2f"), fmt(sm[v]["p99_ms"], "%.2f"),
            fmt(sm[v]["used_per_req"], "%.2f"), sum(r["rejected"] for r in by[v])))
    lines += ["", "| ratio | of the medians | per round: median (min..max) |",
              "|---|---:|---:|"]
    for v in ("tokens", "tokens+headers"):
        for k, name in (("rps", "req/s"), ("cpu_rps", "req/cpu-s"),
                        ("sched_rps", "req/cpu-s (schedstat)")):
            ra, per = ratios(by, sm, v, "rate", k)
            lines.append("| %s / rate, %s | %s | %s |" % (v, name, fmt(ra, "%.3f"),
                                                          spread(per)))
    lines += ["", "Verdict: %s." % (s["cost_void"] or "valid (no rejection in any window, no "
                                     "wrk error)"), "",
              "*tokens used/req* is `deepseek_guard_tokens_total{kind=\"used\"}` over the "
              "window's requests: %d when every answer was settled from its `usage` "
              "(requests straddling the window's edges move it a little)." %
              USED_PER_REQUEST, ""]
    if res["cost"]["headers"]:
        lines += ["Headers of the tokens+headers answer checked before the runs: %s." %
                  ", ".join("`%s: %s`" % kv for kv in sorted(res["cost"]["headers"].items())),
                  ""]
    lines += ["Every run (the medians above are over these):", ""] + run_table(runs) + [""]

    # ---- part 2
    p = res["parse"]
    lines += ["## 2. The body measure by body size", "",
              "### 2a. The core functions (C micro-benchmark)", "",
              "`bench/tokens_parse.c`, built as `%s` (gcc -O2). Chat bodies of exactly the "
              "size: a system message, then a user message of ASCII words (or CJK "
              "ideographs, raw UTF-8, a space every 20), then `\"max_tokens\":256` or "
              "`\"temperature\":0.7` (the same length). Timed with "
              "clock_gettime(CLOCK_MONOTONIC), iterations calibrated to about %d ms a run, "
              "the fastest of %d runs (the one least disturbed by the other processes of "
              "the machine; the median is in the JSON); MB/s = body bytes / µs (10^6 B/s). *scan*: "
              "`dsg_tokens_scan()` + `dsg_tokens_estimate()`, run on every body; *names*: "
              "the glue's test whether the body names `max_tokens` or "
              "`max_completion_tokens` (two `ngx_strlcasestrn()` searches; nginx's "
              "algorithm, copied); *json*: `dsg_json_max_tokens()` (a one-pass scan of the top level since 0857474; a jansson tree before); "
              "*measure*: what `ngx_http_deepseek_guard_tokens_measure()` runs on a body in "
              "one buffer, scan + names + json only when named.%s" % (
                  p["cmd"], S.parse_ms, S.parse_reps,
                  " The module itself is compiled with nginx's configure flags (`%s` in "
                  "build/nginx/objs/Makefile), not -O2: its copies of these functions may "
                  "run somewhat slower than here." % p["module_opt"]
                  if p.get("module_opt") and p["module_opt"] != "-O2" else ""), "",
              "| body | text | max_tokens | scan µs (MB/s) | names µs (MB/s) | json µs "
              "(MB/s) | measure µs (MB/s) | estimate | max_tokens read |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for size in S.sizes:
        for text in ("ascii", "cjk"):
            for mt in (False, True):
                cells = []
                for fn in ("scan", "names", "json", "measure"):
                    r = parse_row(p["rows"], size, text, mt, fn)
                    c = "%s (%.0f)" % (("%.2f" if r["us"] < 100 else "%.0f") % r["us"],
                                       r["mb_s"]) if r else "-"
                    if fn == "json" and not mt and r:
                        c += " not run"
                    cells.append(c)
                r = parse_row(p["rows"], size, text, mt, "scan")
                lines.append("| %s | %s | %s | %s | %s | %s |" % (
                    size_name(size), "ASCII" if text == "ascii" else "CJK",
                    "yes" if mt else "no", " | ".join(cells),
                    r["estimate"] if r else "-", r["max_tokens_read"] if r else "-"))
    lines += ["", "*not run*: the module does not parse a body that names neither field; "
              "the figure is what the parse would cost.", ""]

    lines += ["### 2b. End to end, by body size", "",
              "The same nginx pair as part 1; wrk POSTs a chat body of the size (ASCII "
              "words; `client_body_buffer_size 2m`, so the body is in one memory buffer). "
              "*rate* and *tokens* with the body without `max_tokens`, *tokens+max_tokens* "
              "with the body of the same size naming it (so the max_tokens read finds it). The wrk "
              "script formats every request once, at most 32 MB of them, so a large body "
              "cycles over fewer keys (given per size). *extra µs* is the worker's CPU per "
              "request above the rate variant's (from schedstat), beside the C "
              "micro-benchmark's *measure* of an ASCII body of that size.", "",
              "| body | keys | rounds | variant | req/s | req/cpu-s | µs CPU/req | "
              "extra µs vs rate | C measure µs | req/cpu-s / rate: of medians | per round "
              "(min..max) | nginx CPU share | upstream CPU share | rejections |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    allruns = []
    for p2, x in zip(res["sizes"], s["sizes"]):
        by, sm = stats(p2["runs"], SIZE_VARIANTS)
        allruns += p2["runs"]
        for v in SIZE_VARIANTS:
            rv = x.get(v, {})
            lines.append("| %s | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s "
                         "| %d |" % (
                             size_name(p2["size"]), p2["keys"], p2["rounds"], v,
                             fmt(sm[v]["rps"]), fmt(sm[v]["cpu_rps"]),
                             fmt(sm[v]["us_per_req"], "%.1f"),
                             fmt(rv.get("extra_us"), "%+.1f"),
                             fmt(rv.get("measure_us"), "%.1f"),
                             fmt(rv.get("ratio_cpu"), "%.3f"),
                             spread(rv.get("ratio_cpu_rounds", [])),
                             fmt(sm[v]["share"], "%.2f"), fmt(sm[v]["up_share"], "%.2f"),
                             sum(r["rejected"] for r in by[v])))
    voids = ["%s: %s" % (size_name(x["size"]), x["void"]) for x in s["sizes"] if x["void"]]
    lines += ["", "Verdict: %s." % ("; ".join(voids) if voids else
                                    "valid (no rejection in any window, no wrk error)"), "",
              "Every run:", ""] + run_table(allruns)
    alerts = res.get("alerts", [])
    if alerts:
        lines += ["", "**error.log alerts:**", "", "```"] + alerts[:10] + ["```"]
    return "\n".join(lines) + "\n"


def summary_text(res):
    s = res["summary"]
    out = ["tokens/rate req/cpu-s %s (per round %s), tokens+headers/rate %s; %s" % (
        fmt(s["tokens"]["ratio_cpu"], "%.3f"), spread(s["tokens"]["ratio_cpu_rounds"]),
        fmt(s["tokens+headers"]["ratio_cpu"], "%.3f"), s["cost_void"] or "valid")]
    for x in s["sizes"]:
        out.append("%7s: tokens/rate req/cpu-s %s, tokens+max_tokens/rate %s; C measure %s / "
                   "%s us%s" % (size_name(x["size"]), fmt(x["tokens"]["ratio_cpu"], "%.3f"),
                                fmt(x["tokens+max_tokens"]["ratio_cpu"], "%.3f"),
                                fmt(x["tokens"]["measure_us"], "%.1f"),
                                fmt(x["tokens+max_tokens"]["measure_us"], "%.1f"),
                                "; " + x["void"] if x["void"] else ""))
    return "\n".join(out)


# ------------------------------------------------------------------ main

def run(quick=False):
    S = Settings(quick)
    for f in (B.NGINX, B.MODULE, PARSE_SRC):
        if not os.path.exists(f):
            sys.exit("bench: %s not found (run ./build.sh bench)" % f)
    for prog in (B.WRK, CC):
        if not shutil.which(prog):
            sys.exit("bench: %s not found" % prog)
    if any(s > 2 << 20 for s in S.sizes + [S.body]):
        sys.exit("bench: bodies up to 2 MB (client_body_buffer_size 2m)")

    # a SIGTERM or SIGHUP still stops what we started
    def bye(sig, frame):
        raise SystemExit(128 + sig)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bye)

    meta = B.meta_info(types.SimpleNamespace())
    meta["commit"], meta["tree"] = F.tree_state()
    meta["nproc"] = os.cpu_count()
    meta["load0"] = B.loadavg()
    log("tokens: load average %s" % meta["load0"])
    root = tempfile.mkdtemp(prefix="dsg-bench-")
    os.chmod(root, 0o755)
    module = os.path.join(root, "module.so")
    shutil.copy(B.MODULE, module)
    B.MODULE = module
    with open(module, "rb") as f:
        meta["so"] = hashlib.sha256(f.read()).hexdigest()[:12]
    res = {}
    rig = None
    try:
        res["parse"] = part_parse(S, root)
        rig = Rig(root).start()
        res["cost"] = part_cost(S, rig)
        res["sizes"] = part_sizes(S, rig)
    finally:
        if rig:
            res["alerts"] = ["%s: %s" % (n, a) for n, ng in (("guard", rig.guard),
                                                             ("upstream", rig.upstream))
                             for a in ng.alerts()][:10]
            rig.stop()
        if S.keep:
            log("prefix kept: %s" % root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    secs = time.time() - B.T0
    meta["runtime"] = "%d min %02d s" % (secs // 60, secs % 60)
    meta["load1"] = B.loadavg()
    meta["date"] = datetime.date.today().isoformat()
    text = render(S, res, meta)
    print(text)
    print(summary_text(res))
    os.makedirs(B.RESULTS, exist_ok=True)
    full = S.is_default()
    base = meta["date"] + ("-tokens" if full else "-tokens-partial")
    tmp = "" if full else ".tmp"
    with open(os.path.join(B.RESULTS, base + ".md" + tmp), "w") as f:
        f.write(text)
    # the numbers behind the report: tokens_scenario.py --render <file> prints it again
    with open(os.path.join(B.RESULTS, base + ".json" + tmp), "w") as f:
        json.dump({"meta": meta, "settings": vars(S), "results": res}, f, indent=1,
                  sort_keys=True)
    log("written to bench/results/%s.md%s (%s)" % (base, tmp, meta["runtime"]))
    return 0


def render_saved(path):
    with open(path) as f:
        saved = json.load(f)
    S = types.SimpleNamespace(**saved["settings"])
    return render(S, saved["results"], saved["meta"])


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--render"] and len(argv) == 2:
        print(render_saved(argv[1]), end="")
        sys.exit(0)
    sys.exit(run("--quick" in argv))
