#!/usr/bin/python3
"""Scenario stall of the ngx_deepseek_guard_module benchmarks.

How long do cache hits wait while the same worker stores large misses?
Today a miss's LMDB write runs on the worker's event loop, and every
other request of that worker waits behind it.

One nginx worker (bench/conf/stall.conf) with the module's cache. An
open-loop client (bench/hitclient.c, built with cc for the run; a
connection per request) asks for a 1 KB hit at BENCH_STALL_HIT_RATE
(200/s) for BENCH_STALL_SECONDS (20 s) and records each request's latency
from its scheduled time. BENCH_STALL_CLIENT=python uses bench/loadgen.py
instead, as the runs before 2026-12-03 did: its own scheduling (about 2 ms
at the median for a local hit) hides what this scenario looks for. The
misses are sent by bench/loadgen.py (POSTs with a body). Four passes:

  baseline  the hits alone;
  stored    the hits, and a second client sending 1 MB misses at
            BENCH_STALL_MISS_RATE (5/s): POSTs with a prompt of their own,
            so that each has a key of its own, is a MISS and is stored;
  no-store  the same misses, with an answer carrying Cache-Control:
            no-store: the 1 MB passes through the worker, nothing is
            written. stored - no-store is what the write costs the hits.
  threads   hits and misses as in "stored", on a second cache whose
            path has threads=: the 1 MB writes run in nginx's thread
            pool, off the event loop.

The origin is a second nginx (bench/conf/stall-origin.conf, its own
worker) serving static files, so that the 1 MB does not cost the measured
worker anything but the proxying. The passes are interleaved over
BENCH_STALL_ROUNDS (3) rounds, the order rotating from round to round; one
nginx (one cache) for the whole run. Report: bench/results/<date>-stall.md
and .json (other settings, or --quick: <date>-stall-partial.md.tmp).

  stall_scenario.py [--quick]
  stall_scenario.py --render bench/results/<date>-stall.json
"""
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

PASSES = ("baseline", "stored", "nostore", "threads")
LABELS = {"baseline": "baseline: hits alone",
          "stored": "with 1 MB misses, stored (an LMDB write each)",
          "nostore": "with 1 MB misses, `no-store` (passed through, not written)",
          "threads": "with 1 MB misses, stored by the thread pool (`threads=`)"}


def log(msg):
    B.log("stall: " + msg)


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.rounds = B.env_int("BENCH_STALL_ROUNDS", 1 if quick else 3)
        self.seconds = B.env_int("BENCH_STALL_SECONDS", 4 if quick else 20)
        self.hit_rate = B.env_int("BENCH_STALL_HIT_RATE", 200)
        self.miss_rate = B.env_int("BENCH_STALL_MISS_RATE", 5)
        self.miss_bytes = B.env_int("BENCH_STALL_MISS_BYTES", 1000000)
        self.hit_bytes = 1024
        self.nostore = B.env_int("BENCH_STALL_NOSTORE", 1) == 1
        self.keep = os.environ.get("BENCH_KEEP") == "1"

    def default(self):
        return (not self.quick and self.rounds == 3 and self.seconds == 20
                and self.hit_rate == 200 and self.miss_rate == 5
                and self.miss_bytes == 1000000 and self.nostore)


def pct(xs, p):
    return B.percentile(xs, p)


def loadgen(port, path, rate, secs, out, method, prompt=""):
    """bench/loadgen.py in the background; returns the process."""
    cmd = [B.PYTHON, B.LOADGEN, "--port", str(port), "--path", path, "--rate", str(rate),
           "--duration", str(secs), "--method", method, "--timeout", "30",
           "--out", out, "--quiet"]
    if prompt:
        cmd += ["--prompt", prompt]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


CLIENT = None   # the built bench/hitclient.c, or None


