#!/usr/bin/python3
"""Mock of an overloaded OpenAI-compatible LLM backend (DeepSeek-like) for tests.

Python 3.11 stdlib only.  Runs until SIGTERM/SIGINT, then exits 0.

  mock_llm.py --listen 127.0.0.1:PORT   (PORT 0 = pick a free port)
              [--portfile FILE]     write the bound port + newline to FILE
              [--capacity N]        max concurrent chat requests, then 503 (0 = unlimited)
              [--first-token-ms MS] latency before the first token / JSON answer (50)
              [--token-ms MS]       delay between streamed tokens (10)
              [--tokens N]          tokens per answer without max_tokens (8)
              [--quiet]             no log lines on stderr

Endpoints:
  POST /v1/chat/completions  deterministic answer from sha256(body); "stream":true
                             gives SSE.  Test headers: X-Mock-Status, X-Mock-Delay-Ms,
                             X-Mock-Token-Ms, X-Mock-Abort-After, X-Mock-Header
                             ("Name: value", repeatable), X-Mock-Pad,
                             X-Mock-Gzip, X-Mock-Close-Delimited (see below).
                             Usage counts: see "Tokens and usage" below.
  GET  /v1/models            one model, "deepseek-chat"
  GET  /stats                counters (requests, chat_requests, completed, inflight,
                             max_inflight, rejected_503, forced_errors, aborted_by_mock,
                             client_aborts, cut_by_mock, bodies{sha256: count},
                             tokens, tokens_by_key: see "Tokens and usage")
  POST /stats/reset          zero the counters
  GET|POST /admin/config     read / change capacity, first_token_ms, token_ms, tokens,
                             force_status (0 = off)

Test headers of a non-streamed 200 chat answer (both may be combined):
  X-Mock-Gzip: 1            the answer carries "Vary: Accept-Encoding"; when the
                            request's Accept-Encoding accepts gzip (a "gzip" or
                            "x-gzip" coding whose q is not 0) its body is
                            gzip-compressed (mtime 0: the same bytes every time)
                            with "Content-Encoding: gzip" and the Content-Length of
                            the compressed bytes.  Any other value: no effect.
  X-Mock-Close-Delimited: N the answer is close-delimited: no Content-Length, no
                            Transfer-Encoding, "Connection: close"; the mock sends
                            the first N bytes of the body (the whole body when
                            N <= 0 or N >= its length), then closes the connection
                            gracefully (FIN), as a complete answer would end.
                            Counted in "cut_by_mock" when N cut the body, else in
                            "completed".  Ignored with X-Mock-Abort-After.

Tokens and usage (the mock's own tokenizer: nothing else should know it):
  Tokenizer.  Whitespace (Unicode, Python's re "\s") separates tokens and is
    not one.  A token is either
      - a run of ASCII letters and digits, where single hyphens between two
        such runs join them: "Hello", "42", "well-known", "tok0-1a2b3c4d" are
        one token each, or
      - any other single character (code point): an ASCII punctuation or
        symbol ("," "!" "-" alone), a control character, or any non-ASCII
        character (each CJK character, accented letter or emoji code point
        is one token).
    Regex: [A-Za-z0-9]+(?:-[A-Za-z0-9]+)*|\S.  "Hello, world!" = 4 tokens
    (Hello , world !), "a--b" = 4, "你好" = 2, "café" = 2, "" = 0.
  prompt_tokens = 3 per request + for each element of "messages": 3 + the
    tokens of its "content": a string content is tokenized as a whole; of a
    list content, every part that is an object with a string "text" is
    tokenized on its own and the counts are added.  Other contents (and the
    role, name, model, tools...) count nothing.  No "messages" list: 3.
  completion_tokens = the tokens of the generated text.  The generator writes
    N pieces "tok<i>-<first 8 hex digits of sha256(body)> " and each piece is
    one token, so completion_tokens = N: "max_completion_tokens" (when a
    positive integer), else "max_tokens" (when a positive integer), else the
    configured "tokens".  total_tokens = prompt_tokens + completion_tokens.
  A JSON answer always carries "usage": {"prompt_tokens", "completion_tokens",
    "total_tokens"}.
  SSE: with "stream_options": {"include_usage": true} every chunk carries
    "usage": null, and after the chunk with the finish_reason one more chunk
    {"id", "object": "chat.completion.chunk", "created", "model",
    "choices": [], "usage": {...}} comes before "data: [DONE]" (OpenAI's
    behaviour).  Without include_usage the chunks have no "usage" key and there
    is no usage chunk.  A stream cut (X-Mock-Abort-After, or the client going
    away) never sends the usage chunk.  "stream_options" (not null) in a
    request whose "stream" is not true, or a "stream_options" that is not an
    object, is answered 400 invalid_request_error (as DeepSeek does).
  /stats "tokens": {"prompt", "completion"} summed over completed 200 answers
    (a JSON answer sent whole, or a stream sent to its "data: [DONE]").
    "tokens_by_key": {<Authorization header value, "" when absent>:
    {"prompt", "completion", "requests"} of those completed answers, plus of
    the streams cut after their head was sent (by X-Mock-Abort-After or by the
    client): "cut" (how many), "cut_prompt" (their prompt tokens) and
    "completion_delivered" (the content tokens written to the connection
    before the cut)}.  A cut JSON answer counts in none of them.

Example:
  curl -sN -H 'Content-Type: application/json' \\
       -d '{"stream":true,"messages":[{"role":"user","content":"hi"}]}' \\
       http://127.0.0.1:PORT/v1/chat/completions
"""
import argparse
import asyncio
import gzip
import hashlib
import json
import os
import re
import resource
import signal
import sys
from http import HTTPStatus

