"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server in the tests).

:class:`S3FaultProxy` listens on 127.0.0.1 (a free port) in a background thread and forwards
every request to the upstream endpoint, faithfully: method, path and query, headers (the
``Host`` header too, so request signatures stay valid), the request body (``Content-Length`` or
``Transfer-Encoding: chunked``), and the response as the upstream gives it: status, headers,
``Content-Length`` or chunked framing, ``Range`` answers (206 + ``Content-Range``), bodyless
``HEAD`` answers. ``Expect: 100-continue`` is answered by the proxy itself.

On a seeded share of the requests that match its :class:`Rule` s it injects what real object
stores do on a bad day:

``"500"`` / ``"503"``
    an S3 error answer (``InternalError`` / ``SlowDown``, XML body, as S3 sends them) instead of
    forwarding the request;
``"reset"``
    forward, send the response headers and part of the body, then reset the connection (TCP RST;
    a bodyless answer is reset before any byte is sent);
``"slow"``
    forward, then trickle the body in small pieces with sleeps in between;
``"stall"``
    forward, send the headers and part of the body, then go silent for ``stall_s`` seconds (more
    than the client's read timeout) and reset (a bodyless answer stalls before any byte);
``"stall_headers"``
    go silent before any byte of the answer for ``stall_s`` seconds, without forwarding, then
    reset;
``"corrupt"``
    forward, flipping the bits of one byte in the middle of the body (what checksums are for).

Faults are bounded: each rule may cap its count (``max_count``), the proxy caps the total
(``max_faults``), may only inject inside a time window after :meth:`S3FaultProxy.arm`
(``window_s``), and may cap the faults in a row on one object (``max_streak``: the request
after that many consecutive faults on the same method and path goes through; below the
client's attempts, every request must eventually succeed). Every fault injected is recorded (:attr:`S3FaultProxy.faults`: kind, method,
path, S3 operation), and so is every request seen (:attr:`S3FaultProxy.requests`), so a test can
assert that faults did happen.

Usage::

    with S3FaultProxy(upstream, seed=1) as proxy:
        proxy.arm([Rule("503", rate=0.3), Rule("reset", rate=0.2, ops=("get_object",))],
                  max_faults=20)
        ... point the client at proxy.endpoint ...
        assert proxy.faults
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["KINDS", "Fault", "ProxyProcess", "Rule", "S3FaultProxy", "s3_operation"]

KINDS = ("500", "503", "reset", "slow", "stall", "stall_headers", "corrupt")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authenticate",
    "proxy-authorization",
}
ERRORS = {
    "500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
COPY_CHUNK = 64 * 1024


def s3_operation(method: str, path: str, query: str) -> str:
    """The S3 operation of a path-style request: ``get_object``, ``put_object``, ``upload_part``,
    ``list``, ``head_object``... (what :attr:`Rule.ops` filters on)."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    q = parse_qs(query, keep_blank_values=True)
    if method == "HEAD":
        return "head_object" if key else "head_bucket"
    if method == "GET":
        if not key:
            return "list"
        return "list_parts" if "uploadId" in q else "get_object"
    if method == "PUT":
        if not key:
            return "create_bucket"
        if "partNumber" in q and "uploadId" in q:
            return "upload_part"
        return "put_object"
    if method == "POST":
        if "uploads" in q:
            return "create_multipart"
        if "uploadId" in q:
            return "complete_multipart"
        return "delete_objects" if "delete" in q else "post"
    if method == "DELETE":
        if "uploadId" in q:
            return "abort_multipart"
        return "delete_object" if key else "delete_bucket"
    return method.lower()


@dataclass
class Rule:
    """Inject ``kind`` into a ``rate`` share of the matching requests.

    A request matches when its method is in ``methods`` (empty: any), its S3 operation is in
    ``ops`` (empty: any; see :func:`s3_operation`) and ``path`` (a regular expression) is found
    in its unquoted URL path (None: any). ``max_count`` caps this rule's faults.
    """

    kind: str
    rate: float = 1.0
    methods: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    path: str | None = None
    max_count: int | None = None
    count: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate {self.rate}: expected 0..1")
        self.methods = tuple(m.upper() for m in self.methods)

    def matches(self, method: str, op: str, path: str) -> bool:
        if self.max_count is not None and self.count >= self.max_count:
            return False
        if self.methods and method not in self.methods:
            return False
        if self.ops and op not in self.ops:
            return False
        return self.path is None or re.search(self.path, path) is not None


@dataclass(frozen=True)
class Fault:
    """One injected fault (what the proxy did, to which request)."""

    kind: str
    method: str
    path: str
    op: str
    range: str | None = None
    at: float = 0.0  # seconds after arm()

    def __str__(self) -> str:
        rng = f" [{self.range}]" if self.range else ""
        return f"{self.kind} on {self.method} {self.path}{rng} ({self.op})"


class _Abort(Exception):
    """Reset the client's connection now."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked answers, 100-continue
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815

    # -- the request ------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        proxy: S3FaultProxy = self.server.proxy
        body = self._read_body()
        split = urlsplit(self.path)
        op = s3_operation(self.command, split.path, split.query)
        fault = proxy._pick(self.command, unquote(split.path), op, self.headers.get("Range"))
        try:
            if fault in ("500", "503"):
                self._send_error(fault, unquote(split.path))
            elif fault == "stall_headers":
                proxy._stopped.wait(proxy.stall_s)
                raise _Abort
            else:
                self._forward(body, fault)
        except _Abort:
            self._reset()
        except OSError:
            self.close_connection = True  # the client went away (e.g. its read timed out)

    # -- the answer -------------------------------------------------------------------------------
    def _send_error(self, kind: str, resource: str) -> None:
        status, reason, code, message = ERRORS[kind]
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        body = b"" if self.command == "HEAD" else xml  # S3 answers HEAD errors without a body
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, body: bytes, fault: str | None) -> None:
        proxy: S3FaultProxy = self.server.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        else:
            headers.pop("Content-Length", None)
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            resp = upstream.getresponse()
            length = resp.getheader("Content-Length")
            chunked = "chunked" in (resp.getheader("Transfer-Encoding") or "").lower()
            bodyless = self.command == "HEAD" or resp.status in (204, 304) or length == "0"
            if bodyless and fault in ("reset", "stall"):
                if fault == "stall":
                    proxy._stopped.wait(proxy.stall_s)
                raise _Abort  # nothing was sent yet
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif length is None and not bodyless:
                self.send_header("Connection", "close")  # delimited by the end of the stream
                self.close_connection = True
            self.end_headers()
            if bodyless:
                return
            total = int(length) if length is not None else None
            cut = None
            if fault in ("reset", "stall"):  # somewhere in the body, never all of it
                share = proxy._rng_uniform(0.1, 0.9)
                cut = max(
                    1,
                    int(COPY_CHUNK * share)
                    if total is None
                    else min(int(total * share), total - 1),
                )
            sent = 0
            piece = proxy.slow_chunk if fault == "slow" else COPY_CHUNK
            flip = (total or 1) // 2 if fault == "corrupt" else None
            while True:
                want = piece if cut is None else min(piece, cut - sent)
                data = resp.read(want) if want > 0 else b""
                if flip is not None and sent <= flip < sent + len(data):
                    i = flip - sent
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                if cut is not None and sent + len(data) >= cut:
                    self._write(data, chunked)
                    self.wfile.flush()
                    if fault == "stall":
                        proxy._stopped.wait(proxy.stall_s)
                    else:
                        time.sleep(0.02)  # let the client take the part it got
                    raise _Abort
                if not data:
                    break
                self._write(data, chunked)
                sent += len(data)
                if fault == "slow":
                    time.sleep(proxy.slow_delay)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            upstream.close()

    def _write(self, data: bytes, chunked: bool) -> None:
        if not data:
            return
        if chunked:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        else:
            self.wfile.write(data)

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a dying load balancer does."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    proxy: S3FaultProxy

    def handle_error(self, request, client_address) -> None:
        pass  # a client that went away mid-answer is part of the game here


