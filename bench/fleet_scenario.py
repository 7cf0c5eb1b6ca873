#!/usr/bin/python3
"""The `fleet` benchmark: what fleet zones (deepseek_guard_fleet, fleet=on)
cost, on the request path and in Redis commands (issue 16, item 5).

Run by bench/run.sh (./build.sh bench fleet, bench/run.sh fleet).  It starts
its own redis-server on a free port (and stops it), and nginx from
bench/conf/fleet.conf: one worker, the same per-key zone twice, "z" with
fleet=on and "l" local only, rate=100000r/s per key, key=$arg_k, empty_gif
behind each.

Part 1, request cost.  wrk (-t1 -c50, bench/conf/fleet.lua) cycles over
1,000 keys (?k=1..1000) on /fleet or on /local, interleaved: rounds of
fleet, local (local, fleet in every other round), 5 rounds.  Each wrk run
lasts ramp + window + 1 s; the window (4 s) starts after a ramp of 2 s and is
measured from the zone's own counters (requests = admitted + rejected, from
/metrics) and the worker's CPU (utime + stime from /proc/PID/stat, and
/proc/PID/schedstat), so that the fleet keys' cold start (a key idle for 20
intervals has given its tokens back: its first request goes on credit, the
next ones wait for a grant) stays out of the comparison; it is reported
beside it.  req/s, req/cpu-s and the ratio fleet/local (of the medians, and
per round), with the spread over rounds.  Target: fleet/local >= 0.95.  The
comparison is void if the fleet zone rejected anything in a window or lost
Redis (errors or fallbacks).

Part 2, Redis commands.  1, 2 and 3 nginx instances (nodes node1..nodeN,
nodes=N, each 1 worker) against the one redis-server, each node with the
same K active keys (100, 1,000, 10,000), every key hit twice per sync
interval.  One zone of 10,000 keys would need 200,000 req/s per node, so K
keys are K/100 fleet zones (f0, f1, ...) of 100 keys each, every request
(/k<K>?k=1..100, 2,000 req/s per node, paced by wrk's delay()) passing all
of them: an EVAL carries 100 keys of one zone, so these are the same EVALs
as one zone of K keys (a "1 zone" point checks it: 1,000 keys in z at
20,000 req/s).  After a ramp, over a window: per node the Redis commands it
sent (deepseek_guard_fleet_commands_total), its syncs and their mean round
trip (deepseek_guard_fleet_sync_seconds_sum / _count), the keys synced per
sync (deepseek_guard_fleet_keys, summed over the zones, sampled); Redis's
own counts (INFO stats total_commands_processed, which includes the
commands the Lua script runs, and INFO commandstats: EVAL and PING calls,
EVAL µs per call) and the CPU of redis-server (/proc/PID/stat), also per
key synced.

The report goes to bench/results/<YYYY-MM-DD>-fleet.md (a quick run, or other
settings, write <YYYY-MM-DD>-fleet-partial.md.tmp).

Environment: BENCH_FLEET_ROUNDS (5), BENCH_FLEET_RAMP_S (2),
BENCH_FLEET_WINDOW_S (4), BENCH_FLEET_KEYS (1000), BENCH_FLEET_CONNECTIONS
(50), BENCH_FLEET_KEY_COUNTS (100,1000,10000: multiples of 100),
BENCH_FLEET_NODE_COUNTS (1,2,3), BENCH_FLEET_HITS (2: hits per key per
interval), BENCH_FLEET_ONE_ZONE (1), BENCH_FLEET_SCALE_RAMP_S (3),
BENCH_FLEET_SCALE_WINDOW_S (5), BENCH_FLEET_INTERVAL (100ms), REDIS_SERVER
(redis-server), BENCH_KEEP=1, and bench.py's NGINX_BIN, DSG_MODULE, WRK.
"""
import datetime
import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B                       # noqa: E402  (bench/bench.py)

LUA = os.path.join(B.CONF, "fleet.lua")
TEMPLATE = "fleet.conf"
REDIS_SERVER = os.environ.get("REDIS_SERVER", "redis-server")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET = 0.95
PACE_MS = 10                            # wrk delay() per connection, part 2
KEYS_PER_ZONE = 100                     # part 2: one EVAL's worth
DEFAULTS = {"rounds": 5, "ramp": 2, "window": 4, "keys": 1000, "conns": 50,
            "key_counts": [100, 1000, 10000], "node_counts": [1, 2, 3],
            "hits": 2, "scale_ramp": 3, "scale_window": 5, "one_zone": 1,
            "interval": "100ms"}
REJECTED = ("rejected_429", "rejected_503", "rejected_other", "queue_timeout")


def log(msg):
    B.log(msg)


