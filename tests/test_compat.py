"""Run directories written by streamd 0.1 before the package regroup still load, resolve and resume.

``tests/data/run_v0_1`` was written by the pre-regroup trainer (flat ``streamd/*.py``, commit 0fc2a2c) with
``streamd.trainer.Trainer(cfg, activation_file="acts.npy").run()`` where ``acts.npy`` held 3000 x 16 float32 standard
normal rows (``numpy.random.default_rng(0)``) and ``cfg`` was ``tests/streamd_testing.trainer_config`` with
``site_id=00000000000000ab, d_in=16, buffer_tokens=1024, batch_size=128, warmup_tokens=0, eval_tokens=256,
norm_estimate_tokens=512, device=cpu, torch_threads=1``, metrics port 0, checkpoints every 1024 tokens (no time
cadence), keep_last 2, and two SAEs: ``topk`` (topk, expansion 4, k 4) and ``relu`` (relu, expansion 4). It trained
1792 tokens (checkpoints 000000001024 and 000000001792); its LOCK file was removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import streamd
from streamd.client import locate
from streamd.run.checkpoints import checkpoint_id
from streamd.config import CheckpointConfig, KafkaConfig, MetricsConfig, SAEConfig, StreamdConfig, TrainerConfig

RUN = Path(__file__).parent / "data" / "run_v0_1"
LATEST_ID = "000000001792"
D_IN, D_SAE, K = 16, 64, 4

torch.set_num_threads(1)


def _expected(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and reconstruction computed from the exported tensors and cfg alone (SAELens semantics)."""
    d = RUN / "checkpoints" / LATEST_ID / name
    cfg = json.loads((d / "cfg.json").read_text())
    w = load_file(d / "sae_weights.safetensors")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    else:
        assert cfg["architecture"] == "standard"
        f = pre.relu()
    return f, f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_load_sae_of_an_old_run_matches_its_tensors(name: str) -> None:
    sae = streamd.load_sae(str(RUN), sae=name)
    assert (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(3)) * 2
    f_want, x_hat_want = _expected(name, x)
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(f, f_want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.decode(f), x_hat_want, rtol=1e-5, atol=1e-6)
    assert f.count_nonzero() > 0
    if name == "topk":
        assert ((f != 0).sum(-1) <= K).all()


@pytest.mark.parametrize("where", ["", "checkpoints", f"checkpoints/{LATEST_ID}", "checkpoints/latest"])
def test_eval_paths_of_an_old_run_resolve(where: str) -> None:
    """What ``streamd eval`` and ``load_sae`` accept: run dir, ``checkpoints/``, a checkpoint, the latest pointer."""
    path = RUN / where if where else RUN
    found = locate.resolve(path)
    assert found.checkpoint == RUN / "checkpoints" / LATEST_ID
    assert found.saes == {n: RUN / "checkpoints" / LATEST_ID / n for n in ("relu", "topk")}
    assert found.manifest["tokens"] == 1792
    assert locate.sae_dir(path, "relu") == RUN / "checkpoints" / LATEST_ID / "relu"
    assert streamd.load_sae(str(path), sae="topk").d_sae == D_SAE


def test_trainer_resumes_a_copy_of_an_old_run(tmp_path: Path) -> None:
    from streamd.train.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    acts = tmp_path / "more.npy"
    np.save(acts, np.random.default_rng(1).standard_normal((2048, D_IN)).astype(np.float32))
    saes = [SAEConfig(name="topk", architecture="topk", expansion_factor=4, k=K),
            SAEConfig(name="relu", architecture="relu", expansion_factor=4)]
    trainer_cfg = TrainerConfig(site_id=f"{0xAB:016x}", d_in=D_IN, buffer_tokens=1024, batch_size=128,
                                warmup_tokens=0, eval_tokens=256, norm_estimate_tokens=512, run_dir=run,
                                device="cpu", torch_threads=1, saes=saes)
    cfg = StreamdConfig(
        kafka=KafkaConfig(), trainer=trainer_cfg, metrics=MetricsConfig(port=0),
        checkpoints=CheckpointConfig(every_tokens=None, every_seconds=None, keep_last=2),
    )
    trainer = Trainer(cfg, activation_file=acts)
    assert trainer.tokens == 1792
    tokens = trainer.run()
    assert tokens > 1792 and (tokens - 1792) % 128 == 0
    new_id = checkpoint_id(1, tokens)  # the first write of the new id scheme: sequence 1, after every 0.1 id
    assert (run / "checkpoints" / "latest").read_text().strip() == new_id
    assert [p.name for p in sorted((run / "checkpoints").glob("0*"), key=lambda p: int(p.name))] == [LATEST_ID, new_id]
    manifest = json.loads((run / "checkpoints" / new_id / "manifest.json").read_text())
    assert manifest["tokens"] == tokens and sorted(manifest["saes"]) == ["relu", "topk"]
    resumed = streamd.load_sae(str(run), sae="topk")
    assert json.loads((run / "checkpoints" / new_id / "topk" / "cfg.json").read_text())["metadata"][
        "tokens_trained"] == tokens
    assert resumed.d_sae == D_SAE
    assert (RUN / "checkpoints" / "latest").read_text().strip() == LATEST_ID  # the fixture itself is untouched
