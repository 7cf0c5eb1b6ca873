#!/usr/bin/python3
"""The `queue` benchmark: what an admission costs with every queue place taken.

Run by bench.py (./build.sh bench queue, bench/run.sh queue).  For each
queue size N (256, 4096, 65535: the maximum), nginx with 2 workers runs one
global zone `inflight=8` and one class `queue=N queue_timeout=600s` in front
of the mock LLM (short fixed answers).  bench/qclient.py keeps N + 8
requests outstanding (closed loop): 8 in flight, N queued.  By default over
HTTP/2 (h2c, 32 streams per connection): 65543 HTTP/1.1 connections need
about 33,000 open files in each worker, and without CAP_SYS_RESOURCE the
hard limit cannot be raised that far (20,000 on the test machine).  Once
the queue depth gauge reads N, it measures fixed windows, and reports per
window:

  - admitted/s, from the zone's admitted counter (/metrics);
  - the zone-mutex hold time per lock section (p50/p99, ns), and the lock
    sections per admitted request, from bench/shmtx_hold.c, an LD_PRELOAD
    shim that times the module's ngx_shmtx_lock/ngx_shmtx_unlock calls;
  - the worker CPU per admitted request (µs): utime + stime of the workers
    (/proc/PID/stat) over the window / admitted requests.

Then the ratio of the CPU per admission at 65535 to that at 256, against the
target (<= 2).  The report goes to bench/results/<YYYY-MM-DD>-queue.md, the
numbers to <YYYY-MM-DD>-queue.json (a quick run, or other sizes, write
<YYYY-MM-DD>-queue-partial.*.tmp).

Environment: BENCH_QUEUE_SIZES (256,4096,65535), BENCH_QUEUE_SECONDS (10),
BENCH_QUEUE_WINDOWS (2), BENCH_QUEUE_PASSES (2: the sizes in turn, twice),
BENCH_QUEUE_DELAY_MS (25), BENCH_QUEUE_CLIENTS (4), BENCH_QUEUE_PROTO (h2,
or http1), BENCH_QUEUE_STREAMS (32),
BENCH_QUEUE_THINK_MS (5), BENCH_QUEUE_WARMUP_S (300: the most to wait for a
full queue), BENCH_KEEP=1, and bench.py's NGINX_BIN, DSG_MODULE, DSG_PYTHON.
"""
import datetime
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import types
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B                       # noqa: E402  (bench/bench.py)

