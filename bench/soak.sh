#!/usr/bin/env bash
# Soak test: the example gateway (examples/gateway.conf) in front of the
# mock LLM under a steady mixed load for SOAK_SECONDS (default 900), with
# the workers' memory, the shared zones and the LMDB file sampled every
# SOAK_SAMPLE_SECONDS (7).  At the end it prints, for the measured part
# (after the warm-up), each measure's start (the median of its first
# window), end (the median of its last window), change, lowest and highest
# sample, and checks:
#
#   RSS           VmRSS of every worker (what ps and top show) flat: end
#                 within SOAK_TOLERANCE_PCT (5) of start, either way
#   shared RSS    RssShmem of every worker (the zones' pages it touched)
#                 flat within the same tolerance
#   zone keys     the keys tracked by the per-key zone, flat
#   data.mdb      never larger than max_size (SOAK_MAX_SIZE, 4m: small, so
#                 that the cache fills up early and the run is spent
#                 evicting); RssFile (the LMDB map, read through the page
#                 cache) is reported, not checked: it grows with the file
#   workers       the same two pids from start to end, no [alert], [crit],
#                 [emerg] or "exited on signal" in error.log
#   load          every answer a 200, or a 429/503 with Retry-After
#
# It also reports, without checking it, the private part (RssAnon: malloc's
# heap and nginx's anonymous maps).  The gateway trims each worker's heap
# every second (deepseek_guard_malloc_trim 1s), so RssAnon follows the
# pages the heap uses rather than its high-water mark; a leak in the
# module, jansson, LMDB's own buffers or nginx's pools would grow it.  But
# in some runs the heap also settles once, at a random time, ~170 kB
# (about 5% of RssAnon) higher and stays there, where a leak would keep
# climbing (bench/SOAK.md, fifth session).  A start-to-end comparison of
# ~3.4 MB cannot tell that step from a leak, so it is shown (its change,
# a note when over the tolerance, the median of each window), and leaks
# are checked where they can be told apart: SOAK_HEAPTRACK=1 below, and
# valgrind in ./build.sh test.
#
# The load, open-loop (requests leave on schedule, whatever the answers),
# per second at SOAK_RATE=1 (about 70 requests/s):
#   30 cache hits   deterministic chats over 40 fixed prompts, class
#                   normal (HIT after their first round)
#    8 misses       deterministic chats with unique prompts over 100 API
#                   keys (class low), 4 KB answers: stored, and evicted
#                   once the file is full
#    6 streams      SSE chats, class high, not cached (no X-Deterministic)
#    6 low class    batch traffic: class "low" never queues, 503 when the
#                   backend is full
#   15 abusive key  one key over its 10r/s quota: ~5/s answered 429
#   every 10 s a burst of 60 chats within 0.1 s (classes normal, high,
#                   critical): over the backend's rate (50r/s, burst 20),
#                   so they queue by class, and over each key's own burst
#                   (429)
# The mock answers in ~150 ms + 20 ms per token (8 tokens).
#
# Sampling against the load's 10-second cycle: for about a second after
# each burst the workers' heaps hold ~300 kB more, until the next trim.
# A sample every 10 s would see the same moment of that cycle for minutes
# on end (or, drifting, see it in one window and not in the other).  So
# samples are taken on a fixed schedule (START + k * SOAK_SAMPLE_SECONDS,
# not "sleep after each round"), at 7 s by default: no common factor with
# 10, so any lcm(7, 10) / 7 = 10 consecutive samples see each second of
# the cycle once.  Start and end are medians of such whole-cycle windows
# (at least a minute long): both see the post-burst second equally often.
#
# Environment: SOAK_SECONDS (900: a 5-minute warm-up, then 10 minutes
# measured), SOAK_SAMPLE_SECONDS (7), SOAK_WARMUP_SECONDS (a third of the
# run, at least 30), SOAK_RATE (1), SOAK_MAX_SIZE (4m), SOAK_TOLERANCE_PCT
# (5), SOAK_KEEP=1 (keep the prefix with samples.tsv, load.json, logs),
# SOAK_HEAPTRACK=1 (attach heaptrack to the first worker at the end of the
# warm-up and report what it allocated and never freed), NGINX_BIN,
# DSG_MODULE, DSG_PYTHON.
#
# The warm-up: the workers' malloc heap grows for the first ~4 minutes of
# this load (the cache fills at ~80 s, then evicts; the queue's bursts
# reach their peak concurrency), then stays on a plateau; see
# bench/SOAK.md for a 30-minute run.
#
#   bench/soak.sh                      # 15 minutes
#   SOAK_SECONDS=180 bench/soak.sh     # 3 minutes
#
# Exit status 0 when every check passes, 1 otherwise.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
MODULE=${DSG_MODULE:-$REPO/build/ngx_http_deepseek_guard_module.so}
PYTHON=${DSG_PYTHON:-/usr/bin/python3}

