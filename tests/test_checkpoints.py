"""CheckpointStore: atomic layout, latest pointer, retention, verification, failure injection, crash debris."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamd.run import checkpoints
from streamd.run.checkpoints import ID_RE, CheckpointError, CheckpointStore, SAEExport, checkpoint_id, checkpoint_seq

HOOK = "blocks.3.hook_resid_post"
D_IN, D_SAE = 8, 32


def make_sae(name: str = "topk-k4", seed: int = 0, arch: str = "topk") -> SAEExport:
    g = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    cfg = {"architecture": arch, "k": 4} if arch == "topk" else {"architecture": arch}
    return SAEExport(name, cfg, weights, sparsity=torch.full((D_SAE,), -2.0))


def write(store: CheckpointStore, tokens: int, saes: list[SAEExport] | None = None) -> Path:
    return store.write(
        tokens,
        saes or [make_sae()],
        trainer_state={"step": tokens // 10, "adam": {"m": torch.ones(3)}},
        offsets={"acts": {0: tokens, 1: tokens + 1}},
        manifest={"streamd_version": "0.1.0", "config": {"trainer": {"d_in": D_IN}}, "model_name": "tiny"},
        hook_name=HOOK,
    )


def tmp_dirs(store: CheckpointStore) -> list[Path]:
    return list(store.dir.glob(".tmp-*"))


def test_layout_and_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    a, b = make_sae("a", 1), make_sae("b", 2, arch="standard")
    path = write(store, 123456, [a, b])

    ckid = checkpoint_id(1, 123456)
    assert ckid == "00000100000000123456" and ID_RE.match(ckid)
    assert path == tmp_path / "checkpoints" / ckid
    assert (store.dir / "latest").read_text().strip() == ckid
    assert store.latest() == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tokens"] == 123456 and manifest["saes"] == ["a", "b"] and manifest["hook_name"] == HOOK
    assert manifest["config"] == {"trainer": {"d_in": D_IN}}
    sae_files = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
    expected = {"trainer_state.pt", "offsets.json"} | {f"{n}/{f}" for n in "ab" for f in sae_files}
    assert set(manifest["files"]) == expected
    assert store.verify(path)["id"] == ckid

    cfg = json.loads((path / "a" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 4, D_IN, D_SAE)
    assert cfg["dtype"] == "float32" and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["device"] == "cpu"
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    w = load_file(path / "b" / "sae_weights.safetensors")
    assert set(w) == {"W_enc", "W_dec", "b_enc", "b_dec"} and torch.equal(w["W_dec"], b.weights["W_dec"])
    assert torch.equal(load_file(path / "a" / "sparsity.safetensors")["sparsity"], a.sparsity)

    assert store.read_offsets(path) == {"acts": {0: 123456, 1: 123457}}
    state = store.read_trainer_state(path)
    assert state["step"] == 12345 and torch.equal(state["adam"]["m"], torch.ones(3))
    [info] = store.list()
    assert (info.id, info.tokens, info.saes, info.path) == (ckid, 123456, ["a", "b"], path)


def test_bad_exports_rejected_before_touching_disk(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    bad = make_sae()
    bad.weights["b_dec"] = torch.zeros(D_IN + 1)
    with pytest.raises(ValueError, match="b_dec"):
        write(store, 10, [bad])
    with pytest.raises(ValueError, match="safe directory name"):
        write(store, 10, [make_sae("..")])
    with pytest.raises(ValueError, match="unique"):
        write(store, 10, [make_sae("x"), make_sae("x")])
    assert list(store.dir.iterdir()) == []


def test_retention_keeps_last_k(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    for t in (100, 200, 300, 400):
        write(store, t)
    assert [i.tokens for i in store.list()] == [300, 400]
    assert store.latest() == store.dir / checkpoint_id(4, 400)
    assert tmp_dirs(store) == []


def test_retention_never_deletes_what_latest_names(tmp_path: Path) -> None:
    """Rolled back to an old checkpoint and resumed with a smaller keep_last: what latest names is never deleted,
    and a write at the same token count as an existing checkpoint makes a new one (new id, sorts last, kept)."""
    for t in (100, 200, 300):
        write(CheckpointStore(tmp_path, keep_last=3), t)
    store = CheckpointStore(tmp_path, keep_last=1)
    first = store.list()[0]
    (store.dir / "latest").write_text(first.id + "\n")  # the operator rolls back to the first checkpoint
    store._apply_retention()
    assert store.latest() == first.path and [i.tokens for i in store.list()] == [100, 300]
    path = write(store, 100, [make_sae(seed=9)])  # the resumed run reaches the same token count: new weights
    assert path.name != first.id and path.name == checkpoint_id(4, 100)
    assert store.latest() == path and [i.path for i in store.list()] == [path]  # sorts last; the rest retired
    assert store.verify(path)["id"] == path.name
    got = load_file(path / "topk-k4" / "sae_weights.safetensors")["W_enc"]
    assert torch.equal(got, make_sae(seed=9).weights["W_enc"])


def test_same_tokens_twice_writes_two_checkpoints(tmp_path: Path) -> None:
    """No tokens trained between two writes still means two checkpoints: the second one's offsets are the truth."""
    store = CheckpointStore(tmp_path, keep_last=5)
    a = write(store, 500)
    b = store.write(500, [make_sae(seed=3)], {"step": 1}, {"acts": {0: 777}}, {"streamd_version": "x"}, HOOK)
    assert a != b and store.latest() == b and [i.id for i in store.list()] == [a.name, b.name]
    assert store.read_offsets(b) == {"acts": {0: 777}} and store.read_offsets(a) == {"acts": {0: 500, 1: 501}}
    (store.dir / "latest").unlink()  # a deleted pointer (or a crash before it moved): still a new id
    c = write(store, 500)
    assert c.name not in (a.name, b.name) and int(c.name) > int(b.name) and store.latest() == c