SHIM_SRC = os.path.join(B.BENCH, "shmtx_hold.c")
CLIENT = os.path.join(B.BENCH, "qclient.py")
DEFAULT_SIZES = (256, 4096, 65535)
TARGET = 2.0
ZONE, CLASS = "q", "waiters"
INFLIGHT = 8
# a window counts as full when the depth gauge never read less than N - SLACK:
# a place is free from an admission to the client's next request
SLACK = 16
# the same for every size: as many connections per worker as the fd limit
# allows (nginx raises the workers' soft limit to worker_rlimit_nofile; the
# hard limit can only be raised with CAP_SYS_RESOURCE)
NOFILE = min(150000, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
WORKER_CONNECTIONS = NOFILE - 256
SOURCES = ["127.0.0.%d" % i for i in range(2, 10)]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    B.log(msg)


class Settings:
    def __init__(self, quick):
        self.quick = quick
        sizes = os.environ.get("BENCH_QUEUE_SIZES")
        self.sizes = [int(x) for x in sizes.split(",")] if sizes else list(DEFAULT_SIZES)
        self.seconds = B.env_int("BENCH_QUEUE_SECONDS", 3 if quick else 10)
        self.windows = B.env_int("BENCH_QUEUE_WINDOWS", 1 if quick else 2)
        self.passes = B.env_int("BENCH_QUEUE_PASSES", 1 if quick else 2)
        self.delay_ms = B.env_int("BENCH_QUEUE_DELAY_MS", 25)
        self.clients = B.env_int("BENCH_QUEUE_CLIENTS", 4)
        self.proto = os.environ.get("BENCH_QUEUE_PROTO") or "h2"
        if self.proto not in ("h2", "http1"):
            sys.exit("bench: BENCH_QUEUE_PROTO is h2 or http1")
        self.streams = B.env_int("BENCH_QUEUE_STREAMS", 32)
        self.think_ms = B.env_int("BENCH_QUEUE_THINK_MS", 5)
        self.warmup_s = B.env_int("BENCH_QUEUE_WARMUP_S", 300)
        self.keep = os.environ.get("BENCH_KEEP") == "1"


# ------------------------------------------------------------------ the shim

def build_shim(root):
    out = os.path.join(root, "shmtx_hold.so")
    r = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-o", out, SHIM_SRC,
                        "-ldl"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("building the shim failed:\n" + r.stderr)
    return out


HEAD = struct.Struct("<8s15Q")


def read_shim(path):
    """One process's live counters, or None before the process mapped them."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < HEAD.size or data[:8] != b"DSGSHMTX":
        return None
    h = HEAD.unpack_from(data)
    (version, pid, sub, nb, sections, hold_sum, wait_sum, unmatched, patched,
     timer_ns) = h[1:11]
    want = HEAD.size + 2 * nb * 8
    if len(data) < want:
        return None
    hist = struct.unpack_from("<%dQ" % (2 * nb), data, HEAD.size)
    return {"pid": pid, "sub": sub, "sections": sections, "hold_sum": hold_sum,
            "wait_sum": wait_sum, "unmatched": unmatched, "patched": patched,
            "timer_ns": timer_ns, "hold": list(hist[:nb]), "wait": list(hist[nb:])}


def shim_delta(a, b):
    d = {k: b[k] - a[k] for k in ("sections", "hold_sum", "wait_sum", "unmatched")}
    d["hold"] = [y - x for x, y in zip(a["hold"], b["hold"])]
    d["wait"] = [y - x for x, y in zip(a["wait"], b["wait"])]
    d["sub"] = b["sub"]
    return d


def shim_sum(parts):
    out = None
    for p in parts:
        if out is None:
            out = {k: (list(v) if isinstance(v, list) else v) for k, v in p.items()}
            continue
        for k in ("sections", "hold_sum", "wait_sum", "unmatched"):
            out[k] += p[k]
        for k in ("hold", "wait"):
            out[k] = [x + y for x, y in zip(out[k], p[k])]
    return out


def bucket_range(b, sub):
    """[lo, hi) of histogram bucket b (see bench/shmtx_hold.c)."""
    bits = sub.bit_length() - 1
    if b < 2 * sub:
        return b, b + 1
    e = b // sub + bits - 1
    m = b % sub + sub
    return m << (e - bits), (m + 1) << (e - bits)


def hist_max(hist, sub):
    """The top of the highest bucket with a count."""
    top = [b for b, n in enumerate(hist) if n]
    return bucket_range(top[-1], sub)[1] - 1 if top else None


def hist_pct(hist, sub, p):
    """Nearest-rank percentile p of a histogram: the middle of its bucket."""
    total = sum(hist)
    if not total:
        return None
    rank = max(1, -(-p * total // 100))
    acc = 0
    for b, n in enumerate(hist):
        acc += n
        if acc >= rank:
            lo, hi = bucket_range(b, sub)
            return (lo + hi - 1) / 2.0
    return None


# ------------------------------------------------------------------ nginx side

class QNginx(B.Nginx):
    """An Nginx with the shim preloaded in the master (workers inherit it:
    nginx forks them without exec)."""

    def __init__(self, *a, env=None, **kw):
        super().__init__(*a, **kw)
        self.env = env or {}

    def start(self):
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return super().start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop(self):
        """Fast shutdown: a graceful one would wait for the queued requests."""
        if not self.pid:
            return
        for sig, secs in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + secs
            while time.time() < deadline and (B.alive(self.pid) or self.workers()):
                time.sleep(0.05)
            if not B.alive(self.pid) and not self.workers():
                break
        self.pid = None


def cpu_ticks(pids):
    """utime + stime of the processes, in clock ticks (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])       # fields 14 and 15
    return total


