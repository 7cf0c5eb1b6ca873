#!/usr/bin/env bash
# Soak test: the example gateway (examples/gateway.conf) in front of the
# mock LLM under a steady mixed load for SOAK_SECONDS (default 900), with
# the workers' memory, the shared zones and the LMDB file sampled every
# SOAK_SAMPLE_SECONDS (7).  During the measured part (after the warm-up)
# two events hit the gateway under that load: a kill -9 of one worker, and
# a reload (nginx -s reload) with a configuration in which one class has a
# different queue size.  After each, the admission gauges must come back to
# exactly the requests still running; at the end, the backend zone's
# in-flight cap must still admit its N at once.
#
# At the end it prints, for the measured part, each worker's measures over
# its own span (start: the median of its first window, end: the median of
# its last window, change, lowest and highest sample), each event's
# recovery times and gauges, and the capacity check, and checks:
#
#   RSS           VmRSS (what ps and top show), compared like with like
#                 (below, "memory across the events"): a worker with its
#                 own start, or a fresh worker with an older one; within
#                 SOAK_TOLERANCE_PCT (5)
#   shared RSS    RssShmem (the zones' pages the worker touched), the same
#   open files    descriptors other than sockets, the same, +2 at most
#   zone keys     the keys tracked by the per-key zone, flat
#   data.mdb      never larger than max_size (SOAK_MAX_SIZE, 4m: small, so
#                 that the cache fills up early and the run is spent
#                 evicting); RssFile (the LMDB map, read through the page
#                 cache) is reported, not checked: it grows with the file
#   events        after each event, once the load is paused and drained:
#                 the in-flight and queue-depth gauges of both zones
#                 (per_key and backend), class by class, equal the held
#                 requests still open and 0 queued within
#                 SOAK_GAUGE_BOUND (5) seconds, and still 1 s later; once
#                 the held requests close, 0 within the same bound
#   workers       the killed worker replaced once (one new worker between
#                 the kill and the reload), the reload replacing the
#                 generation once (the two workers running before it exit
#                 with code 0, two new ones start and are the workers at
#                 the end), no other worker starting or dying, the same
#                 master from start to end
#   error.log     no [alert], [crit] or [emerg] but the kill's own: the
#                 master's "worker process <victim> exited on signal 9"
#                 and, if the victim held a zone's mutex, "shared memory
#                 zone ... was locked by <victim>"
#   load          every answer a 200, or a 429/503 with Retry-After, but
#                 the requests cut by the kill: in flight at the kill (on
#                 the victim) and ended, reset or cut short, within 1 s
#                 of it
#   capacity      at the end, as t/lib/DSG/Test.pm's capacity_is_free:
#                 the backend's N = inflight= (32) slow requests running
#                 together, each admitted at once (none queued), the mock
#                 seeing N in flight together, one more queued ("capacity
#                 check" below)
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
#   every 10 s a burst of 60 chats (classes normal, high, critical): over
#                   the backend's rate (50r/s, burst 20), so they queue by
#                   class, and over each key's own burst (429)
# The mock answers in ~150 ms + 20 ms per token (8 tokens).  (The hits
# leave spread over each second; the other kinds of a second, the burst
# included, leave together after its last hit, ~0.97 s into it: the
# schedule is walked in list order, not sorted by offset.  Against that
# clump the backend zone answers most low and abusive requests 503, and
# the abusive key sees few 429s or none.)
#
# Events.  SOAK_KILL_AT and SOAK_RELOAD_AT (seconds from the start; by
# default a third and two thirds into the measured part) start each event,
# which runs in the background while the sampling goes on:
#  1. at 1.5 s into the load's 10-s cycle (its burst leaves at ~6 s), open
#     the held requests, all at once: 3 of class normal (sk-normal-demo)
#     and 3 of class low (sk-user-0..2), SSE chats with X-Mock-Delay-Ms:
#     60000 (the mock sends the header at once and the first token a
#     minute later), so each holds a slot of both zones until it is
#     closed.  Each must be admitted (its 200 header arrives; a 503 or
#     429 is retried for 3 s).  /proc (the workers' socket inodes) tells
#     which worker holds each; for the kill, 3 more low ones at a time (up
#     to 12 in all) until both workers hold some (if they never do, the
#     one that holds them all is the victim and none stays open).
#  2. at 6.3 s into the cycle, with the burst queued and in flight:
#     kill   kill -9 of a worker that holds some of them (not the one
#            heaptrack traces): of those, the one with the most client
#            connections then (/proc again), so that the reaper has the
#            most of the load's requests to free (the load is spread
#            unevenly: at times one worker has all of it)
#     reload the configuration, generated from the same template with class
#            normal's queue=256 changed to SOAK_RELOAD_QUEUE (8), replaces
#            nginx.conf, then nginx -s reload (SIGHUP to the master);
#            applied when /metrics shows the new queue capacity.  (The
#            module is a copy made at the start: a build that replaces
#            build/*.so meanwhile does not change what the reload loads.)
#  3. at once the load pauses (it issues nothing new; the seconds paused
#     are skipped, not made up for), and the requests it has out finish:
#     "drained" (at most 45 s; ~1-1.5 s: the bursts' queue drains at the
#     zone's rate, the victim's clients are cut at once)
#  4. the gauges must equal, class by class, the held requests still open
#     (for the kill, those on the survivor: each held socket is checked,
#     and must be open exactly when its worker lives), 0 queued, within
#     SOAK_GAUGE_BOUND of the drain (the reaper runs once a second), and
#     still be exact 1 s later.  Recorded: the time from the drain and
#     from the event, the gauges just before the event, at the drain and
#     at the end, each zone's zone_reaped_total growth and, for the kill,
#     when it first grew (the reaper's tick)
#  5. the held requests close: the gauges must be 0 within the bound
#  6. the load resumes.  After the reload, class normal's queue depth at
#     the next burst must be within its new size (before it, the bursts
#     queue ~20 normal requests).
# The run fails when a gauge is not exact within the bound.
#
# Memory across the events.  A worker is compared with itself under the
# same load, or with another worker at the same moments:
#  * the two first workers (started with nginx, through the warm-up):
#    each over its own measured span, from the end of the warm-up (or, if
#    later, from when data.mdb reaches 95% of its peak size: until then
#    RssFile, the LMDB map, grows with the file, and VmRSS with it) to its
#    event (the kill for the victim, the reload for the survivor), its
#    first window against its last: flat within the tolerance;
#  * the worker respawned after the kill starts cold (a fresh heap, the
#    zones' pages not yet touched), so it is compared with the surviving
#    first worker over the same samples, the last window before the
#    reload: not more than the tolerance above it;
#  * the reload's two workers start cold too, with no older worker
#    alongside them once the held requests close: their last window
#    against the survivor's last window before the reload (the plateau of
#    a worker that ran the whole warm-up): not more than the tolerance
#    above it.
# Under SOAK_HEAPTRACK the survivor is the traced worker (the kill spares
# it): the comparisons with it are then reported, not checked.
# Samples taken during an event's check point (from the opening of its
# held requests to 3 s after the load resumes) are in no window.  A span
# too short for two whole windows uses its two halves (at least 3 samples
# each, and then not every second of the load's cycle evenly); shorter
# still, it is reported and not checked.
#
# Capacity check, after the load, the way capacity_is_free does it: wait
# until the mock has nothing in flight and both zones' gauges are 0;
# reset the mock's counters; N slow SSE chats (X-Mock-Delay-Ms: 3000),
# one every 40 ms (the zone's rate, 50r/s with a burst of 20, would queue
# some sent all at once), tagged in the query string for the access log:
# 7 critical (critical's reserve=20%: the other classes together get at
# most 25 of the 32 slots) and 25 of high, normal and low, interleaved;
# then, while they all run, one more of class normal.  Every one of the N logged
# ADMITTED with wait_ms=0, the mock seeing N in flight together, the
# gauges meanwhile exactly that mix and 1 normal queued, the one more
# logged QUEUED, all N+1 answered 200, and the gauges 0 after.
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
# run, at least 30), SOAK_KILL_AT, SOAK_RELOAD_AT (above),
# SOAK_RELOAD_QUEUE (8), SOAK_GAUGE_BOUND (5), SOAK_RATE (1),
# SOAK_MAX_SIZE (4m), SOAK_TOLERANCE_PCT (5), SOAK_KEEP=1 (keep the
# prefix with samples.tsv, load.json, event-*.json, cap.json, logs),
# SOAK_HEAPTRACK=1 (attach heaptrack to the first worker at the end of the
# warm-up and report what it allocated and never freed until the reload
# retires it), NGINX_BIN, DSG_MODULE, DSG_PYTHON.
#
# The warm-up: the workers' malloc heap grows for the first ~4 minutes of
# this load (the cache fills at ~80 s, then evicts; the queue's bursts
# reach their peak concurrency), then stays on a plateau; see
# bench/SOAK.md for a 30-minute run.
#
#   bench/soak.sh                                         # 15 minutes
#   SOAK_SECONDS=240 SOAK_WARMUP_SECONDS=60 bench/soak.sh  # 4 minutes
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
KILL_AT=${SOAK_KILL_AT:-$(( WARMUP + (SOAK_SECONDS - WARMUP) / 3 ))}
RELOAD_AT=${SOAK_RELOAD_AT:-$(( WARMUP + 2 * (SOAK_SECONDS - WARMUP) / 3 ))}
RELOAD_QUEUE=${SOAK_RELOAD_QUEUE:-8}
GAUGE_BOUND=${SOAK_GAUGE_BOUND:-5}
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
# an event takes up to ~25 s (the start of the next sample, a load cycle
# to line up, the drain, the bounds), the reload ~10 s more (the next
# burst); the next one, and the end, must not come before it is over
if ! [ "$KILL_AT" -ge "$WARMUP" ] 2>/dev/null \
   || ! [ "$RELOAD_AT" -ge $(( KILL_AT + 30 )) ] 2>/dev/null \
   || ! [ "$SOAK_SECONDS" -ge $(( RELOAD_AT + 40 )) ]; then
    echo "soak.sh: the events need warm-up <= SOAK_KILL_AT ($KILL_AT), SOAK_KILL_AT + 30" \
         "<= SOAK_RELOAD_AT ($RELOAD_AT), SOAK_RELOAD_AT + 40 <= SOAK_SECONDS" >&2
    exit 1