class S3FaultProxy:
    """A fault-injecting proxy for ``upstream`` (``http://host:port``); see the module doc.

    ``seed`` makes the choice of faulted requests reproducible (for a given request order);
    ``stall_s`` is how long a stall lasts; ``slow_chunk`` / ``slow_delay`` shape a slow body.
    """

    def __init__(
        self,
        upstream: str,
        seed: int = 0,
        stall_s: float = 3.0,
        slow_chunk: int = 2048,
        slow_delay: float = 0.002,
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{upstream!r}: expected http://host:port")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.seed, self.stall_s = seed, stall_s
        self.slow_chunk, self.slow_delay = slow_chunk, slow_delay
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._rng = random.Random(seed)
        self._rules: list[Rule] = []
        self._max_faults: int | None = None
        self._window: tuple[float, float] | None = None
        self._max_streak: int | None = None
        self._streaks: Counter = Counter()
        self._armed_at = time.monotonic()
        self._faults: list[Fault] = []
        self._requests: Counter = Counter()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> S3FaultProxy:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="s3-fault-proxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()  # ends every stall at once
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The URL to give the client (``--endpoint-url``)."""
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- faults ----------------------------------------------------------------------------------
    def arm(
        self,
        rules: list[Rule],
        max_faults: int | None = None,
        window_s: tuple[float, float] | None = None,
        max_streak: int | None = None,
        seed: int | None = None,
    ) -> None:
        """Inject ``rules`` from now on (replacing earlier ones; the records are cleared):
        at most ``max_faults`` in all, only between ``window_s[0]`` and ``window_s[1]`` seconds
        from now if given, at most ``max_streak`` in a row on one method + path; ``seed``
        restarts the random choice."""
        with self._lock:
            self._max_streak, self._streaks = max_streak, Counter()
            self._rules = list(rules)
            for r in self._rules:
                r.count = 0
            self._max_faults, self._window = max_faults, window_s
            self._armed_at = time.monotonic()
            self._faults, self._requests = [], Counter()
            self._rng = random.Random(self.seed if seed is None else seed)

    def disarm(self) -> None:
        """Forward everything faithfully from now on (the records are kept)."""
        with self._lock:
            self._rules = []

    def _pick(self, method: str, path: str, op: str, rng: str | None) -> str | None:
        with self._lock:
            self._requests[op] += 1
            if not self._rules:
                return None
            at = time.monotonic() - self._armed_at
            if self._window is not None and not self._window[0] <= at < self._window[1]:
                return None
            if self._max_faults is not None and len(self._faults) >= self._max_faults:
                return None
            target = (method, path)
            if self._max_streak is not None and self._streaks[target] >= self._max_streak:
                self._streaks[target] = 0  # this one goes through
                return None
            for rule in self._rules:
                if not rule.matches(method, op, path):
                    continue
                if rule.rate < 1 and self._rng.random() >= rule.rate:
                    continue
                rule.count += 1
                self._streaks[target] += 1
                self._faults.append(Fault(rule.kind, method, path, op, rng, round(at, 3)))
                return rule.kind
            self._streaks[target] = 0
            return None

    def _rng_uniform(self, lo: float, hi: float) -> float:
        with self._lock:
            return self._rng.uniform(lo, hi)

    @property
    def faults(self) -> list[Fault]:
        """Every fault injected since the last :meth:`arm`, in order."""
        with self._lock:
            return list(self._faults)

    @property
    def requests(self) -> Counter:
        """Requests seen since the last :meth:`arm`, by S3 operation."""
        with self._lock:
            return Counter(self._requests)

    def fault_counts(self) -> Counter:
        """Faults by kind (``{"503": 4, "reset": 2}``)."""
        return Counter(f.kind for f in self.faults)

    def summary(self) -> str:
        """A one-line account for assertion messages: faults by kind and operation, requests."""
        by = Counter(f"{f.kind}/{f.op}" for f in self.faults)
        faults = ", ".join(f"{k} x{n}" for k, n in sorted(by.items())) or "none"
        return f"faults injected: {faults}; requests: {sum(self.requests.values())}"


def _serve_in_child(conn, upstream: str, kwargs: dict) -> None:
    """The child side of :class:`ProxyProcess`: a proxy, driven by messages on ``conn``."""
    with S3FaultProxy(upstream, **kwargs) as proxy:
        conn.send(proxy.endpoint)
        while True:
            cmd, args = conn.recv()
            if cmd == "stop":
                conn.send(None)
                return
            if cmd == "arm":
                proxy.arm(*args[0], **args[1])
                conn.send(None)
            elif cmd == "disarm":
                proxy.disarm()
                conn.send(None)
            elif cmd == "records":
                conn.send((proxy.faults, proxy.requests))


class ProxyProcess:
    """:class:`S3FaultProxy` in a child process, for clients that hold the GIL while they wait
    on the network (DALI's S3 reader does, while a pipeline builds), so that a proxy thread in
    the same process could not answer them. Same ``arm``/``disarm``/``faults``/``summary``."""

    def __init__(self, upstream: str, **kwargs):
        import multiprocessing

        self._upstream, self._kwargs = upstream, kwargs
        self._ctx = multiprocessing.get_context("spawn")
        self._conn = self._process = None
        self.endpoint = ""

    def __enter__(self) -> ProxyProcess:
        ours, theirs = self._ctx.Pipe()
        self._process = self._ctx.Process(
            target=_serve_in_child, args=(theirs, self._upstream, self._kwargs), daemon=True
        )
        self._process.start()
        self._conn = ours
        if not ours.poll(60):
            raise RuntimeError("the proxy process did not start within 60 s")
        self.endpoint = ours.recv()
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self._call("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()

    def _call(self, cmd: str, *args, **kwargs):
        self._conn.send((cmd, (args, kwargs)))
        return self._conn.recv()

    def arm(self, rules: list[Rule], **kwargs) -> None:
        self._call("arm", rules, **kwargs)

    def disarm(self) -> None:
        self._call("disarm")

    @property
    def faults(self) -> list[Fault]:
        return self._call("records")[0]

    @property
    def requests(self) -> Counter:
        return self._call("records")[1]

    def fault_counts(self) -> Counter:
        return Counter(f.kind for f in self.faults)

    def summary(self) -> str:
        return S3FaultProxy.summary(self)
