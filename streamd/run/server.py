"""One small HTTP(S) server per process: Prometheus metrics, health, readiness, and checkpoint downloads.

Checkpoint paths are never joined from raw request text: each component must match a strict pattern, the file must
be listed in the checkpoint's manifest, and the resolved path must lie inside the checkpoints directory (no ``..``,
no percent-encoding, no absolute paths, no symlinks out). Only ``/checkpoints*`` and a server's extra pages (the inspector's browser) need the optional
bearer token, so scrapers and probes stay unauthenticated; the token is compared in constant time and never logged.

Resources are bounded: a fixed pool of ``workers`` threads serves connections from a queue; at most
``max_connections`` are held (served or queued) and the next one gets an immediate 503 with ``Retry-After`` (over TLS,
where no plain answer can be sent before the handshake, it is closed) without costing a worker. Each request's TLS
handshake, request line and headers must arrive within ``header_timeout`` seconds in total (a client dripping a
byte at a time is cut off there), and every later read or 1 MiB write must finish within ``io_timeout``.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import SecretStr

from streamd.files import sha256_file
from streamd.run.checkpoints import MANIFEST, NAME_RE, CheckpointError, CheckpointStore, read_manifest
from streamd.config import MetricsConfig

log = logging.getLogger(__name__)

ReadyFn = Callable[[], tuple[bool, str]]
# Other routes of a server (the inspector's browser): (path, query) -> (status, body, content type), None for 404.
# They sit behind the same bearer token as /checkpoints; a ValueError is answered 400 with its message.
PagesFn = Callable[[str, dict[str, str]], "tuple[int, bytes, str] | None"]
_CHECKPOINT_ROUTE = re.compile(r"^/checkpoints(?:/(?P<rest>.*))?$")


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """What a client needs to pull a checkpoint: id, tokens, SAEs, and every file (manifest.json included).

    The manifest's own hash is computed here (it cannot list itself); the others come from the manifest, so a file
    corrupted on disk is caught by the client's check rather than served with a matching hash.
    """
    m = read_manifest(path)
    files = {rel: {"sha256": sha, "size": (path / rel).stat().st_size} for rel, sha in m["files"].items()}
    files[MANIFEST] = {"sha256": sha256_file(path / MANIFEST), "size": (path / MANIFEST).stat().st_size}
    return {"id": m["id"], "tokens": m["tokens"], "created_at": m["created_at"], "saes": m["saes"], "files": files}


WORKERS = 16
MAX_CONNECTIONS = 64
HEADER_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 30.0
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n")


class _Server(HTTPServer):
    """An HTTPServer with a fixed worker pool and a cap on held connections (see the module docstring)."""

    status: StatusServer  # set by StatusServer.start
    request_queue_size = 128  # the listen backlog: a burst of connects is accepted (and answered 503), not dropped

    def __init__(self, addr: tuple[str, int], handler: type, *, workers: int, max_connections: int,
                 header_timeout: float, io_timeout: float) -> None:
        if workers < 1 or max_connections < workers:
            raise ValueError(f"need 1 <= workers ({workers}) <= max_connections ({max_connections})")
        self.header_timeout, self.io_timeout = header_timeout, io_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.rejected = 0  # connections answered 503 (or closed, over TLS) because all slots were held
        super().__init__(addr, handler)
        self._workers = [threading.Thread(target=self._work, name=f"streamd-http-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._workers:
            t.start()

    def process_request(self, request: Any, client_address: Any) -> None:  # the accept thread: never blocks
        if not self._slots.acquire(blocking=False):
            self.rejected += 1
            self._reject(request)
            return
        self._queue.put((request, client_address))

    def _reject(self, request: socket.socket) -> None:
        try:
            if not isinstance(request, ssl.SSLSocket):
                request.setblocking(False)
                try:
                    while request.recv(65536):  # what the client already sent, so close() sends FIN, not RST
                        pass
                except OSError:
                    pass
                request.send(_BUSY)  # a few bytes into an empty send buffer: does not block
                request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            request.close()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            self._queue.put(None)
        until = time.monotonic() + 2  # workers still streaming to a slow client are daemons: do not wait long
        for t in self._workers:
            t.join(timeout=max(0.0, until - time.monotonic()))
        while True:  # connections still queued behind the sentinels
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops mid-download or fails the TLS handshake is routine; no stderr traceback.
        log.debug("request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _DeadlineReader(io.RawIOBase):
    """The request's socket, read with a timeout that never reaches past the handler's header deadline."""

    def __init__(self, handler: _Handler) -> None:
        self._h = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        h = self._h
        if h.deadline is not None:
            left = h.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request line and headers not received within the deadline")
            h.connection.settimeout(min(left, h.server.io_timeout))
        return h.connection.recv_into(b)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "streamd"
    protocol_version = "HTTP/1.1"
    deadline: float | None = None  # monotonic time by which the request line and headers must be in

    def setup(self) -> None:
        self.timeout = self.server.io_timeout
        super().setup()
        self.rfile.close()  # the stdlib's makefile(); reads go through the deadline instead
        self.rfile = io.BufferedReader(_DeadlineReader(self))
        if isinstance(self.connection, ssl.SSLSocket):
            # here, on a worker, not in the accept loop; the socket timeout bounds the whole handshake
            self.connection.settimeout(self.server.header_timeout)
            self.connection.do_handshake()
            self.connection.settimeout(self.server.io_timeout)

    def handle_one_request(self) -> None:
        self.deadline = time.monotonic() + self.server.header_timeout
        try:
            super().handle_one_request()
        finally:
            self.deadline = None

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers (through the deadline)
        self.deadline = None
        self.connection.settimeout(self.server.io_timeout)
        return ok

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # Only the request line and status reach here (never a header, so never the token).
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8", headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj, indent=1).encode() + b"\n", "application/json")

    def _not_found(self) -> None:
        self._send(404, b"not found\n")

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        status = self.server.status
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._send(200, generate_latest(status.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            try:
                ok, reason = status.ready()
            except Exception as e:  # a broken readiness probe means not ready, not a dead server
                ok, reason = False, f"readiness check failed: {e!r}"
            self._send(200 if ok else 503, (reason or ("ready" if ok else "not ready")).encode() + b"\n")
        elif m := _CHECKPOINT_ROUTE.match(path):
            if self._authorized(status.token):
                self._checkpoints(status.store, m.group("rest"))
        elif status.pages is not None:
            if self._authorized(status.token):
                self._page(status.pages, path)
        else:
            self._not_found()

    def _page(self, pages: PagesFn, path: str) -> None:
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        try:
            found = pages(path, query)
        except ValueError as e:
            return self._send(400, f"{e}\n".encode())
        if found is None:
            return self._not_found()
        self._send(*found)

    def _authorized(self, token: str | None) -> bool:
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, cred = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), token.encode()):
            return True
        challenge = 'Bearer realm="streamd"' + (', error="invalid_token"' if given else "")
        self._send(401, b"unauthorized\n", headers={"WWW-Authenticate": challenge})
        return False

    def _checkpoints(self, store: CheckpointStore | None, rest: str | None) -> None:
        if store is None:
            return self._send(404, b"this server has no checkpoint store\n")
        parts = rest.split("/") if rest else []
        try:
            if not parts:
                return self._json(
                    [{"id": i.id, "tokens": i.tokens, "created_at": i.created_at, "saes": i.saes} for i in store.list()]
                )
            ckpt = store.latest() if parts[0] == "latest" else store.path(parts[0])
            if ckpt is None:
                return self._not_found()
            if len(parts) == 1:
                return self._json(describe_checkpoint(ckpt))
            self._file(store, ckpt, parts[1:])
        except (CheckpointError, OSError, KeyError) as e:  # corrupt, or removed by retention while serving
            log.warning("serving %s: %r", self.path, e)
            self._not_found()

    def _file(self, store: CheckpointStore, ckpt: Path, parts: list[str]) -> None:
        if len(parts) > 2 or not all(NAME_RE.match(p) for p in parts):
            return self._not_found()
        rel = "/".join(parts)
        m = read_manifest(ckpt)
        sha = m["files"].get(rel) or (sha256_file(ckpt / MANIFEST) if rel == MANIFEST else None)
        target = (ckpt / rel).resolve()
        if sha is None or not target.is_relative_to(store.dir.resolve()) or not target.is_file():
            return self._not_found()
        try:
            f = open(target, "rb")
        except OSError:  # deleted by retention between the check and here
            return self._not_found()
        with f:
            size = f.seek(0, 2)
            f.seek(0)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Checkpoint-SHA256", sha)
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)


class StatusServer:
    """Serves /metrics, /healthz, /readyz and /checkpoints* (and ``pages``, any other route) from a daemon thread;
    ``port=0`` picks a free port.

    ``workers`` threads serve at most ``max_connections`` held connections (beyond: 503); ``header_timeout`` bounds
    the handshake, request line and headers of each request, ``io_timeout`` each later read or 1 MiB write.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        store: CheckpointStore | None = None,
        ready: ReadyFn = lambda: (True, "ready"),
        token: str | None = None,
        tls: tuple[Path, Path] | None = None,
        *,
        pages: PagesFn | None = None,
        workers: int = WORKERS,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT_S,
        io_timeout: float = IO_TIMEOUT_S,
    ) -> None:
        if token is not None and not token:
            raise ValueError("an empty bearer token would protect nothing; pass None to disable")
        if workers < 1 or max_connections < workers:
            raise ValueError(f"need 1 <= workers ({workers}) <= max_connections ({max_connections})")
        self.limits = {"workers": workers, "max_connections": max_connections, "header_timeout": header_timeout,
                       "io_timeout": io_timeout}
        self.host, self._port = host, port
        self.registry, self.store, self.ready, self.token, self.tls = registry, store, ready, token, tls
        self.pages = pages
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def secured(cls, host: str, port: int, token: SecretStr | None, certfile: Path | None, keyfile: Path | None,
                registry: CollectorRegistry, store: CheckpointStore | None, ready: ReadyFn, **kw: Any) -> StatusServer:
        """A server behind a configured bearer token (a secret, or None) and TLS pair (both files, or neither):
        the trainer's (``from_config``) and the inspector's."""
        tls = (certfile, keyfile) if certfile and keyfile else None
        return cls(host, port, registry, store, ready, token.get_secret_value() if token else None, tls, **kw)

    @classmethod
    def from_config(
        cls, cfg: MetricsConfig, registry: CollectorRegistry, store: CheckpointStore | None, ready: ReadyFn
    ) -> StatusServer:
        """A server for ``metrics.*`` (host, port, checkpoint token, TLS pair): what the trainer serves."""
        return cls.secured(cfg.host, cfg.port, cfg.checkpoint_token, cfg.tls_certfile, cfg.tls_keyfile, registry,
                           store, ready, workers=cfg.http_workers, max_connections=cfg.http_max_connections,
                           header_timeout=cfg.http_header_timeout_seconds)

    def start(self) -> StatusServer:
        server_cls = _Server6 if ":" in self.host else _Server
        httpd = server_cls((self.host, self._port), _Handler, **self.limits)
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(certfile=self.tls[0], keyfile=self.tls[1])
            except (OSError, ssl.SSLError):
                httpd.server_close()
                raise
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        httpd.status = self
        self._httpd = httpd
        # A short poll interval only bounds how long stop() waits; requests are served as they arrive.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="streamd-http", daemon=True
        )
        self._thread.start()
        log.info("serving %s (/metrics /healthz /readyz /checkpoints)", self.url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    @property
    def rejected(self) -> int:
        """Connections turned away (503, or closed over TLS) because ``max_connections`` were held."""
        return self._httpd.rejected if self._httpd else 0

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