fi
if ! [ "$RELOAD_QUEUE" -ge 1 ] 2>/dev/null || [ "$RELOAD_QUEUE" -eq 256 ]; then
    echo "soak.sh: SOAK_RELOAD_QUEUE must be a number of places other than 256" >&2
    exit 1
fi

PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/dsg-soak-XXXXXX")
chmod 755 "$PREFIX"
mkdir -p "$PREFIX/logs"
# the reload loads the module again from its path: a copy, so that it is
# the same binary even if a build replaces $MODULE meanwhile
cp "$MODULE" "$PREFIX/module.so"
MODULE_SUM=$(sha256sum "$MODULE" | cut -c1-16)
MODULE_SRC=$MODULE
MODULE=$PREFIX/module.so

MOCK_PID=
NGINX_MASTER=
LOAD_PID=
EV_PID=
HT_PID=
HT_WORKER=

# shellcheck disable=SC2317  # called from the traps
cleanup() {
    trap - INT TERM EXIT
    local p
    for p in "$EV_PID" "$LOAD_PID"; do
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
            kill "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
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

# examples/gateway.conf as it is, but for the placeholders and max_size;
# the reload's configuration is the same with class normal's queue= changed
gateway_conf() {    # gateway_conf <normal's queue> <file>
    sed -e "s|@MODULE@|$MODULE|g" \
        -e "s|@PREFIX@|$PREFIX|g" \
        -e "s|@UPSTREAM@|127.0.0.1:$MOCK_PORT|g" \
        -e "s|@PORT@|$PORT|g" \
        -e "s|max_size=256m|max_size=$MAX_SIZE|" \
        -e "/^ *deepseek_guard_class normal /s|queue=256 |queue=$1 |" \
        "$REPO/examples/gateway.conf" >"$2"
    grep -q "max_size=$MAX_SIZE" "$2" \
        || { echo "soak.sh: could not set max_size in the gateway config" >&2; exit 1; }
    grep -Eq "^ *deepseek_guard_class normal +queue=$1 " "$2" \
        || { echo "soak.sh: could not set class normal's queue=$1 in the gateway config" >&2; exit 1; }
}
gateway_conf 256 "$PREFIX/nginx.conf"
gateway_conf "$RELOAD_QUEUE" "$PREFIX/nginx-reload.conf"
# the two differ in that one line only
[ "$(diff "$PREFIX/nginx.conf" "$PREFIX/nginx-reload.conf" | grep -c '^[<>]')" -eq 2 ] \
    || { echo "soak.sh: the reload's config differs in more than class normal's queue" >&2; exit 1; }

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

echo "soak.sh: module $MODULE_SRC (sha256 $MODULE_SUM...), copied to the prefix"
echo "soak.sh: gateway on 127.0.0.1:$PORT (master $NGINX_MASTER, workers $(workers)), mock on $MOCK_PORT"
echo "soak.sh: $SOAK_SECONDS s of load, a sample every $SAMPLE s, warm-up $WARMUP s, max_size=$MAX_SIZE, rate x$RATE"
echo "soak.sh: kill -9 of a worker at t=${KILL_AT}s, reload with class normal's queue=256 -> $RELOAD_QUEUE at t=${RELOAD_AT}s"

# ------------------------------------------------------------ the load

# While the file <ctl>.pause exists the load issues nothing (an event's
# check point) and writes <ctl>.state every 50 ms: whether it saw the
# pause, and how many of its requests are still out.  <ctl>.t0 holds the
# wall-clock time of its second 0 (the events line up with its cycle).
cat >"$PREFIX/load.py" <<'PY'
import asyncio, json, os, random, sys, time

port, seconds, rate, out, ctl = (int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]),
                                 sys.argv[4], sys.argv[5])
PAUSE, STATE = ctl + ".pause", ctl + ".state"
HOT = ["hot prompt %d" % i for i in range(40)]
stats = {}          # kind -> {status: n}
bad = []            # answers that are not a 200 nor a 429/503 with Retry-After
seq = 0
skipped = 0         # requests not issued while paused
tasks = set()


def body(prompt, stream=False):
    return json.dumps({"model": "deepseek-chat", "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": prompt}]}).encode()


async def one(kind, key, payload, headers=()):
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
           + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
           + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    status, err, start = 0, None, time.time()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        w.write(req)
        data = await asyncio.wait_for(r.read(), 60)
        w.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not data:
            raise ConnectionError("closed without an answer")
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
        # cut: the connection ended without a whole answer (what a killed
        # worker does to its clients), as opposed to a wrong answer
        cut = status == 0 or err.startswith(("truncated", "body length"))
        bad.append({"kind": kind, "status": status, "err": err, "cut": cut,
                    "start": round(start, 3), "end": round(time.time(), 3)})


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


async def state():
    while True:
        if os.path.exists(PAUSE):
            with open(STATE + ".tmp", "w") as f:
                json.dump({"paused": True, "outstanding": len(tasks), "t": time.time()}, f)
            os.replace(STATE + ".tmp", STATE)
        await asyncio.sleep(0.05)