def test_ids_of_the_previous_version_sort_first(tmp_path: Path) -> None:
    old = tmp_path / "checkpoints" / "000000001792"
    store = CheckpointStore(tmp_path, keep_last=5)
    old.mkdir()
    (store.dir / "latest").write_text(old.name + "\n")
    assert checkpoint_seq(old.name) == 0 and store._next_seq() == 1
    new = write(store, 1024)  # fewer tokens than the old one, written later: sorts after it
    assert checkpoint_seq(new.name) == 1 and int(new.name) > int(old.name) and store.latest() == new
    with pytest.raises(ValueError):
        checkpoint_id(0, 5)
    with pytest.raises(ValueError):
        checkpoint_id(1, 10**14)
    assert sorted([checkpoint_id(2, 5), checkpoint_id(1, 10**13)], key=int)[0] == checkpoint_id(1, 10**13)


def test_verify_detects_corruption_missing_and_extra_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    path = write(store, 5)
    weights = path / "topk-k4" / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"topk-k4/sae_weights.safetensors: sha256"):
        store.verify(path)
    weights.unlink()
    (path / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError) as e:
        store.verify(path)
    assert "sae_weights.safetensors: missing" in str(e.value) and "stray.bin: not in manifest" in str(e.value)


def count_writes(monkeypatch: pytest.MonkeyPatch, store: CheckpointStore, tokens: int) -> int:
    calls = []
    real = checkpoints.write_bytes
    monkeypatch.setattr(checkpoints, "write_bytes", lambda p, d: (calls.append(p), real(p, d))[1])
    write(store, tokens)
    monkeypatch.setattr(checkpoints, "write_bytes", real)
    return len(calls)


def test_enospc_at_every_write_leaves_previous_state_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep_last=5)
    first = write(store, 1000)
    n_writes = count_writes(monkeypatch, CheckpointStore(tmp_path / "probe", keep_last=5), 2000)
    assert n_writes == 7  # 3 SAE files, trainer state, offsets, manifest, latest pointer
    real = checkpoints.write_bytes
    for fail_at in range(n_writes):
        calls = []

        def flaky(path: Path, data: bytes) -> None:
            calls.append(path)
            if len(calls) == fail_at + 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real(path, data)

        monkeypatch.setattr(checkpoints, "write_bytes", flaky)
        with pytest.raises(CheckpointError, match="no space left") as e:
            write(store, 2000)
        assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
        assert store.latest() == first, f"latest moved when write {fail_at} failed"
        assert [i.tokens for i in store.list()] == [1000]
        assert tmp_dirs(store) == [], f"debris left when write {fail_at} failed"
        store.verify(first)
    monkeypatch.setattr(checkpoints, "write_bytes", real)
    assert write(store, 2000) == store.latest()  # the next attempt, with space, succeeds