def env_list(name, default):
    v = os.environ.get(name)
    return [int(x) for x in v.split(",") if x.strip()] if v else list(default)


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.rounds = B.env_int("BENCH_FLEET_ROUNDS", 1 if quick else DEFAULTS["rounds"])
        self.ramp = B.env_int("BENCH_FLEET_RAMP_S", DEFAULTS["ramp"])
        self.window = B.env_int("BENCH_FLEET_WINDOW_S", 2 if quick else DEFAULTS["window"])
        self.keys = B.env_int("BENCH_FLEET_KEYS", DEFAULTS["keys"])
        self.conns = B.env_int("BENCH_FLEET_CONNECTIONS", DEFAULTS["conns"])
        self.key_counts = env_list("BENCH_FLEET_KEY_COUNTS", DEFAULTS["key_counts"])
        self.node_counts = env_list("BENCH_FLEET_NODE_COUNTS", DEFAULTS["node_counts"])
        self.hits = B.env_int("BENCH_FLEET_HITS", DEFAULTS["hits"])
        self.one_zone = B.env_int("BENCH_FLEET_ONE_ZONE", DEFAULTS["one_zone"])
        self.scale_ramp = B.env_int("BENCH_FLEET_SCALE_RAMP_S", DEFAULTS["scale_ramp"])
        self.scale_window = B.env_int("BENCH_FLEET_SCALE_WINDOW_S",
                                      2 if quick else DEFAULTS["scale_window"])
        self.interval = os.environ.get("BENCH_FLEET_INTERVAL") or DEFAULTS["interval"]
        self.keep = os.environ.get("BENCH_KEEP") == "1"

    def interval_ms(self):
        m = re.fullmatch(r"(\d+)(ms|s)?", self.interval)
        if not m:
            sys.exit("bench: BENCH_FLEET_INTERVAL: <n>ms or <n>s")
        return int(m.group(1)) * (1000 if m.group(2) == "s" else 1)

    def is_default(self):
        return not self.quick and all(getattr(self, k) == v for k, v in DEFAULTS.items())


# ------------------------------------------------------------------ processes

def proc_ticks(pid):
    """utime + stime of a process (every thread), in clock ticks."""
    with open("/proc/%d/stat" % pid) as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])           # fields 14 and 15


def proc_sched_ns(pid):
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0])


class Redis:
    """A redis-server of our own on a free loopback port."""

    def __init__(self, root):
        self.dir = os.path.join(root, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = B.free_port()
        self.logf = os.path.join(self.dir, "redis.log")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir,
             "--logfile", self.logf, "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited with %s:\n%s" % (
                    self.proc.returncode, self.tail()))
            try:
                if self.cmd("PING") == "PONG":
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not answer PING\n" + self.tail())
        self.version = self.info("server").get("redis_version", "?")

    def tail(self):
        try:
            with open(self.logf) as f:
                return "".join(f.readlines()[-10:])
        except OSError:
            return ""

    def cmd(self, *args):
        """One command on its own connection; a status or bulk reply."""
        s = socket.create_connection(("127.0.0.1", self.port), 5)
        try:
            out = "*%d\r\n" % len(args) + "".join(
                "$%d\r\n%s\r\n" % (len(a.encode()), a) for a in args)
            s.sendall(out.encode())
            buf = b""
            while True:
                d = s.recv(65536)
                if not d:
                    raise OSError("redis closed the connection")
                buf += d
                if buf[:1] in (b"+", b"-", b":") and buf.endswith(b"\r\n"):
                    if buf[:1] == b"-":
                        raise RuntimeError("redis: " + buf[1:-2].decode())
                    return buf[1:-2].decode()
                if buf[:1] == b"$":
                    head, _, rest = buf.partition(b"\r\n")
                    n = int(head[1:])
                    if n < 0:
                        return None
                    if len(rest) >= n + 2:
                        return rest[:n].decode()
        finally:
            s.close()

    def info(self, section):
        out = {}
        for line in self.cmd("INFO", section).splitlines():
            k, sep, v = line.partition(":")
            if sep:
                out[k] = v
        return out

    def snap(self):
        st = self.info("stats")
        cs = self.info("commandstats")

        def calls(name):
            m = re.search(r"calls=(\d+),usec=(\d+)", cs.get("cmdstat_" + name, ""))
            return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

        eval_calls, eval_usec = calls("eval")
        return {"t": time.time(), "total": int(st["total_commands_processed"]),
                "eval": eval_calls, "eval_usec": eval_usec, "ping": calls("ping")[0],
                "ticks": proc_ticks(self.proc.pid)}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Node(B.Nginx):
    """One nginx instance of bench/conf/fleet.conf (1 worker)."""

    def __init__(self, root, prefix, name, redis, S, nodes, scale=()):
        self.port, self.mport = B.free_port(), B.free_port()
        zones, locs = scale_conf(scale)
        super().__init__(root, prefix, TEMPLATE, {
            "PORT": self.port, "METRICS_PORT": self.mport, "REDIS_PORT": redis.port,
            "INTERVAL": S.interval, "NODES": nodes, "NODE": name,
            "SCALE_ZONES": zones, "SCALE_LOCATIONS": locs},
            [self.port, self.mport])
        self.name = name
        self.worker = None

    def start(self):
        super().start()
        deadline = time.time() + 10
        while time.time() < deadline:
            w = self.workers()
            if len(w) == 1:
                self.worker = w[0]
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("%s: not one worker: %s" % (self.name, self.workers()))
        # the agent has synced once (PING): the fleet zone uses its fleet share
        deadline = time.time() + 10
        while time.time() < deadline:
            m = self.metrics()
            if m.get(("deepseek_guard_fleet_up", None)) == 1 and \
                    m.get(("deepseek_guard_fleet_syncs_total", None), 0) > 0:
                return self
            time.sleep(0.05)
        raise RuntimeError("%s: fleet not up after 10 s\n%s" % (self.name, self.tail()))

    def metrics(self):
        """{(name, zone or None): value, (name, zone, decision): value}"""
        st, _, body = B.http(self.mport, "/metrics")
        if st != 200:
            raise RuntimeError("%s: /metrics answered %s" % (self.name, st))
        out = {}
        for line in body.decode().splitlines():
            if not line.startswith("deepseek_guard_") or "{" not in line:
                continue
            name = line[:line.index("{")]
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
            v = float(line.rsplit(None, 1)[1])
            if name == "deepseek_guard_requests_total":
                k = (name, labels.get("zone"), labels.get("decision"))
                out[k] = out.get(k, 0) + v             # summed over classes
            else:
                out[(name, labels.get("zone"))] = v
        return out

    def snap(self):
        m = self.metrics()
        return {"t": time.time(), "m": m, "ticks": proc_ticks(self.worker),
                "sched": proc_sched_ns(self.worker)}