SOAK_SECONDS=${SOAK_SECONDS:-900}
SAMPLE=${SOAK_SAMPLE_SECONDS:-7}
WARMUP=${SOAK_WARMUP_SECONDS:-$(( SOAK_SECONDS / 3 < 30 ? 30 : SOAK_SECONDS / 3 ))}
HEAPTRACK=${SOAK_HEAPTRACK:-}
RATE=${SOAK_RATE:-1}
MAX_SIZE=${SOAK_MAX_SIZE:-4m}
TOL=${SOAK_TOLERANCE_PCT:-5}

if [ ! -f "$MODULE" ]; then
    echo "soak.sh: $MODULE not found: run ./build.sh first" >&2
    exit 1
fi
if [ -n "$HEAPTRACK" ] && ! command -v heaptrack >/dev/null; then
    echo "soak.sh: SOAK_HEAPTRACK needs heaptrack (apt-get install heaptrack)" >&2
    exit 1
fi
if ! [ "$SAMPLE" -ge 1 ] 2>/dev/null; then
    echo "soak.sh: SOAK_SAMPLE_SECONDS must be a whole number of seconds, at least 1" >&2
    exit 1
fi
if [ "$WARMUP" -ge "$SOAK_SECONDS" ]; then
    echo "soak.sh: the warm-up ($WARMUP s) must be shorter than the run ($SOAK_SECONDS s)" >&2
    exit 1
fi

PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/dsg-soak-XXXXXX")
chmod 755 "$PREFIX"
mkdir -p "$PREFIX/logs"

MOCK_PID=
NGINX_MASTER=
LOAD_PID=
HT_PID=
HT_WORKER=

