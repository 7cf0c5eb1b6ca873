#!/usr/bin/python3
"""Closed-loop HTTP client of the `queue` benchmark.

Python 3.11 stdlib only (epoll and non-blocking sockets, no asyncio: about
1 KB per connection).  Keeps --requests requests outstanding at all times:
when an answer is complete the next request goes out at once, after
--think seconds, or after --backoff seconds when the answer was not a 200
(a refusal must not become a busy loop).  A connection that the server
closes, or that fails, is opened again after --backoff, with its requests.
No request timeout: a queued request may wait minutes.

  qclient.py --port PORT --requests N --status FILE
             [--h2 --streams K] [--host 127.0.0.1]
             [--path /v1/chat/completions] [--src 127.0.0.2,...]
             [--think 0.005] [--backoff 0.2] [--max-connecting 256]

  HTTP/1.1 (default)  one keep-alive connection per request.
  --h2                HTTP/2 over cleartext (prior knowledge, as nginx's
                      `listen ... http2` without TLS wants it): K concurrent
                      streams per connection, so N requests need N/K
                      connections.  The client sends its SETTINGS (no push,
                      stream windows of 2^31-1) and opens the connection
                      window, answers SETTINGS and PING, and reads only
                      :status (the first field nginx encodes: indexed, or a
                      literal of 3 raw digits).
  --src               source addresses, round-robin over the connections:
                      each socket is bound to one (IP_BIND_ADDRESS_NO_PORT,
                      the port is picked at connect time, per destination).
                      Tens of thousands of connections from 127.0.0.1 would
                      take every ephemeral port of 127.0.0.1, and other
                      programs on the machine could not bind one.
  --think             the pause before the next request after a 200: the
                      guard admits the head of its queue on a 3 ms timer
                      tick, so a request sent the instant a slot frees can
                      find the queue still full and be refused.

Every request is "GET <path>" without a body (the benchmark's nginx turns it
into the POST the upstream wants).  Runs until SIGTERM or SIGINT.  FILE is
rewritten (atomically) every 0.5 s and at exit with a JSON object: pid,
requests (the target), conns (connections wanted), open (connected),
connecting, outstanding (requests sent and not answered), responses
({status: count} since start), reconnects, errors ({kind: count}), t (unix
time of the snapshot).
"""
import argparse
import collections
import errno
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import time

CONNECTING, OPEN = 0, 1
CLEN = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_STATIC_STATUS = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404",
                    14: "500"}
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
FRAME = struct.Struct(">IBI")   # (length << 8 | type), flags, stream id


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + \
        struct.pack(">I", sid) + payload


def hpack_literal(index, value):
    """Literal header field without indexing, indexed name, raw value."""
    v = value.encode()
    assert index < 15 and len(v) < 127
    return bytes((index, len(v))) + v


class Conn:
    __slots__ = ("sock", "fd", "state", "buf", "dest", "quota", "out",
                 "next_sid", "streams", "consumed")


