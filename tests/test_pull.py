"""pull() against a live StatusServer (full, per-SAE, token, TLS, corruption, a damaged or stale cache), against
hostile or busy servers (redirects, sizes, names, 503), and load_sae from every kind of source."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from streamd.run.checkpoints import CheckpointStore, SAEExport, checkpoint_id
from streamd.config import SAEConfig
from streamd.client.load import load_sae
from streamd.client.pull import PullError, pull
from streamd.sae import ARCHITECTURES, SAE, build_sae
from streamd.run.server import StatusServer
from tests.test_checkpoints import HOOK, make_sae, write
from tests.test_serve import self_signed

torch.set_num_threads(1)
D_IN = 16
SCALE = 2.5  # training-time input scale: exports must work on raw activations anyway
LATEST = checkpoint_id(2, 64)  # the second checkpoint of the ``store`` fixture


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "run", keep_last=3)
    write(store, 50, [make_sae("a", 1)])
    write(store, 64, [make_sae("a", 1), make_sae("b", 2)])
    return store


@pytest.fixture
def server(store: CheckpointStore) -> Iterator[StatusServer]:
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=store) as s:
        yield s


def test_pull_everything_is_a_verifiable_replica(server: StatusServer, store: CheckpointStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    got = pull(server.url, out)
    assert got == out / LATEST
    src = store.latest()
    assert sorted(p.relative_to(got) for p in got.rglob("*")) == sorted(p.relative_to(src) for p in src.rglob("*"))
    assert CheckpointStore.verify(got)["id"] == LATEST
    assert [p.name for p in out.iterdir()] == [LATEST]  # no temp dirs left
    assert pull(server.url, out) == got  # already complete and verified: nothing to fetch
    CheckpointStore.verify(got)


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "extra", "manifest"])
def test_a_damaged_local_copy_is_fetched_again(server: StatusServer, store: CheckpointStore, tmp_path: Path,
                                               damage: str) -> None:
    """What is already in out/<id> is re-hashed, not trusted: a damaged part is fetched again."""
    out = tmp_path / "out"
    got = pull(server.url, out)
    weights = got / "b" / "sae_weights.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "remove":
        weights.unlink()
    elif damage == "extra":
        (got / "b" / "planted.bin").write_bytes(b"not in the manifest")
    else:  # a manifest that is not the server's: the whole directory is another checkpoint
        (got / "manifest.json").write_text((got / "manifest.json").read_text().replace('"tiny"', '"other"'))
    assert pull(server.url, out) == got
    assert CheckpointStore.verify(got)["id"] == LATEST
    assert (got / "manifest.json").read_bytes() == (store.latest() / "manifest.json").read_bytes()
    assert [p.name for p in out.iterdir()] == [LATEST]


def test_a_new_run_on_the_same_port_is_not_served_from_the_cache(tmp_path: Path) -> None:
    """Issue 13.5: two runs behind the same host:port, each with a checkpoint of the same id but other weights:
    load_sae(url) must return the second run's SAE, not the cached first."""
    cache = tmp_path / "cache"
    first, second = CheckpointStore(tmp_path / "run1"), CheckpointStore(tmp_path / "run2")
    write(first, 64, [make_sae("a", 1), make_sae("b", 2)])
    write(second, 64, [make_sae("a", 3), make_sae("b", 4)])
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=first) as s:
        port = s.port
        one = load_sae(s.url, sae="a", cache_dir=cache)
        assert pull(s.url, cache / f"127.0.0.1_{port}", sae="b").name == checkpoint_id(1, 64)
    with StatusServer("127.0.0.1", port, CollectorRegistry(), store=second) as s:
        two = load_sae(s.url, sae="a", cache_dir=cache)
    want = load_sae(second.latest(), sae="a")
    assert not torch.equal(one.W_enc, two.W_enc)
    assert torch.equal(two.W_enc, want.W_enc) and torch.equal(two.b_dec, want.b_dec)
    # the first run's other SAE went with its checkpoint: what is cached is the second run's, verifiably
    cached = cache / f"127.0.0.1_{port}" / checkpoint_id(1, 64)
    assert {p.name for p in cached.iterdir()} == {"a", "manifest.json"}
    assert (cached / "manifest.json").read_bytes() == (second.latest() / "manifest.json").read_bytes()


def test_pull_one_sae_then_another(server: StatusServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    got = pull(server.url + "/", out, sae="b")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*")) == [
        "b", "b/cfg.json", "b/sae_weights.safetensors", "b/sparsity.safetensors", "manifest.json"]
    pull(server.url, out, sae="a")
    assert {p.name for p in got.iterdir()} == {"a", "b", "manifest.json"}
    assert [p.name for p in out.iterdir()] == [LATEST]
    with pytest.raises(PullError, match="no SAE 'zz'"):
        pull(server.url, out, sae="zz")