# shellcheck disable=SC2317  # called from the traps
cleanup() {
    trap - INT TERM EXIT
    if [ -n "$LOAD_PID" ] && kill -0 "$LOAD_PID" 2>/dev/null; then
        kill "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
    fi
    if [ -n "$NGINX_MASTER" ] && kill -0 "$NGINX_MASTER" 2>/dev/null; then
        kill -QUIT "$NGINX_MASTER" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$NGINX_MASTER" 2>/dev/null || break
            sleep 0.1
        done
        kill -TERM "$NGINX_MASTER" 2>/dev/null || true
    fi
    if [ -n "$MOCK_PID" ] && kill -0 "$MOCK_PID" 2>/dev/null; then
        kill -TERM "$MOCK_PID" 2>/dev/null || true
        wait "$MOCK_PID" 2>/dev/null || true
    fi
    if [ -n "${SOAK_KEEP:-}" ]; then
        echo "soak.sh: kept $PREFIX"
    else
        rm -rf "$PREFIX"
    fi
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap 'cleanup' EXIT

# a free port on 127.0.0.1
PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# ------------------------------------------------------------ the mock LLM

"$PYTHON" "$REPO/t/mock/mock_llm.py" --listen 127.0.0.1:0 \
    --portfile "$PREFIX/mock.port" --quiet \
    --first-token-ms 150 --token-ms 20 --tokens 8 \
    >>"$PREFIX/logs/mock.log" 2>&1 &
MOCK_PID=$!
MOCK_PORT=
for _ in $(seq 100); do
    MOCK_PORT=$(cat "$PREFIX/mock.port" 2>/dev/null || true)
    [ -n "$MOCK_PORT" ] && break
    sleep 0.1
done
[ -n "$MOCK_PORT" ] || { echo "soak.sh: the mock LLM did not start" >&2; exit 1; }

# ------------------------------------------------------------ the gateway

# examples/gateway.conf as it is, but for the placeholders and max_size
sed -e "s|@MODULE@|$MODULE|g" \
    -e "s|@PREFIX@|$PREFIX|g" \
    -e "s|@UPSTREAM@|127.0.0.1:$MOCK_PORT|g" \
    -e "s|@PORT@|$PORT|g" \
    -e "s|max_size=256m|max_size=$MAX_SIZE|" \
    "$REPO/examples/gateway.conf" >"$PREFIX/nginx.conf"
grep -q "max_size=$MAX_SIZE" "$PREFIX/nginx.conf" \
    || { echo "soak.sh: could not set max_size in the gateway config" >&2; exit 1; }

"$NGINX_BIN" -p "$PREFIX/" -c "$PREFIX/nginx.conf" -e "$PREFIX/logs/error.log"
for _ in $(seq 100); do
    NGINX_MASTER=$(cat "$PREFIX/nginx.pid" 2>/dev/null || true)
    [ -n "$NGINX_MASTER" ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
[ -n "$NGINX_MASTER" ] || { echo "soak.sh: nginx did not start" >&2; exit 1; }

workers() {
    local p
    for p in $(pgrep -P "$NGINX_MASTER"); do
        grep -q 'worker process' "/proc/$p/cmdline" 2>/dev/null && echo "$p"
    done | sort -n | tr '\n' ' '
}

echo "soak.sh: gateway on 127.0.0.1:$PORT (master $NGINX_MASTER, workers $(workers)), mock on $MOCK_PORT"
echo "soak.sh: $SOAK_SECONDS s of load, a sample every $SAMPLE s, warm-up $WARMUP s, max_size=$MAX_SIZE, rate x$RATE"

# ------------------------------------------------------------ the load

cat >"$PREFIX/load.py" <<'PY'
import asyncio, json, random, sys, time

port, seconds, rate, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
HOT = ["hot prompt %d" % i for i in range(40)]
stats = {}          # kind -> {status: n}
bad = []            # answers that are not a 200 nor a 429/503 with Retry-After
seq = 0


def body(prompt, stream=False):
    return json.dumps({"model": "deepseek-chat", "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": prompt}]}).encode()


async def one(kind, key, payload, headers=()):
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
           + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
           + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    status, err = 0, None
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        w.write(req)
        data = await asyncio.wait_for(r.read(), 60)
        w.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        hdrs = {l.split(b":", 1)[0].strip().lower(): l.split(b":", 1)[1].strip()
                for l in lines[1:] if b":" in l}
        if status == 200:
            if b"chunked" in hdrs.get(b"transfer-encoding", b""):
                if not rest.endswith(b"0\r\n\r\n"):
                    err = "truncated chunked body"
            elif int(hdrs.get(b"content-length", b"-1")) != len(rest):
                err = "body length differs from Content-Length"
        elif status in (429, 503):
            ra = hdrs.get(b"retry-after", b"")
            if not ra.isdigit() or int(ra) < 1:
                err = "%d without Retry-After" % status
        else:
            err = "status %d" % status
    except Exception as e:                  # a reset, a timeout: counted
        err = "%s: %s" % (type(e).__name__, e)
    s = stats.setdefault(kind, {})
    s[str(status)] = s.get(str(status), 0) + 1
    if err:
        bad.append({"kind": kind, "status": status, "err": err})