def main():
    ap = argparse.ArgumentParser(description="closed-loop HTTP client")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--status", required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--h2", action="store_true")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--src", default="")
    ap.add_argument("--think", type=float, default=0.005)
    ap.add_argument("--backoff", type=float, default=0.2)
    ap.add_argument("--max-connecting", type=int, default=256)
    a = ap.parse_args()
    srcs = [x for x in a.src.split(",") if x]
    no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
    per = a.streams if a.h2 else 1
    nconns = -(-a.requests // per)

    want = nconns + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    req1 = ("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (a.path, a.host)).encode()
    block = (b"\x82\x86" + hpack_literal(4, a.path) + hpack_literal(1, a.host))
    h2_open = (H2_PREFACE
               + frame(SETTINGS, 0, 0, struct.pack(">HIHI", 2, 0, 4, 0x7fffffff))
               + frame(8, 0, 0, struct.pack(">I", 0x7fffffff - 65535)))

    ep = select.epoll(nconns + 16)
    conns = {}
    todo = collections.deque()       # (due, (port, src, quota)): to open
    think = collections.deque()      # (due, conn): one request to send
    backoff = collections.deque()    # (due, conn): one request to send
    for i in range(nconns):
        q = min(per, a.requests - i * per)
        todo.append((0.0, (a.port, srcs[i % len(srcs)] if srcs else None, q)))
    st = {"responses": collections.Counter(), "errors": collections.Counter(),
          "reconnects": 0, "connecting": 0, "outstanding": 0}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    def write_status():
        snap = {"pid": os.getpid(), "requests": a.requests, "conns": nconns,
                "open": len(conns) - st["connecting"], "connecting": st["connecting"],
                "outstanding": st["outstanding"], "responses": dict(st["responses"]),
                "reconnects": st["reconnects"], "errors": dict(st["errors"]),
                "t": time.time()}
        tmp = a.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, a.status)

    def drop(c, kind):
        if kind:
            st["errors"][kind] += 1
        if c.state == CONNECTING:
            st["connecting"] -= 1
        st["outstanding"] -= c.out
        conns.pop(c.fd, None)
        try:
            ep.unregister(c.fd)
        except OSError:
            pass
        c.sock.close()
        c.fd = -1
        st["reconnects"] += 1
        todo.append((time.monotonic() + a.backoff, c.dest))

    def write(c, data):
        try:
            n = c.sock.send(data)
        except OSError as e:
            drop(c, errno.errorcode.get(e.errno, "send"))
            return False
        if n != len(data):
            drop(c, "short send")
            return False
        return True

    def send(c):
        """One more request on c."""
        if c.fd < 0:
            return
        if a.h2:
            sid = c.next_sid
            if sid > 0x7ffffff0:
                drop(c, None)
                return
            c.next_sid += 2
            if not write(c, frame(HEADERS, END_STREAM | END_HEADERS, sid, block)):
                return
            c.streams[sid] = None
        elif not write(c, req1):
            return
        c.out += 1
        st["outstanding"] += 1

    def answered(c, status):
        st["responses"][status] += 1
        c.out -= 1
        st["outstanding"] -= 1
        if status == "200":
            think.append((time.monotonic() + a.think, c))
        else:
            backoff.append((time.monotonic() + a.backoff, c))

    def open_one(dest):
        port, src, quota = dest
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            if src:
                s.setsockopt(socket.IPPROTO_IP, no_port, 1)
                s.bind((src, 0))
            err = s.connect_ex((a.host, port))
        except OSError as e:
            err = e.errno
        if err not in (0, errno.EINPROGRESS):
            s.close()
            st["errors"][errno.errorcode.get(err, str(err))] += 1
            todo.append((time.monotonic() + a.backoff, dest))
            return
        c = Conn()
        c.sock, c.fd, c.state, c.buf, c.dest = s, s.fileno(), CONNECTING, bytearray(), dest
        c.quota, c.out, c.next_sid, c.streams, c.consumed = quota, 0, 1, {}, 0
        conns[c.fd] = c
        st["connecting"] += 1
        ep.register(c.fd, select.EPOLLOUT)

    def connected(c):
        st["connecting"] -= 1
        c.state = OPEN
        ep.modify(c.fd, select.EPOLLIN)
        if a.h2 and not write(c, h2_open):
            return
        for _ in range(c.quota):
            send(c)

    def on_h1(c):
        buf = c.buf
        while True:
            e = buf.find(b"\r\n\r\n")
            if e < 0:
                return
            head = bytes(buf[:e + 2])
            m = CLEN.search(head)
            end = e + 4 + (int(m.group(1)) if m else 0)
            if len(buf) < end:
                return
            del buf[:end]
            answered(c, head[9:12].decode("latin-1"))
            if CLOSE.search(head):
                drop(c, None)
                return

    def on_h2(c):
        buf = c.buf
        while len(buf) >= 9:
            word, flags, sid = FRAME.unpack_from(buf)
            length, ftype = word >> 8, word & 0xff
            if len(buf) < 9 + length:
                return
            p = bytes(buf[9:9 + length])
            del buf[:9 + length]
            sid &= 0x7fffffff
            if ftype == SETTINGS:
                if not flags & ACK and not write(c, frame(SETTINGS, ACK, 0)):
                    return
            elif ftype == PING:
                if not flags & ACK and not write(c, frame(PING, ACK, 0, p)):
                    return
            elif ftype == GOAWAY:
                drop(c, "goaway")
                return
            elif sid in c.streams:
                if ftype == HEADERS and c.streams[sid] is None:
                    i = 1 if flags & PADDED else 0
                    i += 5 if flags & PRIORITY else 0
                    c.streams[sid] = h2_status(p[i:])
                elif ftype == DATA:
                    c.consumed += length
                elif ftype == RST_STREAM:
                    st["errors"]["rst_stream"] += 1
                    del c.streams[sid]
                    c.out -= 1
                    st["outstanding"] -= 1
                    backoff.append((time.monotonic() + a.backoff, c))
                    continue
                if flags & END_STREAM and ftype in (HEADERS, DATA):
                    answered(c, c.streams.pop(sid) or "???")
            if c.consumed > 1 << 30:
                if not write(c, frame(8, 0, 0, struct.pack(">I", c.consumed))):
                    return
                c.consumed = 0

    def h2_status(block):
        if not block:
            return None
        b0 = block[0]
        if b0 & 0x80:
            return H2_STATIC_STATUS.get(b0 & 0x7f, "?%d" % (b0 & 0x7f))
        # a literal with name index 8 (:status): 0x48, 0x08 or 0x18
        if b0 & 0x0f == 8 and len(block) >= 5 and block[1] == 3:
            return block[2:5].decode("latin-1")
        return "?"

    def on_data(c):
        try:
            d = c.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            drop(c, errno.errorcode.get(e.errno, "recv"))
            return
        if not d:
            drop(c, "closed by server" if c.out else None)
            return
        c.buf += d
        if a.h2:
            on_h2(c)
        else:
            on_h1(c)

    def due(dq, now):
        while dq and dq[0][0] <= now:
            c = dq.popleft()[1]
            if conns.get(c.fd) is c:
                send(c)

    last = 0.0
    while not stop:
        now = time.monotonic()
        while todo and st["connecting"] < a.max_connecting and todo[0][0] <= now:
            open_one(todo.popleft()[1])
        due(think, now)
        due(backoff, now)
        if now - last >= 0.5:
            write_status()
            last = now
        wait = 0.05
        for dq in (think, backoff):
            if dq:
                wait = min(wait, max(0.0, dq[0][0] - now))
        if todo and st["connecting"] < a.max_connecting:
            wait = min(wait, max(0.0, todo[0][0] - now))
        try:
            events = ep.poll(wait, 4096)
        except InterruptedError:
            continue
        for fd, ev in events:
            c = conns.get(fd)
            if c is None:
                continue
            if c.state == CONNECTING:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err or ev & (select.EPOLLERR | select.EPOLLHUP):
                    drop(c, errno.errorcode.get(err, "connect"))
                    continue
                connected(c)
            else:
                on_data(c)
    write_status()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