async def main():
    global skipped
    t0 = time.monotonic()
    with open(ctl + ".t0.tmp", "w") as f:
        f.write("%.3f\n" % (time.time() - (time.monotonic() - t0)))
    os.replace(ctl + ".t0.tmp", ctl + ".t0")
    st = asyncio.create_task(state())
    t = 0
    while t < seconds:
        for off, args in schedule(t):
            delay = t0 + t + off - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if os.path.exists(PAUSE):
                skipped += 1
                continue
            task = asyncio.create_task(one(*args))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        t += 1
    await asyncio.sleep(max(0, t0 + seconds - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks, timeout=70)
    st.cancel()
    with open(out, "w") as f:
        json.dump({"stats": stats, "bad": bad[:5000], "nbad": len(bad), "skipped": skipped,
                   "total": sum(sum(s.values()) for s in stats.values())}, f)

asyncio.run(main())
PY

# ------------------------------------------------------------ the events

# event.py <json settings>: one event (kill or reload) and its check
# point, as the header says; writes its record to settings["out"]
cat >"$PREFIX/event.py" <<'PY'
import json, os, re, shutil, signal, socket, subprocess, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

S = json.loads(sys.argv[1])
KIND, PORT, BOUND = S["kind"], S["port"], float(S["bound"])
PAUSE, STATE = S["ctl"] + ".pause", S["ctl"] + ".state"
ZONES = ("per_key", "backend")
HOLD = [("normal", "sk-normal-demo")] * 3 + [("low", "sk-user-%d" % i) for i in range(3)]
MORE = [("low", "sk-user-%d" % i) for i in range(3, 9)]     # to reach both workers
rec = {"kind": KIND, "ok": False, "notes": [], "info": [], "reaped_at": {}}


def log(msg):
    print("%.3f %s: %s" % (time.time(), KIND, msg), flush=True)


def note(msg):
    log(msg)
    rec["notes"].append(msg)


def save():
    with open(S["out"] + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(S["out"] + ".tmp", S["out"])


def scrape():
    """the metrics text, or None (a scrape may meet a worker as it dies); after the
    kill, notes when each zone's reaped counter first grows (the reaper's tick)"""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % PORT, timeout=3) as r:
            text = r.read().decode()
    except Exception:
        return None
    if KIND == "kill" and "t_event" in rec:
        for z in ZONES:
            v = metric(text, 'deepseek_guard_zone_reaped_total{zone="%s"}' % z)
            if v is not None and v > (rec["reaped_before"][z] or 0) \
               and z not in rec["reaped_at"]:
                rec["reaped_at"][z] = round(time.time() - rec["t_event"], 3)
    return text


def gauges(text):
    """{zone: {"inflight": {class: n}, "queue_depth": {class: n}}} of both zones"""
    g = {z: {"inflight": {}, "queue_depth": {}} for z in ZONES}
    for l in text.splitlines():
        m = re.match(r'deepseek_guard_(inflight|queue_depth)\{zone="([^"]+)",class="([^"]+)"\} (\S+)$', l)
        if m and m.group(2) in g:
            g[m.group(2)][m.group(1)][m.group(3)] = int(float(m.group(4)))
    return g


def metric(text, name):
    m = re.search(r"^%s (\S+)$" % re.escape(name), text or "", re.M)
    return int(float(m.group(1))) if m else None


def matches(g, expect):
    """the gauges of both zones are exactly the held requests of each class, 0 queued"""
    for z in ZONES:
        if not g[z]["inflight"]:
            return False
        for c, v in g[z]["inflight"].items():
            if v != expect.get(c, 0):
                return False
        if any(g[z]["queue_depth"].values()):
            return False
    return True


def wait_exact(expect, bound):
    """(seconds it took or None, the gauges of the first scrape, of the last)"""
    t0 = time.time()
    first = last = None
    while True:
        text = scrape()
        if text:
            last = gauges(text)
            first = first or last
            if matches(last, expect):
                return time.time() - t0, first, last
        if time.time() - t0 > bound:
            return None, first, last
        time.sleep(0.05)


def workers():
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = open("/proc/%s/stat" % p).read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = open("/proc/%s/cmdline" % p, "rb").read()
        except OSError:
            continue
        if ppid == S["master"] and b"worker process" in cmd:
            out.append(int(p))
    return sorted(out)


def owner(sock):
    """the worker whose accepted socket is the other end of sock"""
    lport = sock.getsockname()[1]
    want_l, want_r = "0100007F:%04X" % PORT, "0100007F:%04X" % lport
    inode = None
    for l in open("/proc/net/tcp").read().splitlines()[1:]:
        f = l.split()
        if f[1] == want_l and f[2] == want_r:
            inode = f[9]
    if inode is None:
        return None
    for w in workers():
        try:
            for fd in os.listdir("/proc/%d/fd" % w):
                if os.readlink("/proc/%d/fd/%s" % (w, fd)) == "socket:[%s]" % inode:
                    return w
        except OSError:
            pass
    return None


def client_conns():
    """{worker: the established client connections it has accepted}"""
    want_l = "0100007F:%04X" % PORT
    inodes = set()
    for l in open("/proc/net/tcp").read().splitlines()[1:]:
        f = l.split()
        if f[1] == want_l and f[3] == "01":
            inodes.add("socket:[%s]" % f[9])
    out = {}
    for w in workers():
        n = 0
        try:
            for fd in os.listdir("/proc/%d/fd" % w):
                try:
                    n += os.readlink("/proc/%d/fd/%s" % (w, fd)) in inodes
                except OSError:
                    pass
        except OSError:
            pass
        out[w] = n
    return out


def is_open(sock):
    try:
        sock.setblocking(False)
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def hold(i, cls, key, until):
    """a slow SSE chat through both zones: the socket once its 200 header is in"""
    body = json.dumps({"model": "deepseek-chat", "stream": True,
                       "messages": [{"role": "user", "content": "hold %s %d %f" % (KIND, i, time.time())}]}).encode()
    req = ("POST /v1/chat/completions?soakhold=%s-%d HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
           "Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
           "X-Mock-Delay-Ms: 60000\r\nContent-Length: %d\r\n\r\n" % (KIND, i, key, len(body))).encode() + body
    tries = []
    while time.time() < until:
        s = socket.create_connection(("127.0.0.1", PORT), timeout=15)
        s.sendall(req)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                d = s.recv(4096)
                if not d:
                    break
                buf += d
        except OSError:
            pass
        status = int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/") else 0
        if status == 200:
            return s, tries
        tries.append(status)
        s.close()
        time.sleep(0.2)
    return None, tries


def open_held(which):
    """open the held requests of which ((class, key), ...) at once, as clients do: at
    once, both workers take some (one after the other, one worker may take them all)"""
    n = len(held)
    with ThreadPoolExecutor(len(which)) as ex:
        got = list(ex.map(lambda a: hold(n + a[0], a[1][0], a[1][1], time.time() + 3),
                          enumerate(which)))
    for (cls, key), (s, tries) in zip(which, got):
        if s is None:
            note("a held request (%s, %s) was not admitted: %s" % (cls, key, tries))
        else:
            held.append({"sock": s, "cls": cls, "key": key, "tries": tries, "worker": owner(s)})
    if len(held) < n + len(which):
        raise SystemExit


def pause():
    """the load issues nothing from now on"""
    open(PAUSE, "w").close()
    rec["t_pause"] = time.time()


def phase():
    return (time.time() - T0) % 10.0


def wait_phase(p):
    time.sleep((p - phase()) % 10.0)


held = []       # {"sock", "cls", "key", "worker"}
T0 = float(open(S["ctl"] + ".t0").read())
try:
    # 1. the held requests, where the load's cycle is calm
    wait_phase(1.5)
    rec["held_at"] = time.time()
    open_held(HOLD)
    if KIND == "kill":
        # both workers must hold some: more, 3 at a time, while they do not
        more = list(MORE)
        while more and len({h["worker"] for h in held} & set(workers())) < 2:
            open_held(more[:3])
            del more[:3]
        if len({h["worker"] for h in held} & set(workers())) < 2:
            rec["info"].append("the held requests all went to one worker: it is the victim, "
                               "none is left open")
    rec["held"] = [{k: h[k] for k in ("cls", "key", "worker", "tries")} for h in held]
    log("held: %s" % rec["held"])
    if any(h["worker"] is None for h in held):
        note("could not tell which worker holds each held request")

    # 2. the event, 0.3 s after the burst
    wait_phase(6.3)
    before = scrape()
    rec["before"] = gauges(before) if before else None
    rec["reaped_before"] = {z: metric(before, 'deepseek_guard_zone_reaped_total{zone="%s"}' % z)
                            for z in ZONES}
    rec["workers_before"] = workers()
    if KIND == "kill":
        by = {}
        for h in held:
            by.setdefault(h["worker"], []).append(h)
        cands = [w for w in rec["workers_before"] if by.get(w)]
        if len(cands) > 1 and S.get("avoid") in cands:
            cands.remove(S["avoid"])
        if not cands:
            note("no worker holds a held request")
            raise SystemExit
        # the busier one: the load's clients are spread unevenly (one idle
        # worker may take most new connections), and the victim's own
        # requests in flight and queued are what the reaper must free
        conns = client_conns()
        rec["conns_before"] = conns
        victim = max(cands, key=lambda w: conns.get(w, 0))
        rec["victim"] = victim
        rec["t_event"] = time.time()
        os.kill(victim, signal.SIGKILL)
        pause()
        log("killed worker %d, holding %d of the %d held" % (victim, len(by[victim]), len(held)))
    else:
        tmp = S["conf"] + ".new"
        shutil.copyfile(S["variant"], tmp)
        os.replace(tmp, S["conf"])
        rec["t_event"] = time.time()
        r = subprocess.run(S["reload_cmd"], capture_output=True, text=True)
        pause()
        rec["reload_rc"], rec["reload_out"] = r.returncode, (r.stdout + r.stderr)[-2000:]
        name = 'deepseek_guard_queue_capacity{zone="backend",class="normal"}'
        rec["capacity_before"] = metric(before, name)
        deadline = time.time() + 10
        while time.time() < deadline:
            cap = metric(scrape(), name)
            if cap == S["queue"]:
                rec["applied_s"] = round(time.time() - rec["t_event"], 3)
                break
            time.sleep(0.05)
        rec["capacity_after"] = cap
        rec["new_workers"] = sorted(set(workers()) - set(rec["workers_before"]))
        log("reloaded (rc %d): capacity %s -> %s after %s s, new workers %s"
            % (r.returncode, rec["capacity_before"], cap, rec.get("applied_s"), rec["new_workers"]))
        if r.returncode != 0 or "applied_s" not in rec:
            note("the reload was not applied: rc %d, %s" % (r.returncode, rec["reload_out"]))

    # 3. the load paused at once: its requests finish
    deadline = rec["t_pause"] + 45
    while time.time() < deadline:
        try:
            st = json.load(open(STATE))
        except (OSError, ValueError):
            st = None
        if st and st["paused"] and st["t"] > rec["t_pause"] and st["outstanding"] == 0:
            rec["t_drained"] = st["t"]
            break
        if KIND == "kill":
            scrape()            # for the reaper's tick
        time.sleep(0.05)
    else:
        note("the load did not drain within 45 s")
        raise SystemExit
    log("drained %.2f s after the pause" % (rec["t_drained"] - rec["t_pause"]))

    # 4. the gauges: exactly the held requests still open, class by class
    live = set(workers())
    for h in held:
        h["open"] = is_open(h["sock"])
        # a held request lives exactly as long as its worker
        h["expected_open"] = KIND != "kill" or h["worker"] != rec["victim"]
    rec["held_open"] = [h["open"] for h in held]
    if any(h["open"] != h["expected_open"] for h in held):
        note("held requests open %s, expected %s"
             % ([h["open"] for h in held], [h["expected_open"] for h in held]))
    expect = {}
    for h in held:
        if h["open"]:
            expect[h["cls"]] = expect.get(h["cls"], 0) + 1
    rec["expect"] = expect
    took, first, last = wait_exact(expect, BOUND)
    rec["at_drain"], rec["exact"] = first, last
    if took is None:
        note("the gauges were not %s in flight, 0 queued, within %g s of the drain: %s"
             % (expect, BOUND, last))
    else:
        rec["exact_after_drain_s"] = round(time.time() - rec["t_drained"], 3)
        rec["exact_after_event_s"] = round(time.time() - rec["t_event"], 3)
        log("exact %.3f s after the drain, %.3f s after the event: %s"
            % (rec["exact_after_drain_s"], rec["exact_after_event_s"], last))
        time.sleep(1)
        text = scrape()
        rec["exact_1s_later"] = gauges(text) if text else None
        if not (text and matches(rec["exact_1s_later"], expect)):
            note("the gauges were no longer exact 1 s later: %s" % rec["exact_1s_later"])
    after = scrape()
    rec["reaped_after"] = {z: metric(after, 'deepseek_guard_zone_reaped_total{zone="%s"}' % z)
                           for z in ZONES}
    rec["workers_after"] = workers()

    # 5. close the held requests: nothing left
    for h in held:
        h["sock"].close()
    t = time.time()
    took0, _, last0 = wait_exact({}, BOUND)
    rec["released"] = last0
    if took0 is None:
        note("the gauges were not 0 within %g s of closing the held requests: %s" % (BOUND, last0))
    else:
        rec["released_s"] = round(time.time() - t, 3)
    rec["ok"] = not rec["notes"]
finally:
    for h in held:
        h["sock"].close()
    # 6. the load resumes
    for f in (PAUSE, STATE):
        try:
            os.unlink(f)
        except OSError:
            pass
    rec["t_resume"] = time.time()
    save()
    log("done, %s" % ("ok" if rec["ok"] else "FAILED: %s" % rec["notes"]))

# the reload's new queue size at work: class normal's depth at the next
# burst (before the reload the bursts queue ~20 normal requests)
if KIND == "reload" and rec["ok"]:
    name = 'deepseek_guard_requests_total{zone="backend",class="normal",decision="rejected_503"}'
    wait_phase(5.5)
    r0 = metric(scrape(), name)
    wait_phase(6.3)
    text = scrape()
    rec["next_burst"] = gauges(text) if text else None
    depth = (rec["next_burst"] or {}).get("backend", {}).get("queue_depth", {}).get("normal")
    time.sleep(2)
    r1 = metric(scrape(), name)
    rec["next_burst_rejected"] = (r1 - r0) if r0 is not None and r1 is not None else None
    if depth is None or depth > S["queue"]:
        rec["ok"] = False
        note("class normal's queue %s deep at the next burst, over its new %d places"
             % (depth, S["queue"]))
    save()
    log("next burst: normal queued %s, %s rejected 503" % (depth, rec["next_burst_rejected"]))
PY

# cap.py <json settings>: the capacity check at the end (see the header)
cat >"$PREFIX/cap.py" <<'PY'
import asyncio, json, re, sys, time, urllib.request

S = json.loads(sys.argv[1])
PORT, BOUND = S["port"], float(S["bound"])
ZONES = ("per_key", "backend")
KEYS = {"critical": "sk-critical-demo", "high": "sk-high-demo", "normal": "sk-normal-demo"}
rec = {"ok": False, "fails": []}


def fail(msg):
    print("cap: " + msg, flush=True)
    rec["fails"].append(msg)


def get(url, data=None):
    with urllib.request.urlopen(url, data=data, timeout=5) as r:
        return r.read().decode()


def scrape():
    try:
        return get("http://127.0.0.1:%d/metrics" % PORT)
    except Exception:
        return ""


def gauges(text):
    g = {z: {"inflight": {}, "queue_depth": {}} for z in ZONES}
    for l in text.splitlines():
        m = re.match(r'deepseek_guard_(inflight|queue_depth)\{zone="([^"]+)",class="([^"]+)"\} (\S+)$', l)
        if m and m.group(2) in g:
            g[m.group(2)][m.group(1)][m.group(3)] = int(float(m.group(4)))
    return g


def idle(g):
    return all(g[z]["inflight"] and not any(g[z]["inflight"].values())
               and not any(g[z]["queue_depth"].values()) for z in ZONES)


def mock_stats():
    return json.loads(get("http://127.0.0.1:%d/stats" % S["mock_port"]))


def wait_until(cond, secs):
    deadline = time.time() + secs
    while True:
        v = cond()
        if v or time.time() > deadline:
            return v
        time.sleep(0.05)


async def one(i, at, cls, key):
    await asyncio.sleep(at)
    body = json.dumps({"model": "deepseek-chat", "stream": True,
                       "messages": [{"role": "user", "content": "cap %s %f" % (i, time.time())}]}).encode()
    req = ("POST /v1/chat/completions?soakcap=%s HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
           "Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
           "X-Mock-Delay-Ms: 3000\r\nContent-Length: %d\r\n\r\n" % (i, key, len(body))).encode() + body
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT), 10)
        w.write(req)
        data = await asyncio.wait_for(r.read(), 30)
        w.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        if status == 200 and not data.endswith(b"0\r\n\r\n"):
            status = -200
    except Exception:
        status = 0
    return i, cls, status