def schedule(t):
    """the requests of second t: (offset in the second, coroutine args)"""
    global seq
    reqs = []
    def per_s(n):
        n = n * rate
        whole = int(n) + (1 if random.random() < n - int(n) else 0)
        return [i / max(whole, 1) for i in range(whole)]
    for off in per_s(30):
        reqs.append((off, ("hit", "sk-normal-demo", body(random.choice(HOT)),
                           (("X-Deterministic", "1"),))))
    for off in per_s(8):
        seq += 1
        reqs.append((off, ("miss", "sk-user-%d" % (seq % 100), body("miss %d %d" % (t, seq)),
                           (("X-Deterministic", "1"), ("X-Mock-Pad", "3000")))))
    for off in per_s(6):
        seq += 1
        reqs.append((off, ("stream", "sk-high-demo", body("stream %d" % seq, True), ())))
    for off in per_s(6):
        seq += 1
        reqs.append((off, ("low", "sk-batch-demo", body("batch %d" % seq), ())))
    for off in per_s(15):
        seq += 1
        reqs.append((off, ("abusive", "sk-abuser", body("abuse %d" % seq), ())))
    if t % 10 == 5:
        keys = ("sk-normal-demo", "sk-high-demo", "sk-critical-demo")
        for i in range(int(60 * rate)):
            seq += 1
            reqs.append((i / 600.0, ("burst", keys[i % 3], body("burst %d" % seq), ())))
    return reqs


async def main():
    t0 = time.monotonic()
    tasks = set()
    t = 0
    while t < seconds:
        for off, args in schedule(t):
            delay = t0 + t + off - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(*args))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        t += 1
    await asyncio.sleep(max(0, t0 + seconds - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks, timeout=70)
    with open(out, "w") as f:
        json.dump({"stats": stats, "bad": bad[:50], "nbad": len(bad),
                   "total": sum(sum(s.values()) for s in stats.values())}, f)

asyncio.run(main())
PY

"$PYTHON" "$PREFIX/load.py" "$PORT" "$SOAK_SECONDS" "$RATE" "$PREFIX/load.json" \
    >>"$PREFIX/logs/load.log" 2>&1 &
LOAD_PID=$!

# ------------------------------------------------------------ sampling

metric() {      # metric name{labels} from the metrics text in $M
    awk -v k="$1" '$1 == k { print $2; f = 1 } END { if (!f) print 0 }' <<<"$M"
}
status_kb() {   # field of /proc/<pid>/status in kB
    awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}
heap_kb() {     # resident anonymous kB of the [heap] mapping: malloc's main arena
    awk '/^[0-9a-f]+-[0-9a-f]+ / { h = ($6 == "[heap]") }
         h && $1 == "Anonymous:" { n += $2 } END { print n + 0 }' \
        "/proc/$1/smaps" 2>/dev/null || echo 0
}

SAMPLES="$PREFIX/samples.tsv"
printf 't\tworker\trss_kb\tanon_kb\theap_kb\tfile_kb\tshmem_kb\tfds\tzone_keys\tcache_entries\tcache_file_bytes\tdata_mdb_bytes\n' >"$SAMPLES"
START_MS=$(date +%s%3N)
FIRST_WORKERS=$(workers)
tick=0
while :; do
    now=$(( ($(date +%s%3N) - START_MS) / 1000 ))
    M=$(curl -s --max-time 5 "http://127.0.0.1:$PORT/metrics" || true)
    keys=$(metric 'deepseek_guard_zone_keys{zone="per_key"}')
    entries=$(metric 'deepseek_guard_cache_entries{cache="llm"}')
    fbytes=$(metric 'deepseek_guard_cache_file_bytes{cache="llm"}')
    mdb=$(stat -c %s "$PREFIX/cache/data.mdb" 2>/dev/null || echo 0)
    for w in $(workers); do
        # descriptors that are not sockets: client and upstream connections
        # come and go with the load, a file or pipe left open stays
        # (find fails when a descriptor closes while it reads the directory:
        # not an error here, and set -e must not end the run for it)
        fds=$( { find "/proc/$w/fd" -mindepth 1 -maxdepth 1 ! -lname 'socket:*' \
                     2>/dev/null || true; } | wc -l)
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$now" "$w" \
            "$(status_kb "$w" VmRSS)" "$(status_kb "$w" RssAnon)" "$(heap_kb "$w")" \
            "$(status_kb "$w" RssFile)" "$(status_kb "$w" RssShmem)" \
            "$fds" "$keys" "$entries" "$fbytes" "$mdb" >>"$SAMPLES"
    done
    if [ -n "$HEAPTRACK" ] && [ -z "$HT_PID" ] && [ "$now" -ge "$WARMUP" ]; then
        # heaptrack writes heaptrack.nginx.<its pid>.zst into its cwd, and
        # stops when the worker exits
        HT_WORKER=$(workers | awk '{ print $1 }')
        (cd "$PREFIX" && exec heaptrack -p "$HT_WORKER") \
            >"$PREFIX/logs/heaptrack.log" 2>&1 &
        HT_PID=$!
    fi
    kill -0 "$LOAD_PID" 2>/dev/null || break
    printf '\rsoak.sh: %4d/%d s  data.mdb %s bytes  entries %s  keys %s ' \
        "$now" "$SOAK_SECONDS" "$mdb" "$entries" "$keys"
    # the next sample on the schedule: a round's own time (~0.1 s) must not
    # shift the samples' phase against the load's cycle
    tick=$(( tick + 1 ))
    wait_ms=$(( START_MS + tick * SAMPLE * 1000 - $(date +%s%3N) ))
    if [ "$wait_ms" -gt 0 ]; then
        sleep "$(( wait_ms / 1000 )).$(printf '%03d' $(( wait_ms % 1000 )))"
    fi
done
echo
wait "$LOAD_PID" || true
LOAD_PID=
LAST_WORKERS=$(workers)
curl -s --max-time 5 "http://127.0.0.1:$PORT/metrics" >"$PREFIX/metrics.end" || true
cp "$PREFIX/logs/error.log" "$PREFIX/error.log.copy"

# ------------------------------------------------------------ report

rc=0

"$PYTHON" - "$SAMPLES" "$PREFIX/load.json" "$PREFIX/logs/error.log" "$WARMUP" "$TOL" \
    "$MAX_SIZE" "$FIRST_WORKERS" "$LAST_WORKERS" "$PREFIX/metrics.end" "${HT_WORKER:-0}" \
    "$SAMPLE" <<'PY' || rc=$?
import json, math, re, sys
samples, loadf, errlog, warmup, tol, max_size, first_w, last_w, metricsf, traced, period = sys.argv[1:12]
traced, period = int(traced), int(period)
warmup, tol = int(warmup), float(tol)
m = re.fullmatch(r"(\d+)([kmg]?)", max_size.lower())
max_bytes = int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}[m.group(2)]

