"""pull() against a live StatusServer (full, per-SAE, token, TLS, corruption) and load_sae from every kind of source."""

from __future__ import annotations

import json
from collections.abc import Iterator
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
    assert pull(server.url, out) == got  # already complete: nothing to do


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