async def probe(at):
    await asyncio.sleep(at)
    return await asyncio.get_running_loop().run_in_executor(None, scrape)


async def run(reqs, extra, probe_at):
    jobs = [one(*r) for r in reqs] + [one(*extra)]
    res = await asyncio.gather(probe(probe_at), *jobs)
    return res[0], res[1:]


# settle: the mock has nothing in flight, both zones are idle
if not wait_until(lambda: mock_stats()["inflight"] == 0, 30):
    fail("the mock still has requests in flight before the check")
g = wait_until(lambda: (lambda g: g if idle(g) else None)(gauges(scrape())), 15)
rec["idle_before"] = g or gauges(scrape())
if not g:
    fail("the zones are not idle before the check: %s" % rec["idle_before"])
get("http://127.0.0.1:%d/stats/reset" % S["mock_port"], data=b"")

text = scrape()
m = re.search(r'^deepseek_guard_zone_inflight_limit\{zone="backend"\} (\S+)$', text, re.M)
N = int(float(m.group(1)))
# the classes in order and their reserves, from the configuration
classes = re.findall(r"^\s*deepseek_guard_class\s+(\w+)([^;]*);", open(S["conf"]).read(), re.M)
reserve = {c: int((re.search(r"reserve=(\d+)%", rest) or [0, 0])[1]) for c, rest in classes}
top = classes[0][0]
below = [c for c, _ in classes[1:]]
# the classes below the first share one tier: N * (100 - its reserve) / 100 slots
n_below = N * (100 - reserve[top]) // 100
mix = [top] * (N - n_below) + [below[i % len(below)] for i in range(n_below)]
# interleaved (every 4th of the list first, then the next...): the first
# class's requests spread over the N
reqs = []
for j, i in enumerate(sorted(range(N), key=lambda i: (i % 4, i))):
    cls = mix[i]
    reqs.append((j, j * 0.04, cls, KEYS.get(cls, "sk-user-%d" % (50 + j))))