def sched_ns(pids):
    total = 0
    for pid in pids:
        with open("/proc/%d/schedstat" % pid) as f:
            total += int(f.read().split()[0])
    return total


def metrics(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        text = r.read().decode()

    def val(name, **labels):
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(None, 1)[1])
        return None

    out = {"depth": val("deepseek_guard_queue_depth", zone=ZONE),
           "capacity": val("deepseek_guard_queue_capacity", zone=ZONE),
           "inflight": val("deepseek_guard_inflight", zone=ZONE)}
    for d in ("admitted", "queued", "rejected_503", "queue_timeout"):
        out[d] = val("deepseek_guard_requests_total", zone=ZONE, decision=d)
    for k, v in out.items():
        if v is None:
            raise RuntimeError("/metrics: no %s for zone %s:\n%s" % (k, ZONE, text[:2000]))
    return out


# ------------------------------------------------------------------ clients

class Clients:
    def __init__(self, root, S, port, total):
        self.dir = os.path.join(root, "clients")
        os.makedirs(self.dir, exist_ok=True)
        self.procs, self.files = [], []
        self.conns = 0
        per = S.streams if S.proto == "h2" else 1
        k = max(1, min(S.clients, total))
        for i in range(k):
            n = total // k + (1 if i < total % k else 0)
            self.conns += -(-n // per)
            status = os.path.join(self.dir, "client%d.json" % i)
            if os.path.exists(status):
                os.unlink(status)
            logf = open(os.path.join(self.dir, "client%d.log" % i), "ab")
            cmd = [B.PYTHON, CLIENT, "--port", str(port), "--requests", str(n),
                   "--status", status, "--src", ",".join(SOURCES),
                   "--think", str(S.think_ms / 1000.0)]
            if S.proto == "h2":
                cmd += ["--h2", "--streams", str(S.streams)]
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            logf.close()
            self.procs.append(p)
            self.files.append(status)

    def status(self):
        out = {"open": 0, "connecting": 0, "outstanding": 0, "reconnects": 0,
               "responses": {}, "errors": {}}
        for p, f in zip(self.procs, self.files):
            if p.poll() is not None:
                raise RuntimeError("a client exited with %s (see %s)" % (
                    p.returncode, f.replace(".json", ".log")))
            try:
                with open(f) as fh:
                    s = json.load(fh)
            except (OSError, ValueError):
                continue
            for k in ("open", "connecting", "outstanding", "reconnects"):
                out[k] += s[k]
            for k in ("responses", "errors"):
                for code, n in s[k].items():
                    out[k][code] = out[k].get(code, 0) + n
        return out

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def counts_delta(a, b):
    keys = set(a) | set(b)
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(keys) if b.get(k, 0) - a.get(k, 0)}


# ------------------------------------------------------------------ one size

def snapshot(ngx, pids, shimdir, mport, clients):
    shims = {pid: read_shim(os.path.join(shimdir, "shmtx.%d" % pid)) for pid in pids}
    t = time.time()
    ticks = cpu_ticks(pids)
    sns = sched_ns(pids)
    m = metrics(mport)
    c = clients.status()
    return {"t": t, "ticks": ticks, "sched_ns": sns, "m": m, "shims": shims, "clients": c}