rows = [l.rstrip("\n").split("\t") for l in open(samples)]
head, rows = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
for r in rows:
    for k in head:
        r[k] = int(float(r[k]))
times = sorted({r["t"] for r in rows})
t_start = min((t for t in times if t >= warmup), default=times[-1])
t_end = times[-1]
# start and end are the medians of the first and the last window of the
# measured part: one sample can land on a moment of the allocator's churn
# (the second after a burst), a few percent above its level.  A window is
# enough consecutive samples to see every second of the load's 10-s cycle
# (lcm(period, 10) / period: 10 at the default 7 s), and at least a minute
LOAD_CYCLE = 10
nwin = max(LOAD_CYCLE // math.gcd(period, LOAD_CYCLE), -(-60 // period))
meas_ts = [t for t in times if t >= t_start]
start_ts = meas_ts[:nwin] or [t_start]
end_ts = meas_ts[-nwin:] or [t_end]
workers = sorted({r["worker"] for r in rows})
ok = True
lines = []

def at(t, w):
    return next((r for r in rows if r["t"] == t and r["worker"] == w), None)

def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) // 2

def level(ts, w, k):
    v = [r[k] for r in (at(t, w) for t in ts) if r]
    return median(v) if v else None

def check(cond, what):
    global ok
    lines.append(("ok  " if cond else "FAIL") + "  " + what)
    ok = ok and cond

def flat(a, b):
    return a > 0 and abs(b - a) <= a * tol / 100

def change(a, b):
    return (b - a) * 100.0 / a if a else 0.0

print("\nsamples: %d, every worker every ~%ds; warm-up until t=%ds; measured t=%d..%ds;"
      % (len(times), (times[1] - times[0]) if len(times) > 1 else 0, warmup, t_start, t_end))