def test_sha_mismatch_detected_and_nothing_left(server: StatusServer, store: CheckpointStore, tmp_path: Path) -> None:
    weights = store.latest() / "b" / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(PullError, match="sha256"):
        pull(server.url, out)
    assert not out.exists() or list(out.iterdir()) == []
    with pytest.raises(PullError, match="sha256"):
        pull(server.url, out, sae="b")
    assert list(out.iterdir()) == []
    assert pull(server.url, out, sae="a").name == LATEST  # the intact SAE still pulls


def test_pull_errors(tmp_path: Path) -> None:
    empty = CheckpointStore(tmp_path / "empty", writer=False)
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=empty) as s:
        with pytest.raises(PullError, match="HTTP 404"):
            pull(s.url, tmp_path / "out")
        port = s.port
    with pytest.raises(PullError, match="GET http://127.0.0.1"):
        pull(f"http://127.0.0.1:{port}", tmp_path / "out", timeout=5)


def test_pull_over_tls_with_token(store: CheckpointStore, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=store, token="tok", tls=(cert, key)) as s:
        with pytest.raises(PullError, match="HTTP 401.*token"):
            pull(s.url, tmp_path / "out", cafile=cert)
        with pytest.raises(PullError, match="CERTIFICATE_VERIFY_FAILED"):
            pull(s.url, tmp_path / "out", token="tok")
        got = pull(s.url, tmp_path / "out", token="tok", cafile=cert)
    CheckpointStore.verify(got)


# ---- load_sae ---------------------------------------------------------------------------------------------------


def trained_like(arch: str) -> SAE:
    """An SAE of ``arch`` with non-trivial biases and thresholds, as if trained."""
    g = torch.Generator().manual_seed(len(arch))
    params = {"k": 5} if "k" in ARCHITECTURES[arch].model_fields else {}
    sae = build_sae(SAEConfig(name=arch, architecture=arch, d_sae=4 * D_IN, **params), D_IN, g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.b_dec.normal_(0, 1.0, generator=g)
        if arch == "jumprelu":
            sae.threshold.uniform_(0, 0.5, generator=g)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval()


def export(sae: SAE) -> SAEExport:
    return SAEExport(sae.cfg.name, sae.saelens_cfg(), sae.export_tensors(SCALE), torch.full((sae.d_sae,), -3.0))


@pytest.fixture
def zoo(tmp_path: Path) -> tuple[dict[str, SAE], CheckpointStore]:
    """One checkpoint holding one SAE of every architecture, exported at input scale SCALE."""
    saes = {arch: trained_like(arch) for arch in ARCHITECTURES}
    store = CheckpointStore(tmp_path / "zoo", keep_last=2)
    store.write(1000, [export(s) for s in saes.values()], {}, {}, {"model_name": "tiny"}, HOOK)
    return saes, store


def assert_same_sae(loaded: SAE, original: SAE) -> None:
    """Loaded module on raw x == original (trained on x * SCALE), in latents and in raw-unit reconstructions."""
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(7)) * 3
    with torch.no_grad():
        f_orig = original.encode(x * SCALE)
        f = loaded.encode(x)
        assert f.count_nonzero() > 0 and torch.equal(f != 0, f_orig != 0)
        torch.testing.assert_close(f, f_orig, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.decode(f), original.decode(f_orig) / SCALE, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_load_sae_from_sae_dir_and_checkpoint_dir(zoo, arch: str) -> None:
    saes, store = zoo
    ckpt = store.latest()
    assert_same_sae(load_sae(ckpt / arch), saes[arch])
    assert_same_sae(load_sae(ckpt, sae=arch), saes[arch])


def test_load_sae_from_run_dir_and_url(zoo, tmp_path: Path) -> None:
    saes, store = zoo
    assert_same_sae(load_sae(store.run_dir, sae="topk"), saes["topk"])
    assert_same_sae(load_sae(str(store.dir), sae="relu"), saes["relu"])
    with pytest.raises(ValueError, match="name one"):
        load_sae(store.run_dir)
    with pytest.raises(ValueError, match="no SAE 'nope'"):
        load_sae(store.latest(), sae="nope")
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nowhere")
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=store) as s:
        cache = tmp_path / "cache"
        assert_same_sae(load_sae(s.url, sae="jumprelu", cache_dir=cache), saes["jumprelu"])
        [pulled] = list(cache.iterdir())
        assert pulled.name == f"127.0.0.1_{s.port}"
        assert {p.name for p in (pulled / checkpoint_id(1, 1000)).iterdir()} == {"jumprelu", "manifest.json"}


