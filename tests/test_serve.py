"""StatusServer over real sockets: every endpoint, 404s, path-traversal attempts, bearer token, TLS, readiness."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import ssl
import subprocess
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