print("start = median of t=%d..%ds, end = median of t=%d..%ds (%d samples each, every "
      "second of the load's %d-s cycle seen %s); lowest and highest sample of the measured "
      "part\n" % (start_ts[0], start_ts[-1], end_ts[0], end_ts[-1], nwin, LOAD_CYCLE,
                  "once" if math.gcd(period, LOAD_CYCLE) == 1 else "NOT evenly: the period "
                  "shares a factor with the cycle"))
print("%-8s %-16s %10s %10s %9s %10s %10s" % ("worker", "measure", "start", "end", "change",
                                              "lowest", "highest"))
for w in workers:
    meas = [r for r in rows if r["worker"] == w and t_start <= r["t"] <= t_end]
    if not meas or level(start_ts, w, "anon_kb") is None or level(end_ts, w, "anon_kb") is None:
        check(False, "worker %d sampled at start and end" % w)
        continue
    a, b = {}, {}
    for k in ("rss_kb", "anon_kb", "heap_kb", "file_kb", "shmem_kb", "fds"):
        a[k], b[k] = level(start_ts, w, k), level(end_ts, w, k)
        lo, hi = min(r[k] for r in meas), max(r[k] for r in meas)
        print("%-8d %-16s %10s %10s %+8.1f%% %10s %10s" % (w, k, a[k], b[k], change(a[k], b[k]),
                                                          lo, hi))
    if w == traced:
        # heaptrack's own buffers live in this worker from the warm-up on
        lines.append("info  worker %d private RSS %d -> %d kB: not checked, heaptrack runs in it"
                     % (w, a["anon_kb"], b["anon_kb"]))
    else:
        lines.append("info  worker %d private RSS (RssAnon) %d -> %d kB (%+.1f%%): reported, not checked%s"
                     % (w, a["anon_kb"], b["anon_kb"], change(a["anon_kb"], b["anon_kb"]),
                        "" if flat(a["anon_kb"], b["anon_kb"]) else
                        "; over %g%%: see the window medians below and bench/SOAK.md" % tol))
    if w == traced:
        lines.append("info  worker %d RSS %d -> %d kB: not checked, heaptrack runs in it"
                     % (w, a["rss_kb"], b["rss_kb"]))
    else:
        check(flat(a["rss_kb"], b["rss_kb"]),
              "worker %d RSS (VmRSS) %d -> %d kB: flat within %g%%" % (w, a["rss_kb"], b["rss_kb"], tol))
    check(flat(a["shmem_kb"], b["shmem_kb"]),
          "worker %d shared RSS (RssShmem) %d -> %d kB: flat within %g%%" % (w, a["shmem_kb"], b["shmem_kb"], tol))
    if w == traced:
        lines.append("info  worker %d open files %d -> %d: not checked, heaptrack's pipes"
                     % (w, a["fds"], b["fds"]))
    else:
        check(b["fds"] <= a["fds"] + 2, "worker %d open files (not sockets) %d -> %d: no descriptor leak" % (w, a["fds"], b["fds"]))
# the private part window by window: a leak climbs from window to window,
# the one-time step seen in some runs moves once and stays
print("\nprivate RSS (RssAnon, kB), the median of each window of %d samples from t=%d s:"
      % (nwin, t_start))
for w in workers:
    wins = [meas_ts[i:i + nwin] for i in range(0, len(meas_ts) - nwin + 1, nwin)]
    print("%-8d %s" % (w, " ".join(str(level(ts, w, "anon_kb")) for ts in wins)))
print()
a = next(r for r in rows if r["t"] == t_start)
b = next(r for r in rows if r["t"] == t_end)
for k in ("zone_keys", "cache_entries", "cache_file_bytes", "data_mdb_bytes"):
    print("%-8s %-16s %12s %12s" % ("-", k, a[k], b[k]))
peak = max(r["data_mdb_bytes"] for r in rows)
check(b["zone_keys"] <= a["zone_keys"] * (1 + tol / 100) + 1,
      "per_key zone keys %d -> %d: flat" % (a["zone_keys"], b["zone_keys"]))