def run_size(S, root, mock, shim, n):
    log("queue=%d: %d requests (%d queued + %d in flight)" % (n, n + INFLIGHT, n, INFLIGHT))
    port, mport = B.free_port(), B.free_port()
    shimdir = os.path.join(root, "shim-%d" % n)
    os.makedirs(shimdir, exist_ok=True)
    os.chmod(shimdir, 0o777)            # in case the workers are not root
    ngx = QNginx(root, "queue-%d" % n, "queue.conf", {
        "PORT": port, "METRICS_PORT": mport, "MOCK_PORT": mock.port, "QUEUE": n,
        "DELAY_MS": S.delay_ms, "WORKER_CONNECTIONS": WORKER_CONNECTIONS,
        "NOFILE": NOFILE, "LISTEN_OPTS": "http2 " if S.proto == "h2" else "",
        "PROTO": "HTTP/2 (h2c, prior knowledge)" if S.proto == "h2" else "HTTP/1.1"},
        [port, mport],
        env={"LD_PRELOAD": shim, "DSG_SHMTX_DIR": shimdir})
    ngx.start()
    out = {"n": n, "windows": [], "warmup": {}}
    clients = None
    try:
        pids = sorted(ngx.workers())
        if len(pids) != 2:
            raise RuntimeError("expected 2 workers, found %s" % pids)
        if S.proto == "http1":
            st, _, body = B.http(port, "/v1/chat/completions")
            if st != 200:
                raise RuntimeError("smoke request answered %d: %r" % (st, body[:200]))
        m = metrics(mport)
        if int(m["capacity"]) != n:
            raise RuntimeError("queue capacity gauge reads %s, not %d" % (m["capacity"], n))

        # fill: every place taken, then a few seconds more at a steady state
        t0 = time.time()
        clients = Clients(root, S, port, n + INFLIGHT)
        full_at, last_log = None, 0.0
        while True:
            # often: a place is free for a few ms after each admission
            time.sleep(0.1)
            m = metrics(mport)
            c = clients.status()
            now = time.time()
            if now - last_log >= 5:
                log("  filling: %.0f s, %d connected, %d connecting, queue depth %d, "
                    "in flight %d, responses %s" % (now - t0, c["open"], c["connecting"],
                                                    m["depth"], m["inflight"],
                                                    c["responses"]))
                last_log = now
            if full_at is None and m["depth"] >= n and c["open"] >= clients.conns:
                full_at = now
                log("  full after %.1f s" % (now - t0))
            if full_at is not None and now - full_at >= max(3.0, S.seconds / 2):
                break
            if now - t0 > S.warmup_s:
                raise RuntimeError("queue=%d: not full after %d s (depth %d, %d connected)"
                                   % (n, S.warmup_s, m["depth"], c["open"]))
        out["warmup"] = {"fill_s": full_at - t0, "total_s": time.time() - t0}

        for w in range(S.windows):
            a = snapshot(ngx, pids, shimdir, mport, clients)
            depths = [a["m"]["depth"]]
            end = a["t"] + S.seconds
            while True:
                left = end - time.time()
                if left <= 0:
                    break
                time.sleep(min(1.0, left))
                if end - time.time() > 0.3:
                    depths.append(metrics(mport)["depth"])
            b = snapshot(ngx, pids, shimdir, mport, clients)
            depths.append(b["m"]["depth"])
            r = window_result(a, b, pids, depths, n)
            out["windows"].append(r)
            log("  window %d: %.1f admitted/s, hold p50 %s / p99 %s ns, %.2f sections/adm, "
                "%.1f us CPU/adm (schedstat %.1f), depth %d..%d%s" % (
                    w + 1, r["admitted_per_s"], B.fmt(r["hold_p50_ns"]),
                    B.fmt(r["hold_p99_ns"]), r["sections_per_admitted"] or 0,
                    r["cpu_us_per_admitted"] or 0, r["sched_us_per_admitted"] or 0,
                    r["depth_min"], r["depth_max"],
                    "" if not r["non200"] else ", non-200 answers %s" % r["non200"]))
        out["timer_ns"] = max((s or {}).get("timer_ns", 0) for s in b["shims"].values())
        out["patched"] = [(s or {}).get("patched", 0) for s in b["shims"].values()]
        out["connections"] = b["clients"]["open"]
        out["admitted_before"] = m["admitted"]
    finally:
        if clients:
            clients.stop()
        ngx.stop()
        out["alerts"] = ngx.alerts()
    return out


