"""One small HTTP(S) server per process: Prometheus metrics, health, readiness, and checkpoint downloads.

Checkpoint paths are never joined from raw request text: each component must match a strict pattern, the file must
be listed in the checkpoint's manifest, and the resolved path must lie inside the checkpoints directory (no ``..``,
no percent-encoding, no absolute paths, no symlinks out). Only ``/checkpoints*`` needs the optional bearer token, so
scrapers and probes stay unauthenticated.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import shutil
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from streamd.files import sha256_file
from streamd.run.checkpoints import MANIFEST, NAME_RE, CheckpointError, CheckpointStore, read_manifest
from streamd.config import MetricsConfig

log = logging.getLogger(__name__)

ReadyFn = Callable[[], tuple[bool, str]]
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    status: StatusServer  # set by StatusServer.start

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops mid-download or fails the TLS handshake is routine; no stderr traceback.
        log.debug("request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "streamd"
    protocol_version = "HTTP/1.1"
    timeout = 30  # per-socket: a stalled client (or TLS handshake) cannot hold a thread forever

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, on the request thread, not in the accept loop

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
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
        else:
            self._not_found()

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
    """Serves /metrics, /healthz, /readyz and /checkpoints* from a daemon thread; ``port=0`` picks a free port."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        store: CheckpointStore | None = None,
        ready: ReadyFn = lambda: (True, "ready"),
        token: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        if token is not None and not token:
            raise ValueError("an empty bearer token would protect nothing; pass None to disable")
        self.host, self._port = host, port
        self.registry, self.store, self.ready, self.token, self.tls = registry, store, ready, token, tls
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, cfg: MetricsConfig, registry: CollectorRegistry, store: CheckpointStore | None, ready: ReadyFn
    ) -> StatusServer:
        """A server for ``metrics.*`` (host, port, checkpoint token, TLS pair): what the trainer serves."""
        token = cfg.checkpoint_token.get_secret_value() if cfg.checkpoint_token else None
        tls = (cfg.tls_certfile, cfg.tls_keyfile) if cfg.tls_certfile and cfg.tls_keyfile else None
        return cls(cfg.host, cfg.port, registry, store, ready, token, tls)

    def start(self) -> StatusServer:
        server_cls = _Server6 if ":" in self.host else _Server
        httpd = server_cls((self.host, self._port), _Handler)
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