want = {}
for r in reqs:
    want[r[2]] = want.get(r[2], 0) + 1
extra_at = N * 0.04 + 0.3
extra = ("x", extra_at, "normal", KEYS["normal"])
rec.update(n=N, mix=want, extra_class="normal", extra_at=extra_at)
print("cap: N=%d: %s, one more normal at %.2f s" % (N, want, extra_at), flush=True)

mid, res = asyncio.run(run(reqs, extra, extra_at + 0.5))
rec["mid"] = gauges(mid)
rec["statuses"] = {str(i): st for i, _, st in res}
if any(st != 200 for _, _, st in res):
    fail("not all %d answered 200 (complete): %s" % (N + 1, {i: st for i, _, st in res if st != 200}))
# the gauges while the N ran and the one more waited
b = rec["mid"]["backend"]
if any(b["inflight"].get(c, 0) != want.get(c, 0) for c in set(b["inflight"]) | set(want)) \
   or any(b["queue_depth"].get(c, 0) != (1 if c == "normal" else 0) for c in b["queue_depth"]):
    fail("backend gauges while the N ran: %s, expected in flight %s and 1 normal queued" % (b, want))
# the access log: every one of the N ADMITTED at once, the one more QUEUED
log = {}
def logged():
    log.clear()
    for l in open(S["access_log"], errors="replace"):
        mm = re.search(r"soakcap=(\w+) .*decision=(\S+) wait_ms=(\S+)", l)
        if mm:
            log[mm.group(1)] = (mm.group(2), mm.group(3))
    return len(log) == N + 1
wait_until(logged, 10)
rec["log"] = log
admitted = [str(i) for i, _, _, _ in reqs if log.get(str(i)) == ("ADMITTED", "0")]
rec["admitted_at_once"] = len(admitted)
if len(admitted) != N:
    fail("%d of the %d admitted at once, none queued: %s" % (len(admitted), N,
         {i: v for i, v in log.items() if i != "x" and v != ("ADMITTED", "0")}))
rec["extra_logged"] = log.get("x")
if (log.get("x") or ("",))[0] != "QUEUED":
    fail("the one more was not queued: %s" % (log.get("x"),))
rec["mock_max_inflight"] = mock_stats()["max_inflight"]
if rec["mock_max_inflight"] != N:
    fail("the mock saw %d in flight together, not %d" % (rec["mock_max_inflight"], N))
t = time.time()
g = wait_until(lambda: (lambda g: g if idle(g) else None)(gauges(scrape())), BOUND)
rec["idle_after"] = g or gauges(scrape())
if g:
    rec["idle_after_s"] = round(time.time() - t, 3)
else:
    fail("the zones not idle within %g s after: %s" % (BOUND, rec["idle_after"]))
rec["ok"] = not rec["fails"]
json.dump(rec, open(S["out"], "w"), indent=1)
print("cap: " + ("ok" if rec["ok"] else "FAILED"), flush=True)
PY

"$PYTHON" "$PREFIX/load.py" "$PORT" "$SOAK_SECONDS" "$RATE" "$PREFIX/load.json" "$PREFIX/load" \
    >>"$PREFIX/logs/load.log" 2>&1 &
LOAD_PID=$!

# the settings of an event
event_json() {
    "$PYTHON" -c 'import json, sys; a = sys.argv
print(json.dumps({"kind": a[1], "port": int(a[2]), "master": int(a[3]), "ctl": a[4],
                  "out": a[5], "bound": float(a[6]), "avoid": int(a[7] or 0),
                  "conf": a[8], "variant": a[9], "queue": int(a[10]),
                  "reload_cmd": a[11:]}))' \
        "$1" "$PORT" "$NGINX_MASTER" "$PREFIX/load" "$PREFIX/event-$1.json" "$GAUGE_BOUND" \
        "${HT_WORKER:-}" "$PREFIX/nginx.conf" "$PREFIX/nginx-reload.conf" "$RELOAD_QUEUE" \
        "$NGINX_BIN" -p "$PREFIX/" -c "$PREFIX/nginx.conf" -e "$PREFIX/logs/error.log" -s reload
}

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
event_start() { # event_start kill|reload: in the background, logged
    local settings
    settings=$(event_json "$1")
    "$PYTHON" "$PREFIX/event.py" "$settings" >>"$PREFIX/logs/events.log" 2>&1 &
    EV_PID=$!
}

SAMPLES="$PREFIX/samples.tsv"
printf 't\tworker\trss_kb\tanon_kb\theap_kb\tfile_kb\tshmem_kb\tfds\tzone_keys\tcache_entries\tcache_file_bytes\tdata_mdb_bytes\n' >"$SAMPLES"
START_MS=$(date +%s%3N)
FIRST_WORKERS=$(workers)
KILLED=
RELOADED=
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
    # the events, one after the other
    if [ -z "$KILLED" ] && [ "$now" -ge "$KILL_AT" ]; then
        event_start kill
        KILLED=1
    elif [ -z "$RELOADED" ] && [ "$now" -ge "$RELOAD_AT" ] && ! kill -0 "$EV_PID" 2>/dev/null; then
        wait "$EV_PID" 2>/dev/null || true
        event_start reload
        RELOADED=1
    fi
    kill -0 "$LOAD_PID" 2>/dev/null || break
    printf '\rsoak.sh: %4d/%d s  data.mdb %s bytes  entries %s  keys %s  workers %s' \
        "$now" "$SOAK_SECONDS" "$mdb" "$entries" "$keys" "$(workers)"
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
if [ -n "$EV_PID" ]; then
    wait "$EV_PID" 2>/dev/null || true
    EV_PID=
fi
LAST_WORKERS=$(workers)
LAST_MASTER=$(cat "$PREFIX/nginx.pid" 2>/dev/null || echo 0)
kill -0 "$NGINX_MASTER" 2>/dev/null || LAST_MASTER=0
curl -s --max-time 5 "http://127.0.0.1:$PORT/metrics" >"$PREFIX/metrics.end" || true