def window_result(a, b, pids, depths, n):
    secs = b["t"] - a["t"]
    admitted = b["m"]["admitted"] - a["m"]["admitted"]
    parts = []
    for pid in pids:
        x, y = a["shims"].get(pid), b["shims"].get(pid)
        if y is None:
            continue
        if x is None:                   # mapped during the window: from zero
            x = dict(y, sections=0, hold_sum=0, wait_sum=0, unmatched=0,
                     hold=[0] * len(y["hold"]), wait=[0] * len(y["wait"]))
        parts.append(shim_delta(x, y))
    sh = shim_sum(parts) or {"sections": 0, "hold_sum": 0, "wait_sum": 0, "unmatched": 0,
                             "hold": [], "wait": [], "sub": 32}
    cpu_s = (b["ticks"] - a["ticks"]) / float(CLK_TCK)
    sched_s = (b["sched_ns"] - a["sched_ns"]) / 1e9
    non200 = counts_delta(a["clients"]["responses"], b["clients"]["responses"])
    answered = non200.pop("200", 0)
    return {
        "seconds": secs,
        "admitted": admitted,
        "admitted_per_s": admitted / secs if secs > 0 else None,
        "answered_200": answered,
        "non200": non200,
        "client_errors": counts_delta(a["clients"]["errors"], b["clients"]["errors"]),
        "rejected_503": b["m"]["rejected_503"] - a["m"]["rejected_503"],
        "queue_timeouts": b["m"]["queue_timeout"] - a["m"]["queue_timeout"],
        "sections": sh["sections"],
        "unmatched": sh["unmatched"],
        "sections_per_admitted": sh["sections"] / admitted if admitted else None,
        "hold_p50_ns": hist_pct(sh["hold"], sh["sub"], 50),
        "hold_p99_ns": hist_pct(sh["hold"], sh["sub"], 99),
        "hold_mean_ns": sh["hold_sum"] / sh["sections"] if sh["sections"] else None,
        "hold_max_ns": hist_max(sh["hold"], sh["sub"]),
        "long_sections": sum(v for b, v in enumerate(sh["hold"])
                             if bucket_range(b, sh["sub"])[0] >= 100000),
        "held_us_per_admitted": sh["hold_sum"] / 1000.0 / admitted if admitted else None,
        "wait_p99_ns": hist_pct(sh["wait"], sh["sub"], 99),
        "wait_mean_ns": sh["wait_sum"] / sh["sections"] if sh["sections"] else None,
        "cpu_s": cpu_s,
        "cpu_us_per_admitted": cpu_s * 1e6 / admitted if admitted else None,
        "sched_us_per_admitted": sched_s * 1e6 / admitted if admitted else None,
        "cpu_share": cpu_s / secs if secs > 0 else None,
        "depth_min": int(min(depths)),
        "depth_max": int(max(depths)),
        "depth_samples": len(depths),
        "full": min(depths) >= n - SLACK,
        "hold_hist": {str(i): v for i, v in enumerate(sh["hold"]) if v},
    }


# ------------------------------------------------------------------ report

def med(rs, k):
    return B.median([r[k] for r in rs])


def by_size(res):
    """{n: [run, ...]} in the order of the sizes; a run is one nginx, one fill
    and its windows (a pass measures every size once)."""
    out = {}
    for x in res["sizes"]:
        out.setdefault(x["n"], []).append(x)
    return out