CREATED = 1700000000
MAX_LINE = 64 * 1024
MAX_HEADERS = 200
MAX_BODY = 64 * 1024 * 1024
BUF_HIGH = 1024 * 1024
BUSY_MSG = "Server is busy, please try again later."
ERR_KINDS = {400: ("invalid_request_error", "invalid_request"),
             401: ("authentication_error", "invalid_api_key"),
             402: ("invalid_request_error", "insufficient_balance"),
             429: ("rate_limit_error", "rate_limit_exceeded"),
             503: ("server_error", "server_busy")}
COUNTERS = ("requests", "chat_requests", "completed", "inflight", "max_inflight",
            "rejected_503", "forced_errors", "aborted_by_mock", "client_aborts",
            "cut_by_mock")
CONFIG_KEYS = ("capacity", "first_token_ms", "token_ms", "tokens", "force_status")
TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*|\S")
REQ_OVERHEAD = 3                    # prompt tokens of every request
MSG_OVERHEAD = 3                    # prompt tokens of every message


def dumps(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def err_body(message, etype, code):
    return dumps({"error": {"message": message, "type": etype, "code": code}})


def forced_err_body(status):
    etype, code = ERR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error",
                 "mock_status_%d" % status))
    msg = BUSY_MSG if status == 503 else "Mock forced error status %d" % status
    return err_body(msg, etype, code)


def count_tokens(text):
    """Tokens of text by the mock's tokenizer (see the module docstring)."""
    return sum(1 for _ in TOKEN_RE.finditer(text))


def count_prompt(data):
    """prompt_tokens of a request body (a dict): overheads + message contents."""
    msgs = data.get("messages")
    n = REQ_OVERHEAD
    for m in msgs if isinstance(msgs, list) else ():
        n += MSG_OVERHEAD
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            n += count_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    n += count_tokens(part["text"])
    return n


def positive_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) \
        and value > 0 else None


def accepts_gzip(value):
    """True when an Accept-Encoding value accepts gzip (gzip or x-gzip, q != 0)."""
    for item in value.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


def as_int(value, default):
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


class ClientGone(Exception):       # the peer closed or reset the connection
    pass


class BadRequest(Exception):       # malformed HTTP request: answer 400 and close
    pass


class MockAbort(Exception):        # X-Mock-Abort-After: drop the connection on purpose
    pass