# ------------------------------------------------------------ capacity check

echo "soak.sh: capacity check"
"$PYTHON" "$PREFIX/cap.py" "$("$PYTHON" -c 'import json, sys; a = sys.argv
print(json.dumps({"port": int(a[1]), "mock_port": int(a[2]), "bound": float(a[3]),
                  "conf": a[4], "access_log": a[5], "out": a[6]}))' \
    "$PORT" "$MOCK_PORT" "$GAUGE_BOUND" "$PREFIX/nginx.conf" "$PREFIX/logs/access.log" \
    "$PREFIX/cap.json")" >>"$PREFIX/logs/cap.log" 2>&1 || true
cp "$PREFIX/logs/error.log" "$PREFIX/error.log.copy"

# ------------------------------------------------------------ report

rc=0

"$PYTHON" - "$SAMPLES" "$PREFIX/load.json" "$PREFIX/logs/error.log" "$WARMUP" "$TOL" \
    "$MAX_SIZE" "$FIRST_WORKERS" "$LAST_WORKERS" "$PREFIX/metrics.end" "${HT_WORKER:-0}" \
    "$SAMPLE" "$START_MS" "$PREFIX" "$NGINX_MASTER" "$LAST_MASTER" "$RELOAD_QUEUE" \
    "$GAUGE_BOUND" <<'PY' || rc=$?
import json, math, os, re, sys
(samples, loadf, errlog, warmup, tol, max_size, first_w, last_w, metricsf, traced, period,
 start_ms, prefix, master, last_master, rqueue, bound) = sys.argv[1:18]
traced, period, start_s = int(traced), int(period), int(start_ms) / 1000.0
warmup, tol, bound = int(warmup), float(tol), float(bound)
m = re.fullmatch(r"(\d+)([kmg]?)", max_size.lower())
max_bytes = int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}[m.group(2)]
first_w, last_w = [int(w) for w in first_w.split()], [int(w) for w in last_w.split()]

rows = [l.rstrip("\n").split("\t") for l in open(samples)]
head, rows = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
for r in rows:
    for k in head:
        r[k] = int(float(r[k]))
times = sorted({r["t"] for r in rows})
t_start = min((t for t in times if t >= warmup), default=times[-1])
t_end = times[-1]
LOAD_CYCLE = 10
nwin = max(LOAD_CYCLE // math.gcd(period, LOAD_CYCLE), -(-60 // period))
ok = True
lines = []


def rel(t):
    return t - start_s if t else None


def check(cond, what):
    global ok
    lines.append(("ok  " if cond else "FAIL") + "  " + what)
    ok = ok and bool(cond)


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) // 2


def change(a, b):
    return (b - a) * 100.0 / a if a else 0.0


def within(a, b):           # b not more than tol above a
    return a > 0 and b <= a * (1 + tol / 100)


def flat(a, b):
    return a > 0 and abs(b - a) <= a * tol / 100


# ---- the events
ev = {}
for kind in ("kill", "reload"):
    try:
        ev[kind] = json.load(open(os.path.join(prefix, "event-%s.json" % kind)))
    except (OSError, ValueError):
        ev[kind] = None
kill_t = rel(ev["kill"]["t_event"]) if ev["kill"] and ev["kill"].get("t_event") else None
reload_t = rel(ev["reload"]["t_event"]) if ev["reload"] and ev["reload"].get("t_event") else None
victim = (ev["kill"] or {}).get("victim")
# no sample of an event's check point is in a window: from its held
# requests' opening to 3 s after the load resumed
quiet = [(rel(e["held_at"]) - 1, rel(e["t_resume"]) + 3) for e in ev.values()
         if e and e.get("held_at") and e.get("t_resume")]


def usable(t):
    return not any(a <= t <= b for a, b in quiet)


# ---- the workers' lineage, from error.log in order
log_lines = open(errlog, errors="replace").read().splitlines()
starts, sig_exits, code_exits = [], [], []      # (line number, pid[, n])
i_kill = i_reload = None
for n, l in enumerate(log_lines):
    mm = re.search(r"start worker process (\d+)", l)
    if mm:
        starts.append((n, int(mm.group(1))))
    mm = re.search(r"worker process (\d+) exited on signal (\d+)", l)
    if mm:
        sig_exits.append((n, int(mm.group(1)), int(mm.group(2))))
        if int(mm.group(1)) == victim and i_kill is None:
            i_kill = n
    mm = re.search(r"worker process (\d+) exited with code (\d+)", l)
    if mm:
        code_exits.append((n, int(mm.group(1)), int(mm.group(2))))
    if re.search(r"signal 1 \(SIGHUP\) received.*reconfiguring", l) and i_reload is None:
        i_reload = n
big = len(log_lines)
gen0 = [p for n, p in starts if n < (i_kill if i_kill is not None else big)
        and n < (i_reload if i_reload is not None else big)]
respawn = [p for n, p in starts if i_kill is not None and n > i_kill
           and n < (i_reload if i_reload is not None else big)]
gen2 = [p for n, p in starts if i_reload is not None and n > i_reload]
survivor = [p for p in gen0 if p != victim]
survivor = survivor[0] if len(survivor) == 1 else None
role = {}
for p in gen0:
    role[p] = "victim" if p == victim else "first"
for p in respawn:
    role[p] = "respawned"
for p in gen2:
    role[p] = "reload"

workers = sorted({r["worker"] for r in rows})
by = {}
for r in rows:
    by.setdefault(r["worker"], {})[r["t"]] = r


# the cache file's full size: RssFile (the LMDB map) grows with the file
# until then, and VmRSS with it; a first worker's span starts when both the
# warm-up is over and the file is full
peak = max(r["data_mdb_bytes"] for r in rows)
t_full = min((r["t"] for r in rows if r["data_mdb_bytes"] >= peak * 0.95), default=0)
t_first = max(t_start, t_full)


def span(w):
    """the sample times of worker w's measured span (see the header)"""
    ts = sorted(t for t in by.get(w, {}) if usable(t))
    rl = role.get(w)
    if rl in ("first", "victim"):
        end = kill_t if rl == "victim" else reload_t
        return [t for t in ts if t >= t_first and (end is None or t < end)]
    if rl == "respawned":
        return [t for t in ts if reload_t is None or t < reload_t]
    return ts


def level(w, ts, k):
    v = [by[w][t][k] for t in ts if t in by.get(w, {})]
    return median(v) if v else None


print("\nsamples: %d, every worker every ~%ds; warm-up until t=%ds; measured t=%d..%ds; "
      "windows of %d samples (every second of the load's %d-s cycle seen %s)"
      % (len(times), (times[1] - times[0]) if len(times) > 1 else 0, warmup, t_start, t_end,
         nwin, LOAD_CYCLE, "once" if math.gcd(period, LOAD_CYCLE) == 1 else
         "NOT evenly: the period shares a factor with the cycle"))
print("data.mdb at 95%% of its peak from t=%d s: the first workers' spans start at t=%d s"
      % (t_full, t_first))
print("events: kill at t=%s s, reload at t=%s s; samples left out (check points): %s"
      % ("%.1f" % kill_t if kill_t is not None else "-",
         "%.1f" % reload_t if reload_t is not None else "-",
         ", ".join("t=%.0f..%.0f" % q for q in quiet) or "none"))
desc = {"first": "first worker, survived the kill, retired by the reload",
        "victim": "first worker, killed", "respawned": "respawned after the kill, "
        "retired by the reload", "reload": "started by the reload"}
print("\n%-8s %-16s %10s %10s %9s %10s %10s" % ("worker", "measure", "start", "end", "change",
                                              "lowest", "highest"))
