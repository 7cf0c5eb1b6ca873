#!/usr/bin/env python3
"""Instructions per request of the nginx worker under valgrind's callgrind.

Deterministic where req/s and req/cpu-s move with the machine's load. The
scenario `instructions` of bench/bench.py (./build.sh bench instructions)
runs it over the configurations of the admit and reject paths
(bench/conf/throughput.conf) and of the cache hits (bench/conf/cache.conf):

  admit:  guard (per-key zone + global in-flight zone + classes) vs
          `limit_req` per key + `limit_conn` global; references: empty_gif
          alone and `return 200`
  reject: guard vs `limit_req`
  hits of 1 KB, 32 KB, 256 KB: guard cache vs `proxy_cache`; reference:
          `return 200` of the same body

nginx runs in the foreground with one process (`master_process off`) under
`valgrind --tool=callgrind`. For each path, WARMUP requests go first on a
keep-alive connection (the caches are filled and checked to answer HIT
before that), then `callgrind_control -z` zeroes the counters, N requests
follow on keep-alive connections (nginx closes one after 1000 requests,
`keepalive_requests`; the next one is opened as wrk would), and
`callgrind_control -d` dumps what
they cost: the worker's setup and the warm-up are not counted. Every
measured answer is checked (status; X-Cache-Status: HIT and the exact body
for the cache paths), and the origin's access log must not grow while a
cache path is measured; anything else stops the scenario.

callgrind counts the instructions nginx runs in user space (Ir); the
kernel's share (system calls, the copies of write() and sendfile()) is not
in the figure.

  bench/instructions.py <module.so> <scratch dir>    (valgrind needed)
prints the table; BENCH_INSTR_REQUESTS (2000) and BENCH_INSTR_WARMUP (100)
set N and WARMUP.
"""
import glob
import http.client
import os
import shutil
import subprocess
import sys
import time

VALGRIND = os.environ.get("VALGRIND", "valgrind")
CALLGRIND_CONTROL = os.environ.get("CALLGRIND_CONTROL", "callgrind_control")
# BENCH_INSTR_ONLY=admit,reject: only these groups (a look while working;
# a report needs them all)
ONLY = [g for g in os.environ.get("BENCH_INSTR_ONLY", "").split(",") if g]

# (group, variant, config, path, headers, expect); expect: "200", "503" or
# "hit" (200, X-Cache-Status: HIT, the body of the size)
API = {"Authorization": "Bearer sk-bench-normal"}
PATHS = (
    ("admit", "return", "throughput", "/return", dict(API, Host="return"), "200"),
    ("admit", "plain", "throughput", "/plain", dict(API, Host="plain"), "200"),
    ("admit", "limit_req", "throughput", "/limit_req", dict(API, Host="limit_req"), "200"),
    ("admit", "guard", "throughput", "/guard", dict(API, Host="guard"), "200"),
    ("admit", "guard_map", "throughput", "/guard_map", dict(API, Host="guard_map"), "200"),
    ("reject", "limit_req", "throughput", "/reject/limit_req",
     dict(API, Host="reject_limit_req"), "503"),
    ("reject", "guard", "throughput", "/reject/guard", dict(API, Host="reject_guard"), "503"),
    ("reject", "guard_map", "throughput", "/reject/guard_map",
     dict(API, Host="reject_guard_map"), "503"),
) + tuple(
    (size, v, "cache", "/%s/%s.json" % (v, size), {}, "hit" if v != "ceiling" else "200")
    for size in ("1k", "32k", "256k") for v in ("proxy_cache", "guard_cache", "ceiling"))

# (group, variant, anchor): the ratios the report gives
RATIOS = (
    ("admit", "guard", "limit_req"),
    ("admit", "guard", "plain"),
    ("admit", "guard_map", "limit_req"),
    ("reject", "guard", "limit_req"),
    ("reject", "guard_map", "limit_req"),
    ("1k", "guard_cache", "proxy_cache"),
    ("1k", "guard_cache", "ceiling"),
    ("32k", "guard_cache", "proxy_cache"),
    ("32k", "guard_cache", "ceiling"),
    ("256k", "guard_cache", "proxy_cache"),
    ("256k", "guard_cache", "ceiling"),
)


class Failure(RuntimeError):
    pass


