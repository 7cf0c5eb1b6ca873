#!/usr/bin/python3
"""Benchmarks of ngx_deepseek_guard_module against stock nginx.

Run by bench/run.sh (./build.sh bench).  Python 3.11 stdlib only, plus wrk
and Debian's nginx.  Each scenario starts its own nginx (configurations in
bench/conf/) in a private prefix, runs its variants interleaved
(A, B, C, A, B, C, ...), repeats them, and reports medians and ratios with
each target beside its result.  The markdown report is printed and written
to bench/results/<YYYY-MM-DD>.md, with the raw numbers in <YYYY-MM-DD>.json
(a partial or quick run writes bench/results/<YYYY-MM-DD>-partial.*.tmp).

  bench.py [--quick] [scenario ...]
    scenarios: admit reject cache keys overload coalesce misses instructions
    (default: all; instructions alone writes <YYYY-MM-DD>-instructions.md)
    and queue and stall (only when named: bench/queue_scenario.py and
    bench/stall_scenario.py, their own reports bench/results/<YYYY-MM-DD>-queue.md
    and <YYYY-MM-DD>-stall.md)
  bench.py --render bench/results/<YYYY-MM-DD>.json    the report again
  bench.py --render bench/results/<YYYY-MM-DD>-queue.json
  bench.py --render bench/results/<YYYY-MM-DD>-stall.json

Environment: NGINX_BIN, DSG_MODULE, DSG_PYTHON, WRK, BENCH_REPS (3),
BENCH_WRK_REPS (5), BENCH_WRK_SECONDS (4), BENCH_WRK_CONNECTIONS (50),
BENCH_WRK_THREADS (1), BENCH_OVERLOAD_SECONDS (30), BENCH_OVERLOAD_REPS
(= BENCH_REPS), BENCH_KEEP=1 (keep the prefixes), BENCH_INSTR_REQUESTS (2000),
BENCH_INSTR_WARMUP (100).
"""
import argparse
import datetime
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
CONF = os.path.join(BENCH, "conf")
RESULTS = os.path.join(BENCH, "results")
NGINX = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
MODULE = os.path.abspath(os.environ.get(
    "DSG_MODULE", os.path.join(REPO, "build", "ngx_http_deepseek_guard_module.so")))
PYTHON = os.environ.get("DSG_PYTHON", "/usr/bin/python3")
WRK = os.environ.get("WRK", "wrk")
MOCK = os.path.join(REPO, "t", "mock", "mock_llm.py")
LOADGEN = os.path.join(BENCH, "loadgen.py")

SCENARIOS = ("admit", "reject", "cache", "keys", "overload", "coalesce", "misses",
             "instructions")
# run only when named, with a report of their own
SEPARATE = ("queue", "stall")
T0 = time.time()


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.reps = env_int("BENCH_REPS", 1 if quick else 3)
        # wrk scenarios: more, shorter runs; on a shared machine the median
        # of 5 interleaved runs is steadier than that of 3
        self.wrk_reps = env_int("BENCH_WRK_REPS", 1 if quick else 5)
        self.wrk_s = env_int("BENCH_WRK_SECONDS", 1 if quick else 4)
        self.wrk_c = env_int("BENCH_WRK_CONNECTIONS", 50)
        self.wrk_t = env_int("BENCH_WRK_THREADS", 1)
        self.overload_s = env_int("BENCH_OVERLOAD_SECONDS", 6 if quick else 30)
        self.overload_reps = env_int("BENCH_OVERLOAD_REPS", self.reps)
        # the mock LLM of scenarios 5 and 6
        self.capacity = 20
        self.first_token_ms = 200
        self.token_ms = 20
        self.tokens = 10
        self.gen_ms = self.first_token_ms + self.token_ms * self.tokens
        self.capacity_rps = self.capacity * 1000.0 / self.gen_ms
        self.offered_factor = 3
        self.keep = os.environ.get("BENCH_KEEP") == "1"
        # scenario "instructions": requests per path under callgrind
        self.instr_n = env_int("BENCH_INSTR_REQUESTS", 200 if quick else 2000)
        self.instr_warmup = env_int("BENCH_INSTR_WARMUP", 20 if quick else 100)
        self.instr_reps = env_int("BENCH_INSTR_REPS", 1 if quick else 3)


def log(msg):
    print("[bench %6.1fs] %s" % (time.time() - T0, msg), file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rindex(")") + 2] not in "ZX"


# ------------------------------------------------------------------ processes

