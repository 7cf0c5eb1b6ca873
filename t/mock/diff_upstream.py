#!/usr/bin/python3
"""Deterministic HTTP/1.1 upstream of the cache differential test (t/49).

Python 3 stdlib only.  Runs until SIGTERM/SIGINT, then exits 0.

  diff_upstream.py --listen 127.0.0.1:PORT   (PORT 0 = pick a free port)
                   [--portfile FILE]  write the bound port + newline to FILE
                   [--quiet]          no log lines on stderr
  (any other option of t/mock/mock_llm.py is accepted and ignored, so
  DSG::Test::mock_start can launch this script through DSG_MOCK)

Every answer is a PURE FUNCTION of the request: never of time, of a
counter or of the order of requests.  A cache in front of this upstream can
therefore only be right if it answers each request exactly as this upstream
would have answered that request.

Request target: /d/<status>/<framing>/<kind>?<params>

  status   the status of a full answer: 200, 201, 404, 500, 503, ...
  framing  length   Content-Length
           chunked  Transfer-Encoding: chunked
           close    HTTP/1.1, Connection: close, no length: close-delimited
           http10   an HTTP/1.0 status line, no length: close-delimited
  kind     json     application/json
           sse      text/event-stream, ending with "data: [DONE]" (never
                    gzipped: LLM event streams are identity)
           text     text/plain; charset=utf-8 (Accept-Ranges: bytes on 200
                    answers to GET and HEAD, and single Range requests
                    answered 206)
  params   n=<len>   about how many bytes the identity body has (default 200)
           cut=<k>   send only the first k bytes of the body, then close
                     (an incomplete answer; no effect when k >= the length)
           cc=<c>    Cache-Control: ma = max-age=600, ma1 = max-age=1,
                     ns = no-store, pr = private, pu = public, max-age=600,
                     sm = s-maxage=600, nc = no-cache, mr = must-revalidate
           vary=<v>  ae (default) = Vary: Accept-Encoding, none = no Vary,
                     star = Vary: *, lang = Vary: Accept-Encoding,
                     Accept-Language, lang2 = the same as two Vary lines
                     (lower case); with lang and lang2 only, the body
                     depends on the request's Accept-Language
           sc=1      a Set-Cookie header
           br=1      answer brotli (a fake: "BR" + the identity body,
                     Content-Encoding: br) when Accept-Encoding lists br
                     with a q other than 0 (json and text kinds), and only
                     with a Vary that names Accept-Encoding (or *): without
                     Vary, a cache may only tell gzip from identity (its
                     normalized encoding class), so an origin that omits
                     Vary must negotiate no more than that

The body is derived from SHA-256 over the salient parts of the request:
the method (HEAD counted as GET: a HEAD gets the GET's headers), the whole
request target, the request body (its canonical JSON when it is valid JSON
without duplicate keys, else its raw bytes) and the values of the
credential headers Authorization, Api-Key, X-Api-Key and Cookie.  A
response this upstream declares shareable (cc = pu, sm or mr: RFC 9111
section 3.5 lets a shared cache store those for any credentials) does not
depend on the credentials, as such an origin must behave.

Encoding: when the request's Accept-Encoding lists gzip or x-gzip with a q
other than 0, json and text answers are gzipped (Content-Encoding: gzip,
deterministic: mtime 0), else identity (br=1: br first, see above).

Range: a valid single "bytes=a-b" or "bytes=a-" on an answer that carries
Accept-Ranges gets a 206 with Content-Range and exactly those bytes of the
representation (the gzip bytes when gzipped, as nginx's range filter
answers a Range from a full stored body); a first byte past the end gets
416.  Multi-range or malformed Range headers are ignored (200).

Anything else (no /d/ prefix, bad numbers) gets a 400 JSON answer.
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import sys
import threading

REASONS = {200: "OK", 201: "Created", 206: "Partial Content", 400: "Bad Request",
           404: "Not Found", 416: "Range Not Satisfiable",
           500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable"}
CC = {"ma": "max-age=600", "ma1": "max-age=1", "ns": "no-store", "pr": "private",
      "pu": "public, max-age=600", "sm": "s-maxage=600", "nc": "no-cache",
      "mr": "must-revalidate"}
SHAREABLE = ("pu", "sm", "mr")
CRED_HEADERS = ("authorization", "api-key", "x-api-key", "cookie")
KINDS = {"json": "application/json", "sse": "text/event-stream",
         "text": "text/plain; charset=utf-8"}
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
QUIET = False


def log(msg):
    if not QUIET:
        sys.stderr.write("diff_upstream: %s\n" % msg)
        sys.stderr.flush()


class BadRequest(Exception):
    pass


def no_dup_pairs(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("duplicate key")
        d[k] = v
    return d


def body_digest(body):
    """Canonical JSON (sorted keys, compact) when valid and free of
    duplicate keys, else the raw bytes."""
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=no_dup_pairs)
        canon = json.dumps(obj, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False).encode("utf-8")
        return b"J" + hashlib.sha256(canon).digest()
    except (ValueError, UnicodeDecodeError, RecursionError):
        return b"R" + hashlib.sha256(body).digest()


def accepts(value, codings=("gzip", "x-gzip")):
    if value is None:
        return False
    for item in value.split(","):
        parts = [p.strip() for p in item.split(";")]
        coding = parts[0].lower()
        if coding not in codings:
            continue
        q = 1.0
        for p in parts[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 1.0
        if q > 0:
            return True
    return False


def hexstream(seed, n):
    out = bytearray()
    h = seed
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h.hex().encode()
    return bytes(out[:n])


def make_body(kind, status, seed, n):
    if kind == "text":
        return hexstream(seed, max(n - 1, 0)) + b"\n"
    if kind == "json":
        head = b'{"id":"' + seed.hex()[:24].encode() + b'","status":' \
            + str(status).encode() + b',"text":"'
        fill = max(n - len(head) - 2, 8)
        return head + hexstream(seed, fill) + b'"}'
    # sse: events of ~60 bytes until n, then the [DONE] event
    out = b""
    i = 0
    h = seed
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += b'data: {"i":%d,"t":"%s"}\n\n' % (i, h.hex()[:32].encode())
        i += 1
    return out + b"data: [DONE]\n\n"


RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d+)\s*-\s*(\d*)\s*$", re.I)


def respond(method, target, headers, body):
    """-> (status line version, status, [(name, value)], body bytes,
    framing, cut or None, header_only)"""
    path, _, query = target.partition("?")
    params = {}
    for kv in query.split("&"):
        if kv:
            k, _, v = kv.partition("=")
            params[k] = v
    m = re.match(r"^/d/(\d{3})/(length|chunked|close|http10)/(json|sse|text)$", path)
    if not m:
        raise BadRequest("bad target " + target)
    status, framing, kind = int(m.group(1)), m.group(2), m.group(3)
    try:
        n = int(params.get("n", "200"))
        cut = int(params["cut"]) if "cut" in params else None
    except ValueError:
        raise BadRequest("bad number")
    if n < 0 or n > 1 << 20:
        raise BadRequest("bad n")
    cc = params.get("cc", "")
    vary = params.get("vary", "ae")

    getlike = "GET" if method == "HEAD" else method
    shareable = cc in SHAREABLE
    h = hashlib.sha256()
    h.update(getlike.encode() + b"\0" + target.encode() + b"\0")
    h.update(body_digest(body) + b"\0")
    if not shareable:
        for name in CRED_HEADERS:
            for v in headers.get(name, []):
                h.update(name.encode() + b"=" + v.encode("latin-1") + b"\0")
    if vary in ("lang", "lang2"):
        for v in headers.get("accept-language", []):
            h.update(b"lang=" + v.encode("latin-1") + b"\0")
    seed = h.digest()

    rep = make_body(kind, status, seed, n)
    out = [("Content-Type", KINDS[kind])]
    ae = ", ".join(headers.get("accept-encoding", [])) or None
    if kind != "sse" and params.get("br") == "1" and vary != "none" \
            and accepts(ae, ("br",)):
        rep = b"BR" + rep
        out.append(("Content-Encoding", "br"))
    elif kind != "sse" and accepts(ae):
        rep = gzip.compress(rep, compresslevel=6, mtime=0)
        out.append(("Content-Encoding", "gzip"))
    if vary == "ae":
        out.append(("Vary", "Accept-Encoding"))
    elif vary == "star":
        out.append(("Vary", "*"))
    elif vary == "lang":
        out.append(("Vary", "Accept-Encoding, Accept-Language"))
    elif vary == "lang2":
        out.append(("Vary", "accept-language"))
        out.append(("Vary", "accept-encoding"))
    elif vary != "none":
        raise BadRequest("bad vary")
    if cc:
        if cc not in CC:
            raise BadRequest("bad cc")
        out.append(("Cache-Control", CC[cc]))
    if params.get("sc") == "1":
        out.append(("Set-Cookie", "s=" + seed.hex()[:8] + "; Path=/"))
    out.append(("X-Up-Id", seed.hex()[:16]))

    if kind == "text" and status == 200 and getlike == "GET":
        out.append(("Accept-Ranges", "bytes"))
        rh = headers.get("range", [])
        rm = RANGE_RE.match(rh[0]) if len(rh) == 1 else None
        if rm and (rm.group(2) == "" or int(rm.group(2)) >= int(rm.group(1))):
            a = int(rm.group(1))
            b = int(rm.group(2)) if rm.group(2) != "" else len(rep) - 1
            total = len(rep)
            if a >= total:
                status = 416
                out.append(("Content-Range", "bytes */%d" % total))
                rep = b'{"error":"range not satisfiable"}'
                out[0] = ("Content-Type", "application/json")
                out = [x for x in out if x[0] != "Content-Encoding"]
            else:
                b = min(b, total - 1)
                status = 206
                out.append(("Content-Range", "bytes %d-%d/%d" % (a, b, total)))
                rep = rep[a:b + 1]

    version = "HTTP/1.0" if framing == "http10" else "HTTP/1.1"
    return (version, status, out, rep, framing, cut, method == "HEAD")


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.settimeout(30)
        try:
            self.serve(sock)
        except (OSError, BadRequest) as e:
            log("connection: %s" % e)
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                # drain what the client still sends, so close() does not
                # reset the connection under data the client has not read
                sock.settimeout(1)
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            sock.close()

    def serve(self, sock):
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
            if len(buf) > MAX_HEAD:
                raise BadRequest("header too large")
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            raise BadRequest("bad request line")
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers.setdefault(k.strip().lower(), []).append(v.strip())
        body = rest
        te = ",".join(headers.get("transfer-encoding", [])).lower()
        if "chunked" in te:
            body = self.read_chunked(sock, rest)
        else:
            cl = int((headers.get("content-length") or ["0"])[0])
            if cl > MAX_BODY:
                raise BadRequest("body too large")
            while len(body) < cl:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                body += chunk
            body = body[:cl]

        try:
            version, status, hdrs, rep, framing, cut, header_only = \
                respond(method, target, headers, body)
        except BadRequest as e:
            rep = json.dumps({"error": str(e)}).encode()
            version, status, framing, cut, header_only = \
                "HTTP/1.1", 400, "length", None, method == "HEAD"
            hdrs = [("Content-Type", "application/json")]

        send = rep
        if cut is not None and cut < len(rep):
            send = rep[:cut]
        out = ["%s %d %s" % (version, status, REASONS.get(status, "Status"))]
        out += ["%s: %s" % kv for kv in hdrs]
        if framing == "length":
            out.append("Content-Length: %d" % len(rep))
        elif framing == "chunked":
            out.append("Transfer-Encoding: chunked")
        out.append("Connection: close")
        data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
        if not header_only:
            if framing == "chunked":
                for i in range(0, len(send), 97):
                    piece = send[i:i + 97]
                    data += b"%x\r\n%s\r\n" % (len(piece), piece)
                if send is rep:
                    data += b"0\r\n\r\n"
            else:
                data += send
        sock.sendall(data)

    @staticmethod
    def read_chunked(sock, buf):
        body = b""
        while True:
            while b"\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BadRequest("eof in chunk size")
                buf += chunk
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                return body
            while len(buf) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BadRequest("eof in chunk")
                buf += chunk
            body += buf[:size]
            buf = buf[size + 2:]
            if len(body) > MAX_BODY:
                raise BadRequest("body too large")


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def main():
    global QUIET
    ap = argparse.ArgumentParser(description="deterministic upstream of t/49")
    ap.add_argument("--listen", required=True, help="HOST:PORT, port 0 picks a free one")
    ap.add_argument("--portfile")
    ap.add_argument("--quiet", action="store_true")
    args, _ = ap.parse_known_args()
    QUIET = args.quiet
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        sys.exit("diff_upstream: --listen wants HOST:PORT")
    srv = Server((host or "127.0.0.1", int(port)), Handler)
    bound = srv.server_address[1]
    if args.portfile:
        with open(args.portfile + ".tmp", "w") as f:
            f.write("%d\n" % bound)
        os.replace(args.portfile + ".tmp", args.portfile)

    def stop(_sig, _frm):
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log("listening on %s:%d" % (host, bound))
    srv.serve_forever(poll_interval=0.1)
    srv.server_close()
    log("stopped")


if __name__ == "__main__":
    main()
