"""A local S3 server for tests and benchmarks, and a proxy in front of it that counts requests and injects
S3's failure modes.

``local_s3()`` starts moto's S3 server on 127.0.0.1 (a free port, in a thread of this process) and yields
a ``LocalS3``: its ``url``, ``storage_options(...)`` for fsspec (``kd-cache build --storage-options``)
and ``env`` for a subprocess. ``FaultProxy(target, rule)`` forwards every request to ``target`` and
counts it by method (``counts``); ``rule(method, path, n) -> Fault`` (``n``: the request's number, from 0)
decides what happens to each request:

- ``PASS``: forwarded, its answer returned;
- ``SLOWDOWN``: answered ``503 SlowDown`` with S3's XML body, not forwarded;
- ``BARE_503``: answered ``503`` with no body, not forwarded (what a load balancer in front of a
  store sends);
- ``RESET_BEFORE``: the connection is closed before the request reaches the server;
- ``RESET_AFTER``: the request is applied by the server, then the connection is closed before its
  answer is sent (a lost answer: the client cannot tell whether it was applied);
- ``STALL``: the answer is held for ``stall_s`` seconds, then sent.

Requests signed with an access key in ``deny_keys`` are answered ``403 InvalidAccessKeyId``.

``random_faults(seed, rates)`` is a rule that draws each request's fault from ``rates``
(e.g. ``{SLOWDOWN: 0.05, RESET_AFTER: 0.02}``) with its own generator.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

PASS, SLOWDOWN, BARE_503, RESET_BEFORE, RESET_AFTER, STALL = "pass", "slowdown", "503", "reset-before", "reset-after", \
    "stall"
DENIED = "denied"  # 403 InvalidAccessKeyId, as S3 answers a key it does not know
DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidAccessKeyId</Code>'
               b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")


def moto_available() -> bool:
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class LocalS3:
    """A running local S3 endpoint (``url``: ``http://127.0.0.1:PORT``)."""

    url: str
    server: object = None

    def storage_options(self, endpoint: str | None = None, **extra) -> dict:
        """fsspec options that reach this server (or ``endpoint``: e.g. a ``FaultProxy`` in front of it)."""
        return {"endpoint_url": endpoint or self.url, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], **extra}

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                     region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
        return name

    @property
    def env(self) -> dict:
        """Environment of a subprocess that reaches this server without storage options."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url}


@contextlib.contextmanager
def local_s3() -> Iterator[LocalS3]:
    """moto's S3 server on 127.0.0.1 for the duration of the block (nothing outside this machine is used)."""
    from moto.server import ThreadedMotoServer

    for k, v in CREDENTIALS.items():
        os.environ.setdefault(k, v)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield LocalS3(f"http://{host}:{port}", server)
    finally:
        server.stop()


Fault = str
Rule = Callable[[str, str, int], Fault]


def random_faults(seed: int, rates: dict[Fault, float]) -> Rule:
    """A rule drawing each request's fault from ``rates`` (the rest: ``PASS``), reproducible by ``seed``."""
    rng, lock = random.Random(seed), threading.Lock()

    def rule(method: str, path: str, n: int) -> Fault:
        with lock:
            u = rng.random()
        for fault, rate in rates.items():
            if u < rate:
                return fault
            u -= rate
        return PASS

    return rule


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``target`` that counts requests and applies ``rule``.

    Use as a context manager; ``url`` is its endpoint. ``counts``: requests by method (and by
    ``"METHOD fault"`` for those that met a fault); ``log``: (method, path, status or fault) of each."""

    target: str
    rule: Rule = field(default=lambda method, path, n: PASS)
    stall_s: float = 5.0
    deny_keys: set = field(default_factory=set)  # requests signed with these access keys get S3's 403
    counts: Counter = field(default_factory=Counter)
    log: list = field(default_factory=list)

    def __post_init__(self):
        host, port = self.target.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self._n = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    n = proxy._n
                    proxy._n += 1
                fault = proxy.rule(self.command, self.path, n)
                if any(f"Credential={k}/" in (self.headers.get("Authorization") or "") for k in proxy.deny_keys):
                    fault = DENIED
                with proxy._lock:
                    proxy.counts[self.command] += 1
                    if fault != PASS:
                        proxy.counts[f"{self.command} {fault}"] += 1
                if fault == RESET_BEFORE:
                    proxy.log.append((self.command, self.path, fault))
                    return self._reset()
                if fault in (SLOWDOWN, BARE_503, DENIED):
                    payload = {SLOWDOWN: SLOWDOWN_BODY, BARE_503: b"", DENIED: DENIED_BODY}[fault]
                    self.send_response(403 if fault == DENIED else 503)
                    if payload:
                        self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    proxy.log.append((self.command, self.path, fault))
                    return
                conn = http.client.HTTPConnection(*proxy._target, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                proxy.log.append((self.command, self.path, resp.status if fault == PASS else fault))
                if fault == RESET_AFTER:
                    return self._reset()
                if fault == STALL:
                    time.sleep(proxy.stall_s)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _reset(self):
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.log.clear()
