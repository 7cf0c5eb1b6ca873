#!/usr/bin/python3
"""Open-loop HTTP load generator for the ngx_deepseek_guard_module benchmarks.

Python 3.11 stdlib only.  Arrivals are scheduled at fixed times
(t0 + i / rate) before the run starts and fire whether or not earlier
requests were answered: a slow or stuck server does not slow the offered
load down (no coordinated omission).  Every request has its own TCP
connection (Connection: close), as independent clients would.

  loadgen.py --port PORT [--host 127.0.0.1] [--path /v1/chat/completions]
             --rate R (--duration S | --count N)
             [--class NAME:WEIGHT:KEY[,KEY...]] ...   (repeatable)
             [--method POST|GET] [--prompt TEXT] [--same-body]
             [--timeout S] [--out FILE] [--quiet]

  --class     request classes, interleaved by weight (smooth weighted round
              robin, so 1:4 gives exactly 20% / 80% in every window of 5);
              each request of a class sends "Authorization: Bearer KEY",
              rotating over the class's keys.  Default: one class "all".
  --prompt    the user message; "<prompt> #<i>" unless --same-body, which
              sends the identical body every time (coalescing tests).
  --out       one JSON object per request, one per line:
                i, cls, sched (s after t0), start (s after t0, when the
                request was launched), status (0: no response), retry_after
                (header value or null), cache (X-Cache-Status or null),
                end (s after t0), lat_ms (end - sched), bytes, err
  stdout      a JSON summary: scheduled, sent, completed, errors, statuses,
              max_inflight, lateness_ms (start - sched: p50/p99/max),
              achieved_rate (1 / slope of a least-squares fit of the launch
              times against i), wall_s

Every request carries "X-Req-Id: <i>" so server logs can be joined with the
records.
"""
import argparse
import asyncio
import json
import resource
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def parse_class(spec):
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise argparse.ArgumentTypeError("--class wants NAME:WEIGHT:KEY[,KEY...]")
    try:
        weight = int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError("--class weight must be an integer") from None
    if weight <= 0:
        raise argparse.ArgumentTypeError("--class weight must be > 0")
    return {"name": parts[0], "weight": weight, "keys": parts[2].split(",")}


def class_sequence(classes, n):
    """Smooth weighted round robin: class of each of n arrivals."""
    total = sum(c["weight"] for c in classes)
    cur = [0] * len(classes)
    seq = []
    for _ in range(n):
        for k, c in enumerate(classes):
            cur[k] += c["weight"]
        best = max(range(len(classes)), key=lambda k: cur[k])
        cur[best] -= total
        seq.append(best)
    return seq