MEASURES = ("rss_kb", "anon_kb", "heap_kb", "file_kb", "shmem_kb", "fds")
wins = {}
for w in workers:
    ts = span(w)
    if len(ts) >= 2 * nwin:
        m_ = nwin
    else:
        m_ = len(ts) // 2
    wins[w] = (ts[:m_], ts[-m_:] if m_ else [])
    print("%-8d %s: %s; span t=%s..%s s, %d samples, windows of %d"
          % (w, role.get(w, "UNKNOWN"), desc.get(role.get(w), "not a worker the events explain"),
             ts[0] if ts else "-", ts[-1] if ts else "-", len(ts), m_))
    if m_ == 0:
        continue
    for k in MEASURES:
        a, b = level(w, wins[w][0], k), level(w, wins[w][1], k)
        lo, hi = min(by[w][t][k] for t in ts), max(by[w][t][k] for t in ts)
        print("%-8s %-16s %10s %10s %+8.1f%% %10s %10s" % ("", k, a, b, change(a, b), lo, hi))

# ---- memory checks, like with like
for w in workers:
    rl = role.get(w)
    ts = span(w)
    first_win, last_win = wins[w]
    if rl in ("first", "victim"):
        if len(first_win) < 3:
            lines.append("info  worker %d (%s): %d samples in its measured span, too few to "
                         "compare" % (w, rl, len(ts)))
            continue
        a = {k: level(w, first_win, k) for k in MEASURES}
        b = {k: level(w, last_win, k) for k in MEASURES}
        what = "worker %d (%s, t=%d..%d s)" % (w, rl, ts[0], ts[-1])
        lines.append("info  %s private RSS (RssAnon) %d -> %d kB (%+.1f%%): reported, not checked%s"
                     % (what, a["anon_kb"], b["anon_kb"], change(a["anon_kb"], b["anon_kb"]),
                        "" if flat(a["anon_kb"], b["anon_kb"]) else
                        "; over %g%%: see the window medians below and bench/SOAK.md" % tol))
        if w == traced:
            lines.append("info  %s RSS %d -> %d kB, open files %d -> %d: not checked, heaptrack "
                         "runs in it" % (what, a["rss_kb"], b["rss_kb"], a["fds"], b["fds"]))
        else:
            check(flat(a["rss_kb"], b["rss_kb"]), "%s RSS (VmRSS) %d -> %d kB: flat within %g%%"
                  % (what, a["rss_kb"], b["rss_kb"], tol))
            check(b["fds"] <= a["fds"] + 2, "%s open files (not sockets) %d -> %d: no descriptor "
                  "leak" % (what, a["fds"], b["fds"]))
        check(flat(a["shmem_kb"], b["shmem_kb"]), "%s shared RSS (RssShmem) %d -> %d kB: flat "
              "within %g%%" % (what, a["shmem_kb"], b["shmem_kb"], tol))
    elif rl in ("respawned", "reload"):
        if survivor is None:
            check(False, "worker %d (%s): no surviving first worker to compare it with" % (w, rl))
            continue
        sv = span(survivor)
        if rl == "respawned":
            # the same moments in both
            common = [t for t in ts if t in sv]
            mine = theirs = common[-min(nwin, len(common)):] if common else []
            against = "the survivor %d over the same %d samples, t=%s..%s s" % (
                survivor, len(mine), mine[0] if mine else "-", mine[-1] if mine else "-")
        else:
            k_ = min(nwin, len(ts), len(sv))
            mine, theirs = (ts[-k_:], sv[-k_:]) if k_ else ([], [])
            against = ("the survivor %d's last %d samples before the reload (t=%s..%s s; its "
                       "own: t=%s..%s s)" % (survivor, k_, theirs[0] if k_ else "-",
                                             theirs[-1] if k_ else "-", mine[0] if k_ else "-",
                                             mine[-1] if k_ else "-"))
        if len(mine) < 3:
            check(False, "worker %d (%s): %d samples to compare with %s: too few"
                  % (w, rl, len(mine), against))
            continue
        a = {k: level(survivor, theirs, k) for k in MEASURES}
        b = {k: level(w, mine, k) for k in MEASURES}
        what = "worker %d (%s) against %s:" % (w, rl, against)
        lines.append("info  %s private RSS %d against %d kB (%+.1f%%)"
                     % (what, b["anon_kb"], a["anon_kb"], change(a["anon_kb"], b["anon_kb"])))
        said = ("%s RSS %d against %d kB (%+.1f%%), shared RSS %d against %d kB (%+.1f%%)"
                % (what, b["rss_kb"], a["rss_kb"], change(a["rss_kb"], b["rss_kb"]),
                   b["shmem_kb"], a["shmem_kb"], change(a["shmem_kb"], b["shmem_kb"])))
        if survivor == traced:
            # heaptrack's buffers and pipes are in the reference
            lines.append("info  %s, open files %d against %d: not checked, heaptrack runs in "
                         "the survivor" % (said, b["fds"], a["fds"]))
            continue
        check(within(a["rss_kb"], b["rss_kb"]) and within(a["shmem_kb"], b["shmem_kb"])
              and b["fds"] <= a["fds"] + 2,
              "%s: not more than %g%% above; open files %d against %d"
              % (said, tol, b["fds"], a["fds"]))
    else:
        check(False, "worker %d: not one of the workers the events explain" % w)

# the private part window by window over each worker's span: a leak climbs
# from window to window, the one-time step seen in some runs moves once
print("\nprivate RSS (RssAnon, kB), the median of each window of %d samples of each worker's span:"
      % nwin)
for w in workers:
    ts = span(w)
    ws = [ts[i:i + nwin] for i in range(0, len(ts) - nwin + 1, nwin)]
    print("%-8d %s" % (w, " ".join(str(level(w, x, "anon_kb")) for x in ws) or "(shorter than a window)"))
print()
a = next(r for r in rows if r["t"] == t_start)
b = next(r for r in rows if r["t"] == t_end)
for k in ("zone_keys", "cache_entries", "cache_file_bytes", "data_mdb_bytes"):
    print("%-8s %-16s %12s %12s" % ("-", k, a[k], b[k]))
check(b["zone_keys"] <= a["zone_keys"] * (1 + tol / 100) + 1,
      "per_key zone keys %d -> %d: flat" % (a["zone_keys"], b["zone_keys"]))
check(peak <= max_bytes, "data.mdb peak %d bytes <= max_size %d" % (peak, max_bytes))


# ---- the events' check points
def fmt(g):
    if not g:
        return "(no scrape)"
    out = []
    for z in ("backend", "per_key"):
        inf, q = g[z]["inflight"], g[z]["queue_depth"]
        out.append("%s in flight %d%s, queued %d%s" % (
            z, sum(inf.values()), " (%s)" % " ".join("%s %d" % kv for kv in inf.items() if kv[1])
            if any(inf.values()) else "", sum(q.values()),
            " (%s)" % " ".join("%s %d" % kv for kv in q.items() if kv[1]) if any(q.values()) else ""))
    return "; ".join(out)