check(peak <= max_bytes, "data.mdb peak %d bytes <= max_size %d" % (peak, max_bytes))
check(first_w.split() == last_w.split(), "the same workers from start to end (%s)" % first_w.strip())
bad = [l for l in open(errlog, errors="replace")
       if re.search(r"\[(alert|crit|emerg)\]|exited on signal", l)]
check(not bad, "error.log: no alert, crit, emerg, crash (%d lines)" % len(bad))
for l in bad[:5]:
    print("   " + l.rstrip())
load = json.load(open(loadf))
print("\nload: %d requests" % load["total"])
for kind, st in sorted(load["stats"].items()):
    print("  %-8s %s" % (kind, "  ".join("%s x %d" % kv for kv in sorted(st.items()))))
# the guard's own view, summed over zones and classes
sums = {}
for l in open(metricsf, errors="replace"):
    mm = re.match(r'(deepseek_guard_\w+)\{([^}]*)\} (\S+)$', l)
    if not mm:
        continue
    name, labels, v = mm.group(1), dict(re.findall(r'(\w+)="([^"]*)"', mm.group(2))), float(mm.group(3))
    if name == "deepseek_guard_requests_total":
        k = "zone %s: %s" % (labels["zone"], labels["decision"])
    elif name == "deepseek_guard_cache_requests_total":
        k = "cache: " + labels["status"]
    elif name.startswith("deepseek_guard_cache_") and name.endswith("_total"):
        k = "cache: " + name[len("deepseek_guard_cache_"):-len("_total")]
    else:
        continue
    sums[k] = sums.get(k, 0) + v
print("metrics at the end:")
for k in sorted(sums):
    if sums[k]:
        print("  %-32s %d" % (k, sums[k]))
check(load["nbad"] == 0, "every answer a complete 200 or a 429/503 with Retry-After (%d not)" % load["nbad"])
for x in load["bad"][:5]:
    print("   ", x)
print()
for l in lines:
    print(l)
print("\nsoak: " + ("PASS" if ok else "FAIL"))
sys.exit(0 if ok else 1)
PY

# ------------------------------------------------------------ heaptrack

if [ -n "$HT_PID" ]; then
    # stop nginx so that the traced worker exits and heaptrack writes its
    # data, then report on the allocations made after the warm-up
    # (the heaptrack script may return before its data is written: wait
    # for the worker to exit and for heaptrack to say it has finished)
    kill -QUIT "$NGINX_MASTER" 2>/dev/null || true
    for _ in $(seq 600); do
        if ! kill -0 "$HT_WORKER" 2>/dev/null \
           && grep -q 'Heaptrack finished' "$PREFIX/logs/heaptrack.log"
        then
            break
        fi
        sleep 0.1
    done
    wait "$HT_PID" 2>/dev/null || true
    HT_PID=
    ht=$(ls "$PREFIX"/heaptrack.*.zst 2>/dev/null | head -1)
    if [ -z "$ht" ]; then
        echo "heaptrack: no data file (see $PREFIX/logs/heaptrack.log)"
        rc=1
    else
        echo
        echo "heaptrack, worker $HT_WORKER, from the end of the warm-up to its exit:"
        heaptrack_print -f "$ht" -M "$PREFIX/heaptrack.massif" \
            --print-peaks 0 --print-allocators 0 --print-temporary 0 \
            --print-leaks 1 >"$PREFIX/heaptrack.txt" 2>&1 || true
        grep -E '^(total runtime|calls to allocation|temporary memory|peak heap|total memory leaked)' \
            "$PREFIX/heaptrack.txt" | sed 's/^/  /' || true
        # live heap (what was allocated after the attach and not yet freed):
        # its lowest point in each minute; a leak raises it minute by minute
        awk -F= '$1 == "time" { t = $2 } $1 == "mem_heap_B" {
                     m = int(t / 60); if (!(m in lo) || $2 < lo[m]) lo[m] = $2
                     if (m > last) last = m }
                 END { printf "  lowest live heap per minute (bytes):"
                       for (i = 0; i <= last; i++) printf " %d", lo[i]; print "" }' \
            "$PREFIX/heaptrack.massif"
        grep -q '^total memory leaked: 0B' "$PREFIX/heaptrack.txt" || rc=1
    fi
fi
exit "$rc"