def percentile(values, p):
    """Nearest-rank percentile of a list (p in 0..100); None if empty."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


class LoadGen:
    def __init__(self, args):
        self.a = args
        self.classes = args.classes or [{"name": "all", "weight": 1, "keys": [""]}]
        self.records = []
        self.inflight = 0
        self.max_inflight = 0
        self.sent = 0
        self.key_turn = [0] * len(self.classes)

    def build(self, i, ci):
        a = self.a
        c = self.classes[ci]
        key = c["keys"][self.key_turn[ci] % len(c["keys"])]
        self.key_turn[ci] += 1
        lines = ["%s %s HTTP/1.1" % (a.method, a.path),
                 "Host: %s:%d" % (a.host, a.port),
                 "X-Req-Id: %d" % i,
                 "Connection: close"]
        if key:
            lines.append("Authorization: Bearer " + key)
        body = b""
        if a.method == "POST":
            content = a.prompt if a.same_body else "%s #%d" % (a.prompt, i)
            body = json.dumps({"model": "deepseek-chat",
                               "messages": [{"role": "user", "content": content}]},
                              separators=(",", ":")).encode()
            lines.append("Content-Type: application/json")
            lines.append("Content-Length: %d" % len(body))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def one(self, i, ci, sched, t0):
        loop = asyncio.get_running_loop()
        start = loop.time()
        rec = {"i": i, "cls": self.classes[ci]["name"], "sched": round(sched - t0, 6),
               "start": round(start - t0, 6), "status": 0, "retry_after": None,
               "cache": None, "end": None, "lat_ms": None, "bytes": 0, "err": None}
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        writer = None
        try:
            req = self.build(i, ci)
            async with asyncio.timeout(self.a.timeout):
                reader, writer = await asyncio.open_connection(self.a.host, self.a.port)
                writer.write(req)
                await writer.drain()
                self.sent += 1
                chunks = []
                while True:
                    data = await reader.read(262144)
                    if not data:
                        break
                    chunks.append(data)
            raw = b"".join(chunks)
            rec["bytes"] = len(raw)
            self.parse(raw, rec)
        except asyncio.TimeoutError:
            rec["err"] = "timeout"
        except (ConnectionError, OSError) as e:
            rec["err"] = type(e).__name__
        finally:
            if writer is not None:
                writer.transport.abort()
            self.inflight -= 1
            end = loop.time()
            rec["end"] = round(end - t0, 6)
            rec["lat_ms"] = round((end - sched) * 1000, 3)
            self.records.append(rec)

    @staticmethod
    def parse(raw, rec):
        head, sep, _ = raw.partition(b"\r\n\r\n")
        if not sep:
            rec["err"] = "incomplete"
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            rec["err"] = "bad status line"
            return
        rec["status"] = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "retry-after":
                rec["retry_after"] = value.strip()
            elif name == "x-cache-status":
                rec["cache"] = value.strip()

    async def run(self):
        a = self.a
        loop = asyncio.get_running_loop()
        n = a.count if a.count is not None else int(round(a.rate * a.duration))
        seq = class_sequence(self.classes, n)
        tasks = set()
        t0 = loop.time() + 0.05
        wall0 = time.time()

        def launch(i, sched):
            t = loop.create_task(self.one(i, seq[i], sched, t0))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        # every arrival is on the timer heap before the first one fires
        for i in range(n):
            sched = t0 + i / a.rate
            loop.call_at(sched, launch, i, sched)

        last = t0 + (n - 1) / a.rate if n else t0
        await asyncio.sleep(max(0.0, last - loop.time()) + 0.001)
        while tasks or len(self.records) + len(tasks) < n:
            if tasks:
                await asyncio.wait(set(tasks))
            else:
                await asyncio.sleep(0.001)
        return n, time.time() - wall0

    def summary(self, n, wall):
        recs = sorted(self.records, key=lambda r: r["i"])
        late = [(r["start"] - r["sched"]) * 1000 for r in recs]
        starts = [r["start"] for r in recs]
        statuses = {}
        for r in recs:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        # the sustained launch rate: 1 / slope of the least-squares line
        # through (i, launch time), so one late arrival at either end does
        # not move it much
        rate = None
        if len(recs) > 2:
            idx = [r["i"] for r in recs]
            mi, ms = sum(idx) / len(idx), sum(starts) / len(starts)
            var = sum((i - mi) ** 2 for i in idx)
            cov = sum((i - mi) * (s - ms) for i, s in zip(idx, starts))
            if var > 0 and cov > 0:
                rate = var / cov
        return {
            "scheduled": n,
            "sent": self.sent,
            "completed": sum(1 for r in recs if r["status"]),
            "errors": sum(1 for r in recs if r["err"]),
            "statuses": statuses,
            "max_inflight": self.max_inflight,
            "lateness_ms": {"p50": percentile(late, 50), "p99": percentile(late, 99),
                            "max": max(late) if late else None},
            "achieved_rate": rate,
            "configured_rate": self.a.rate,
            "wall_s": wall,
        }


def main():
    ap = argparse.ArgumentParser(description="open-loop HTTP load generator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--rate", type=float, required=True, help="arrivals per second")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--duration", type=float, help="seconds of arrivals")
    g.add_argument("--count", type=int, help="number of arrivals")
    ap.add_argument("--class", dest="classes", type=parse_class, action="append")
    ap.add_argument("--method", default="POST", choices=("POST", "GET"))
    ap.add_argument("--prompt", default="hello")
    ap.add_argument("--same-body", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--out")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if a.rate <= 0:
        ap.error("--rate must be > 0")
    raise_nofile()
    gen = LoadGen(a)
    n, wall = asyncio.run(gen.run())
    if a.out:
        with open(a.out, "w") as f:
            for r in sorted(gen.records, key=lambda r: r["i"]):
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
    s = gen.summary(n, wall)
    print(json.dumps(s, sort_keys=True))
    if not a.quiet:
        print("loadgen: %d scheduled, %d sent, %d answered, %d errors, "
              "max in flight %d, lateness p99 %.1f ms" % (
                  s["scheduled"], s["sent"], s["completed"], s["errors"],
                  s["max_inflight"], s["lateness_ms"]["p99"] or 0), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