print("\nevents:")
for kind in ("kill", "reload"):
    e = ev[kind]
    if not e:
        print("  %s: no record" % kind)
        check(False, "%s: the event ran and recorded its check point" % kind)
        continue
    held = e.get("held", [])
    ho = e.get("held_open", [])
    te = e.get("t_event")
    if kind == "kill":
        on_v = [h for h in held if h["worker"] == victim]
        print("  kill -9 at t=%.1f s of worker %s, which held %d of the %d held requests (%s); "
              "held by worker: %s" % (rel(te) if te else -1, victim, len(on_v), len(held),
                                       " ".join(h["cls"] for h in on_v),
                                       " ".join("%s:%s" % (h["cls"], h["worker"]) for h in held)))
        print("    client connections just before, by worker: %s"
              % " ".join("%s:%s" % kv for kv in sorted((e.get("conns_before") or {}).items())))
    else:
        print("  reload at t=%.1f s: class normal's queue %s -> %s places in /metrics, %s s after "
              "nginx -s reload (rc %s); new workers %s"
              % (rel(te) if te else -1, e.get("capacity_before"), e.get("capacity_after"),
                 e.get("applied_s"), e.get("reload_rc"), e.get("new_workers")))
    print("    just before: %s" % fmt(e.get("before")))
    if e.get("t_drained"):
        print("    load paused %.2f s after the event, drained %.2f s later"
              % (e["t_pause"] - te, e["t_drained"] - e["t_pause"]))
        print("    at the drain:  %s" % fmt(e.get("at_drain")))
        print("    expected:      %d held requests still open: %s, 0 queued (open: %s)"
              % (sum(e.get("expect", {}).values()),
                 " ".join("%s %d" % kv for kv in e.get("expect", {}).items()) or "none",
                 " ".join("%s:%s" % (h["cls"], "open" if o else "closed") for h, o in zip(held, ho))))
        print("    exact:         %s" % fmt(e.get("exact")))
        if e.get("exact_after_drain_s") is not None:
            print("    recovery:      exact %.3f s after the drain, %.3f s after the event; "
                  "1 s later: %s" % (e["exact_after_drain_s"], e["exact_after_event_s"],
                                     fmt(e.get("exact_1s_later"))))
        rb, ra = e.get("reaped_before") or {}, e.get("reaped_after") or {}
        print("    reaped:        %s" % ", ".join(
            "%s +%s%s" % (z, (ra.get(z) or 0) - (rb.get(z) or 0),
                          " (counted %.3f s after the kill)" % e["reaped_at"][z]
                          if z in e.get("reaped_at", {}) else "")
            for z in ("backend", "per_key")))
        print("    held closed:   %s%s" % (fmt(e.get("released")),
              " after %.3f s" % e["released_s"] if e.get("released_s") is not None else ""))
    if kind == "reload" and e.get("next_burst"):
        print("    next burst:    %s; %s normal requests rejected 503 around it"
              % (fmt(e["next_burst"]), e.get("next_burst_rejected")))
    for n_ in e.get("info", []):
        print("    info: " + n_)
    for n_ in e.get("notes", []):
        print("    FAILED: " + n_)
    if kind == "kill":
        what = ("kill: the gauges back to exactly the %d held requests still open (%s), 0 queued, "
                "within %g s of the drain" % (sum(e.get("expect", {}).values()),
                                               " ".join("%s %d" % kv for kv in e.get("expect", {}).items()),
                                               bound))
    else:
        what = ("reload (class normal's queue 256 -> %s): applied (normal %s deep at the next "
                "burst); the gauges exactly the %d held requests, 0 queued, within %g s of the "
                "drain" % (rqueue, ((e.get("next_burst") or {}).get("backend") or {}).get(
                    "queue_depth", {}).get("normal"), sum(e.get("expect", {}).values()), bound))
    if e.get("exact_after_drain_s") is not None:
        what += " (%.3f s; %.3f s after the event), still 1 s later, 0 within %g s of their closing" % (
            e["exact_after_drain_s"], e["exact_after_event_s"], bound)
    check(e.get("ok"), what)

# ---- the workers
check(victim is not None and i_kill is not None and len(respawn) == 1,
      "the killed worker %s was replaced once: %s started between the kill and the reload"
      % (victim, " ".join(map(str, respawn)) or "nothing"))
retired = sorted(set(gen0) - {victim}) + respawn
check(i_reload is not None and len(gen2) == 2 and sorted(gen2) == last_w
      and sorted(p for n, p, c in code_exits if c == 0 and n > i_reload) == sorted(retired)
      and not [x for x in code_exits if x[2] != 0],
      "the reload replaced the generation once: %s exited with code 0, %s started and are the "
      "workers at the end (%s)" % (" ".join(map(str, retired)), " ".join(map(str, gen2)),
                                   " ".join(map(str, last_w))))
check(sorted(gen0) == sorted(first_w) and len(starts) == len(gen0) + len(respawn) + len(gen2)
      and [(p, s) for n, p, s in sig_exits] == [(victim, 9)],
      "no other worker died or started: %d started, %d exited on a signal (%s), %d with code 0"
      % (len(starts), len(sig_exits), " ".join("%d:%d" % (p, s) for n, p, s in sig_exits),
         len(code_exits)))
check(master == last_master, "the same master from start to end (%s)" % master)
allowed = []
if victim:
    allowed = [r"worker process %d exited on signal 9\b" % victim,
               r'shared memory zone "(per_key|backend|llm)" was locked by %d\b' % victim]
alerts = [l for l in log_lines if re.search(r"\[(alert|crit|emerg)\]", l)]
expected = [l for l in alerts if any(re.search(a, l) for a in allowed)]
bad = [l for l in alerts if l not in expected] + [
    l for l in log_lines if "exited on signal" in l and l not in alerts]
check(not bad, "error.log: no alert, crit, emerg but the kill's own (%d expected: %s; %d other)"
      % (len(expected), "; ".join(re.sub(r"^.*?\[", "[", l) for l in expected), len(bad)))
for l in bad[:5]:
    print("   " + l.rstrip())
nerr = sum(1 for l in log_lines if "[error]" in l)
lines.append("info  error.log: %d [error] lines; the reaper's notices: %s" % (
    nerr, "; ".join(re.sub(r"^.*?\[notice\] \S+ ", "", l) for l in log_lines if "dead worker" in l)[:300]
    or "none"))

# ---- the load
load = json.load(open(loadf))
print("\nload: %d requests, %d not issued during the check points" % (load["total"], load.get("skipped", 0)))
for kind, st in sorted(load["stats"].items()):
    print("  %-8s %s" % (kind, "  ".join("%s x %d" % kv for kv in sorted(st.items()))))
sums = {}
for l in open(metricsf, errors="replace"):
    mm = re.match(r'(deepseek_guard_\w+)\{([^}]*)\} (\S+)$', l)
    if not mm:
        continue
    name, labels, v = mm.group(1), dict(re.findall(r'(\w+)="([^"]*)"', mm.group(2))), float(mm.group(3))
    if name == "deepseek_guard_requests_total":
        k = "zone %s: %s" % (labels["zone"], labels["decision"])
    elif name == "deepseek_guard_zone_reaped_total":
        k = "zone %s: reaped" % labels["zone"]
    elif name == "deepseek_guard_cache_requests_total":
        k = "cache: " + labels["status"]
    elif name.startswith("deepseek_guard_cache_") and name.endswith("_total"):
        k = "cache: " + name[len("deepseek_guard_cache_"):-len("_total")]
    else:
        continue
    sums[k] = sums.get(k, 0) + v
print("metrics at the end of the load:")
for k in sorted(sums):
    if sums[k]:
        print("  %-32s %d" % (k, sums[k]))
kt = ev["kill"]["t_event"] if ev["kill"] and ev["kill"].get("t_event") else None
cut = [x for x in load["bad"] if kt and x.get("cut") and x["start"] <= kt + 0.05
       and kt - 0.05 <= x["end"] <= kt + 1]
others = [x for x in load["bad"] if x not in cut]
check(load["nbad"] == len(cut),
      "every answer a complete 200 or a 429/503 with Retry-After, but %d cut by the kill "
      "(in flight at it, ended within 1 s): %d others" % (len(cut), load["nbad"] - len(cut)))
for x in others[:5]:
    print("   ", x)

# ---- the capacity check
try:
    cap = json.load(open(os.path.join(prefix, "cap.json")))
except (OSError, ValueError):
    cap = None
print("\ncapacity check (backend inflight=N, after the load):")
if cap:
    print("  N=%s: %s, then one more normal at %.2f s" % (cap.get("n"), " ".join(
        "%s %d" % kv for kv in (cap.get("mix") or {}).items()), cap.get("extra_at", 0)))
    print("  before:        %s" % fmt(cap.get("idle_before")))
    print("  while they ran: %s" % fmt(cap.get("mid")))
    print("  access log:    %s of %s ADMITTED with wait_ms=0; the one more %s; the mock saw %s in "
          "flight together" % (cap.get("admitted_at_once"), cap.get("n"), cap.get("extra_logged"),
                               cap.get("mock_max_inflight")))
    print("  after:         %s%s" % (fmt(cap.get("idle_after")), " (%.3f s)" % cap["idle_after_s"]
                                     if cap.get("idle_after_s") is not None else ""))
    for f in cap.get("fails", []):
        print("  FAIL: " + f)
check(cap and cap.get("ok"),
      "capacity: the backend's %s slots admit %s at once, none queued, the mock sees %s together, "
      "one more queues" % ((cap or {}).get("n"), (cap or {}).get("admitted_at_once"),
                           (cap or {}).get("mock_max_inflight")))
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
