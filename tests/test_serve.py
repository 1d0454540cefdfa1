"""StatusServer over real sockets: every endpoint, 404s, path-traversal attempts, bearer token, TLS, readiness,
and bounded resources (header deadline, worker pool, connection cap, no token in logs)."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from streamd.run.checkpoints import CheckpointStore, checkpoint_id
from streamd.config import MetricsConfig
from streamd.run.server import StatusServer
from tests.test_checkpoints import make_sae, write

SECRET = b"top secret outside the checkpoints dir"
TOKEN = "s3cret-token"
C100, C200 = checkpoint_id(1, 100), checkpoint_id(2, 200)  # the ``run`` fixture's checkpoints
C300 = checkpoint_id(3, 300)  # never written


def get(server: StatusServer, path: str, headers: dict | None = None, ctx: ssl.SSLContext | None = None):
    """A raw GET: http.client sends ``path`` byte for byte (no normalisation of ``..`` or ``%2e``)."""
    if ctx is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def run(tmp_path: Path) -> tuple[CheckpointStore, Path]:
    store = CheckpointStore(tmp_path / "run", keep_last=3)
    write(store, 100, [make_sae("a", 1)])
    path = write(store, 200, [make_sae("a", 1), make_sae("b", 2)])
    (tmp_path / "run" / "secret.txt").write_bytes(SECRET)
    return store, path


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("streamd_test_events", "events seen by the test", registry=reg).inc(3)
    return reg


@pytest.fixture
def server(run, registry) -> Iterator[StatusServer]:
    with StatusServer("127.0.0.1", 0, registry, store=run[0]) as s:
        yield s


def test_metrics_health_and_ready(registry: CollectorRegistry) -> None:
    state = {"ok": False, "reason": "waiting for first message"}
    with StatusServer("127.0.0.1", 0, registry, ready=lambda: (state["ok"], state["reason"])) as s:
        assert s.port != 0 and s.url == f"http://127.0.0.1:{s.port}"
        code, headers, body = get(s, "/metrics")
        assert code == 200 and b"streamd_test_events_total 3.0" in body
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert get(s, "/healthz")[::2] == (200, b"ok\n")
        assert get(s, "/readyz")[::2] == (503, b"waiting for first message\n")
        state.update(ok=True, reason="consuming")
        assert get(s, "/readyz")[::2] == (200, b"consuming\n")
        assert get(s, "/checkpoints")[0] == 404  # no store given
        assert get(s, "/nope")[0] == 404

    def broken() -> tuple[bool, str]:
        raise RuntimeError("probe exploded")

    with StatusServer("127.0.0.1", 0, registry, ready=broken) as s:
        code, _, body = get(s, "/readyz")
        assert code == 503 and b"probe exploded" in body
        assert get(s, "/healthz")[0] == 200


def test_checkpoint_listing_and_description(server: StatusServer, run) -> None:
    store, path = run
    code, _, body = get(server, "/checkpoints")
    assert code == 200
    assert [(c["id"], c["saes"]) for c in json.loads(body)] == [(C100, ["a"]), (C200, ["a", "b"])]

    code, _, body = get(server, "/checkpoints/latest")
    desc = json.loads(body)
    assert code == 200 and (desc["id"], desc["tokens"], desc["saes"]) == (C200, 200, ["a", "b"])
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(desc["files"]) == on_disk
    for rel, meta in desc["files"].items():
        data = (path / rel).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert json.loads(get(server, f"/checkpoints/{C100}")[2])["saes"] == ["a"]


@pytest.mark.parametrize("rel", ["manifest.json", "offsets.json", "trainer_state.pt", "b/sae_weights.safetensors"])
def test_downloads_carry_sha(server: StatusServer, run, rel: str) -> None:
    path = run[1]
    for ref in (C200, "latest"):
        code, headers, body = get(server, f"/checkpoints/{ref}/{rel}")
        assert code == 200 and body == (path / rel).read_bytes()
        assert headers["X-Checkpoint-SHA256"] == hashlib.sha256(body).hexdigest()
        assert headers["Content-Type"] == "application/octet-stream"


def test_not_found(server: StatusServer, run) -> None:
    path = run[1]
    (path / "unlisted.bin").write_bytes(b"not in the manifest")
    for p in [
        f"/checkpoints/{C300}",
        f"/checkpoints/{C300}/offsets.json",
        "/checkpoints/12/offsets.json",  # not a well-formed id
        f"/checkpoints/{C200}/nope.json",
        f"/checkpoints/{C200}/unlisted.bin",
        f"/checkpoints/{C200}/c/cfg.json",
        f"/checkpoints/{C200}/a/cfg.json/x",
        f"/checkpoints/{C200}/a",  # a directory
        "/checkpointsX",
    ]:
        assert get(server, p)[0] == 404, p


def test_no_checkpoint_yet(tmp_path: Path, registry: CollectorRegistry) -> None:
    with StatusServer("127.0.0.1", 0, registry, store=CheckpointStore(tmp_path, writer=False)) as s:
        assert get(s, "/checkpoints")[::2] == (200, b"[]\n")
        assert get(s, "/checkpoints/latest")[0] == 404


TRAVERSALS = [
    f"/checkpoints/{C200}/../../secret.txt",
    f"/checkpoints/{C200}/a/../../../secret.txt",
    "/checkpoints/../secret.txt",
    "/checkpoints/%2e%2e/secret.txt",
    f"/checkpoints/{C200}/%2e%2e/%2e%2e/secret.txt",
    f"/checkpoints/{C200}/..%2f..%2fsecret.txt",
    "/checkpoints/latest/..%2F..%2Fsecret.txt",
    f"/checkpoints/{C200}/..%5c..%5csecret.txt",
    f"/checkpoints/{C200}/%2fetc%2fpasswd",
    f"/checkpoints/{C200}//etc/passwd",
    "/checkpoints//etc/passwd",
    f"/checkpoints/{C200}/a/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    f"/checkpoints/{C200}/.%2e/.%2e/secret.txt",
    f"http://127.0.0.1/checkpoints/{C200}/../../secret.txt",
    f"/checkpoints/{C200}/a/cfg.json%00",
]


@pytest.mark.parametrize("raw", TRAVERSALS)
def test_path_traversal_refused(server: StatusServer, raw: str) -> None:
    code, _, body = get(server, raw)
    assert code in (400, 404) and SECRET not in body and b"root:" not in body


def test_symlink_out_of_the_checkpoints_dir_refused(server: StatusServer, run, tmp_path: Path) -> None:
    """Even a file the manifest lists is refused when it resolves outside (a symlink planted in the checkpoint)."""
    path = run[1]
    (path / "offsets.json").unlink()
    (path / "offsets.json").symlink_to(tmp_path / "run" / "secret.txt")
    shutil.rmtree(path / "b")
    (path / "b").symlink_to(tmp_path / "run", target_is_directory=True)
    (tmp_path / "run" / "cfg.json").write_bytes(SECRET)
    for p in (f"/checkpoints/{C200}/offsets.json", f"/checkpoints/{C200}/b/cfg.json"):
        code, _, body = get(server, p)
        assert code == 404 and SECRET not in body, p
    assert get(server, f"/checkpoints/{C200}/a/cfg.json")[0] == 200


def test_bearer_token_guards_checkpoints_only(run, registry: CollectorRegistry) -> None:
    with StatusServer("127.0.0.1", 0, registry, store=run[0], token=TOKEN) as s:
        for p in ("/checkpoints", "/checkpoints/latest", "/checkpoints/latest/manifest.json", "/checkpoints/x/../y"):
            code, headers, body = get(s, p)
            assert code == 401 and headers["WWW-Authenticate"] == 'Bearer realm="streamd"', p
            assert b"sha256" not in body
        code, headers, _ = get(s, "/checkpoints/latest", {"Authorization": "Bearer wrong"})
        assert code == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert get(s, "/checkpoints/latest", {"Authorization": f"Basic {TOKEN}"})[0] == 401
        assert get(s, "/checkpoints/latest", {"Authorization": f"Bearer {TOKEN}x"})[0] == 401
        code, _, body = get(s, "/checkpoints/latest", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and json.loads(body)["id"] == C200
        for p in ("/metrics", "/healthz", "/readyz"):
            assert get(s, p)[0] == 200, p
    with pytest.raises(ValueError, match="empty bearer token"):
        StatusServer("127.0.0.1", 0, registry, token="")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 from the openssl CLI (the `cryptography` package is not installed here)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found; needed to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


def test_tls(run, registry: CollectorRegistry, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    cfg = MetricsConfig(host="127.0.0.1", port=0, tls_certfile=cert, tls_keyfile=key, checkpoint_token=TOKEN)
    with StatusServer.from_config(cfg, registry, run[0], lambda: (True, "ready")) as s:
        assert s.url.startswith("https://")
        trusting = ssl.create_default_context(cafile=str(cert))
        assert get(s, "/healthz", ctx=trusting)[::2] == (200, b"ok\n")
        code, headers, body = get(s, "/checkpoints/latest/a/cfg.json", {"Authorization": f"Bearer {TOKEN}"}, trusting)
        assert code == 200 and headers["X-Checkpoint-SHA256"] == hashlib.sha256(body).hexdigest()
        with pytest.raises(ssl.SSLCertVerificationError):
            get(s, "/healthz", ctx=ssl.create_default_context())  # system CAs do not trust it
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            get(s, "/healthz")  # plain HTTP on the TLS port
        # the server survives failed handshakes
        assert urllib.request.urlopen(f"{s.url}/healthz", context=trusting, timeout=10).status == 200


def test_bad_tls_files_fail_at_start(registry: CollectorRegistry, tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a cert")
    with pytest.raises(ssl.SSLError):
        StatusServer("127.0.0.1", 0, registry, tls=(tmp_path / "c.pem", tmp_path / "c.pem")).start()


def test_stop_releases_the_port(registry: CollectorRegistry) -> None:
    s = StatusServer("127.0.0.1", 0, registry).start()
    port = s.port
    s.stop()
    with StatusServer("127.0.0.1", port, registry) as again:
        assert get(again, "/healthz")[0] == 200


# ---- bounded resources: a deadline on the request head, a worker pool, a connection cap --------------------------


def _connect(server: StatusServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_a_client_dripping_bytes_is_cut_off_at_the_header_deadline(registry: CollectorRegistry) -> None:
    """A byte every 0.2 s never trips a per-read timeout; the deadline on the whole head closes it after ~1 s."""
    with StatusServer("127.0.0.1", 0, registry, header_timeout=1.0, io_timeout=5.0) as s:
        sock = _connect(s)
        t0 = time.monotonic()
        closed_after = None
        try:
            for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([b]))
                time.sleep(0.2)
                if time.monotonic() - t0 > 6:
                    break
        except OSError:  # reset or broken pipe: the server closed it
            closed_after = time.monotonic() - t0
        if closed_after is None:
            sock.settimeout(3)
            assert sock.recv(100) == b""  # closed without an answer
            closed_after = time.monotonic() - t0
        sock.close()
        assert 0.9 < closed_after < 4, closed_after
        assert get(s, "/healthz")[0] == 200  # and it serves the next client


def test_connections_share_a_fixed_pool_and_the_cap_answers_503(registry: CollectorRegistry) -> None:
    """50 idle connections cost no thread each; past max_connections the answer is an immediate 503 (Retry-After)
    from the accept loop; when the held ones go, requests are served again."""
    before = threading.active_count()
    with StatusServer("127.0.0.1", 0, registry, workers=2, max_connections=4, header_timeout=30) as s:
        started = threading.active_count()
        assert started - before <= 3  # the accept loop and two workers
        held = [_connect(s) for _ in range(4)]  # two on the workers, two queued, none sending
        time.sleep(0.3)
        t0 = time.monotonic()
        code, headers, body = get(s, "/healthz")
        assert (code, headers.get("Retry-After"), body) == (503, "1", b"busy\n")
        assert time.monotonic() - t0 < 2
        more = [_connect(s) for _ in range(50)]
        time.sleep(0.3)
        assert threading.active_count() == started
        for c in held + more:
            c.close()
        deadline = time.monotonic() + 10
        while (code := get(s, "/healthz")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code == 200
    with pytest.raises(ValueError, match="max_connections"):
        StatusServer("127.0.0.1", 0, registry, workers=4, max_connections=2)


def test_limits_come_from_the_config(run, registry: CollectorRegistry) -> None:
    cfg = MetricsConfig(host="127.0.0.1", port=0, http_workers=3, http_max_connections=5,
                        http_header_timeout_seconds=2.5)
    s = StatusServer.from_config(cfg, registry, run[0], lambda: (True, "ready"))
    assert (s.limits["workers"], s.limits["max_connections"], s.limits["header_timeout"]) == (3, 5, 2.5)
    with pytest.raises(ValueError, match="http_max_connections"):
        MetricsConfig(http_workers=8, http_max_connections=4)


def test_tls_handshake_is_bounded_too(run, registry: CollectorRegistry, tmp_path: Path) -> None:
    """A client that connects to the TLS port and never says hello is dropped at the header deadline."""
    cert, key = self_signed(tmp_path)
    with StatusServer("127.0.0.1", 0, registry, tls=(cert, key), header_timeout=1.0) as s:
        sock = _connect(s)
        t0 = time.monotonic()
        sock.settimeout(5)
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 3
        sock.close()
        trusting = ssl.create_default_context(cafile=str(cert))
        assert get(s, "/healthz", ctx=trusting)[0] == 200


def test_the_token_never_reaches_the_logs(run, registry: CollectorRegistry, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with StatusServer("127.0.0.1", 0, registry, store=run[0], token=TOKEN, header_timeout=1.0) as s:
        assert get(s, "/checkpoints/latest", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert get(s, "/checkpoints/latest", {"Authorization": f"Bearer {TOKEN}x"})[0] == 401
        assert get(s, "/checkpoints/000000000200/../x", {"Authorization": f"Bearer {TOKEN}"})[0] == 404
        sock = _connect(s)  # a malformed request carrying the token, then one cut off mid-header
        sock.sendall(f"BROKEN\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        sock.recv(1000)
        sock.close()
        sock = _connect(s)
        sock.sendall(f"GET /checkpoints HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n".encode())
        sock.settimeout(5)
        assert sock.recv(100) == b""
        sock.close()
    assert "GET /checkpoints/latest" in caplog.text  # requests are logged ...
    assert TOKEN not in caplog.text  # ... their credentials are not