class Callgrind:
    """One nginx, one process, in the foreground under callgrind."""

    def __init__(self, nginx, prefix, conf, port):
        self.prefix, self.port = prefix, port
        # one process: the worker's code runs in the process callgrind sees
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write("daemon off;\nmaster_process off;\n" + text)
        self.out = os.path.join(prefix, "callgrind")
        os.makedirs(self.out, exist_ok=True)
        self.vglog = open(os.path.join(prefix, "valgrind.log"), "w")
        self.proc = subprocess.Popen(
            [VALGRIND, "--tool=callgrind",
             "--callgrind-out-file=%s/cg.%%p" % self.out,
             nginx, "-p", prefix + "/", "-c", conf,
             "-e", os.path.join(prefix, "logs", "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.vglog)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise Failure("nginx under callgrind exited with %s; see %s" % (
                    self.proc.returncode, self.vglog.name))
            try:
                import socket
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise Failure("nginx under callgrind did not come up")
                time.sleep(0.2)
        self.dumps = 0

    def control(self, *args):
        r = subprocess.run([CALLGRIND_CONTROL] + list(args) + [str(self.proc.pid)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise Failure("callgrind_control %s: %s%s" % (" ".join(args), r.stdout,
                                                          r.stderr))

    def zero(self):
        self.control("-z")

    def dump(self, tag):
        """Instructions since the last zero, from a new dump file."""
        before = set(glob.glob(os.path.join(self.out, "cg.%d*" % self.proc.pid)))
        self.control("-d", tag)
        deadline = time.time() + 60
        while time.time() < deadline:
            new = set(glob.glob(os.path.join(self.out, "cg.%d*" % self.proc.pid))) - before
            for f in new:
                tot = None
                with open(f) as fh:
                    for line in fh:
                        if line.startswith(("summary:", "totals:")):
                            tot = int(line.split()[1])
                if tot is not None:
                    return tot
            time.sleep(0.1)
        raise Failure("callgrind dump %s did not appear" % tag)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.vglog.close()


def requests(port, path, headers, n, expect, want=None):
    """n requests on keep-alive connections (a new one when nginx closes
    one after keepalive_requests, 1000); each answer checked."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for i in range(n):
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            body = r.read()
            st = r.status
            if expect == "hit":
                cs = r.getheader("X-Cache-Status")
                if st != 200 or cs != "HIT" or (want is not None and body != want):
                    raise Failure("%s: request %d of %d answered %d, X-Cache-Status %s, "
                                  "%d bytes: not a cache HIT of the expected body"
                                  % (path, i + 1, n, st, cs, len(body)))
            elif st != int(expect) or (want is not None and body != want):
                raise Failure("%s: request %d of %d answered %d (%d bytes), expected %s"
                              % (path, i + 1, n, st, len(body), expect))
            if r.will_close:
                # keepalive_requests (1000): a new connection, as wrk opens
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    finally:
        c.close()


def warm_cache(port, path, want, tries=20):
    """Requests path until it answers HIT with the expected body."""
    seen = []
    for _ in range(tries):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        cs = r.getheader("X-Cache-Status")
        seen.append(cs)
        if r.status != 200 or body != want:
            raise Failure("%s: warming answered %d with %d bytes" % (path, r.status,
                                                                    len(body)))
        if cs == "HIT":
            return seen
        time.sleep(0.1)
    raise Failure("%s: no HIT after %d requests (X-Cache-Status: %s)" % (
        path, tries, " ".join(map(str, seen))))


def lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def measure(nginx, configs, n, warmup, bodies, log=print):
    """configs: {name: (prefix, conf file, port, origin log or None)},
    rendered; bodies: {size: bytes}. Returns {"paths": {group: {variant:
    Ir per request}}, "warm": {path: [X-Cache-Status...]}, "totals": ...}."""
    out = {"paths": {}, "totals": {}, "warm": {}, "n": n, "warmup": warmup}
    for cname, (prefix, conf, port, origin_log) in configs.items():
        cg = Callgrind(nginx, prefix, conf, port)
        try:
            for group, variant, c, path, headers, expect in PATHS:
                if c != cname or (ONLY and group not in ONLY):
                    continue
                want = bodies.get(group) if c == "cache" else None
                if expect == "hit":
                    out["warm"][path] = warm_cache(port, path, want)
                elif expect == "503":
                    # rate=1r/m: the key's one token, then every request refused
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    c.request("GET", path, headers=headers)
                    c.getresponse().read()
                    c.close()
                t = time.time()
                requests(port, path, headers, warmup, expect, want)
                o0 = lines(origin_log) if origin_log else 0
                cg.zero()
                requests(port, path, headers, n, expect, want)
                tot = cg.dump(path.strip("/").replace("/", "_"))
                if origin_log and expect == "hit" and lines(origin_log) != o0:
                    raise Failure("%s: the origin was asked %d times during the measured "
                                  "requests" % (path, lines(origin_log) - o0))
                out["paths"].setdefault(group, {})[variant] = tot / n
                out["totals"][path] = tot
                log("  %-26s %9.0f instructions/request (%.0f s)" % (
                    path, tot / n, time.time() - t))
        finally:
            cg.stop()
    return out


def table(res):
    rows = ["%-8s %-12s %12s" % ("path", "variant", "Ir/request")]
    for group, variants in res["paths"].items():
        for v, ir in variants.items():
            rows.append("%-8s %-12s %12.0f" % (group, v, ir))
    rows.append("")
    for group, a, b in RATIOS:
        x = res["paths"].get(group, {})
        if a in x and b in x:
            rows.append("%-8s %s / %s: %.3f" % (group, a, b, x[a] / x[b]))
    return "\n".join(rows)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: bench/instructions.py <module.so> <scratch dir>")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench as B
    B.MODULE = os.path.abspath(sys.argv[1])
    root = os.path.abspath(sys.argv[2])
    os.makedirs(root, exist_ok=True)
    if not shutil.which(VALGRIND):
        sys.exit("instructions: valgrind not found")
    S = B.Settings(False)
    res = B.scenario_instructions(S, root)
    print(table(res))


if __name__ == "__main__":
    main()