def test_single_sae_checkpoint_needs_no_name(store: CheckpointStore) -> None:
    first = store.list()[0].path  # holds only "a" (topk, k=4, from test_checkpoints.make_sae)
    sae = load_sae(first)
    cfg = json.loads((first / "a" / "cfg.json").read_text())
    assert (sae.d_in, sae.d_sae, sae.cfg.k) == (cfg["d_in"], cfg["d_sae"], 4)
    f = sae.encode(torch.randn(5, cfg["d_in"]))
    assert ((f != 0).sum(-1) <= 4).all() and f.count_nonzero() > 0


def test_load_sae_from_the_latest_pointer_and_default_cache(zoo, tmp_path: Path, monkeypatch) -> None:
    saes, store = zoo
    assert_same_sae(load_sae(store.dir / "latest", sae="relu"), saes["relu"])
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(FileNotFoundError, match="does not name a checkpoint"):
        load_sae(tmp_path / "latest")
    monkeypatch.setenv("STREAMD_CACHE", str(tmp_path / "cache"))
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=store) as s:
        assert_same_sae(load_sae(s.url, sae="topk"), saes["topk"])
        assert (tmp_path / "cache" / "pulls" / f"127.0.0.1_{s.port}" / checkpoint_id(1, 1000) / "topk").is_dir()


# ---- the client against hostile or busy servers: redirects, sizes, names, 503, where the token comes from -------


class Front:
    """A small http.server on 127.0.0.1 (TLS with ``tls=(cert, key)``) whose ``route(handler)`` answers each GET;
    ``seen`` records (path, Authorization header) of every request it got."""

    def __init__(self, route, tls: tuple[Path, Path] | None = None) -> None:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                front.seen.append((self.path, self.headers.get("Authorization")))
                route(self)

            def log_message(self, *args) -> None:
                pass

        self.seen: list[tuple[str, str | None]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self) -> Front:
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(h: BaseHTTPRequestHandler, code: int, body: bytes = b"", headers: dict | None = None) -> None:
    h.send_response(code)
    for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def redirect_to(base: str):
    return lambda h: answer(h, 302, headers={"Location": base + h.path})


def proxy_to(base: str):
    """Forward the GET (with the Authorization it came with) to ``base`` and relay the answer."""

    def route(h: BaseHTTPRequestHandler) -> None:
        auth = h.headers.get("Authorization")
        req = urllib.request.Request(base + h.path, headers={"Authorization": auth} if auth else {})
        try:
            resp = urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            resp = e
        with resp:
            body = resp.read()
            keep = {k: resp.headers[k] for k in ("X-Checkpoint-SHA256", "WWW-Authenticate") if resp.headers[k]}
            answer(h, resp.status if hasattr(resp, "status") else resp.code, body, keep)

    return route


@pytest.fixture
def guarded(store: CheckpointStore) -> Iterator[StatusServer]:
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=store, token="tok") as s:
        yield s