def hitclient(exe, port, path, rate, secs, out):
    """bench/hitclient.c in the background; returns the process."""
    return subprocess.Popen([exe, str(port), path, str(rate), str(secs), out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def build_hitclient(root):
    """bench/hitclient.c built for this run; None: use bench/loadgen.py."""
    if os.environ.get("BENCH_STALL_CLIENT", "c") == "python":
        return None
    exe = os.path.join(root, "hitclient")
    r = subprocess.run(["cc", "-O2", "-Wall", "-o", exe,
                        os.path.join(B.BENCH, "hitclient.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("building bench/hitclient.c failed:\n" + r.stderr)
    return exe


def finish(p, out):
    so, se = p.communicate(timeout=300)
    if p.returncode != 0:
        raise RuntimeError("loadgen failed: %s" % se)
    summary = json.loads(so.strip().splitlines()[-1])
    with open(out) as f:
        recs = [json.loads(l) for l in f]
    return summary, recs


def one_post(port, path, prompt):
    """The first request of a miss client again (its "<prompt> #0" body)."""
    body = json.dumps({"model": "deepseek-chat",
                       "messages": [{"role": "user", "content": "%s #0" % prompt}]},
                      separators=(",", ":")).encode()
    st, h, data = B.http(port, path, method="POST", body=body,
                         headers={"Content-Type": "application/json"}, timeout=30)
    return st, h.get("x-cache-status"), len(data)


def run_pass(S, root, ngx, port, kind, rnd):
    """One pass; returns its figures."""
    ngx.settle()
    time.sleep(0.5)
    tag = "r%d-%s-%d" % (rnd, kind, int(time.time() * 1000))
    hout = os.path.join(root, "hits-%s.jsonl" % tag)
    mout = os.path.join(root, "misses-%s.jsonl" % tag)
    cpu0 = ngx.cpu_ns()
    hit = "/thit/1k.json" if kind == "threads" else "/hit/1k.json"
    if CLIENT:
        hp = hitclient(CLIENT, port, hit, S.hit_rate, S.seconds, hout)
    else:
        hp = loadgen(port, hit, S.hit_rate, S.seconds, hout, "GET")
    mp = None
    if kind != "baseline":
        path = {"stored": "/miss/", "nostore": "/nostore/",
                "threads": "/tmiss/"}[kind] + "v1/chat/completions"
        mp = loadgen(port, path, S.miss_rate, S.seconds, mout, "POST", prompt="stall " + tag)
    hsum, hrecs = finish(hp, hout)
    msum, mrecs = finish(mp, mout) if mp else (None, [])
    cpu = (ngx.cpu_ns() - cpu0) / 1e9
    ok = [r for r in hrecs if r["status"] == 200]
    lat = [r["lat_ms"] for r in ok]
    notes = []
    bad = [r for r in ok if r["cache"] != "HIT" or r["bytes"] < S.hit_bytes]
    if bad:
        notes.append("%d hits answered without X-Cache-Status: HIT" % len(bad))
    if len(ok) != len(hrecs):
        notes.append("%d of %d hits failed (%s)" % (
            len(hrecs) - len(ok), len(hrecs),
            ", ".join(sorted({str(r["err"] or r["status"]) for r in hrecs
                              if r["status"] != 200}))[:200]))
    x = {"round": rnd, "kind": kind, "hits": len(hrecs), "hits_ok": len(ok),
         "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "p999_ms": pct(lat, 99.9),
         "max_ms": max(lat) if lat else None,
         "over_5ms": sum(1 for v in lat if v > 5), "over_10ms": sum(1 for v in lat if v > 10),
         "over_50ms": sum(1 for v in lat if v > 50),
         "lateness_p99_ms": hsum["lateness_ms"]["p99"], "achieved_rate": hsum["achieved_rate"],
         "worker_cpu_s": cpu, "notes": notes}
    if mp:
        mok = [r for r in mrecs if r["status"] == 200]
        mlat = [r["lat_ms"] for r in mok]
        caches = {}
        for r in mrecs:
            caches[r["cache"] or "-"] = caches.get(r["cache"] or "-", 0) + 1
        x.update({"misses": len(mrecs), "misses_ok": len(mok),
                  "miss_bytes_min": min((r["bytes"] for r in mok), default=0),
                  "miss_p50_ms": pct(mlat, 50), "miss_max_ms": max(mlat) if mlat else None,
                  "miss_cache": caches,
                  "miss_lateness_p99_ms": msum["lateness_ms"]["p99"]})
        if caches.get("MISS", 0) != len(mrecs):
            notes.append("misses' X-Cache-Status: %s" % caches)
        if x["miss_bytes_min"] < S.miss_bytes:
            notes.append("a miss answered %d bytes" % x["miss_bytes_min"])
        # the first miss again: stored, it is now a HIT; no-store, a MISS
        st, cs, n = one_post(port, path, "stall " + tag)
        x["again"] = cs
        want = "MISS" if kind == "nostore" else "HIT"
        if st != 200 or cs != want or n < S.miss_bytes:
            notes.append("the first miss again answered %s, %s, %d bytes (expected %s)"
                         % (st, cs, n, want))
    log("round %d %-8s: hits p50 %.2f p99 %.2f max %.1f ms (%d/%d ok)%s, worker CPU %.2f s%s" % (
        rnd, kind, x["p50_ms"] or 0, x["p99_ms"] or 0, x["max_ms"] or 0, len(ok), len(hrecs),
        "; misses %d/%d, %s" % (x["misses_ok"], x["misses"], x["miss_cache"]) if mp else "",
        cpu, "; " + "; ".join(notes) if notes else ""))
    return x


def run(quick=False):
    S = Settings(quick)
    for f in (B.NGINX, B.MODULE, B.PYTHON):
        if not os.path.exists(f):
            sys.exit("bench: %s not found (run ./build.sh bench)" % f)
    meta = B.meta_info(types.SimpleNamespace())
    meta["load0"] = B.loadavg()
    kinds = [k for k in PASSES if k != "nostore" or S.nostore]
    log("%d rounds of %s, %d s each: hits %d/s, misses %d/s of %d bytes; load average %s" % (
        S.rounds, "/".join(kinds), S.seconds, S.hit_rate, S.miss_rate, S.miss_bytes,
        meta["load0"]))
    root = tempfile.mkdtemp(prefix="dsg-bench-")
    os.chmod(root, 0o755)
    module = os.path.join(root, "module.so")
    shutil.copy(B.MODULE, module)
    B.MODULE = module
    with open(module, "rb") as f:
        meta["so"] = hashlib.sha256(f.read()).hexdigest()[:12]
    res = {"passes": []}
    global CLIENT
    CLIENT = build_hitclient(root)
    meta["hit_client"] = "bench/hitclient.c" if CLIENT else "bench/loadgen.py"
    oport, port = B.free_port(), B.free_port()
    origin = B.Nginx(root, "origin", "stall-origin.conf", {"PORT": oport}, [oport])
    os.makedirs(origin.path("www"), exist_ok=True)
    with open(origin.path("www", "1k.json"), "w") as f:
        f.write(B.json_body(S.hit_bytes))
    with open(origin.path("www", "big.json"), "w") as f:
        f.write(B.json_body(S.miss_bytes))
    ngx = B.Nginx(root, "stall", "stall.conf", {"PORT": port, "ORIGIN_PORT": oport}, [port])
    try:
        origin.start()
        ngx.start()
        res["warm"] = []
        for hit in ("/hit/1k.json", "/thit/1k.json"):
            seen = []
            for _ in range(20):
                st, h, body = B.http(port, hit)
                seen.append(h.get("x-cache-status"))
                if st != 200 or len(body) != S.hit_bytes:
                    raise RuntimeError("%s answered %d, %d bytes" % (hit, st, len(body)))
                if seen[-1] == "HIT":
                    break
                time.sleep(0.05)
            if seen[-1] != "HIT":
                raise RuntimeError("%s: no HIT (%s)" % (hit, " ".join(map(str, seen))))
            res["warm"] += seen
        for rnd in range(1, S.rounds + 1):
            k = (rnd - 1) % len(kinds)
            for kind in kinds[k:] + kinds[:k]:
                res["passes"].append(run_pass(S, root, ngx, port, kind, rnd))
        res["cache_bytes"] = os.path.getsize(ngx.path("guard_cache", "data.mdb")) \
            if os.path.exists(ngx.path("guard_cache", "data.mdb")) else None
    finally:
        ngx.stop()
        origin.stop()
        res["alerts"] = ngx.alerts() + origin.alerts()
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
    full = S.default()
    base = meta["date"] + ("-stall" if full else "-stall-partial")
    tmp = "" if full else ".tmp"
    with open(os.path.join(B.RESULTS, base + ".md" + tmp), "w") as f:
        f.write(text)
    with open(os.path.join(B.RESULTS, base + ".json" + tmp), "w") as f:
        json.dump({"meta": meta, "settings": vars(S), "results": res}, f, indent=1,
                  sort_keys=True)
    log("written to bench/results/%s.md%s (%s)" % (base, tmp, meta["runtime"]))
    return 0


def f2(v):
    return B.fmt(v, "%.2f")


def f1(v):
    return B.fmt(v, "%.1f")


def render(S, res, meta):
    ps = res["passes"]
    kinds = [k for k in PASSES if any(p["kind"] == k for p in ps)]
    out = ["# ngx_deepseek_guard_module benchmarks, %s: stall" % meta["date"], "",
           "Generated by `./build.sh bench stall` (bench/stall_scenario.py); see "
           "bench/README.md.", "",
           "| | |", "|---|---|",
           "| module | commit %s, .so sha256 %s |" % (meta["commit"], meta["so"]),
           "| nginx | %s |" % meta["nginx"],
           "| machine | %s, %d CPUs, %s |" % (meta["cpu"], os.cpu_count(), meta["kernel"]),
           "| load average at start / end | %s / %s |" % (meta["load0"], meta["load1"]),
           "| passes | %d rounds of %s, %d s each%s |" % (
               S.rounds, " / ".join(kinds), S.seconds, " (quick mode)" if S.quick else ""),
           "| total runtime | %s |" % meta["runtime"], "",
           "## Cache hits while the worker stores 1 MB misses", "",
           "One nginx worker with the module's cache (`bench/conf/stall.conf`). An open-loop "
           "client (`%s`, a connection per request) asks for a %d-byte cache "
           "hit %d times a second for %d s; latency is from each request's scheduled time "
           "to the end of its answer. *stored*: a second client sends %d POSTs a second, "
           "each with a prompt of its own, which the origin answers with %s bytes: each is "
           "a MISS and an LMDB write of about 1 MB, on the worker's event loop. *`no-store`*: "
           "the same misses, answered with `Cache-Control: no-store`, so the 1 MB passes "
           "through and nothing is written: stored against `no-store` is what the write "
           "costs the hits. *threads*: hits and misses as in *stored*, on a second cache "
           "whose path has `threads=stall` (`thread_pool stall threads=2`): the 1 MB writes "
           "run in nginx's thread pool. The origin is another nginx (static files, a worker of its "
           "own). Passes interleaved, the order rotating each round; one cache for the "
           "whole run. Medians of the rounds, and every round." % (
               meta.get("hit_client", "bench/loadgen.py"),
               S.hit_bytes, S.hit_rate, S.seconds, S.miss_rate, B.kfmt(S.miss_bytes)), "",
           "| pass | hits p50 ms | hits p99 ms | hits p99.9 ms | hits max ms | hits > 5 ms "
           "| hits > 10 ms | worker CPU s per pass | rounds: p50 / p99 / max ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    med = {}
    for k in kinds:
        rs = [p for p in ps if p["kind"] == k]
        m = {q: B.median([r[q] for r in rs]) for q in
             ("p50_ms", "p99_ms", "p999_ms", "max_ms", "over_5ms", "over_10ms",
              "worker_cpu_s")}
        med[k] = m
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            LABELS[k], f2(m["p50_ms"]), f2(m["p99_ms"]), f1(m["p999_ms"]), f1(m["max_ms"]),
            B.fmt(m["over_5ms"]), B.fmt(m["over_10ms"]), f2(m["worker_cpu_s"]),
            "; ".join("%s / %s / %s" % (f2(r["p50_ms"]), f2(r["p99_ms"]), f1(r["max_ms"]))
                      for r in rs)))
    out += ["", "| ratio of medians | p50 | p99 | max |", "|---|---:|---:|---:|"]
    for a, b in (("stored", "baseline"), ("nostore", "baseline"), ("stored", "nostore"),
                 ("threads", "baseline"), ("threads", "nostore")):
        if a in med and b in med:
            out.append("| %s / %s | %s | %s | %s |" % (
                a.replace("nostore", "`no-store`"), b.replace("nostore", "`no-store`"),
                f2(B.ratio(med[a]["p50_ms"], med[b]["p50_ms"])),
                f2(B.ratio(med[a]["p99_ms"], med[b]["p99_ms"])),
                f2(B.ratio(med[a]["max_ms"], med[b]["max_ms"]))))
    mp = [p for p in ps if p["kind"] != "baseline"]
    if mp:
        out += ["", "The misses: %s. The first miss of each pass asked again after it: %s." % (
            "; ".join("round %d %s: %d of %d answered (%s), p50 %s ms, max %s ms" % (
                p["round"], p["kind"].replace("nostore", "no-store"), p["misses_ok"],
                p["misses"], ", ".join("%s %d" % kv for kv in sorted(p["miss_cache"].items())),
                B.fmt(p["miss_p50_ms"]), B.fmt(p["miss_max_ms"])) for p in mp),
            ", ".join("%s %s" % (p["kind"].replace("nostore", "no-store"), p.get("again"))
                      for p in mp))]
    out += ["", "Hits answered per pass: %s (all `X-Cache-Status: HIT` unless noted). Client "
            "lateness p99 (launch after the scheduled time, hits' client) per pass: %s ms; "
            "the guard cache's data.mdb at the end: %s bytes." % (
                ", ".join("%d/%d" % (p["hits_ok"], p["hits"]) for p in ps),
                ", ".join(f1(p["lateness_p99_ms"]) for p in ps), B.kfmt(res.get("cache_bytes")))]
    notes = ["round %d %s: %s" % (p["round"], p["kind"], "; ".join(p["notes"]))
             for p in ps if p["notes"]]
    if notes:
        out += ["", "**Anomalies:** " + " / ".join(notes)]
    if res.get("alerts"):
        out += ["", "**error.log alerts:**", "", "```"] + res["alerts"][:10] + ["```"]
    return "\n".join(out) + "\n"


def render_saved(path):
    with open(path) as f:
        saved = json.load(f)
    S = Settings(False)
    S.__dict__.update(saved["settings"])
    return render(S, saved["results"], saved["meta"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render_saved(sys.argv[2]), end="")
        sys.exit(0)
    sys.exit(run("--quick" in sys.argv[1:]))