class Nginx:
    """One nginx instance of a bench/conf/ template in a private prefix."""

    def __init__(self, root, name, template, subs, ports):
        self.prefix = os.path.join(root, name)
        self.template = template
        self.subs = dict(subs)
        self.ports = ports              # the ports to wait for
        self.pid = None
        for d in ("logs", "client_body_temp", "proxy_temp", "fastcgi_temp",
                  "uwsgi_temp", "scgi_temp"):
            os.makedirs(os.path.join(self.prefix, d), exist_ok=True)
        self.conf = os.path.join(self.prefix, "nginx.conf")

    def render(self):
        with open(os.path.join(CONF, self.template)) as f:
            text = f.read()
        p = self.prefix
        subs = {
            "LOAD_MODULE": "load_module %s;" % MODULE,
            "USER": "user root;" if os.geteuid() == 0 else "",
            "PREFIX": p,
            "HTTP_COMMON": "\n".join("    " + l for l in (
                "client_body_temp_path %s/client_body_temp;" % p,
                "proxy_temp_path %s/proxy_temp;" % p,
                "fastcgi_temp_path %s/fastcgi_temp;" % p,
                "uwsgi_temp_path %s/uwsgi_temp;" % p,
                "scgi_temp_path %s/scgi_temp;" % p,
                "# as in Debian's /etc/nginx/nginx.conf",
                "sendfile on;",
                "tcp_nopush on;",
                "default_type application/json;")),
        }
        subs.update({k: str(v) for k, v in self.subs.items()})
        for k, v in subs.items():
            text = text.replace("{{%s}}" % k, v)
        left = re.findall(r"\{\{[A-Z0-9_]+\}\}", text)
        if left:
            raise RuntimeError("%s: unfilled %s" % (self.template, left))
        with open(self.conf, "w") as f:
            f.write(text)

    def start(self):
        self.render()
        pidfile = os.path.join(self.prefix, "nginx.pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        err = os.path.join(self.prefix, "logs", "error.log")
        r = subprocess.run([NGINX, "-p", self.prefix + "/", "-c", self.conf, "-e", err],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError("nginx %s failed to start: %s\n%s" % (
                self.template, r.stderr.strip(), self.tail()))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with open(pidfile) as f:
                    self.pid = int(f.read().strip())
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            if all(self.listening(p) for p in self.ports):
                return self
            time.sleep(0.02)
        raise RuntimeError("nginx %s did not come up\n%s" % (self.template, self.tail()))

    @staticmethod
    def listening(port):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            return False

    def tail(self, n=20):
        try:
            with open(os.path.join(self.prefix, "logs", "error.log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if not self.pid:
            return
        for sig, secs in ((signal.SIGQUIT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 3)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + secs
            while time.time() < deadline and alive(self.pid):
                time.sleep(0.02)
            if not alive(self.pid):
                break
        self.pid = None

    def alerts(self):
        try:
            with open(os.path.join(self.prefix, "logs", "error.log")) as f:
                return [l.rstrip() for l in f
                        if re.search(r"\[(alert|crit|emerg)\]|exited on signal", l)]
        except OSError:
            return []

    def path(self, *parts):
        return os.path.join(self.prefix, *parts)

    def workers(self):
        kids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open("/proc/%s/stat" % d) as f:
                        st = f.read()
                except OSError:
                    continue
                if int(st[st.rindex(")") + 2:].split()[1]) == self.pid:
                    kids.append(int(d))
        return kids

    def settle(self, busy_ms=5, step=0.1, limit=10):
        """Waits until the workers use less than busy_ms of CPU in a step:
        requests that wrk left behind are done before the next run."""
        deadline = time.time() + limit
        prev = self.cpu_ns()
        while time.time() < deadline:
            time.sleep(step)
            cur = self.cpu_ns()
            if cur - prev < busy_ms * 1e6:
                return
            prev = cur

    def cpu_ns(self):
        """CPU time used so far by the worker processes, in ns."""
        total = 0
        for pid in self.workers():
            try:
                with open("/proc/%d/schedstat" % pid) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total


class Mock:
    """t/mock/mock_llm.py on a free port."""

    def __init__(self, root, S):
        self.dir = os.path.join(root, "mock")
        os.makedirs(self.dir, exist_ok=True)
        portfile = os.path.join(self.dir, "port")
        self.logf = open(os.path.join(self.dir, "mock.log"), "ab")
        self.proc = subprocess.Popen(
            [PYTHON, MOCK, "--listen", "127.0.0.1:0", "--portfile", portfile,
             "--capacity", str(S.capacity), "--first-token-ms", str(S.first_token_ms),
             "--token-ms", str(S.token_ms), "--tokens", str(S.tokens), "--quiet"],
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        deadline = time.time() + 15
        self.port = None
        while time.time() < deadline:
            try:
                with open(portfile) as f:
                    self.port = int(f.read().strip())
                break
            except (OSError, ValueError):
                if self.proc.poll() is not None:
                    raise RuntimeError("mock exited with %s" % self.proc.returncode)
                time.sleep(0.02)
        if not self.port:
            raise RuntimeError("mock did not start")

    def call(self, method, path, obj=None):
        body = json.dumps(obj).encode() if obj is not None else b""
        st, _, data = http(self.port, path, method=method, body=body,
                           headers={"Content-Type": "application/json"} if body else None)
        if st != 200:
            raise RuntimeError("mock %s %s: %s" % (method, path, st))
        return json.loads(data)

    def stats(self):
        return self.call("GET", "/stats")

    def reset(self):
        return self.call("POST", "/stats/reset")

    def config(self, **kw):
        return self.call("POST", "/admin/config", kw)

    def idle(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.stats()["inflight"] == 0:
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


# ------------------------------------------------------------------ HTTP

def parse_head(raw):
    head, sep, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest


def http(port, path, method="GET", headers=None, body=b"", timeout=15):
    """One blocking HTTP/1.1 request on its own connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        # the Host wrk sends, so that cache keys with $host match
        headers = dict(headers or {})
        host = headers.pop("Host", "127.0.0.1:%d" % port)
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % host,
                 "Connection: close"]
        for k, v in headers.items():
            lines.append("%s: %s" % (k, v))
        if body or method == "POST":
            lines.append("Content-Length: %d" % len(body))
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        chunks = []
        while True:
            d = s.recv(262144)
            if not d:
                break
            chunks.append(d)
    finally:
        s.close()
    status, hdrs, rest = parse_head(b"".join(chunks))
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        out, i = bytearray(), 0
        while True:
            j = rest.index(b"\r\n", i)
            n = int(rest[i:j].split(b";")[0], 16)
            if n == 0:
                break
            out += rest[j + 2:j + 2 + n]
            i = j + 2 + n + 2
        rest = bytes(out)
    return status, hdrs, rest


class Pipeline:
    """Many requests pipelined on one keep-alive connection, in order."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), 30)
        self.buf = bytearray()

    def run(self, requests, batch=512):
        statuses = []
        for i in range(0, len(requests), batch):
            part = requests[i:i + batch]
            self.sock.sendall(b"".join(part))
            statuses += self.read(len(part))
        return statuses

    def read(self, n):
        out = []
        buf = self.buf
        while len(out) < n:
            e = buf.find(b"\r\n\r\n")
            if e >= 0:
                head = bytes(buf[:e]).decode("latin-1")
                m = re.search(r"(?im)^content-length:\s*(\d+)", head)
                clen = int(m.group(1)) if m else 0
                if len(buf) >= e + 4 + clen:
                    out.append(int(head.split(" ", 2)[1]))
                    del buf[:e + 4 + clen]
                    continue
            d = self.sock.recv(1 << 20)
            if not d:
                raise RuntimeError("pipeline: connection closed after %d of %d" % (len(out), n))
            buf += d
        return out

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------ wrk

def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(text):
    r = {"rps": None, "p99_ms": None, "requests": None, "non2xx": 0, "sock_err": 0,
         "bytes": None}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    if m:
        r["p99_ms"] = to_ms(m.group(1), m.group(2))
    m = re.search(r"(\d+) requests in [\d.]+\w+, ([\d.]+)(B|KB|MB|GB) read", text)
    if m:
        r["requests"] = int(m.group(1))
        r["bytes"] = float(m.group(2)) * {"B": 1, "KB": 1024, "MB": 1 << 20,
                                          "GB": 1 << 30}[m.group(3)]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["sock_err"] = sum(int(x) for x in m.groups())
        r["timeouts"] = int(m.group(4))
    return r


WRK_RUNS = itertools.count(1)


def run_wrk(S, url, headers=(), secs=None, ngx=None, script=None):
    """script: a wrk Lua script; it gets a tag unique to this wrk run
    (its args[1]), so that URIs made from it never repeat across runs."""
    secs = secs or S.wrk_s
    cpu0 = ngx.cpu_ns() if ngx else 0
    cmd = [WRK, "-t%d" % S.wrk_t, "-c%d" % S.wrk_c, "-d%ds" % secs, "--latency"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    if script:
        cmd += ["--", "r%d" % next(WRK_RUNS)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    r = parse_wrk(out.stdout)
    if r["rps"] is None:
        raise RuntimeError("wrk output not understood:\n%s\n%s" % (out.stdout, out.stderr))
    # requests per second of nginx worker CPU: what the req/s would be with
    # a whole core for nginx, much less sensitive to other load on the box
    r["cpu_rps"] = None
    if ngx:
        cpu = (ngx.cpu_ns() - cpu0) / 1e9
        if cpu > 0 and r["requests"]:
            r["cpu_rps"] = r["requests"] / cpu
    return r


def wrk_interleaved(S, ngx, variants, expect, script=None):
    """variants: [(name, url, headers, before)], run A,B,C,A,B,C,...

    expect: "2xx" (every response 2xx) or "reject" (every response non-2xx).
    script: a wrk Lua script for every run (see run_wrk).
    Returns {name: [wrk result, ...]}; each result has "ok" set."""
    res = {v[0]: [] for v in variants}
    for name, url, headers, before in variants:      # warm-up, not recorded
        if before:
            before()
        run_wrk(S, url, headers, secs=1, ngx=ngx, script=script)
    for rep in range(S.wrk_reps):
        for name, url, headers, before in variants:
            if before:
                before()
            r = run_wrk(S, url, headers, ngx=ngx, script=script)
            if expect == "2xx":
                r["ok"] = r["non2xx"] == 0 and r["sock_err"] == 0
            else:
                r["ok"] = r["non2xx"] == r["requests"] and r["sock_err"] == 0
            res[name].append(r)
            log("  %-26s rep %d: %9.0f req/s  p99 %6.2f ms  %9.0f req/cpu-s%s" % (
                name, rep + 1, r["rps"], r["p99_ms"] or 0, r["cpu_rps"] or 0,
                "" if r["ok"] else "  (unexpected: %d non-2xx, %d socket errors of %d)"
                % (r["non2xx"], r["sock_err"], r["requests"] or 0)))
    return res


def summarize_wrk(runs):
    return {"rps": median([r["rps"] for r in runs]),
            "p99_ms": median([r["p99_ms"] for r in runs]),
            "cpu_rps": median([r["cpu_rps"] for r in runs]),
            # share of a core nginx got: below ~0.9 the req/s were held back
            # by other load on the machine (or by wrk)
            "util": median([r["rps"] / r["cpu_rps"] if r["cpu_rps"] else None
                            for r in runs]),
            "runs": [r["rps"] for r in runs],
            "ok": all(r["ok"] for r in runs)}


def paired(a, b):
    """Per-run ratios of a to b (run i of a was measured right after or
    before run i of b), as text: shows the spread behind a ratio of medians."""
    return " / ".join("%.2f" % (x / y) for x, y in zip(a["runs"], b["runs"]) if x and y)


# ------------------------------------------------------------------ scenarios

API_HEADER = "Authorization: Bearer sk-bench-normal"


def scenario_throughput(S, root, which):
    port = free_port()
    ngx = Nginx(root, "throughput", "throughput.conf", {"PORT": port}, [port]).start()
    out = {}
    try:
        base = "http://127.0.0.1:%d" % port
        hdr = {"Authorization": "Bearer sk-bench-normal"}
        if "admit" in which:
            log("1. admit path")
            # each variant is a server of its own, chosen by Host
            res = wrk_interleaved(S, ngx, [
                (v, base + "/" + v, [API_HEADER, "Host: " + v], None)
                for v in ("return", "plain", "limit_req", "guard")], "2xx")
            out["admit"] = {k: summarize_wrk(v) for k, v in res.items()}
        if "reject" in which:
            log("2. reject path")
            checks = {}
            for name in ("limit_req", "guard"):
                hh = dict(hdr, Host="reject_" + name)
                http(port, "/reject/" + name, headers=hh)       # the one token
                st, h, body = http(port, "/reject/" + name, headers=hh)
                checks[name] = {"status": st, "retry_after": h.get("retry-after"),
                                "type": h.get("content-type"), "len": len(body)}

            def consume(name):
                return lambda: http(port, "/reject/" + name,
                                    headers=dict(hdr, Host="reject_" + name))

            res = wrk_interleaved(S, ngx, [
                (v, base + "/reject/" + v, [API_HEADER, "Host: reject_" + v], consume(v))
                for v in ("limit_req", "guard")], "reject")
            out["reject"] = {k: summarize_wrk(v) for k, v in res.items()}
            out["reject"]["checks"] = checks
    finally:
        ngx.stop()
        out["alerts"] = ngx.alerts()
    return out


CACHE_SIZES = (("1k", 1024), ("32k", 32768), ("256k", 262144))


def json_body(n):
    """A JSON document of exactly n bytes."""
    pad = n - len('{"pad":""}')
    alpha = "abcdefghijklmnopqrstuvwxyz0123456789"
    s = (alpha * (pad // len(alpha) + 1))[:pad]
    return '{"pad":"%s"}' % s


def cache_nginx(root, name):
    """The nginx of bench/conf/cache.conf (not started) and its ports:
    the origin's files and the ceiling's literal bodies are filled in."""
    port, origin = free_port(), free_port()
    maps, locs = [], []
    for size, n in CACHE_SIZES:
        body = json_body(n)
        if n <= 4000:
            value = "'%s'" % body
        else:
            pieces = [body[i:i + 4000] for i in range(0, n, 4000)]
            for k, p in enumerate(pieces):
                maps.append("    map \"\" $ceiling_%s_%d { default '%s'; }" % (size, k, p))
            value = '"%s"' % "".join("$ceiling_%s_%d" % (size, k) for k in range(len(pieces)))
        locs.append("        location = /ceiling/%s.json {\n            return 200 %s;\n"
                    "        }\n" % (size, value))
    ngx = Nginx(root, name, "cache.conf",
                {"PORT": port, "ORIGIN_PORT": origin, "CEILING_MAPS": "\n".join(maps),
                 "CEILING_LOCATIONS": "\n".join(locs)}, [port, origin])
    os.makedirs(ngx.path("www"), exist_ok=True)
    for size, n in CACHE_SIZES:
        with open(ngx.path("www", size + ".json"), "w") as f:
            f.write(json_body(n))
    return ngx, port


def scenario_cache(S, root):
    log("3. cache hits")
    ngx, port = cache_nginx(root, "cache")
    ngx.start()
    out = {"sizes": {}, "warm": {}, "origin_during_runs": None}
    try:
        # warm both caches, check every variant answers the same bytes
        for name, n in CACHE_SIZES:
            want = json_body(n).encode()
            for v in ("proxy_cache", "guard_cache", "ceiling"):
                path = "/%s/%s.json" % (v, name)
                cache = None
                for _ in range(10):
                    st, h, body = http(port, path)
                    cache = h.get("x-cache-status")
                    if st != 200 or body != want:
                        raise RuntimeError("%s: status %s, %d bytes" % (path, st, len(body)))
                    if v == "ceiling" or cache == "HIT":
                        break
                    time.sleep(0.05)
                out["warm"][path] = cache or "n/a"
        origin_log = ngx.path("logs", "origin.log")
        before = sum(1 for _ in open(origin_log))
        base = "http://127.0.0.1:%d" % port
        for name, n in CACHE_SIZES:
            log("  %s bodies" % name)
            res = wrk_interleaved(S, ngx, [
                (v + " " + name, "%s/%s/%s.json" % (base, v, name), [], None)
                for v in ("proxy_cache", "guard_cache", "ceiling")], "2xx")
            out["sizes"][name] = {k.split()[0]: summarize_wrk(r) for k, r in res.items()}
        out["origin_during_runs"] = sum(1 for _ in open(origin_log)) - before
    finally:
        ngx.stop()
        out["alerts"] = ngx.alerts()
    return out


def scenario_keys(S, root):
    log("4. memory per key (1 MB zones, 64-byte keys)")
    nzones = 24
    zones, locs = [], []
    for i in range(nzones):
        zones.append("    deepseek_guard_zone guard_%d:1m key=$http_x_api_key rate=1r/m status=429;" % i)
        zones.append("    limit_req_zone $http_x_api_key zone=limit_req_%d:1m rate=1r/m;" % i)
        locs.append("        location = /guard/%d { deepseek_guard guard_%d; empty_gif; }" % (i, i))
        locs.append("        location = /limit_req/%d { limit_req zone=limit_req_%d; empty_gif; }" % (i, i))
    port = free_port()
    ngx = Nginx(root, "keys", "keys.conf",
                {"PORT": port, "ZONES": "\n".join(zones), "LOCATIONS": "\n".join(locs)}, [port])
    ngx.start()
    state = {"next": 0, "probes": 0, "restarts": 0, "anomalies": []}

    def probe(side, n, tag):
        """True if the first of n + 1 keys is still tracked after n others."""
        if state["next"] >= nzones:
            ngx.stop()
            ngx.start()         # fresh shared memory for every zone
            state["next"] = 0
            state["restarts"] += 1
        z = state["next"]
        state["next"] += 1
        state["probes"] += 1
        path = "/%s/%d" % (side, z)
        keys = [hashlib.sha256(("%s-%s-%d-%d" % (tag, side, n, i)).encode()).hexdigest()
                for i in range(n + 1)]
        reqs = [("GET %s HTTP/1.1\r\nHost: bench\r\nX-API-Key: %s\r\n\r\n" % (path, k))
                .encode() for k in keys + keys[:1]]
        p = Pipeline(port)
        try:
            st = p.run(reqs)
        finally:
            p.close()
        if any(s != 200 for s in st[:-1]):
            state["anomalies"].append("%s n=%d: %d first requests not 200" % (
                side, n, sum(1 for s in st[:-1] if s != 200)))
        if st[-1] not in (200, 429):
            state["anomalies"].append("%s n=%d: probe answered %d" % (side, n, st[-1]))
        return st[-1] == 429

    def search(side, tag):
        lo, hi, n = 0, None, 1024              # lo: tracked, hi: evicted
        while hi is None:
            if probe(side, n, tag):
                lo, n = n, n * 2
                if n > 1 << 20:
                    raise RuntimeError("%s: no eviction up to %d keys" % (side, lo))
            else:
                hi = n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(side, mid, tag):
                lo = mid
            else:
                hi = mid
        return lo + 1                           # the first key and lo others

    out = {"guard": [], "limit_req": []}
    try:
        for rep in range(S.reps):
            for side in ("guard", "limit_req"):
                t = time.time()
                held = search(side, "rep%d" % rep)
                out[side].append(held)
                log("  %-9s rep %d: %d keys in 1 MB (%.0f bytes/key), %.1fs" % (
                    side, rep + 1, held, 1048576.0 / held, time.time() - t))
    finally:
        ngx.stop()
        out["alerts"] = ngx.alerts()
    out["probes"] = state["probes"]
    out["anomalies"] = state["anomalies"]
    return out


def run_loadgen(port, path, rate, out_file, duration=None, count=None, classes=(),
                prompt="hello", same_body=False, timeout=60):
    cmd = [PYTHON, LOADGEN, "--port", str(port), "--path", path, "--rate", str(rate),
           "--timeout", str(timeout), "--out", out_file, "--prompt", prompt, "--quiet"]
    cmd += ["--duration", str(duration)] if duration is not None else ["--count", str(count)]
    for c in classes:
        cmd += ["--class", c]
    if same_body:
        cmd.append("--same-body")
    r = subprocess.run(cmd, capture_output=True, text=True,
                       timeout=(duration or 1) + timeout + 120)
    if r.returncode != 0:
        raise RuntimeError("loadgen failed: %s" % r.stderr)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    with open(out_file) as f:
        recs = [json.loads(l) for l in f]
    return summary, recs


def read_from(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("latin-1")


CRIT_KEYS = "sk-critical-1,sk-critical-2"
NORMAL_KEYS = ",".join("sk-normal-%d" % i for i in range(1, 9))


def overload_metrics(S, recs, logtext, stats, variant, duration):
    byid = {}
    for line in logtext.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].isdigit():
            byid[int(f[0])] = {"status": f[1], "guard": f[2], "class": f[3],
                               "wait": f[4], "limit_req": f[5]}
    m = {"classes": {}}
    for cls in ("critical", "normal"):
        rs = [r for r in recs if r["cls"] == cls]
        n = len(rs)
        adm = [r for r in rs if r["status"] == 200]
        rej = [r for r in rs if r["status"] in (429, 503)]
        if variant == "guard":
            queued = [r for r in adm if byid.get(r["i"], {}).get("guard") == "QUEUED"]
        else:
            queued = [r for r in adm if byid.get(r["i"], {}).get("limit_req") == "DELAYED"]
        other = n - len(adm) - len(rej)
        lat = [r["lat_ms"] for r in adm]
        m["classes"][cls] = {
            "n": n,
            "admitted": 100.0 * len(adm) / n if n else None,
            "queued": 100.0 * len(queued) / n if n else None,
            "rejected": 100.0 * len(rej) / n if n else None,
            "retry_after": 100.0 * sum(1 for r in rej if r["retry_after"]) / len(rej)
                           if rej else None,
            "other": 100.0 * other / n if n else None,
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
        }
    warm = min(2.0, duration / 5)
    done = [r for r in recs if r["status"] == 200 and warm <= r["end"] <= duration]
    m["goodput_rps"] = len(done) / (duration - warm)
    m["goodput_pct"] = 100.0 * m["goodput_rps"] / S.capacity_rps
    m["upstream_max_inflight"] = stats["max_inflight"]
    m["upstream_503"] = stats["rejected_503"]
    m["upstream_completed"] = stats["completed"]
    m["logged"] = len(byid)
    m["n"] = len(recs)
    return m


def scenario_overload(S, root, mock):
    log("5. overload: capacity %d x %d ms = %.0f req/s, offered %dx for %ds" % (
        S.capacity, S.gen_ms, S.capacity_rps, S.offered_factor, S.overload_s))
    mock.config(capacity=S.capacity, first_token_ms=S.first_token_ms,
                token_ms=S.token_ms, tokens=S.tokens)
    gport, lport = free_port(), free_port()
    ngx = Nginx(root, "overload", "overload.conf", {
        "GUARD_PORT": gport, "LR_PORT": lport, "MOCK_PORT": mock.port,
        "CAPACITY": S.capacity, "CAPACITY_RPS": "%d" % round(S.capacity_rps),
        "GEN_MS": S.gen_ms}, [gport, lport]).start()
    rate = S.capacity_rps * S.offered_factor
    out = {"guard": [], "limit_req": [], "rate": rate}
    variants = (("guard", gport, ngx.path("logs", "guard.log")),
                ("limit_req", lport, ngx.path("logs", "limit_req.log")))
    try:
        for name, port, _ in variants:                  # smoke: one request each
            st, _, _ = http(port, "/v1/chat/completions", method="POST",
                            body=b'{"messages":[{"role":"user","content":"warm"}]}',
                            headers={"Content-Type": "application/json",
                                     "Authorization": "Bearer sk-critical-1"})
            if st != 200:
                raise RuntimeError("overload %s: smoke request answered %d" % (name, st))
        for rep in range(S.overload_reps):
            for name, port, logfile in variants:
                if not mock.idle():
                    raise RuntimeError("mock still busy before a run")
                mock.reset()
                off = os.path.getsize(logfile)
                summary, recs = run_loadgen(
                    port, "/v1/chat/completions", rate, os.path.join(root, "lg.jsonl"),
                    duration=S.overload_s, prompt="overload %s %d" % (name, rep),
                    classes=("critical:1:" + CRIT_KEYS, "normal:4:" + NORMAL_KEYS))
                time.sleep(0.3)                          # access log lines land
                m = overload_metrics(S, recs, read_from(logfile, off), mock.stats(),
                                     name, S.overload_s)
                m["lateness_p99_ms"] = summary["lateness_ms"]["p99"]
                m["achieved_rate"] = summary["achieved_rate"]
                out[name].append(m)
                c, n = m["classes"]["critical"], m["classes"]["normal"]
                log("  %-9s rep %d: critical %5.1f%% admitted, normal %5.1f%%, upstream max "
                    "%d, 503s %d, goodput %.1f%%, loadgen late p99 %.1f ms" % (
                        name, rep + 1, c["admitted"], n["admitted"],
                        m["upstream_max_inflight"], m["upstream_503"], m["goodput_pct"],
                        m["lateness_p99_ms"]))
    finally:
        ngx.stop()
        out["alerts"] = ngx.alerts()
    return out


def scenario_coalesce(S, root, mock):
    log("6. coalescing: 100 concurrent identical prompts")
    mock.config(capacity=0, first_token_ms=S.first_token_ms, token_ms=S.token_ms,
                tokens=S.tokens)
    port = free_port()
    ngx = Nginx(root, "coalesce", "coalesce.conf",
                {"PORT": port, "MOCK_PORT": mock.port}, [port]).start()
    out = {"guard_cache": [], "proxy_cache": []}
    try:
        for rep in range(S.reps):
            for name in ("guard_cache", "proxy_cache"):
                mock.idle()
                mock.reset()
                summary, recs = run_loadgen(
                    port, "/%s/v1/chat/completions" % name, 100000,
                    os.path.join(root, "co.jsonl"), count=100, same_body=True,
                    prompt="coalesce %s %d %f" % (name, rep, time.time()), timeout=30)
                st = mock.stats()
                lat = [r["lat_ms"] for r in recs if r["status"] == 200]
                caches = {}
                for r in recs:
                    caches[r["cache"] or "-"] = caches.get(r["cache"] or "-", 0) + 1
                res = {"upstream_calls": st["chat_requests"],
                       "ok": sum(1 for r in recs if r["status"] == 200),
                       "p50_ms": percentile(lat, 50), "max_ms": max(lat) if lat else None,
                       "max_inflight": summary["max_inflight"], "cache": caches}
                out[name].append(res)
                log("  %-11s rep %d: %d upstream call(s), %d/100 ok, p50 %.0f ms, max %.0f ms"
                    % (name, rep + 1, res["upstream_calls"], res["ok"],
                       res["p50_ms"] or 0, res["max_ms"] or 0))
    finally:
        ngx.stop()
        out["alerts"] = ngx.alerts()
    return out


# scenario 7: (name, location, label); "store" answers are cacheable,
# "nostore" ones carry Cache-Control: no-store
MISS_VARIANTS = (
    ("proxy_cache_store", "/proxy_cache/store/", "`proxy_cache` miss, stored, keys_zone 128m"),
    ("guard_1m_store", "/guard_1m/store/", "guard cache miss, stored, keys_zone 1m"),
    ("guard_128m_store", "/guard_128m/store/", "guard cache miss, stored, keys_zone 128m"),
    ("guard_1m_nostore", "/guard_1m/nostore/", "guard cache miss, `no-store`, keys_zone 1m"),
    ("guard_128m_nostore", "/guard_128m/nostore/",
     "guard cache miss, `no-store`, keys_zone 128m"),
)
# a small chat completion, the origin's answer to every miss
MISS_BODY = ('{"id":"chatcmpl-bench","object":"chat.completion","created":0,'
             '"model":"bench","choices":[{"index":0,"message":{"role":"assistant",'
             '"content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,'
             '"completion_tokens":1,"total_tokens":2}}')


def scenario_misses(S, root):
    log("7. cache misses: keys_zone 1m vs 128m")
    port, origin = free_port(), free_port()
    ngx = Nginx(root, "misses", "misses.conf",
                {"PORT": port, "ORIGIN_PORT": origin, "BODY": MISS_BODY},
                [port, origin]).start()
    want = MISS_BODY.encode()
    out = {"checks": {}, "logged": {}, "timed_requests": {}, "anomalies": [],
           "body_bytes": len(want)}
    try:
        # the same URI twice (not logged): a stored answer is a HIT the
        # second time, a no-store one a MISS again
        for v, path, _ in MISS_VARIANTS:
            seen = []
            for i in range(10):
                st, h, body = http(port, path + "check", headers={"X-Bench-Check": "1"})
                if st != 200 or body != want:
                    raise RuntimeError("%scheck: status %s, %d bytes" % (path, st, len(body)))
                seen.append(h.get("x-cache-status") or "-")
                if len(seen) >= 2 and (seen[-1] == "HIT" or v.endswith("_nostore")):
                    break
                time.sleep(0.05)
            out["checks"][v] = seen
            expect = "HIT" if v.endswith("_store") else "MISS"
            if seen[0] != "MISS" or seen[-1] != expect:
                out["anomalies"].append("%s: the same URI twice gave %s, not MISS then %s"
                                        % (v, " ".join(seen), expect))
        base = "http://127.0.0.1:%d" % port
        # a slow variant leaves up to wrk_c requests behind when wrk stops:
        # every run waits until the worker is idle
        res = wrk_interleaved(S, ngx, [(v, base + path, [], ngx.settle)
                                       for v, path, _ in MISS_VARIANTS], "2xx",
                              script=os.path.join(CONF, "misses.lua"))
        out["variants"] = {k: summarize_wrk(r) for k, r in res.items()}
        out["timed_requests"] = {k: sum(x["requests"] or 0 for x in r)
                                 for k, r in res.items()}
        # wrk counts an answer slower than its 2 s timeout as a socket error
        out["errors"] = {k: {"non2xx": sum(x["non2xx"] for x in r),
                             "sock_err": sum(x["sock_err"] for x in r),
                             "timeouts": sum(x.get("timeouts", 0) for x in r)}
                         for k, r in res.items()}
    finally:
        ngx.stop()                              # flushes the buffered logs
        out["alerts"] = ngx.alerts()
    # every logged request (warm-up and timed runs) by cache status: all MISS
    for v, _, _ in MISS_VARIANTS:
        counts = {}
        try:
            with open(ngx.path("logs", v + ".log")) as f:
                for line in f:
                    k = line.strip() or "-"
                    counts[k] = counts.get(k, 0) + 1
        except OSError:
            pass
        out["logged"][v] = counts
        other = sum(n for k, n in counts.items() if k != "MISS")
        if other or counts.get("MISS", 0) < out["timed_requests"].get(v, 0):
            out["anomalies"].append("%s: logged %s for %d timed requests" % (
                v, ", ".join("%s %d" % kv for kv in sorted(counts.items())) or "nothing",
                out["timed_requests"].get(v, 0)))
    return out


def scenario_instructions(S, root):
    """Instructions per request under callgrind (bench/instructions.py),
    for the paths of scenarios 1-3 and their stock anchors."""
    import instructions
    log("instructions per request (callgrind): %d requests per path after %d, %d runs" % (
        S.instr_n, S.instr_warmup, S.instr_reps))
    bodies = {size: json_body(n).encode() for size, n in CACHE_SIZES}
    r = subprocess.run([instructions.VALGRIND, "--version"], capture_output=True, text=True)
    # a few Ir of a request move with how the event loop's iterations fall
    # (more or fewer epoll_wait() and time updates): repeated, each run in
    # fresh prefixes (empty caches), medians
    runs, alerts = [], []
    for rep in range(S.instr_reps):
        log("  instructions run %d" % (rep + 1))
        tport = free_port()
        tngx = Nginx(root, "instr%d-throughput" % rep, "throughput.conf", {"PORT": tport},
                     [tport])
        tngx.render()
        cngx, cport = cache_nginx(root, "instr%d-cache" % rep)
        cngx.render()
        configs = {"throughput": (tngx.prefix, tngx.conf, tport, None),
                   "cache": (cngx.prefix, cngx.conf, cport, cngx.path("logs", "origin.log"))}
        runs.append(instructions.measure(NGINX, configs, S.instr_n, S.instr_warmup, bodies,
                                         log=log))
        alerts += tngx.alerts() + cngx.alerts()
    out = runs[0]
    out["runs"] = {g: {v: [r["paths"][g][v] for r in runs] for v in x}
                   for g, x in out["paths"].items()}
    out["paths"] = {g: {v: median(ir) for v, ir in x.items()} for g, x in out["runs"].items()}
    out["valgrind"] = r.stdout.strip()
    out["alerts"] = alerts
    return out


# ------------------------------------------------------------------ report

def fmt(v, spec="%.0f"):
    return "n/a" if v is None else spec % v


def kfmt(v):
    return "n/a" if v is None else "{:,.0f}".format(v)


UNCLEAR = "unclear"


def met(ok):
    if ok == UNCLEAR:
        return "unclear: req/s and req/cpu-s disagree"
    return "n/a" if ok is None else ("yes" if ok else "**NO**")


def verdict(r, c, target):
    """A throughput target, judged on the req/s ratio as specified; when
    the req/cpu-s ratio says the opposite, the req/s difference is within
    what other load on the machine does to it: unclear, not met."""
    if r is None:
        return None
    if c is None or (r >= target) == (c >= target):
        return r >= target
    return UNCLEAR


def ratio(a, b):
    return a / b if a is not None and b else None


class Report:
    def __init__(self, S):
        self.S = S
        self.targets = []       # (scenario, measure, result, target, met)
        self.sections = []

    def target(self, scen, measure, result, target, ok):
        self.targets.append((scen, measure, result, target, ok))

    def add(self, text):
        self.sections.append(text.rstrip() + "\n")

    def throughput(self, res):
        S = self.S
        wrk = "wrk -t%d -c%d -d%ds --latency" % (S.wrk_t, S.wrk_c, S.wrk_s)
        if "admit" in res:
            a = res["admit"]
            r1 = ratio(a["guard"]["rps"], a["plain"]["rps"])
            r2 = ratio(a["guard"]["rps"], a["limit_req"]["rps"])
            c1 = ratio(a["guard"]["cpu_rps"], a["plain"]["cpu_rps"])
            c2 = ratio(a["guard"]["cpu_rps"], a["limit_req"]["cpu_rps"])
            t = ["## 1. Admit path", "",
                 "Every request admitted. `return 200` answers in the rewrite phase, before "
                 "`limit_req` (preaccess) and the guard (access) would run, so it is only a "
                 "reference; the three compared variants answer with `empty_gif` (43 bytes "
                 "from memory, the cheapest content-phase handler). One worker; `%s`, "
                 "%d runs each, interleaved; medians. req/cpu-s = requests per second of "
                 "nginx worker CPU time (from /proc), which other load on the machine "
                 "disturbs much less than req/s." % (wrk, S.wrk_reps), "",
                 "| variant | req/s | p99 ms | req/cpu-s | nginx CPU share | runs (req/s) |",
                 "|---|---:|---:|---:|---:|---|"]
            for v, label in (("return", "reference: `return 200 \"ok\"` (no limiter can run)"),
                             ("plain", "plain (`empty_gif`)"),
                             ("limit_req", "`limit_req` per key + `limit_conn` global"),
                             ("guard", "guard: per-key zone + global in-flight zone + classes")):
                x = a[v]
                t.append("| %s | %s | %s | %s | %s | %s%s |" % (
                    label, kfmt(x["rps"]), fmt(x["p99_ms"], "%.2f"), kfmt(x["cpu_rps"]),
                    fmt(x["util"], "%.2f"), " / ".join(kfmt(r) for r in x["runs"]),
                    "" if x["ok"] else " (non-2xx or socket errors!)"))
            t += ["", "| ratio of medians | req/s | req/cpu-s | target (req/s) | met "
                  "| per-run req/s ratios |", "|---|---:|---:|---:|---|---|",
                  "| guard / plain | %s | %s | >= 0.95 | %s | %s |" % (
                      fmt(r1, "%.3f"), fmt(c1, "%.3f"), met(verdict(r1, c1, 0.95)),
                      paired(a["guard"], a["plain"])),
                  "| guard / limit_req | %s | %s | >= 1.0 | %s | %s |" % (
                      fmt(r2, "%.3f"), fmt(c2, "%.3f"), met(verdict(r2, c2, 1.0)),
                      paired(a["guard"], a["limit_req"])),
                  "| guard / plain p99 | %s | | - | - | |" % fmt(
                      ratio(a["guard"]["p99_ms"], a["plain"]["p99_ms"]), "%.2f")]
            self.add("\n".join(t))
            self.target("1 admit path", "guard / plain req/s (req/cpu-s)",
                        "%s (%s)" % (fmt(r1, "%.3f"), fmt(c1, "%.3f")), ">= 0.95",
                        verdict(r1, c1, 0.95))
            self.target("1 admit path", "guard / limit_req req/s (req/cpu-s)",
                        "%s (%s)" % (fmt(r2, "%.3f"), fmt(c2, "%.3f")), ">= 1.0",
                        verdict(r2, c2, 1.0))
        if "reject" in res:
            a = res["reject"]
            r = ratio(a["guard"]["rps"], a["limit_req"]["rps"])
            c = ratio(a["guard"]["cpu_rps"], a["limit_req"]["cpu_rps"])
            ck = a["checks"]
            t = ["## 2. Reject path", "",
                 "Every request refused: `rate=1r/m` per API key, its one token consumed "
                 "before each run. One worker; `%s`, %d runs each, interleaved; medians. "
                 "Both log each refusal at their default level (`limit_req`: error, "
                 "guard: warn; `error_log ... warn`)." % (wrk, S.wrk_reps), "",
                 "| variant | answer | req/s | p99 ms | req/cpu-s | nginx CPU share | runs (req/s) |",
                 "|---|---|---:|---:|---:|---:|---|"]
            for v, label in (("limit_req", "`limit_req`"), ("guard", "guard")):
                x, k = a[v], ck[v]
                t.append("| %s | %s %s, %d bytes, Retry-After: %s | %s | %s | %s | %s | %s%s |" % (
                    label, k["status"], k["type"], k["len"], k["retry_after"] or "none",
                    kfmt(x["rps"]), fmt(x["p99_ms"], "%.2f"), kfmt(x["cpu_rps"]),
                    fmt(x["util"], "%.2f"),
                    " / ".join(kfmt(q) for q in x["runs"]),
                    "" if x["ok"] else " (some requests not refused!)"))
            t += ["", "| ratio of medians | req/s | req/cpu-s | target (req/s) | met "
                  "| per-run req/s ratios |", "|---|---:|---:|---:|---|---|",
                  "| guard / limit_req | %s | %s | >= 1.0 | %s | %s |" % (
                      fmt(r, "%.3f"), fmt(c, "%.3f"), met(verdict(r, c, 1.0)),
                      paired(a["guard"], a["limit_req"]))]
            self.add("\n".join(t))
            self.target("2 reject path", "guard / limit_req req/s (req/cpu-s)",
                        "%s (%s)" % (fmt(r, "%.3f"), fmt(c, "%.3f")), ">= 1.0",
                        verdict(r, c, 1.0))
        self.alerts("throughput", res.get("alerts"))

    def cache(self, res):
        S = self.S
        t = ["## 3. Cache hits", "",
             "GET of a JSON body served as a `proxy_cache` hit, as a guard cache hit "
             "(LMDB), and by nginx itself from memory (ceiling: `return 200` of the same "
             "body; above 4 KB, the limit of a configuration string, the concatenation of "
             "4000-byte literal map variables). `sendfile on`, one worker; `wrk -t%d -c%d "
             "-d%ds --latency`, %d runs each, interleaved per size; caches warmed first "
             "(X-Cache-Status: HIT); origin requests during the timed runs: %s." % (
                 S.wrk_t, S.wrk_c, S.wrk_s, S.wrk_reps, res.get("origin_during_runs")), "",
             "| size | variant | req/s | p99 ms | req/cpu-s | nginx CPU share | runs (req/s) |",
             "|---|---|---:|---:|---:|---:|---|"]
        labels = (("proxy_cache", "`proxy_cache` hit"), ("guard_cache", "guard cache hit"),
                  ("ceiling", "ceiling: `return 200`"))
        for name, _ in CACHE_SIZES:
            x = res["sizes"].get(name)
            if not x:
                continue
            for v, label in labels:
                y = x[v]
                t.append("| %s | %s | %s | %s | %s | %s | %s%s |" % (
                    name.upper().replace("K", " KB"), label, kfmt(y["rps"]),
                    fmt(y["p99_ms"], "%.2f"), kfmt(y["cpu_rps"]), fmt(y["util"], "%.2f"),
                    " / ".join(kfmt(q) for q in y["runs"]),
                    "" if y["ok"] else " (non-2xx or socket errors!)"))
        t += ["", "| size | guard / proxy_cache req/s | req/cpu-s | target (req/s) | met "
              "| per-run req/s ratios | guard / ceiling req/s | req/cpu-s |",
              "|---|---:|---:|---:|---|---|---:|---:|"]
        targets = {"1k": 1.5, "256k": 1.0}
        for name, _ in CACHE_SIZES:
            x = res["sizes"].get(name)
            if not x:
                continue
            r = ratio(x["guard_cache"]["rps"], x["proxy_cache"]["rps"])
            c = ratio(x["guard_cache"]["cpu_rps"], x["proxy_cache"]["cpu_rps"])
            size = name.upper().replace("K", " KB")
            tg = targets.get(name)
            t.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                size, fmt(r, "%.2f"), fmt(c, "%.2f"), ">= %.1f" % tg if tg else "-",
                met(verdict(r, c, tg)) if tg else "-",
                paired(x["guard_cache"], x["proxy_cache"]),
                fmt(ratio(x["guard_cache"]["rps"], x["ceiling"]["rps"]), "%.2f"),
                fmt(ratio(x["guard_cache"]["cpu_rps"], x["ceiling"]["cpu_rps"]), "%.2f")))
            if tg:
                self.target("3 cache hits", "guard / proxy_cache req/s (req/cpu-s), %s" % size,
                            "%s (%s)" % (fmt(r, "%.2f"), fmt(c, "%.2f")), ">= %.1f" % tg,
                            verdict(r, c, tg))
        self.add("\n".join(t))
        self.alerts("cache", res.get("alerts"))

    def keys(self, res):
        g, l = median(res["guard"]), median(res["limit_req"])
        ok = g is not None and l is not None and g >= l
        t = ["## 4. Memory per key", "",
             "Distinct 64-byte API keys (`X-API-Key`) a 1 MB zone tracks before it evicts, "
             "`rate=1r/m` (guard `status=429`, `limit_req_status 429`): the first key is "
             "used once, then N others, then the first again (429: still tracked, 200: "
             "evicted); binary search on N, a fresh zone per probe (%d probes). %d searches "
             "each, interleaved; medians." % (res["probes"], self.S.reps), "",
             "| variant | keys in 1 MB | bytes per key | runs |", "|---|---:|---:|---|",
             "| `limit_req` | %s | %s | %s |" % (kfmt(l), fmt(1048576.0 / l if l else None),
                                                 " / ".join(str(x) for x in res["limit_req"])),
             "| guard | %s | %s | %s |" % (kfmt(g), fmt(1048576.0 / g if g else None),
                                           " / ".join(str(x) for x in res["guard"])),
             "", "| ratio | result | target | met |", "|---|---:|---:|---|",
             "| guard keys / limit_req keys | %s | >= 1.0 | %s |" % (
                 fmt(ratio(g, l), "%.2f"), met(ok))]
        if res["anomalies"]:
            t += ["", "Anomalies: " + "; ".join(res["anomalies"][:5])]
        self.add("\n".join(t))
        self.target("4 memory per key", "keys per 1 MB zone, guard vs limit_req",
                    "%s vs %s" % (kfmt(g), kfmt(l)), "guard >= limit_req", ok)
        self.alerts("keys", res.get("alerts"))

    def overload(self, res):
        S = self.S
        reps = S.overload_reps
        t = ["## 5. Overload", "",
             "Mock LLM: capacity %d concurrent, %d ms per answer (first token %d ms + %d x %d ms)"
             " = %.0f req/s. Open-loop arrivals (bench/loadgen.py) at %.0f req/s (%dx) for %d s, "
             "20%% critical / 80%% normal by API key. nginx with 2 workers. Guard: global zone "
             "`inflight=%d`, `critical reserve=20%% queue=64 queue_timeout=5s`, "
             "`normal queue=256 queue_timeout=3s`. Stock: `limit_req rate=%.0fr/s burst=%d` + "
             "`limit_conn %d`. %d runs each, interleaved; medians. Latency from the scheduled "
             "arrival; goodput = 200 answers completed per second from s %.0f to %d, "
             "as %% of capacity." % (
                 S.capacity, S.gen_ms, S.first_token_ms, S.tokens, S.token_ms, S.capacity_rps,
                 res["rate"], S.offered_factor, S.overload_s, S.capacity, S.capacity_rps,
                 S.capacity, S.capacity, reps, min(2.0, S.overload_s / 5), S.overload_s), "",
             "| variant | class | requests | admitted % | queued % | rejected % | rejections "
             "with Retry-After % | other % | p50 ms | p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        med = {}
        for v in ("guard", "limit_req"):
            runs = res[v]
            med[v] = {"classes": {}}
            for cls in ("critical", "normal"):
                c = {k: median([r["classes"][cls][k] for r in runs])
                     for k in ("n", "admitted", "queued", "rejected", "retry_after", "other",
                               "p50_ms", "p99_ms")}
                med[v]["classes"][cls] = c
                t.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    "guard" if v == "guard" else "`limit_req` + `limit_conn`", cls,
                    fmt(c["n"]), fmt(c["admitted"], "%.1f"), fmt(c["queued"], "%.1f"),
                    fmt(c["rejected"], "%.1f"), fmt(c["retry_after"], "%.0f"),
                    fmt(c["other"], "%.1f"), fmt(c["p50_ms"]), fmt(c["p99_ms"])))
            for k in ("upstream_max_inflight", "upstream_503", "goodput_pct", "goodput_rps"):
                med[v][k] = median([r[k] for r in runs])
            med[v]["max_of_max_inflight"] = max(r["upstream_max_inflight"] for r in runs)
            med[v]["sum_503"] = sum(r["upstream_503"] for r in runs)
        t += ["", "| variant | upstream max concurrency (median / max) | upstream 503s (median / "
              "total) | goodput req/s | goodput % of capacity | runs: critical admitted %, "
              "goodput % |", "|---|---:|---:|---:|---:|---|"]
        for v in ("guard", "limit_req"):
            x = med[v]
            t.append("| %s | %s / %s | %s / %s | %s | %s | %s |" % (
                "guard" if v == "guard" else "`limit_req` + `limit_conn`",
                fmt(x["upstream_max_inflight"]), fmt(x["max_of_max_inflight"]),
                fmt(x["upstream_503"]), fmt(x["sum_503"]), fmt(x["goodput_rps"], "%.1f"),
                fmt(x["goodput_pct"], "%.1f"),
                "; ".join("%.1f, %.1f" % (r["classes"]["critical"]["admitted"],
                                          r["goodput_pct"]) for r in res[v])))
        g = med["guard"]
        gc = g["classes"]["critical"]
        rej_ra = [r["classes"][c]["retry_after"] for r in res["guard"]
                  for c in ("critical", "normal") if r["classes"][c]["retry_after"] is not None]
        ra_min = min(rej_ra) if rej_ra else None
        rows = [
            ("critical admitted", fmt(gc["admitted"], "%.1f%%"), ">= 95%",
             gc["admitted"] is not None and gc["admitted"] >= 95,
             fmt(med["limit_req"]["classes"]["critical"]["admitted"], "%.1f%%")),
            ("upstream max concurrency (max of runs)", fmt(g["max_of_max_inflight"]),
             "<= %d" % S.capacity, g["max_of_max_inflight"] <= S.capacity,
             fmt(med["limit_req"]["max_of_max_inflight"])),
            ("upstream 503s (all runs)", fmt(g["sum_503"]), "0", g["sum_503"] == 0,
             fmt(med["limit_req"]["sum_503"])),
            ("goodput", fmt(g["goodput_pct"], "%.1f%%"), ">= 95% of capacity",
             g["goodput_pct"] is not None and g["goodput_pct"] >= 95,
             fmt(med["limit_req"]["goodput_pct"], "%.1f%%")),
            ("rejections with Retry-After (min of runs)", fmt(ra_min, "%.0f%%"), "100%",
             ra_min is None or ra_min >= 100,
             fmt(median([r["classes"][c]["retry_after"] for r in res["limit_req"]
                         for c in ("critical", "normal")]), "%.0f%%")),
        ]
        t += ["", "| guard target | result | target | met | `limit_req` + `limit_conn` |",
              "|---|---:|---:|---|---:|"]
        for name, result, target, ok, lr in rows:
            t.append("| %s | %s | %s | %s | %s |" % (name, result, target, met(ok), lr))
            self.target("5 overload", name, result, target, ok)
        lg = [r["lateness_p99_ms"] for v in ("guard", "limit_req") for r in res[v]]
        t += ["", "Load generator: arrival lateness p99 <= %.1f ms in every run; achieved "
              "arrival rate %s req/s." % (max(lg), " / ".join(
                  "%.1f" % r["achieved_rate"] for v in ("guard", "limit_req") for r in res[v]))]
        self.add("\n".join(t))
        self.alerts("overload", res.get("alerts"))

    def coalesce(self, res):
        g = median([r["upstream_calls"] for r in res["guard_cache"]])
        p = median([r["upstream_calls"] for r in res["proxy_cache"]])
        gmax = max(r["upstream_calls"] for r in res["guard_cache"])
        t = ["## 6. Coalescing", "",
             "100 concurrent identical POSTs (a new prompt each run) to a cold cache in front "
             "of the mock (%d ms answers), nginx with 2 workers; upstream calls counted by the "
             "mock. Guard: `deepseek_guard_cache` (defaults); stock: `proxy_cache` + "
             "`proxy_cache_methods POST` + `proxy_cache_key \"$request_uri|$request_body\"` + "
             "`proxy_cache_lock on` (defaults). %d runs each, interleaved." % (
                 self.S.gen_ms, self.S.reps), "",
             "| variant | upstream calls (median / runs) | 200 answers | p50 ms | max ms | "
             "X-Cache-Status (first run) |", "|---|---:|---:|---:|---:|---|"]
        for v, label in (("guard_cache", "guard cache"),
                         ("proxy_cache", "`proxy_cache` + `proxy_cache_lock`")):
            rs = res[v]
            t.append("| %s | %s / %s | %s | %s | %s | %s |" % (
                label, fmt(median([r["upstream_calls"] for r in rs])),
                " / ".join(str(r["upstream_calls"]) for r in rs),
                fmt(median([r["ok"] for r in rs])), fmt(median([r["p50_ms"] for r in rs])),
                fmt(median([r["max_ms"] for r in rs])),
                ", ".join("%s %d" % kv for kv in sorted(rs[0]["cache"].items()))))
        t += ["", "| target | result | target | met |", "|---|---:|---:|---|",
              "| guard upstream calls (max of runs) | %d | 1 | %s |" % (gmax, met(gmax == 1))]
        self.add("\n".join(t))
        self.target("6 coalescing", "upstream calls for 100 identical prompts (max of runs)",
                    "%d (proxy_cache: %s)" % (gmax, fmt(p)), "1", gmax == 1)
        self.alerts("coalesce", res.get("alerts"))

    def misses(self, res):
        S = self.S
        x = res["variants"]
        t = ["## 7. Cache misses", "",
             "Every request has a URI of its own (wrk script `bench/conf/misses.lua`: "
             "<location><run tag>-<thread>-<n>), so every request misses and goes upstream, "
             "to an origin in the same nginx (a server block answering `return 200` with a "
             "%d-byte JSON body, over keep-alive connections). The guard cache's keys zone "
             "(`deepseek_guard_cache_path ... keys_zone=NAME:1m` or `:128m`) holds its "
             "fill-lock table, sized from the zone. *Stored*: the answer is cacheable "
             "(`deepseek_guard_cache_valid 200 10m`), so each miss also writes an entry; "
             "*`no-store`*: the origin adds `Cache-Control: no-store`, so each miss takes "
             "and releases its fill lock and writes nothing. Stock anchor: a `proxy_cache` "
             "miss (`keys_zone=pcache:128m`, `proxy_cache_valid 200 10m`, a file written per "
             "miss). One worker; `wrk -t%d -c%d -d%ds --latency`, %d runs each, interleaved, "
             "each run started once the worker is idle (a slow variant leaves requests "
             "behind when wrk stops); medians." % (res["body_bytes"], S.wrk_t, S.wrk_c, S.wrk_s, S.wrk_reps), "",
             "| variant | req/s | p99 ms | req/cpu-s | nginx CPU share | runs (req/s) |",
             "|---|---:|---:|---:|---:|---|"]
        for v, _, label in MISS_VARIANTS:
            y = x[v]
            e = res.get("errors", {}).get(v)
            if y["ok"]:
                note = ""
            elif e and not e["non2xx"] and e["sock_err"] == e["timeouts"]:
                note = " (%d answers slower than wrk's 2 s timeout)" % e["timeouts"]
            else:
                note = " (non-2xx or socket errors!)"
            t.append("| %s | %s | %s | %s | %s | %s%s |" % (
                label, kfmt(y["rps"]), fmt(y["p99_ms"], "%.2f"), kfmt(y["cpu_rps"]),
                fmt(y["util"], "%.2f"), " / ".join(kfmt(q) for q in y["runs"]), note))
        rows = (("guard keys_zone 128m / 1m, stored", "guard_128m_store", "guard_1m_store",
                 0.90),
                ("guard keys_zone 128m / 1m, `no-store`", "guard_128m_nostore",
                 "guard_1m_nostore", 0.90),
                ("guard 1m / `proxy_cache`, stored", "guard_1m_store", "proxy_cache_store",
                 None),
                ("guard 128m / `proxy_cache`, stored", "guard_128m_store",
                 "proxy_cache_store", None),
                ("guard 1m: stored / `no-store` (the cost of the write)", "guard_1m_store",
                 "guard_1m_nostore", None))
        t += ["", "| ratio of medians | req/s | req/cpu-s | target (req/s) | met "
              "| per-run req/s ratios |", "|---|---:|---:|---:|---|---|"]
        for name, a, b, tg in rows:
            r = ratio(x[a]["rps"], x[b]["rps"])
            c = ratio(x[a]["cpu_rps"], x[b]["cpu_rps"])
            t.append("| %s | %s | %s | %s | %s | %s |" % (
                name, fmt(r, "%.3f"), fmt(c, "%.3f"), ">= %.2f" % tg if tg else "-",
                met(verdict(r, c, tg)) if tg else "-", paired(x[a], x[b])))
            if tg:
                self.target("7 cache misses", "%s req/s (req/cpu-s)" % name.replace(
                    "guard keys_zone", "guard miss keys_zone"),
                            "%s (%s)" % (fmt(r, "%.3f"), fmt(c, "%.3f")), ">= %.2f" % tg,
                            verdict(r, c, tg))
        t += ["", "Each variant, before the runs, asked for one URI twice (X-Cache-Status: "
              "%s). Cache status of every request in the runs (warm-up included), from the "
              "access log: %s; timed requests counted by wrk: %s." % (
                  "; ".join("%s %s" % (v, " then ".join(
                      [res["checks"][v][0], res["checks"][v][-1]]))
                            for v, _, _ in MISS_VARIANTS if v in res["checks"]),
                  "; ".join("%s %s" % (v, ", ".join("%s %s" % (k, kfmt(n)) for k, n in
                                                    sorted(res["logged"][v].items())) or
                                      "nothing") for v, _, _ in MISS_VARIANTS),
                  "; ".join("%s %s" % (v, kfmt(res["timed_requests"].get(v)))
                            for v, _, _ in MISS_VARIANTS))]
        if res["anomalies"]:
            t += ["", "**Anomalies:** " + "; ".join(res["anomalies"][:10])]
        self.add("\n".join(t))
        self.alerts("misses", res.get("alerts"))

    def instructions(self, res, raw):
        p = res["paths"]
        thr, cache = raw.get("throughput", {}), raw.get("cache", {}).get("sizes", {})

        def wrk_of(group, variant):
            """the wrk figures of the same variant in this run, if measured"""
            if group in ("admit", "reject"):
                return thr.get(group, {}).get(variant)
            return cache.get(group, {}).get(variant)

        groups = (("admit", "1 admit path"), ("reject", "2 reject path"),
                  ("1k", "3 cache hit, 1 KB"), ("32k", "3 cache hit, 32 KB"),
                  ("256k", "3 cache hit, 256 KB"))
        labels = {"return": "reference: `return 200 \"ok\"`", "plain": "plain (`empty_gif`)",
                  "limit_req": "`limit_req` per key + `limit_conn` global",
                  "guard": "guard: per-key zone + global in-flight zone + 4 classes (key table)",
                  "guard_map": "guard, the same with the classes from a `map`",
                  "proxy_cache": "`proxy_cache` hit", "guard_cache": "guard cache hit",
                  "ceiling": "ceiling: `return 200` of the same body"}
        t = ["## Instructions per request (callgrind)", "",
             "The nginx worker's instructions per request (Ir) under valgrind's callgrind "
             "(%s): the configurations of scenarios 1-3 (`bench/conf/throughput.conf`, "
             "`bench/conf/cache.conf`), nginx in one process (`master_process off`). Per "
             "path, %d requests of warm-up, then `callgrind_control -z`, %d requests on "
             "keep-alive connections (a new one every 1,000: `keepalive_requests`), "
             "`callgrind_control -d`: the worker's setup and the "
             "warm-up are not counted (`bench/instructions.py`). %d runs, each with a "
             "fresh nginx; medians, and every run. Each measured answer was "
             "checked: status, and for the cache paths `X-Cache-Status: HIT` with the exact "
             "body, the origin's access log unchanged. Deterministic where req/s is not; "
             "but only user space: the kernel's work (system calls; `sendfile()`, which "
             "sends `proxy_cache`'s file) is not counted, and a `rep movsb` copy (glibc's "
             "`memcpy` of large blocks) counts one instruction per byte, so the large hits "
             "weigh a copy far above its CPU time. req/s and req/cpu-s are the medians of "
             "the wrk scenarios of this run, where they ran." % (
                 res.get("valgrind", "valgrind"), res["warmup"], res["n"],
                 len(next(iter(next(iter(res.get("runs", {"": {"": [0]}}).values())).values()))),
             ), "",
             "| path | variant | Ir/request | runs | req/s | req/cpu-s |",
             "|---|---|---:|---|---:|---:|"]
        import instructions as I
        for g, gl in groups:
            for v in [x[1] for x in I.PATHS if x[0] == g and x[1] in p.get(g, {})]:
                ir = p[g][v]
                w = wrk_of(g, v) or {}
                label = "`limit_req` per key" if (g, v) == ("reject", "limit_req") else \
                    "guard: per-key zone + classes (key table)" if (g, v) == ("reject", "guard") else \
                    "guard, the classes from a `map`" if (g, v) == ("reject", "guard_map") else \
                    labels.get(v, v)
                rs = res.get("runs", {}).get(g, {}).get(v, [ir])
                t.append("| %s | %s | %s | %s | %s | %s |" % (gl, label, kfmt(ir),
                                                              " / ".join(kfmt(q) for q in rs),
                                                         kfmt(w.get("rps")),
                                                         kfmt(w.get("cpu_rps"))))
        t += ["", "Ratios to the anchors: instructions (lower is cheaper), and req/s and "
              "req/cpu-s (higher is faster) where measured in this run.", "",
              "| path | guard / anchor | Ir ratio | req/s ratio | req/cpu-s ratio |",
              "|---|---|---:|---:|---:|"]
        names = {"limit_req": "`limit_req` + `limit_conn`", "plain": "plain (`empty_gif`)",
                 "proxy_cache": "`proxy_cache`", "ceiling": "`return 200` of the body"}
        for g, a, b in I.RATIOS:
            x = p.get(g, {})
            if a not in x or b not in x:
                continue
            if g == "reject" and b == "limit_req":
                bn = "`limit_req`"
            else:
                bn = names.get(b, b)
            wa, wb = wrk_of(g, a) or {}, wrk_of(g, b) or {}
            an = "guard (classes from a `map`)" if a == "guard_map" else "guard"
            t.append("| %s | %s / %s | %s | %s | %s |" % (
                dict(groups)[g], an, bn, fmt(x[a] / x[b], "%.3f"),
                fmt(ratio(wa.get("rps"), wb.get("rps")), "%.3f"),
                fmt(ratio(wa.get("cpu_rps"), wb.get("cpu_rps")), "%.3f")))
        if not thr and not cache:
            # no wrk scenario in this run: no req/s columns
            t = [re.sub(r"( [^|]* \||---:\|){2}$", "", l) if l.startswith("|") else l
                 for l in t]
            t = [l.replace(", and req/s and req/cpu-s (higher is faster) where measured in "
                           "this run", "").replace(" req/s and req/cpu-s are the medians of "
                           "the wrk scenarios of this run, where they ran.", "") for l in t]
        self.add("\n".join(t))
        self.alerts("instructions", res.get("alerts"))

    def alerts(self, name, lines):
        if lines:
            self.add("**error.log alerts (%s):**\n\n```\n%s\n```" % (
                name, "\n".join(lines[:10])))

    def render(self, meta):
        S = self.S
        out = ["# ngx_deepseek_guard_module benchmarks, %s" % meta["date"], "",
               "Generated by `./build.sh bench` (bench/run.sh, bench/bench.py); "
               "see bench/README.md.", "",
               "| | |", "|---|---|",
               "| module | commit %s, .so sha256 %s |" % (meta["commit"], meta["so"]),
               "| nginx | %s |" % meta["nginx"],
               "| wrk | %s |" % meta["wrk"],
               "| machine | %s, %d CPUs, %s |" % (meta["cpu"], os.cpu_count(), meta["kernel"]),
               "| load average at start / end | %s / %s |" % (meta["load0"], meta["load1"]),
               "| repetitions | wrk scenarios %d x %d s; others %d (overload: %d x %d s)%s |" % (
                   S.wrk_reps, S.wrk_s, S.reps, S.overload_reps, S.overload_s,
                   " (quick mode)" if S.quick else ""),
               "| total runtime | %s |" % meta["runtime"],
               ""]
        if not self.targets:            # instructions alone: no targets
            return "\n".join(out) + "\n" + "\n".join(self.sections)
        out += ["## Targets", "",
                "| scenario | measure | result | target | met |", "|---|---|---:|---:|---|"]
        for scen, measure, result, target, ok in self.targets:
            out.append("| %s | %s | %s | %s | %s |" % (scen, measure, result, target, met(ok)))
        nmet = sum(1 for x in self.targets if x[4] is True)
        nunc = sum(1 for x in self.targets if x[4] == UNCLEAR)
        out += ["", "%d of %d targets met%s. Throughput targets are judged on req/s as "
                "specified; where the req/cpu-s ratio says the opposite, the verdict is "
                "\"unclear\": the difference is within what other load on the machine does "
                "to req/s (see the nginx CPU share columns)." % (
                    nmet, len(self.targets), ", %d unclear" % nunc if nunc else ""), ""]
        return "\n".join(out) + "\n" + "\n".join(self.sections)


def meta_info(S):
    def cmd(*a):
        try:
            r = subprocess.run(a, capture_output=True, text=True, timeout=10, cwd=REPO)
            return (r.stdout + r.stderr).strip()
        except OSError:
            return "?"
    commit = cmd("git", "rev-parse", "--short", "HEAD")
    if not re.fullmatch(r"[0-9a-f]{4,40}", commit):
        commit = "? (not a git checkout)"
    elif cmd("git", "status", "--porcelain", "--", "ngx_deepseek_guard_module", "config"):
        commit += " (with uncommitted changes in ngx_deepseek_guard_module/)"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for l in f:
                if l.startswith("model name"):
                    cpu = l.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"commit": commit, "nginx": cmd(NGINX, "-v").replace("nginx version: ", ""),
            "wrk": cmd(WRK, "-v").splitlines()[0].split(" [")[0] if cmd(WRK, "-v") else "?",
            "cpu": cpu, "kernel": platform.release()}


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def build_report(S, raw, meta):
    rep = Report(S)
    if "throughput" in raw:
        rep.throughput(raw["throughput"])
    for name in ("cache", "keys", "overload", "coalesce", "misses"):
        if name in raw:
            getattr(rep, name)(raw[name])
    if "instructions" in raw:
        rep.instructions(raw["instructions"], raw)
    return rep.render(meta)


def main():
    global MODULE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 run of 1 s each, 6 s overload: a smoke test, not a result")
    ap.add_argument("--render", metavar="JSON",
                    help="only print the report of a saved bench/results/<date>.json")
    ap.add_argument("scenarios", nargs="*", metavar="scenario",
                    help="any of: " + " ".join(SCENARIOS) + " (default: all), "
                    "and queue, stall (only when named)")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            saved = json.load(f)
        if "sizes" in saved["results"]:             # a queue report
            import queue_scenario
            print(queue_scenario.render_saved(a.render), end="")
            return 0
        if "passes" in saved["results"]:            # a stall report
            import stall_scenario
            print(stall_scenario.render_saved(a.render), end="")
            return 0
        S = Settings(False)
        S.__dict__.update(saved["settings"])
        print(build_report(S, saved["results"], saved["meta"]))
        return 0
    bad = [x for x in a.scenarios if x not in SCENARIOS + SEPARATE]
    if bad:
        ap.error("unknown scenario %s; choose from %s" % (bad, " ".join(SCENARIOS + SEPARATE)))
    if "queue" in a.scenarios:
        # its own report (<date>-queue.md), and only when named: see
        # bench/queue_scenario.py
        import queue_scenario
        rc = queue_scenario.run(a.quick)
        a.scenarios = [x for x in a.scenarios if x != "queue"]
        if rc or not a.scenarios:
            return rc
    if "stall" in a.scenarios:
        # its own report (<date>-stall.md), and only when named: see
        # bench/stall_scenario.py
        import stall_scenario
        rc = stall_scenario.run(a.quick)
        a.scenarios = [x for x in a.scenarios if x != "stall"]
        if rc or not a.scenarios:
            return rc
    which = a.scenarios or list(SCENARIOS)
    S = Settings(a.quick)
    for f in (NGINX, MODULE, PYTHON):
        if not os.path.exists(f):
            sys.exit("bench: %s not found (run ./build.sh bench)" % f)
    if set(which) & {"admit", "reject", "cache", "misses"} and not shutil.which(WRK):
        sys.exit("bench: wrk not found (./build.sh bench installs it)")
    if "instructions" in which and not shutil.which("valgrind"):
        sys.exit("bench: valgrind not found (./build.sh bench installs it)")
    meta = meta_info(S)
    meta["load0"] = loadavg()
    log("scenarios: %s; %d reps; load average %s" % (" ".join(which), S.reps, meta["load0"]))
    root = tempfile.mkdtemp(prefix="dsg-bench-")
    os.chmod(root, 0o755)
    # one copy of the module for the whole run, even if build/ changes
    shutil.copy(MODULE, os.path.join(root, "module.so"))
    MODULE = os.path.join(root, "module.so")
    with open(MODULE, "rb") as f:
        meta["so"] = hashlib.sha256(f.read()).hexdigest()[:12]
    raw = {}
    mock = None
    try:
        if "admit" in which or "reject" in which:
            raw["throughput"] = scenario_throughput(S, root, which)
        if "cache" in which:
            raw["cache"] = scenario_cache(S, root)
        if "keys" in which:
            raw["keys"] = scenario_keys(S, root)
        if "misses" in which:                   # before the mock starts
            raw["misses"] = scenario_misses(S, root)
        if "instructions" in which:
            raw["instructions"] = scenario_instructions(S, root)
        if "overload" in which or "coalesce" in which:
            mock = Mock(root, S)
        if "overload" in which:
            raw["overload"] = scenario_overload(S, root, mock)
        if "coalesce" in which:
            raw["coalesce"] = scenario_coalesce(S, root, mock)
    finally:
        if mock:
            mock.stop()
        if S.keep:
            log("prefix kept: %s" % root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    secs = time.time() - T0
    meta["runtime"] = "%d min %02d s" % (secs // 60, secs % 60)
    meta["load1"] = loadavg()
    meta["date"] = datetime.date.today().isoformat()
    text = build_report(S, raw, meta)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    full = set(which) == set(SCENARIOS) and not S.quick
    # instructions alone: a report of its own, <date>-instructions.md
    alone = which == ["instructions"] and not S.quick
    base = meta["date"] if full else meta["date"] + ("-instructions" if alone else "-partial")
    tmp = "" if full or alone else ".tmp"
    with open(os.path.join(RESULTS, base + ".md" + tmp), "w") as f:
        f.write(text)
    # the numbers behind the report: bench.py --render <file> prints it again
    with open(os.path.join(RESULTS, base + ".json" + tmp), "w") as f:
        json.dump({"meta": meta, "settings": vars(S), "results": raw}, f, indent=1,
                  sort_keys=True)
    log("written to bench/results/%s.md%s (%s)" % (base, tmp, meta["runtime"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