def test_the_token_does_not_follow_a_redirect_to_another_origin(guarded: StatusServer, tmp_path: Path) -> None:
    """Another port is another origin: the redirect is followed without the token, so the guarded server says 401."""
    with Front(lambda h: answer(h, 404)) as sink, Front(redirect_to(sink.url)) as to_sink:
        with pytest.raises(PullError, match="HTTP 404"):
            pull(to_sink.url, tmp_path / "out", token="tok")
        assert to_sink.seen == [("/checkpoints/latest", "Bearer tok")]
        assert [auth for _, auth in sink.seen] == [None]
    with Front(redirect_to(guarded.url)) as to_trainer:
        with pytest.raises(PullError, match="HTTP 401"):
            pull(to_trainer.url, tmp_path / "out", token="tok")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_redirect_within_the_origin_keeps_the_token(guarded: StatusServer, tmp_path: Path) -> None:
    """/v1/... redirects to /... on the same host and port (which proxies to the trainer): the token goes along."""
    proxy = proxy_to(guarded.url)

    def route(h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/v1/"):
            answer(h, 301, headers={"Location": h.path.removeprefix("/v1")})
        else:
            proxy(h)

    with Front(route) as front:
        got = pull(front.url + "/v1", tmp_path / "out", token="tok")
    CheckpointStore.verify(got)
    assert all(auth == "Bearer tok" for _, auth in front.seen) and len(front.seen) > 10


def test_a_redirect_from_https_to_http_is_refused(guarded: StatusServer, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with Front(proxy_to(guarded.url)) as plain, Front(redirect_to(plain.url), tls=(cert, key)) as secure:
        with pytest.raises(PullError, match="https"):
            pull(secure.url, tmp_path / "out", token="tok", cafile=cert)
        assert plain.seen == []  # nothing went out in the clear, token or not


def fake_trainer(desc: dict, bodies: dict[str, bytes], headers: dict[str, dict] | None = None):
    """A route serving ``desc`` at /checkpoints/latest and ``bodies[rel]`` at /checkpoints/<id>/<rel>."""

    def route(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/checkpoints/latest":
            return answer(h, 200, json.dumps(desc).encode())
        rel = h.path.removeprefix(f"/checkpoints/{desc['id']}/")
        if rel in bodies:
            return answer(h, 200, bodies[rel], (headers or {}).get(rel))
        answer(h, 404)

    return route


def real_description(store: CheckpointStore) -> tuple[dict, dict[str, bytes]]:
    from streamd.run.server import describe_checkpoint

    ckpt = store.latest()
    desc = describe_checkpoint(ckpt)
    return desc, {rel: (ckpt / rel).read_bytes() for rel in desc["files"]}


def test_sizes_are_enforced(store: CheckpointStore, tmp_path: Path) -> None:
    desc, bodies = real_description(store)
    rel = "a/sae_weights.safetensors"
    size = desc["files"][rel]["size"]
    # a body far larger than listed (no Content-Length: a stream that would not stop): cut at the listed size
    huge = bytes(4 << 20)

    def endless(h: BaseHTTPRequestHandler) -> None:
        if h.path.endswith(rel):
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            try:
                h.wfile.write(huge)
            except OSError:
                pass
        else:
            fake_trainer(desc, bodies)(h)

    with Front(endless) as f:
        with pytest.raises(PullError, match=f"more bytes than the listed size {size}"):
            pull(f.url, tmp_path / "out", sae="a")
    with Front(fake_trainer(desc, {**bodies, rel: bodies[rel] + b"x"})) as f:  # Content-Length says more
        with pytest.raises(PullError, match="not the listed size"):
            pull(f.url, tmp_path / "out", sae="a")
    with Front(fake_trainer(desc, {**bodies, rel: bodies[rel][:-1]})) as f:
        with pytest.raises(PullError, match="not the listed size"):
            pull(f.url, tmp_path / "out", sae="a")
    big = {**desc, "padding": "x" * (17 << 20)}
    with Front(fake_trainer(big, bodies)) as f:
        with pytest.raises(PullError, match="more than"):
            pull(f.url, tmp_path / "out", sae="a")
    unsized = json.loads(json.dumps(desc))
    del unsized["files"][rel]["size"]
    with Front(fake_trainer(unsized, bodies)) as f:
        with pytest.raises(PullError, match="without a valid sha256 and size"):
            pull(f.url, tmp_path / "out", sae="a")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "../../../tmp/evil", "/etc/evil", ".hidden", "a/b/c",
                                  "a/", "a\\..\\evil", "..", "a/.."])
def test_unsafe_names_in_a_description_are_refused(store: CheckpointStore, tmp_path: Path, name: str) -> None:
    desc, bodies = real_description(store)
    desc["files"][name] = {"sha256": "0" * 64, "size": 4}
    bodies[name] = b"evil"
    out = tmp_path / "deep" / "er" / "out"
    with Front(fake_trainer(desc, bodies)) as f:
        with pytest.raises(PullError, match="unsafe file name"):
            pull(f.url, out)
    assert not (tmp_path / "deep").exists() or [p for p in (tmp_path / "deep").rglob("*") if p.is_file()] == []
    assert not any(p.read_bytes() == b"evil" for p in tmp_path.rglob("*") if p.is_file())


@pytest.fixture
def quick_backoff(monkeypatch) -> None:
    import streamd.client.pull as pull_module

    monkeypatch.setattr(pull_module, "BUSY_BACKOFF_S", 0.05, raising=False)


def test_a_busy_server_is_retried_with_backoff(store: CheckpointStore, tmp_path: Path, quick_backoff) -> None:
    """Three 503s (the connection cap's answer), then the trainer: the pull waits and succeeds."""
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=store) as s:
        proxy, busy = proxy_to(s.url), iter(range(3))

        def route(h: BaseHTTPRequestHandler) -> None:
            if next(busy, None) is not None:
                return answer(h, 503, b"busy\n", {"Retry-After": "0"})
            proxy(h)

        with Front(route) as f:
            t0 = time.monotonic()
            got = pull(f.url, tmp_path / "out", sae="a")
        assert 0.15 < time.monotonic() - t0 < 20  # it waited (0.05 s doubling, jittered)
        assert [p for p, _ in f.seen[:4]] == ["/checkpoints/latest"] * 4
        assert (got / "a" / "sae_weights.safetensors").is_file()
        with Front(lambda h: answer(h, 503, b"busy\n", {"Retry-After": "0"})) as always:
            with pytest.raises(PullError, match="HTTP 503"):
                pull(always.url, tmp_path / "out", retries=2)
            assert len(always.seen) == 3