def test_stale_tmp_dirs_removed_by_writer_only(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    good = write(store, 7)
    stale = store.dir / f".tmp-{checkpoint_id(2, 9)}-deadbeef"
    (stale / "topk-k4").mkdir(parents=True)
    (stale / "topk-k4" / "cfg.json").write_text("{")
    (store.dir / ".tmp-latest-0000").write_text(checkpoint_id(2, 9))

    reader = CheckpointStore(tmp_path, writer=False)
    assert stale.exists() and reader.latest() == good
    with pytest.raises(CheckpointError, match="read-only"):
        write(reader, 11)

    CheckpointStore(tmp_path, keep_last=3)
    assert tmp_dirs(store) == []
    assert store.latest() == good and [i.tokens for i in store.list()] == [7]


def test_empty_and_bad_pointer(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, writer=False)
    assert store.latest() is None and store.list() == []
    store = CheckpointStore(tmp_path, keep_last=1)
    write(store, 3)
    (store.dir / "latest").write_text("../../etc\n")
    assert store.latest() is None
    with pytest.raises(CheckpointError, match="offsets"):
        store.read_offsets(tmp_path)


def enospc_for(monkeypatch: pytest.MonkeyPatch, n_calls: int) -> list[Path]:
    """The next ``n_calls`` writes fail with ENOSPC, later ones succeed; returns the list of attempted paths."""
    real, calls = checkpoints.write_bytes, []

    def full(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) <= n_calls:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoints, "write_bytes", full)
    return calls


def test_enospc_frees_older_checkpoints_and_retries_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep_last=5)
    for t in (100, 200, 300):
        write(store, t)
    good = store.latest()
    enospc_for(monkeypatch, 1)
    path = write(store, 400)  # the first attempt fails; older checkpoints go; the retry succeeds
    assert store.latest() == path and [i.tokens for i in store.list()] == [300, 400]
    store.verify(path), store.verify(good)
    assert tmp_dirs(store) == []


def test_enospc_on_the_retry_too_keeps_the_latest_good_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep_last=5)
    for t in (100, 200):
        write(store, t)
    good = store.latest()
    calls = enospc_for(monkeypatch, 10**6)
    with pytest.raises(CheckpointError, match="no space left"):
        write(store, 300)
    assert len(calls) == 2  # one attempt, one retry: never more
    assert store.latest() == good and [i.tokens for i in store.list()] == [200] and tmp_dirs(store) == []
    store.verify(good)
    calls.clear()
    with pytest.raises(CheckpointError, match="no space left"):
        write(store, 300)  # nothing left to free: no retry, the latest good one stays
    assert len(calls) == 1 and store.latest() == good