def render(S, res, meta):
    fmt, kfmt = B.fmt, B.kfmt
    groups = by_size(res)
    sizes = list(groups)
    passes = max(len(v) for v in groups.values()) if groups else 0
    lines = ["# ngx_deepseek_guard_module benchmarks: queue, %s" % meta["date"], "",
             "Generated by `./build.sh bench queue` (bench/queue_scenario.py, "
             "bench/shmtx_hold.c, bench/qclient.py); see bench/README.md.", "",
             "| | |", "|---|---|",
             "| module | commit %s, .so sha256 %s |" % (meta["commit"], meta["so"]),
             "| nginx | %s |" % meta["nginx"],
             "| machine | %s, %d CPUs, %s |" % (meta["cpu"], os.cpu_count(), meta["kernel"]),
             "| load average at start / end | %s / %s |" % (meta["load0"], meta["load1"]),
             "| measured | %d pass(es) over the sizes, %d x %d s windows per size and pass%s |"
             % (passes, S.windows, S.seconds, " (quick mode)" if S.quick else ""),
             "| total runtime | %s |" % meta["runtime"], ""]
    if res.get("proto", "h2") == "h2":
        proto = ("over HTTP/2 (h2c, %d streams per connection: N + %d requests take %s "
                 "connections at the largest N, as each worker may keep only %s files "
                 "open here)" % (S.streams, INFLIGHT, kfmt(-(-(max(sizes) + INFLIGHT)
                                                             // S.streams)),
                                 kfmt(res.get("nofile"))))
    else:
        proto = "over HTTP/1.1, one keep-alive connection per request"
    lines += [
        "nginx, 2 workers: `deepseek_guard_zone q:64m key=global inflight=%d`, "
        "`deepseek_guard_class waiters queue=N queue_timeout=600s`, a location "
        "`deepseek_guard q; proxy_pass` to the mock LLM (keep-alive upstream) answering "
        "after %d ms. bench/qclient.py (%d processes) keeps N + %d requests outstanding, "
        "closed loop %s, the next request %d ms after an answer (the guard admits the "
        "head of its queue on a 3 ms tick; sooner, the request could find the queue still "
        "full): every queue place is taken. A pass measures every size with a fresh "
        "nginx; its windows start once the queue depth gauge has read N, and the gauge "
        "is sampled every second of a window (*depth*: the lowest and highest reading). "
        "*Admitted*: the zone's admitted counter. *Mutex hold*: from acquiring the "
        "zone's mutex to releasing it, per lock section the module takes (all of them: "
        "queueing, the head's admission try on every tick, leaving the queue, the "
        "release of the in-flight slot, pickup, the once-a-second reaper), from an "
        "LD_PRELOAD shim that wraps the module's ngx_shmtx_lock/ngx_shmtx_unlock "
        "(histogram buckets of 3-6%%, the middle of the bucket is given; a clock read, "
        "about %s ns, is part of each). *CPU*: utime + stime of both workers "
        "(/proc/PID/stat) over the window, per admitted request; *schedstat*: the same "
        "from /proc/PID/schedstat (ns resolution). The table gives the medians of all "
        "windows of a size." % (
            INFLIGHT, S.delay_ms, S.clients, INFLIGHT, proto, S.think_ms,
            fmt(max(x.get("timer_ns", 0) for x in res["sizes"]))), ""]
    lines += ["| queue= | admitted/s | mutex hold p50 ns | mutex hold p99 ns | lock "
              "sections per admitted | worker CPU µs per admitted | schedstat µs per "
              "admitted | mutex held µs per admitted | depth (min..max) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    summary = {}
    for n, runs in groups.items():
        rs = [r for x in runs for r in x["windows"]]
        sm = {k: med(rs, k) for k in ("admitted_per_s", "hold_p50_ns", "hold_p99_ns",
                                      "sections_per_admitted", "cpu_us_per_admitted",
                                      "sched_us_per_admitted", "held_us_per_admitted")}
        sm["depth_min"] = min(r["depth_min"] for r in rs)
        sm["depth_max"] = max(r["depth_max"] for r in rs)
        summary[n] = sm
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s..%s |" % (
            kfmt(n), fmt(sm["admitted_per_s"], "%.1f"), fmt(sm["hold_p50_ns"]),
            fmt(sm["hold_p99_ns"]), fmt(sm["sections_per_admitted"], "%.2f"),
            fmt(sm["cpu_us_per_admitted"], "%.1f"), fmt(sm["sched_us_per_admitted"], "%.1f"),
            fmt(sm["held_us_per_admitted"], "%.2f"), kfmt(sm["depth_min"]),
            kfmt(sm["depth_max"])))
    res["summary"] = {str(k): v for k, v in summary.items()}
    lo, hi = (min(sizes), max(sizes)) if sizes else (None, None)
    lines += [""]
    if lo != hi and summary[lo]["cpu_us_per_admitted"] and summary[hi]["cpu_us_per_admitted"]:
        ratio = summary[hi]["cpu_us_per_admitted"] / summary[lo]["cpu_us_per_admitted"]

        def r_of(k):
            a, b = summary[hi][k], summary[lo][k]
            return a / b if a is not None and b else None

        verdict = ratio <= TARGET
        lw = [r for x in groups[lo] for r in x["windows"]]
        hw = [r for x in groups[hi] for r in x["windows"]]
        per_win = ["%.2f" % (a["cpu_us_per_admitted"] / b["cpu_us_per_admitted"])
                   for a, b in zip(hw, lw)
                   if a["cpu_us_per_admitted"] and b["cpu_us_per_admitted"]]
        lines += ["| target | result | target | met |", "|---|---:|---:|---|",
                  "| worker CPU per admitted request, queue=%s / queue=%s | %.2f | <= %.1f "
                  "| %s |" % (kfmt(hi), kfmt(lo), ratio, TARGET,
                              "yes" if verdict else "**NO**"), "",
                  "**Cost per admission, queue=%s / queue=%s: %.2f, target <= %.1f: %s.** "
                  "Per window (the i-th window of each size, in the order measured): %s. "
                  "The same ratio from schedstat: %s; lock sections per admitted request: "
                  "%s; mutex held per admitted request: %s." % (
                      kfmt(hi), kfmt(lo), ratio, TARGET, "met" if verdict else "not met",
                      " / ".join(per_win) or "-", fmt(r_of("sched_us_per_admitted"), "%.2f"),
                      fmt(r_of("sections_per_admitted"), "%.2f"),
                      fmt(r_of("held_us_per_admitted"), "%.2f"))]
        res["ratio"] = {"cpu": ratio, "sched": r_of("sched_us_per_admitted"),
                        "held": r_of("held_us_per_admitted"), "met": verdict}
    lines += ["", "Every window:", "",
              "| queue= | pass | window | s | admitted | admitted/s | hold p50 / p99 / max "
              "ns | hold mean ns | sections > 100 µs | lock wait p99 ns | sections per "
              "admitted | CPU µs per admitted (schedstat) | worker CPU share | non-200 "
              "answers | depth |",
              "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---|---|"]
    for n, runs in groups.items():
        for k, x in enumerate(runs):
            for i, r in enumerate(x["windows"]):
                lines.append(
                    "| %s | %d | %d | %.1f | %s | %s | %s / %s / %s | %s | %s | %s | %s | "
                    "%s (%s) | %s | %s | %s..%s |" % (
                        kfmt(n), k + 1, i + 1, r["seconds"], kfmt(r["admitted"]),
                        fmt(r["admitted_per_s"], "%.1f"), fmt(r["hold_p50_ns"]),
                        fmt(r["hold_p99_ns"]), kfmt(r.get("hold_max_ns")),
                        fmt(r["hold_mean_ns"]), fmt(r.get("long_sections")),
                        fmt(r["wait_p99_ns"]), fmt(r["sections_per_admitted"], "%.2f"),
                        fmt(r["cpu_us_per_admitted"], "%.1f"),
                        fmt(r["sched_us_per_admitted"], "%.1f"), fmt(r["cpu_share"], "%.2f"),
                        ", ".join("%s: %d" % kv for kv in r["non200"].items()) or "0",
                        kfmt(r["depth_min"]), kfmt(r["depth_max"])))
    checks = []
    for n, runs in groups.items():
        rs = [r for x in runs for r in x["windows"]]
        if any(not r["full"] for r in rs):
            checks.append("queue=%d: depth below N - %d in a window" % (n, SLACK))
        if any(r["sections"] == 0 for r in rs):
            checks.append("queue=%d: the shim counted no lock section" % n)
        if any(r["unmatched"] for r in rs):
            checks.append("queue=%d: unlocks without a lock" % n)
        if any(sum(r["non200"].values()) > 0.01 * r["admitted"] or r["client_errors"]
               for r in rs):
            checks.append("queue=%d: non-200 answers or client errors: %s" % (
                n, "; ".join("%s %s" % (r["non200"], r["client_errors"]) for r in rs)))
    lines += ["", "Warm-up (every connection open and the queue depth gauge at N, then "
              "%s s more): %s. GOT slots rewritten by the shim, per worker: %s." % (
                  fmt(max(3.0, S.seconds / 2), "%.0f"),
                  "; ".join("%s: full after %s s" % (kfmt(n), " / ".join(
                      "%.0f" % x["warmup"]["fill_s"] for x in runs))
                            for n, runs in groups.items()),
                  "; ".join("%s: %s" % (kfmt(n), ", ".join(
                      "/".join(str(p) for p in x["patched"]) for x in runs))
                            for n, runs in groups.items()))]
    if checks:
        lines += ["", "**Anomalies:** " + "; ".join(checks)]
    for x in res["sizes"]:
        if x.get("alerts"):
            lines += ["", "**error.log alerts (queue=%d):**" % x["n"], "", "```"] + \
                     x["alerts"][:10] + ["```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main

def run(quick=False):
    S = Settings(quick)
    for f in (B.NGINX, B.MODULE, B.PYTHON):
        if not os.path.exists(f):
            sys.exit("bench: %s not found (run ./build.sh bench)" % f)
    for n in S.sizes:
        if not 1 <= n <= 65535:
            sys.exit("bench: queue sizes are 1 to 65535")
        if S.proto == "http1" and (n + INFLIGHT) * 0.6 + 64 > WORKER_CONNECTIONS:
            sys.exit("bench: queue=%d over HTTP/1.1 takes %d connections, about half of "
                     "them in each worker, but the hard limit of open files is %d here "
                     "(raising it needs CAP_SYS_RESOURCE): use BENCH_QUEUE_PROTO=h2"
                     % (n, n + INFLIGHT, NOFILE))
    if not shutil.which("cc"):
        sys.exit("bench: cc not found (the queue scenario builds an LD_PRELOAD shim)")
    meta = B.meta_info(types.SimpleNamespace())
    meta["load0"] = B.loadavg()
    log("queue: sizes %s over %s, %d x %d s windows, answers of %d ms; load average %s" % (
        ",".join(map(str, S.sizes)), S.proto, S.windows, S.seconds, S.delay_ms,
        meta["load0"]))
    root = tempfile.mkdtemp(prefix="dsg-bench-")
    os.chmod(root, 0o755)
    module = os.path.join(root, "module.so")
    shutil.copy(B.MODULE, module)
    B.MODULE = module
    with open(module, "rb") as f:
        meta["so"] = hashlib.sha256(f.read()).hexdigest()[:12]
    res = {"sizes": [], "proto": S.proto, "nofile": NOFILE}
    mock = None
    try:
        shim = build_shim(root)
        mock = B.Mock(root, types.SimpleNamespace(capacity=0, first_token_ms=S.delay_ms,
                                                  token_ms=0, tokens=8))
        for p in range(S.passes):
            for n in S.sizes:
                x = run_size(S, root, mock, shim, n)
                x["pass"] = p + 1
                res["sizes"].append(x)
    finally:
        if mock:
            mock.stop()
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
    os.makedirs(B.RESULTS, exist_ok=True)
    full = not S.quick and sorted(S.sizes) == sorted(DEFAULT_SIZES) and S.proto == "h2"
    base = meta["date"] + ("-queue" if full else "-queue-partial")
    tmp = "" if full else ".tmp"
    with open(os.path.join(B.RESULTS, base + ".md" + tmp), "w") as f:
        f.write(text)
    with open(os.path.join(B.RESULTS, base + ".json" + tmp), "w") as f:
        json.dump({"meta": meta, "settings": vars(S), "results": res}, f, indent=1,
                  sort_keys=True)
    log("written to bench/results/%s.md%s (%s)" % (base, tmp, meta["runtime"]))
    return 0


def render_saved(path):
    with open(path) as f:
        saved = json.load(f)
    S = Settings(False)
    S.__dict__.update(saved["settings"])
    return render(S, saved["results"], saved["meta"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render_saved(sys.argv[2]))
        sys.exit(0)
    sys.exit(run("--quick" in sys.argv[1:]))