def scale_conf(key_counts):
    """Part 2's zones f0.. (100 keys each) and a location /k<K> per key count
    that passes K / 100 of them."""
    if not key_counts:
        return "    # (none: part 1)", ""
    nz = max(k // KEYS_PER_ZONE for k in key_counts)
    zones = "\n".join("    deepseek_guard_zone f%d:1m key=$arg_k rate=100000r/s fleet=on;" % i
                      for i in range(nz))
    locs = []
    for k in key_counts:
        locs.append("        location = /k%d {" % k)
        locs += ["            deepseek_guard f%d;" % i for i in range(k // KEYS_PER_ZONE)]
        locs += ["            empty_gif;", "        }"]
    return zones, "\n".join(locs)


def scale_sum(m, name):
    """A per-zone series summed over the zones f0.."""
    return sum(v for k, v in m.items()
               if k[0] == name and k[1] and re.fullmatch(r"f\d+", k[1]) and len(k) == 2)


def scale_rejected(m):
    return sum(v for k, v in m.items()
               if len(k) == 3 and k[0] == "deepseek_guard_requests_total" and k[1]
               and re.fullmatch(r"f\d+", k[1]) and k[2] in REJECTED)


def requests_of(m, zone):
    adm = m.get(("deepseek_guard_requests_total", zone, "admitted"), 0)
    rej = sum(m.get(("deepseek_guard_requests_total", zone, d), 0) for d in REJECTED)
    return adm, rej


def fleet_of(m):
    g = lambda k: m.get(("deepseek_guard_fleet_" + k, None), 0)  # noqa: E731
    return {"commands": g("commands_total"), "syncs": g("syncs_total"),
            "errors": g("errors_total"), "fallbacks": g("fallbacks_total"),
            "rtt_sum": g("sync_seconds_sum"), "rtt_count": g("sync_seconds_count")}


def fleet_delta(a, b):
    fa, fb = fleet_of(a["m"]), fleet_of(b["m"])
    return {k: fb[k] - fa[k] for k in fa}


def wrk_cmd(S, conns, secs, url, keys, tag):
    return [B.WRK, "-t1", "-c%d" % conns, "-d%ds" % secs, "--latency", "-s", LUA,
            url, "--", str(keys), tag]


def wrk_result(proc, secs):
    try:
        out, err = proc.communicate(timeout=secs + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    r = B.parse_wrk(out)
    if r["rps"] is None:
        raise RuntimeError("wrk output not understood:\n%s\n%s" % (out, err))
    return r


# ------------------------------------------------------------------ part 1

def cost_run(S, node, redis, variant, rnd):
    zone = "z" if variant == "fleet" else "l"
    node.settle()
    secs = S.ramp + S.window + 1
    s_start = node.snap()
    proc = subprocess.Popen(
        wrk_cmd(S, S.conns, secs, "http://127.0.0.1:%d/%s" % (node.port, variant),
                S.keys, "k"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(S.ramp)
        s0, r0 = node.snap(), redis.snap()
        time.sleep(S.window)
        s1, r1 = node.snap(), redis.snap()
    finally:
        w = wrk_result(proc, secs)
    dt = s1["t"] - s0["t"]
    a0, j0 = requests_of(s0["m"], zone)
    a1, j1 = requests_of(s1["m"], zone)
    _, js = requests_of(s_start["m"], zone)
    req = (a1 - a0) + (j1 - j0)
    cpu = (s1["ticks"] - s0["ticks"]) / CLK_TCK
    sched = (s1["sched"] - s0["sched"]) / 1e9
    f = fleet_delta(s0, s1)
    x = {"round": rnd, "variant": variant, "seconds": dt, "requests": req,
         "rps": req / dt, "cpu_s": cpu, "cpu_rps": req / cpu if cpu > 0 else None,
         "sched_rps": req / sched if sched > 0 else None, "share": sched / dt,
         "rejected": j1 - j0, "ramp_rejected": j0 - js, "wrk_non2xx": w["non2xx"],
         "wrk_sock_err": w["sock_err"], "wrk_rps": w["rps"], "p99_ms": w["p99_ms"],
         "redis_cpu": (r1["ticks"] - r0["ticks"]) / CLK_TCK / (r1["t"] - r0["t"]),
         "commands": f["commands"], "syncs": f["syncs"], "errors": f["errors"],
         "fallbacks": f["fallbacks"],
         "rtt_ms": 1000 * f["rtt_sum"] / f["rtt_count"] if f["rtt_count"] else None,
         "keys_synced": s1["m"].get(("deepseek_guard_fleet_keys", "z"))}
    log("  %-5s round %d: %8.0f req/s  %8.0f req/cpu-s (schedstat %8.0f)  rejected %d "
        "(ramp %d)  redis %3.0f%%  %s cmd  rtt %s ms" % (
            variant, rnd, x["rps"], x["cpu_rps"] or 0, x["sched_rps"] or 0, x["rejected"],
            x["ramp_rejected"], 100 * x["redis_cpu"], int(x["commands"]),
            "%.1f" % x["rtt_ms"] if x["rtt_ms"] is not None else "-"))
    return x


def part_cost(S, root, redis):
    log("fleet part 1: fleet vs local zone, 1 worker, %d keys, %d rounds of %d s "
        "(after %d s of ramp)" % (S.keys, S.rounds, S.window, S.ramp))
    node = Node(root, "cost", "node1", redis, S, 1).start()
    runs = []
    try:
        # warm-up, not recorded: keys allocated in both zones, caches warm
        for v in ("fleet", "local"):
            p = subprocess.Popen(wrk_cmd(S, S.conns, 1, "http://127.0.0.1:%d/%s" % (
                node.port, v), S.keys, "k"), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wrk_result(p, 1)
        for rnd in range(1, S.rounds + 1):
            order = ("fleet", "local") if rnd % 2 else ("local", "fleet")
            for v in order:
                runs.append(cost_run(S, node, redis, v, rnd))
    finally:
        alerts = node.alerts()
        node.stop()
    return {"runs": runs, "alerts": alerts[:10]}


# ------------------------------------------------------------------ part 2

def scale_point(S, nodes, redis, keys, n, one_zone=False):
    """keys active keys on every node: keys / 100 zones of 100 keys, each
    request passing all of them (or, one_zone, the zone z with keys keys),
    every key hit S.hits times per sync interval."""
    values = keys if one_zone else KEYS_PER_ZONE
    rate = S.hits * values * 1000 // S.interval_ms()
    conns = max(1, int(round(rate * PACE_MS / 1000.0)))
    path = "/fleet" if one_zone else "/k%d" % keys
    secs = S.scale_ramp + S.scale_window + 1
    env = dict(os.environ, FLEET_PACE_MS=str(PACE_MS))
    procs = []
    try:
        for node in nodes:
            procs.append(subprocess.Popen(
                wrk_cmd(S, conns, secs, "http://127.0.0.1:%d%s" % (node.port, path), values,
                        "n%dk%d%s-" % (n, keys, "z" if one_zone else "")),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=env))
        time.sleep(S.scale_ramp)
        s0 = [nd.snap() for nd in nodes]
        r0 = redis.snap()
        gauge = [[] for _ in nodes]
        end = time.time() + S.scale_window
        while time.time() < end:
            time.sleep(min(0.5, max(0.0, end - time.time())))
            for i, nd in enumerate(nodes):
                m = nd.metrics()
                gauge[i].append(m.get(("deepseek_guard_fleet_keys", "z"), 0) if one_zone
                                else scale_sum(m, "deepseek_guard_fleet_keys"))
        s1 = [nd.snap() for nd in nodes]
        r1 = redis.snap()
    finally:
        wrks = [wrk_result(p, secs) for p in procs]
    per = []
    for i, nd in enumerate(nodes):
        dt = s1[i]["t"] - s0[i]["t"]
        f = fleet_delta(s0[i], s1[i])
        zone = "z" if one_zone else "f0"
        a0, j0 = requests_of(s0[i]["m"], zone)
        a1, j1 = requests_of(s1[i]["m"], zone)
        rej = (j1 - j0) if one_zone else scale_rejected(s1[i]["m"]) - scale_rejected(s0[i]["m"])
        kps = statistics.mean(gauge[i]) if gauge[i] else None
        per.append({
            "node": nd.name, "seconds": dt, "rps": ((a1 - a0) + (j1 - j0)) / dt,
            "rejected": rej, "cmd_s": f["commands"] / dt, "syncs_s": f["syncs"] / dt,
            "cmd_per_sync": f["commands"] / f["syncs"] if f["syncs"] else None,
            "rtt_ms": 1000 * f["rtt_sum"] / f["rtt_count"] if f["rtt_count"] else None,
            "keys_per_sync": kps, "key_syncs_s": (kps or 0) * f["syncs"] / dt,
            "errors": f["errors"], "fallbacks": f["fallbacks"],
            "cpu": (s1[i]["ticks"] - s0[i]["ticks"]) / CLK_TCK / dt,
            "wrk_non2xx": wrks[i]["non2xx"], "wrk_sock_err": wrks[i]["sock_err"]})
    rdt = r1["t"] - r0["t"]
    de = r1["eval"] - r0["eval"]
    x = {"nodes": n, "keys": keys, "one_zone": one_zone,
         "zones": 1 if one_zone else keys // KEYS_PER_ZONE, "target_rps": rate,
         "conns": conns, "per": per,
         "redis_total_s": (r1["total"] - r0["total"]) / rdt,
         "redis_client_s": (de + r1["ping"] - r0["ping"]) / rdt,
         "redis_eval_s": de / rdt,
         "eval_us": (r1["eval_usec"] - r0["eval_usec"]) / de if de else None,
         "redis_cpu": (r1["ticks"] - r0["ticks"]) / CLK_TCK / rdt}
    x["cmd_s_total"] = sum(p["cmd_s"] for p in per)
    ks = sum(p["key_syncs_s"] for p in per)
    x["redis_us_per_key"] = 1e6 * x["redis_cpu"] / ks if ks else None
    log("  %d node(s), %5d keys%s: %s req/s, %s keys/sync, %s cmd/s per node (total %.0f; "
        "redis: %.0f client, %.0f in all, EVAL %s us), rtt %s ms, redis CPU %.0f%%%s" % (
            n, keys, " (one zone)" if one_zone else "",
            "/".join("%.0f" % p["rps"] for p in per),
            "/".join("%.0f" % (p["keys_per_sync"] or 0) for p in per),
            "/".join("%.1f" % p["cmd_s"] for p in per), x["cmd_s_total"],
            x["redis_client_s"], x["redis_total_s"], fmt(x["eval_us"]),
            "/".join(fmt(p["rtt_ms"], "%.1f") for p in per), 100 * x["redis_cpu"],
            "".join("; %s: %d errors, %d rejected" % (p["node"], p["errors"], p["rejected"])
                    for p in per if p["errors"] or p["rejected"])))
    return x


def part_scale(S, root, redis):
    log("fleet part 2: Redis commands by active keys %s and nodes %s (%d s windows after "
        "%d s)" % (",".join(map(str, S.key_counts)), ",".join(map(str, S.node_counts)),
                   S.scale_window, S.scale_ramp))
    points, alerts = [], []
    for n in S.node_counts:
        nodes = []
        try:
            for i in range(1, n + 1):
                nodes.append(Node(root, "n%d-node%d" % (n, i), "node%d" % i, redis, S, n,
                                  scale=S.key_counts))
                nodes[-1].start()
            for keys in S.key_counts:
                points.append(scale_point(S, nodes, redis, keys, n))
            if n == 1 and S.one_zone and 1000 in S.key_counts:
                # the same 1,000 keys in one zone: the same EVALs, 10x the requests
                points.append(scale_point(S, nodes, redis, 1000, n, one_zone=True))
        finally:
            for nd in nodes:
                alerts += ["%s: %s" % (nd.name, a) for a in nd.alerts()]
                nd.stop()
        # the keys of these nodes would expire in Redis (PEXPIRE) without them
        redis.cmd("FLUSHALL")
    return {"points": points, "alerts": alerts[:10]}


# ------------------------------------------------------------------ report

def fmt(v, f="%.0f"):
    return "-" if v is None else f % v


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def tree_state():
    def git(*a):
        try:
            r = subprocess.run(("git",) + a, capture_output=True, text=True, timeout=10,
                               cwd=B.REPO)
            return r.stdout if r.returncode == 0 else None
        except OSError:
            return None
    commit = (git("rev-parse", "--short", "HEAD") or "?").strip()
    st = git("status", "--porcelain")
    if st is None:
        return commit, "?"
    paths = [l[3:].strip() for l in st.splitlines() if l.strip()]
    if not paths:
        return commit, "clean"
    tops = sorted({p.split("/", 1)[0] + ("/" if "/" in p else "") for p in paths})
    return commit, "dirty: %d uncommitted paths (%s)" % (len(paths), ", ".join(tops))


def render(S, res, meta):
    lines = ["# Benchmark: fleet zones on Redis (%s)" % meta["date"], "",
             "- commit: %s, %s" % (meta["commit"], meta["tree"]),
             "- module: sha256 %s" % meta["so"],
             "- machine: %s CPUs, %s; kernel %s" % (meta["nproc"], meta["cpu"], meta["kernel"]),
             "- %s; wrk %s; Redis %s on the same machine" % (meta["nginx"], meta["wrk"],
                                                             meta["redis"]),
             "- load average %s at the start, %s at the end; runtime %s" % (
                 meta["load0"], meta["load1"], meta["runtime"]),
             "- `./build.sh bench fleet` (bench/fleet_scenario.py, bench/conf/fleet.conf, "
             "bench/conf/fleet.lua); sync interval %s" % S.interval, ""]

    # ---- part 1
    runs = res["cost"]["runs"]
    by = {v: [r for r in runs if r["variant"] == v] for v in ("fleet", "local")}
    sm = {v: {k: med([r[k] for r in rs]) for k in ("rps", "cpu_rps", "sched_rps", "share",
                                                   "redis_cpu", "p99_ms")}
          for v, rs in by.items()}
    pairs = []
    for rnd in range(1, S.rounds + 1):
        f = [r for r in by["fleet"] if r["round"] == rnd]
        l = [r for r in by["local"] if r["round"] == rnd]
        if f and l:
            pairs.append((f[0], l[0]))

    def ratio(k):
        a, b = sm["fleet"][k], sm["local"][k]
        return a / b if a and b else None

    def per_round(k):
        return [f[k] / l[k] for f, l in pairs if f[k] and l[k]]

    rej = sum(r["rejected"] for r in by["fleet"]) + sum(r["rejected"] for r in by["local"])
    errs = sum(r["errors"] + r["fallbacks"] for r in by["fleet"])
    rr, rc = ratio("rps"), ratio("cpu_rps")
    void = rej > 0 or any(r["wrk_sock_err"] for r in runs)
    if void:
        verdict = "**void** (%d rejections in the windows, %d socket errors)" % (
            rej, sum(r["wrk_sock_err"] for r in runs))
    elif rr is None:
        verdict = "-"
    elif rr >= TARGET and (rc is None or rc >= TARGET):
        verdict = "met"
    elif rr < TARGET and (rc is None or rc < TARGET):
        verdict = "**not met**"
    else:
        verdict = "unclear (req/s and req/cpu-s disagree)"

    def spread(xs):
        return "%.3f (%.3f..%.3f)" % (statistics.median(xs), min(xs), max(xs)) if xs else "-"

    lines += ["## 1. Request cost: fleet zone vs the same zone local only", "",
              "nginx with 1 worker, `deepseek_guard_zone z:32m key=$arg_k rate=100000r/s "
              "fleet=on` against `l:32m` the same without `fleet=on`, `empty_gif` behind each; "
              "wrk -t1 -c%d cycling over %s keys (`?k=1..%d`), %d rounds, fleet and local "
              "interleaved (the order alternates by round). Each run: %d s of ramp, then a "
              "%d s window measured from the zone's counters (admitted + rejected, "
              "/metrics) and the worker's CPU (utime + stime, /proc/PID/stat; schedstat "
              "beside it). The worker is also the node's agent: the syncs' CPU is in the "
              "fleet figures. Redis runs on the same 2 cores (its CPU is given)." % (
                  S.conns, "{:,}".format(S.keys), S.keys, S.rounds, S.ramp, S.window), "",
              "| variant | req/s | req/cpu-s | req/cpu-s (schedstat) | nginx CPU share | "
              "redis CPU | wrk p99 ms | rejections in windows | rejections in ramps |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in ("fleet", "local"):
        lines.append("| %s | %s | %s | %s | %s | %s%% | %s | %d | %d |" % (
            v, fmt(sm[v]["rps"]), fmt(sm[v]["cpu_rps"]), fmt(sm[v]["sched_rps"]),
            fmt(sm[v]["share"], "%.2f"), fmt(100 * sm[v]["redis_cpu"] if sm[v]["redis_cpu"]
                                            is not None else None),
            fmt(sm[v]["p99_ms"], "%.2f"),
            sum(r["rejected"] for r in by[v]), sum(r["ramp_rejected"] for r in by[v])))
    lines += ["", "| ratio fleet / local | of the medians | per round: median (min..max) | "
              "target | met |", "|---|---:|---:|---:|---|",
              "| req/s | %s | %s | >= %.2f | %s |" % (fmt(rr, "%.3f"), spread(per_round("rps")),
                                                    TARGET, verdict),
              "| req/cpu-s | %s | %s | >= %.2f | |" % (fmt(rc, "%.3f"),
                                                      spread(per_round("cpu_rps")), TARGET),
              "| req/cpu-s (schedstat) | %s | %s | | |" % (
                  fmt(ratio("sched_rps"), "%.3f"), spread(per_round("sched_rps"))), ""]
    pc = per_round("cpu_rps")
    if rc:
        lines += ["Worker CPU per request, fleet over local: %+.1f%% (from the req/cpu-s "
                  "ratio of the medians; per round %s). It includes the agent's syncs "
                  "(%s keys every %s) and Redis's CPU does not." % (
                      100 * (1 / rc - 1), " / ".join("%+.1f%%" % (100 * (1 / x - 1))
                                                      for x in pc),
                      "{:,}".format(S.keys), S.interval), ""]
    if errs:
        lines += ["%d sync failures in the fleet windows (errors + fallbacks): after one, "
                  "the fleet zone admits against its static share (the local rule, rate / "
                  "nodes) until the next sync succeeds, one interval later." % errs, ""]
    res["cost"]["summary"] = {"ratio_rps": rr, "ratio_cpu": rc, "verdict": verdict,
                              "rejected": rej, "errors": errs}
    lines += ["Every run (medians above are over these):", "",
              "| round | variant | window s | requests | req/s | CPU s | req/cpu-s | "
              "schedstat req/cpu-s | rejected (window / ramp) | wrk non-2xx (whole run) | "
              "redis CPU | fleet commands | syncs | sync rtt ms | keys in last sync |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append("| %d | %s | %.2f | %d | %.0f | %.2f | %s | %s | %d / %d | %d | %.0f%% | "
                     "%d | %d | %s | %s |" % (
                         r["round"], r["variant"], r["seconds"], r["requests"], r["rps"],
                         r["cpu_s"], fmt(r["cpu_rps"]), fmt(r["sched_rps"]), r["rejected"],
                         r["ramp_rejected"], r["wrk_non2xx"], 100 * r["redis_cpu"],
                         r["commands"], r["syncs"], fmt(r["rtt_ms"], "%.1f"),
                         fmt(r["keys_synced"])))
    lines += ["", "A fleet key idle for 20 intervals has given its tokens back to the "
              "fleet; its first request then goes on credit and the next ones are refused "
              "(503) until the agent's next sync grants it some, and the grants follow the "
              "key's demand (twice its recent demand per sync, an average over a few "
              "syncs). So every fleet run starts with refusals (\"ramp\" above: the local "
              "run between two fleet runs leaves the fleet keys idle), whatever the rate; "
              "the windows start after them.", ""]

    # ---- part 2
    pts = res["scale"]["points"]
    rate = S.hits * KEYS_PER_ZONE * 1000 // S.interval_ms()
    lines += ["## 2. Redis commands by active keys and nodes", "",
              "1 to %d nginx instances (`node=node1`.., `nodes=N`, 1 worker each) against "
              "the one redis-server, each node with the same K active keys. To keep K keys "
              "active in every %s sync at a request rate this 2-core machine can drive for "
              "3 nodes, K keys are K/100 fleet zones (`f0`, `f1`, ...) of 100 keys each, and "
              "every request passes all of them (`?k=1..100`, %d req/s per node, paced by "
              "wrk's delay(): each key is hit %d times per interval). An EVAL carries 100 "
              "keys of one zone, so these are the same EVALs as one zone of K keys; the "
              "row *1 zone* is that zone (`z`, %s req/s) for comparison. After %d s, a %d s "
              "window. *keys/sync*: `deepseek_guard_fleet_keys` summed over the zones, "
              "sampled every 0.5 s (mean); *cmd/s*: `deepseek_guard_fleet_commands_total` "
              "delta (one EVAL per zone and 100 keys per sync, or one PING); *rtt*: "
              "`sync_seconds_sum / _count` delta (ms; nginx's millisecond clock); Redis: "
              "`INFO commandstats` EVAL + PING calls (*client cmd/s*), "
              "`total_commands_processed` (*in all*: it also counts the TIME, HGETALL, "
              "HSET and PEXPIRE the script runs), EVAL µs per call, redis-server's CPU "
              "(/proc/PID/stat, %% of one core) and that CPU per key synced." % (
                  max(S.node_counts), S.interval, rate, S.hits,
                  "{:,}".format(S.hits * 1000 * 1000 // S.interval_ms()), S.scale_ramp,
                  S.scale_window), "",
              "| nodes | active keys per node | req/s per node | keys/sync per node | "
              "syncs/s per node | cmd/s per node | cmd per sync | cmd/s all nodes | redis "
              "client cmd/s | redis cmd/s in all | EVAL µs per call | redis CPU | redis µs "
              "per key synced | sync rtt ms per node | failed syncs | nginx worker CPU |",
              "|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for x in pts:
        per = x["per"]
        cps = [p["cmd_per_sync"] for p in per if p["cmd_per_sync"] is not None]
        lines.append("| %d | %s | %s | %s | %s | %s | %s | %.0f | %.0f | %.0f | %s | %.0f%% "
                     "| %s | %s | %d | %s |" % (
                         x["nodes"], "{:,}".format(x["keys"]) + (
                             " (1 zone)" if x["one_zone"] else " (%d zones)" % x["zones"]),
                         "/".join("%.0f" % p["rps"] for p in per),
                         "/".join(fmt(p["keys_per_sync"]) for p in per),
                         "/".join(fmt(p["syncs_s"], "%.1f") for p in per),
                         "/".join(fmt(p["cmd_s"], "%.1f") for p in per),
                         fmt(statistics.mean(cps) if cps else None, "%.1f"),
                         x["cmd_s_total"], x["redis_client_s"], x["redis_total_s"],
                         fmt(x["eval_us"]), 100 * x["redis_cpu"],
                         fmt(x["redis_us_per_key"], "%.1f"),
                         "/".join(fmt(p["rtt_ms"], "%.1f") for p in per),
                         sum(p["errors"] for p in per),
                         "/".join("%.0f%%" % (100 * p["cpu"]) for p in per)))
    checks = []
    for x in pts:
        per = x["per"]
        what = []
        fails = sum(p["errors"] for p in per)
        if fails or any(p["fallbacks"] for p in per):
            what.append("%d failed syncs, %d fallbacks to the static share" % (
                fails, sum(p["fallbacks"] for p in per)))
        if any(p["rejected"] or p["wrk_sock_err"] for p in per):
            what.append("%d rejections, %d socket errors" % (
                sum(p["rejected"] for p in per), sum(p["wrk_sock_err"] for p in per)))
        if any(p["keys_per_sync"] is not None and p["keys_per_sync"] < 0.9 * x["keys"]
               for p in per):
            what.append("keys per sync %s of %s" % (
                "/".join(fmt(p["keys_per_sync"]) for p in per), "{:,}".format(x["keys"])))
        if what:
            checks.append("- %d node%s, %s keys%s: %s" % (
                x["nodes"], "s" if x["nodes"] > 1 else "", "{:,}".format(x["keys"]),
                " (1 zone)" if x["one_zone"] else "", "; ".join(what)))
    head = [x for x in pts if x["nodes"] == 1 and x["keys"] == 1000 and not x["one_zone"]]
    if head:
        h = head[0]
        lines += ["", "**At 1,000 active keys, 1 node: %.1f Redis commands/s** (%.1f per "
                  "sync, %s keys in a sync), sync round trip %s ms, redis-server at %.0f%% "
                  "of a core (EVAL %s µs per call)." % (
                      h["per"][0]["cmd_s"], h["per"][0]["cmd_per_sync"] or 0,
                      fmt(h["per"][0]["keys_per_sync"]), fmt(h["per"][0]["rtt_ms"], "%.1f"),
                      100 * h["redis_cpu"], fmt(h["eval_us"]))]
    cap = redis_capacity(S, pts)
    if cap:
        lines += ["", "Redis CPU per key synced, median of the points of 1,000 keys and more "
                  "without a failed sync: "
                  "%.1f µs, so one Redis core syncs about %s keys a second: at one sync "
                  "every %s, about %s active keys summed over all nodes (a node syncing "
                  "more keys than the Redis can answer within an interval times out and "
                  "falls back to its static share, as in the rows with failed syncs)." % (
                      cap["us"], "{:,}".format(int(cap["per_s"])), S.interval,
                      "{:,}".format(int(cap["keys"])))]
    lines += ["", "*cmd/s* counts every command an agent sent, also those of syncs that "
              "failed (a sync that has not been answered within one interval is abandoned: "
              "\"timed out\" in error.log, the connection is closed and the next tick "
              "starts a new one). *nginx worker CPU* is the requests' (each one passing "
              "K/100 zones) and the agent's."]
    if checks:
        lines += ["", "**Anomalies** (in the windows):", ""] + checks
    alerts = res["cost"]["alerts"] + res["scale"]["alerts"]
    if alerts:
        lines += ["", "**error.log alerts:**", "", "```"] + alerts[:10] + ["```"]
    return "\n".join(lines) + "\n"


def redis_capacity(S, pts):
    us = [x["redis_us_per_key"] for x in pts if x["redis_us_per_key"]
          and not any(p["errors"] or p["fallbacks"] for p in x["per"])
          and x["keys"] >= 1000]
    if not us:
        return None
    u = statistics.median(us)
    return {"us": u, "per_s": 1e6 / u, "keys": 1e6 / u * S.interval_ms() / 1000.0}


def summary(S, res):
    s = res["cost"]["summary"]
    out = ["fleet/local: req/s %s, req/cpu-s %s (target >= %.2f: %s); %d rejections in "
           "the windows" % (fmt(s["ratio_rps"], "%.3f"), fmt(s["ratio_cpu"], "%.3f"), TARGET,
                            re.sub(r"\*", "", s["verdict"]), s["rejected"])]
    for x in res["scale"]["points"]:
        out.append("%d node(s) x %6s keys%s: %s cmd/s per node, %.0f in all; redis %.0f "
                   "cmd/s in all, CPU %.0f%%; rtt %s ms" % (
                       x["nodes"], "{:,}".format(x["keys"]),
                       " (1 zone)" if x["one_zone"] else "",
                       "/".join("%.1f" % p["cmd_s"] for p in x["per"]), x["cmd_s_total"],
                       x["redis_total_s"], 100 * x["redis_cpu"],
                       "/".join(fmt(p["rtt_ms"], "%.1f") for p in x["per"])))
    cap = redis_capacity(S, res["scale"]["points"])
    if cap:
        out.append("redis: %.1f us of CPU per key synced: one core for about %s active keys "
                   "over all nodes at one sync every %s" % (
                       cap["us"], "{:,}".format(int(cap["keys"])), S.interval))
    return "\n".join(out)


# ------------------------------------------------------------------ main

def run(quick=False):
    S = Settings(quick)
    for f in (B.NGINX, B.MODULE):
        if not os.path.exists(f):
            sys.exit("bench: %s not found (run ./build.sh bench)" % f)
    if any(k < KEYS_PER_ZONE or k % KEYS_PER_ZONE for k in S.key_counts):
        sys.exit("bench: BENCH_FLEET_KEY_COUNTS: multiples of %d" % KEYS_PER_ZONE)
    for prog in (B.WRK, REDIS_SERVER):
        if not shutil.which(prog):
            sys.exit("bench: %s not found" % prog)

    # a SIGTERM or SIGHUP still stops what we started
    def bye(sig, frame):
        raise SystemExit(128 + sig)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bye)

    meta = B.meta_info(types.SimpleNamespace())
    meta["commit"], meta["tree"] = tree_state()
    meta["nproc"] = os.cpu_count()
    meta["load0"] = B.loadavg()
    log("fleet: load average %s" % meta["load0"])
    root = tempfile.mkdtemp(prefix="dsg-bench-")
    os.chmod(root, 0o755)
    module = os.path.join(root, "module.so")
    shutil.copy(B.MODULE, module)
    B.MODULE = module
    with open(module, "rb") as f:
        meta["so"] = hashlib.sha256(f.read()).hexdigest()[:12]
    res = {}
    redis = None
    try:
        redis = Redis(root)
        meta["redis"] = redis.version
        res["cost"] = part_cost(S, root, redis)
        redis.cmd("FLUSHALL")
        res["scale"] = part_scale(S, root, redis)
    finally:
        if redis:
            redis.stop()
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
    print(summary(S, res))
    os.makedirs(B.RESULTS, exist_ok=True)
    full = S.is_default()
    name = meta["date"] + ("-fleet.md" if full else "-fleet-partial.md.tmp")
    with open(os.path.join(B.RESULTS, name), "w") as f:
        f.write(text)
    log("written to bench/results/%s (%s)" % (name, meta["runtime"]))
    return 0


if __name__ == "__main__":
    sys.exit(run("--quick" in sys.argv[1:]))