@pytest.mark.parametrize("fail", ["fsync-0", "fsync-1", "fsync-2", "fsync-3", "rename"])
def test_fsync_or_rename_failure_leaves_previous_state_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    """fsync of the SAE dir, the temp dir, checkpoints/ after the rename, checkpoints/ after moving latest; the
    rename into place. Before the pointer moves, a failure undoes the checkpoint; after it, the checkpoint stands."""
    store = CheckpointStore(tmp_path, keep_last=5)
    first = write(store, 1000)
    real_fsync, real_rename = checkpoints.fsync_dir, checkpoints.os.rename
    n = {"fsync": 0, "rename": 0, "injected": 0}

    def flaky_fsync(path: Path) -> None:
        n["fsync"] += 1
        if fail == f"fsync-{n['fsync'] - 1}":
            n["injected"] += 1
            raise OSError(errno.EIO, "Input/output error", str(path))
        real_fsync(path)

    def flaky_rename(src, dst) -> None:
        n["rename"] += 1
        if fail == "rename" and n["rename"] == 1:
            n["injected"] += 1
            raise OSError(errno.EIO, "Input/output error", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(checkpoints, "fsync_dir", flaky_fsync)
    monkeypatch.setattr(checkpoints.os, "rename", flaky_rename)
    if fail == "fsync-3":  # after latest moved: only warned
        path = write(store, 2000)
        assert store.latest() == path and [i.tokens for i in store.list()] == [1000, 2000]
        store.verify(path)
    else:
        with pytest.raises(CheckpointError, match="Input/output error"):
            write(store, 2000)
        assert store.latest() == first and [i.tokens for i in store.list()] == [1000]
    assert n["injected"] == 1 and tmp_dirs(store) == []
    store.verify(first)
    monkeypatch.undo()
    assert write(store, 3000) == store.latest()


# --- a disk that stays full: back-off, not a retry storm (issue 13) ---------------------------------------------


def _file_trainer(tmp_path: Path, n_tokens: int, **checkpoints_cfg):
    import numpy as np

    from streamd.config import KafkaConfig
    from streamd.train.trainer import Trainer
    from tests.streamd_testing import random_acts, trainer_config

    path = tmp_path / "acts.npy"
    np.save(path, random_acts(n_tokens, 16, seed=3).numpy())
    cfg = trainer_config(KafkaConfig(), tmp_path / "run", every_tokens=512)
    cfg.checkpoints = cfg.checkpoints.model_copy(update=checkpoints_cfg)
    return Trainer(cfg, activation_file=path)


def test_a_full_disk_is_retried_with_backoff_and_the_run_keeps_training(tmp_path, monkeypatch):
    """The disk fills after the first checkpoint and stays full: one attempt per back-off (60 s here, longer than
    the run), not one per 512-token interval (~30 of them); training goes on; the last good checkpoint stays intact;
    the final checkpoint is tried despite the back-off and lands once there is space again."""
    t = _file_trainer(tmp_path, 16384, retry_seconds=60, retry_max_seconds=600)
    real, attempts, full = checkpoints.write_bytes, [], {"on": False}

    def disk(path: Path, data: bytes) -> None:
        if full["on"]:
            attempts.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoints, "write_bytes", disk)
    store = t.store
    first: list[Path] = []
    step = t._after_step

    def after_step():
        step()
        if store.latest() is not None and not full["on"]:
            first.append(store.latest())
            full["on"] = True  # the first checkpoint is on disk: the disk is full from now on
        if t.tokens >= 16384 - 1024:
            full["on"] = False  # space again before the run ends

    t._after_step = after_step
    assert t.run() == 16384  # every token trained, the disk full most of the run
    assert t.metrics.checkpoint_failures._value.get() == 1, "one attempt while the back-off lasts"
    assert len(attempts) == 1  # its first file; no retry: nothing to free but the latest good one
    assert t.metrics.checkpoint_retry_seconds._value.get() == 0  # the final one succeeded
    final = store.latest()
    assert final != first[0] and CheckpointStore.read_offsets(final) == {"file:acts.npy": {0: 16384}}
    store.verify(first[0]), store.verify(final)  # the last good one survived the full disk


def test_backoff_doubles_per_failure_in_a_row_up_to_the_maximum(tmp_path, monkeypatch):
    t = _file_trainer(tmp_path, 8192, retry_seconds=10, retry_max_seconds=40)
    now = {"t": 0.0}

    def clock() -> float:  # each attempt comes an hour later: never held back
        now["t"] += 3600
        return now["t"]

    t.checkpointer.clock = clock
    delays: list[float] = []
    write = t.checkpointer.write

    def recording_write(*args, **kwargs):
        out = write(*args, **kwargs)
        delays.append(t.metrics.checkpoint_retry_seconds._value.get())
        return out

    t.checkpointer.write = recording_write
    enospc_for(monkeypatch, 10**6)
    t.run()
    assert delays[:5] == [10, 20, 40, 40, 40] and t.checkpointer.failures == len(delays)
    assert store_is_empty(t.store)


def store_is_empty(store: CheckpointStore) -> bool:
    return store.latest() is None and store.list() == [] and tmp_dirs(store) == []