def test_a_full_server_sheds_load_and_pulls_still_complete(store: CheckpointStore, tmp_path: Path,
                                                           quick_backoff) -> None:
    """The real connection cap: one worker, two slots, 12 concurrent pulls; each one retries its 503s and
    verifies."""
    with StatusServer("127.0.0.1", 0, CollectorRegistry(), store=store, workers=1, max_connections=2) as s:
        results: list[object] = []

        def one(i: int) -> None:
            try:
                results.append(pull(s.url, tmp_path / f"out{i}", sae="b", retries=30))
            except Exception as e:  # noqa: BLE001
                results.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert s._httpd.rejected > 0  # the cap was reached ...
    assert len(results) == 12 and all(isinstance(r, Path) for r in results), results  # ... and nobody failed
    for r in results:
        assert sorted(p.relative_to(r).as_posix() for p in r.rglob("*") if p.is_file())[-1] == "manifest.json"


def test_the_token_from_a_file_or_the_environment(guarded: StatusServer, tmp_path: Path, monkeypatch,
                                                  caplog) -> None:
    from streamd.cli import main
    from streamd.client.pull import TOKEN_ENV

    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(PullError, match="HTTP 401"):
        pull(guarded.url, tmp_path / "out", sae="a")
    tok = tmp_path / "token"
    tok.write_text("tok\n")
    tok.chmod(0o600)
    assert pull(guarded.url, tmp_path / "f", sae="a", token_file=tok).name == LATEST
    assert main(["pull", guarded.url, "--out", str(tmp_path / "cli"), "--sae", "b", "--token-file", str(tok)]) == 0
    assert (tmp_path / "cli" / LATEST / "b").is_dir()
    monkeypatch.setenv(TOKEN_ENV, "tok")
    assert main(["pull", guarded.url, "--out", str(tmp_path / "env"), "--sae", "a"]) == 0
    sae = load_sae(guarded.url, sae="b", cache_dir=tmp_path / "cache")
    assert sae.d_sae > 0
    assert main(["pull", guarded.url, "--out", str(tmp_path / "x"), "--token", "wrong"]) == 1  # argv wins over env
    monkeypatch.delenv(TOKEN_ENV)
    assert load_sae(guarded.url, sae="a", cache_dir=tmp_path / "c2", token_file=tok).d_sae > 0
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PullError, match="empty"):
        pull(guarded.url, tmp_path / "out", token_file=tmp_path / "empty")
    with pytest.raises(PullError, match="cannot read the token file"):
        pull(guarded.url, tmp_path / "out", token_file=tmp_path / "missing")
    assert "tok\n" not in caplog.text and "Bearer tok" not in caplog.text


def test_eval_takes_the_token_from_file_env_then_config(tmp_path: Path, monkeypatch) -> None:
    """eval_checkpoint's token for a URL: --token-file, else $STREAMD_CHECKPOINT_TOKEN, else metrics.checkpoint_token
    (the model is never loaded: fetch is stopped once it has the token)."""
    from streamd.client import evaluate, locate
    from streamd.client.pull import TOKEN_ENV
    from streamd.config import MetricsConfig, StreamdConfig

    got = []

    def fake_fetch(src, sae=None, *, token=None, **kw):
        got.append(token)
        raise RuntimeError("stop here")

    monkeypatch.setattr(locate, "fetch", fake_fetch)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cfg = StreamdConfig(metrics=MetricsConfig(checkpoint_token="from-config"))
    (tmp_path / "t").write_text("from-file\n")
    for env in (None, "from-env"):
        if env:
            monkeypatch.setenv(TOKEN_ENV, env)
        for kw in ({}, {"token_file": tmp_path / "t"}):
            with pytest.raises(RuntimeError, match="stop here"):
                evaluate.eval_checkpoint(cfg, "http://127.0.0.1:1", **kw)
    assert got == ["from-config", "from-file", "from-env", "from-file"]
    from streamd.cli import build_parser

    args = build_parser().parse_args(["eval", "http://h:1", "--token-file", "/x", "--cafile", "/ca"])
    assert (str(args.token_file), str(args.cafile)) == ("/x", "/ca")