class Request:
    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version = method, target, version
        self.path = target.split("?", 1)[0]
        self.headers = headers          # list of (lowercase name, value)
        self.body = b""
        self.status = 0
        self.sse = None                 # a stream's usage record once its head is sent
        conn_tokens = [t.strip().lower() for t in self.get("connection", "").split(",")]
        self.keep_alive = version == "HTTP/1.1" and "close" not in conn_tokens

    def get(self, name, default=""):
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def get_all(self, name):
        return [v for k, v in self.headers if k == name]


class Conn:
    """Buffered connection.  A pump task reads the socket all the time, so a
    client that goes away is noticed at once, even while we are sleeping."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.eof = False
        self.gone = asyncio.get_running_loop().create_future()
        self.more = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self):
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.buf += data
                self.more.set()
                if len(self.buf) > BUF_HIGH:
                    self.room.clear()
                    await self.room.wait()
        except Exception:
            pass
        finally:
            self.eof = True
            self.more.set()
            if not self.gone.done():
                self.gone.set_result(None)

    async def _wait_more(self):
        if self.eof:
            raise ClientGone()
        self.more.clear()
        self.room.set()                 # the parser wants more: let the pump run
        await self.more.wait()

    def _take(self, n):
        data = bytes(self.buf[:n])
        del self.buf[:n]
        if len(self.buf) <= BUF_HIGH:
            self.room.set()
        return data

    async def readline(self, allow_eof=False):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                return self._take(i + 1)
            if len(self.buf) > MAX_LINE:
                raise BadRequest("line too long")
            if self.eof and allow_eof and not self.buf:
                return None
            await self._wait_more()

    async def readexactly(self, n):
        while len(self.buf) < n:
            await self._wait_more()
        return self._take(n)

    async def read_request(self):
        while True:
            line = await self.readline(allow_eof=True)
            if line is None:
                return None
            if line.strip():
                break
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
            raise BadRequest("bad request line")
        headers = []
        while True:
            line = await self.readline()
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip() or len(headers) >= MAX_HEADERS:
                raise BadRequest("bad header")
            headers.append((name.lower(), value.strip()))
        req = Request(parts[0], parts[1], parts[2], headers)
        te = req.get("transfer-encoding").lower()
        clen = req.get("content-length")
        if te or clen:
            if req.version == "HTTP/1.1" and "100-continue" in req.get("expect").lower():
                await self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if te:
            if te.split(",")[-1].strip() != "chunked":
                raise BadRequest("unsupported transfer-encoding")
            req.body = await self.read_chunked()
        elif clen:
            n = as_int(clen, -1)
            if n < 0 or n > MAX_BODY:
                raise BadRequest("bad content-length")
            req.body = await self.readexactly(n)
        return req

    async def read_chunked(self):
        body = bytearray()
        while True:
            line = await self.readline()
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size < 0:
                raise BadRequest("bad chunk size")
            if size == 0:
                break
            body += await self.readexactly(size)
            if len(body) > MAX_BODY:
                raise BadRequest("body too large")
            if (await self.readline()).strip():
                raise BadRequest("bad chunk end")
        while (await self.readline()).strip():      # trailers
            pass
        return bytes(body)

    async def write(self, data):
        if self.gone.done() or self.writer.transport.is_closing():
            raise ClientGone()
        self.writer.write(data)
        await self.writer.drain()

    async def sleep(self, ms):
        if ms > 0 and not self.gone.done():
            await asyncio.wait((self.gone,), timeout=ms / 1000.0)
        if self.gone.done():
            raise ClientGone()

    def close(self, graceful):
        self.pump.cancel()
        if graceful:
            self.writer.close()         # flushes what is buffered, then FIN
        else:
            self.writer.transport.abort()


class Mock:
    def __init__(self, args):
        self.cfg = {"capacity": args.capacity, "first_token_ms": args.first_token_ms,
                    "token_ms": args.token_ms, "tokens": args.tokens, "force_status": 0}
        self.quiet = args.quiet
        self.tasks = set()
        self.st = {}
        self.reset(0)

    def reset(self, inflight):
        self.st = dict.fromkeys(COUNTERS, 0)
        self.st["inflight"] = self.st["max_inflight"] = inflight
        self.st["bodies"] = {}
        self.st["tokens"] = {"prompt": 0, "completion": 0}
        self.st["tokens_by_key"] = {}

    def key_stats(self, key):
        return self.st["tokens_by_key"].setdefault(key, {
            "prompt": 0, "completion": 0, "requests": 0,
            "cut": 0, "cut_prompt": 0, "completion_delivered": 0})

    def count_done(self, key, prompt, completion):
        """A completed 200 answer: count its usage."""
        self.st["tokens"]["prompt"] += prompt
        self.st["tokens"]["completion"] += completion
        ks = self.key_stats(key)
        ks["prompt"] += prompt
        ks["completion"] += completion
        ks["requests"] += 1

    def count_cut(self, req):
        """A stream cut after its head was sent: count what it delivered."""
        if req.sse is None:
            return
        key, prompt, delivered = req.sse
        req.sse = None
        ks = self.key_stats(key)
        ks["cut"] += 1
        ks["cut_prompt"] += prompt
        ks["completion_delivered"] += delivered[0]

    def log(self, msg):
        if not self.quiet:
            print("mock_llm: " + msg, file=sys.stderr, flush=True)

    # ---- HTTP plumbing -------------------------------------------------
    def head(self, req, status, headers, length=None, chunked=False):
        req.status = status
        keep = req.keep_alive and (length is not None or chunked)
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = ["HTTP/1.1 %d %s" % (status, reason), "Server: mock-llm"]
        lines += ["%s: %s" % kv for kv in headers]
        if length is not None:
            lines.append("Content-Length: %d" % length)
        elif chunked:
            lines.append("Transfer-Encoding: chunked")
        lines.append("Connection: " + ("keep-alive" if keep else "close"))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), keep

    @staticmethod
    def merge(defaults, extra):
        names = {k.lower() for k, _ in extra}
        return [kv for kv in defaults if kv[0].lower() not in names] + extra

    async def send(self, conn, req, status, body, extra=()):
        data, keep = self.head(req, status, self.merge(
            [("Content-Type", "application/json")], list(extra)), len(body))
        await conn.write(data + body)
        return keep

    async def handle(self, reader, writer):
        task = asyncio.current_task()
        self.tasks.add(task)
        conn = Conn(reader, writer)
        graceful = True
        try:
            while True:
                req = await conn.read_request()
                if req is None:
                    break
                keep = await self.dispatch(conn, req)
                self.log('"%s %s %s" %d' % (req.method, req.target, req.version, req.status))
                if not keep:
                    break
        except BadRequest as e:
            body = err_body(str(e), "invalid_request_error", "bad_request")
            try:
                await conn.write(b"HTTP/1.1 400 Bad Request\r\nServer: mock-llm\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(body), body))
            except (ClientGone, ConnectionError, OSError):
                pass
        except MockAbort:
            self.log("connection dropped on purpose (X-Mock-Abort-After)")
        except (ClientGone, ConnectionError, OSError):
            graceful = False
        except Exception as e:              # never let one connection kill the server
            graceful = False
            self.log("internal error: %r" % e)
        finally:
            conn.close(graceful)
            self.tasks.discard(task)

    async def dispatch(self, conn, req):
        path, method = req.path, req.method
        if not (path.startswith("/stats") or path.startswith("/admin")):
            self.st["requests"] += 1
        if path == "/v1/chat/completions" and method == "POST":
            return await self.chat(conn, req)
        if path == "/v1/models" and method == "GET":
            return await self.send(conn, req, 200, dumps({"object": "list", "data": [
                {"id": "deepseek-chat", "object": "model", "created": CREATED,
                 "owned_by": "deepseek"}]}))
        if path == "/stats" and method == "GET":
            return await self.send(conn, req, 200, dumps(self.st))
        if path == "/stats/reset" and method == "POST":
            self.reset(self.st["inflight"])
            return await self.send(conn, req, 200, dumps({"ok": True}))
        if path == "/admin/config" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    new = json.loads(req.body or b"{}")
                    if not isinstance(new, dict) or any(
                            k not in CONFIG_KEYS or isinstance(v, bool) or not isinstance(v, int)
                            or v < 0 for k, v in new.items()):
                        raise ValueError
                except (ValueError, RecursionError):
                    return await self.send(conn, req, 400, err_body(
                        "config wants a JSON object with non-negative integers for: "
                        + ", ".join(CONFIG_KEYS), "invalid_request_error", "invalid_config"))
                self.cfg.update(new)
            return await self.send(conn, req, 200, dumps(self.cfg))
        return await self.send(conn, req, 404, err_body(
            "Unknown endpoint %s %s" % (method, path), "invalid_request_error", "not_found"))

    # ---- chat completions --------------------------------------------
    async def chat(self, conn, req):
        st, cfg = self.st, self.cfg
        digest = hashlib.sha256(req.body).hexdigest()
        st["chat_requests"] += 1
        st["bodies"][digest] = st["bodies"].get(digest, 0) + 1
        extra = []
        for v in req.get_all("x-mock-header"):
            name, sep, value = v.partition(":")
            if sep and name.strip():
                extra.append((name.strip(), value.strip()))
        if cfg["capacity"] > 0 and st["inflight"] >= cfg["capacity"]:
            st["rejected_503"] += 1
            return await self.send(conn, req, 503, err_body(BUSY_MSG, "server_error",
                                                            "server_busy"), extra=extra)
        st["inflight"] += 1
        st["max_inflight"] = max(st["max_inflight"], st["inflight"])
        try:
            return await self.answer(conn, req, digest, extra)
        except MockAbort:
            self.count_cut(req)
            raise
        except (ClientGone, ConnectionError, OSError):
            self.st["client_aborts"] += 1
            self.count_cut(req)
            raise
        finally:
            self.st["inflight"] -= 1

    async def answer(self, conn, req, digest, extra):
        st, cfg = self.st, self.cfg
        delay = max(0, as_int(req.get("x-mock-delay-ms", None), cfg["first_token_ms"]))
        tok_ms = max(0, as_int(req.get("x-mock-token-ms", None), cfg["token_ms"]))
        forced = as_int(req.get("x-mock-status", None), None)
        if forced is None:
            forced = cfg["force_status"]
        if forced and forced != 200:
            if not 200 < forced < 600 or forced in (204, 304):
                forced = 500            # statuses that cannot carry the error JSON
            st["forced_errors"] += 1
            await conn.sleep(delay)
            return await self.send(conn, req, forced, forced_err_body(forced), extra=extra)
        try:
            data = json.loads(req.body)
            if not isinstance(data, dict):
                raise ValueError
        except (ValueError, RecursionError):
            return await self.send(conn, req, 400, err_body(
                "Invalid JSON body", "invalid_request_error", "invalid_json"), extra=extra)
        stream = data.get("stream") is True
        so = data.get("stream_options")
        if so is not None and (not stream or not isinstance(so, dict)):
            return await self.send(conn, req, 400, err_body(
                "stream_options should be set along with stream = true" if not stream
                else "stream_options must be an object", "invalid_request_error",
                "invalid_stream_options"), extra=extra)
        include_usage = stream and so is not None and so.get("include_usage") is True
        n = (positive_int(data.get("max_completion_tokens"))
             or positive_int(data.get("max_tokens")) or cfg["tokens"])
        model = data.get("model")
        model = model if isinstance(model, str) and model else "deepseek-chat"
        tokens = ["tok%d-%s " % (i, digest[:8]) for i in range(n)]
        key = req.get("authorization")
        prompt = count_prompt(data)
        completion = count_tokens("".join(tokens))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        pad = max(0, as_int(req.get("x-mock-pad", None), 0))
        abort_after = as_int(req.get("x-mock-abort-after", None), None)
        cid = "chatcmpl-" + digest[:16]

        if not stream:
            await conn.sleep(delay + n * tok_ms)
            obj = {"id": cid, "object": "chat.completion", "created": CREATED, "model": model,
                   "choices": [{"index": 0, "message": {"role": "assistant",
                                                        "content": "".join(tokens)},
                                "finish_reason": "stop"}],
                   "usage": usage}
            if pad:
                obj["pad"] = "x" * pad
            body = dumps(obj)
            if req.get("x-mock-gzip", None) == "1":
                extra = extra + [("Vary", "Accept-Encoding")]
                if accepts_gzip(req.get("accept-encoding")):
                    body = gzip.compress(body, mtime=0)
                    extra.append(("Content-Encoding", "gzip"))
            close_after = as_int(req.get("x-mock-close-delimited", None), None)
            if close_after is not None and abort_after is None:
                head, _ = self.head(req, 200, self.merge(
                    [("Content-Type", "application/json")], extra))
                cut = 0 < close_after < len(body)
                await conn.write(head + (body[:close_after] if cut else body))
                st["cut_by_mock" if cut else "completed"] += 1
                if not cut:
                    self.count_done(key, prompt, completion)
                return False            # close: the end of the body
            if abort_after is None:
                keep = await self.send(conn, req, 200, body, extra=extra)
                st["completed"] += 1
                self.count_done(key, prompt, completion)
                return keep
            head, _ = self.head(req, 200, self.merge([("Content-Type", "application/json")],
                                                     extra), len(body))
            await conn.write(head + body[:len(body) // 2])
            st["aborted_by_mock"] += 1
            raise MockAbort()

        chunked = req.version == "HTTP/1.1"
        head, keep = self.head(req, 200, self.merge(
            [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")], extra),
            chunked=chunked)

        def event(delta, finish, use=None):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": CREATED,
                   "model": model, "choices": [] if delta is None else [
                       {"index": 0, "delta": delta, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = use
            if pad:
                obj["pad"] = "x" * pad
            return frame(b"data: " + dumps(obj) + b"\n\n")

        def frame(payload):
            return b"%x\r\n%s\r\n" % (len(payload), payload) if chunked else payload

        delivered = [0]
        req.sse = (key, prompt, delivered)
        await conn.write(head)
        await conn.sleep(delay)
        for i, tok in enumerate(tokens):
            if abort_after is not None and i >= abort_after:
                break
            if i:
                await conn.sleep(tok_ms)
            await conn.write(event({"content": tok}, None))
            delivered[0] += count_tokens(tok)
        if abort_after is not None:
            st["aborted_by_mock"] += 1
            raise MockAbort()
        await conn.write(event({}, "stop")
                         + (event(None, None, usage) if include_usage else b"")
                         + frame(b"data: [DONE]\n\n")
                         + (b"0\r\n\r\n" if chunked else b""))
        req.sse = None
        st["completed"] += 1
        self.count_done(key, prompt, completion)
        return keep


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


async def amain(args):
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        sys.exit("mock_llm: --listen wants HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    mock = Mock(args)
    server = await asyncio.start_server(mock.handle, host, int(port), backlog=8192)
    bound = server.sockets[0].getsockname()[1]
    if args.portfile:
        with open(args.portfile + ".tmp", "w") as f:
            f.write("%d\n" % bound)
        os.replace(args.portfile + ".tmp", args.portfile)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    mock.log("listening on %s:%d (capacity %d, first-token %dms, token %dms, tokens %d)"
             % (host, bound, args.capacity, args.first_token_ms, args.token_ms, args.tokens))
    await stop.wait()
    server.close()
    for task in list(mock.tasks):
        task.cancel()
    await asyncio.gather(*mock.tasks, return_exceptions=True)
    await server.wait_closed()
    mock.log("stopped")


def main():
    ap = argparse.ArgumentParser(description="Mock overloaded OpenAI-compatible LLM backend")
    ap.add_argument("--listen", required=True, help="HOST:PORT, port 0 picks a free one")
    ap.add_argument("--portfile")
    ap.add_argument("--capacity", type=int, default=0)
    ap.add_argument("--first-token-ms", type=int, default=50)
    ap.add_argument("--token-ms", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    raise_nofile()
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
