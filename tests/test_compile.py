"""``trainer.compile``: the sparse step's encoder and selection through ``torch.compile`` train as eager does, and a
host that cannot compile (no C++ compiler) trains eagerly after one warning naming why."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from streamd.config import SAEConfig, TrainerConfig
from streamd.sae.sparse import compiled_select
from streamd.train.learner import Learner

ROOT = Path(__file__).resolve().parents[1]
D_IN, D_SAE, K, AUX_K = 16, 96, 4, 12


def learners(arch: str) -> list[Learner]:
    """An eager and a compiled learner on the same tiny SAE, 2 * aux_k latents dead so AuxK runs."""
    tcfg = dict(batch_size=64, buffer_tokens=1024, warmup_tokens=0, device="cpu")
    cfg = SAEConfig(name=arch, architecture=arch, d_sae=D_SAE, k=K, aux_k=AUX_K, lr=3e-3)
    out = [Learner(cfg, D_IN, TrainerConfig(compile=c, **tcfg)) for c in (False, True)]
    for lr in out:
        lr.since_fired[: 2 * AUX_K] = 10**9
    return out


def train(pair: list[Learner], steps: int) -> None:
    for step in range(steps):
        x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(step)) * 1.5 + 0.3
        stats = [lr.step(x).read() for lr in pair]
        assert stats[0]["loss_auxk"] > 0
        assert stats[1] == pytest.approx(stats[0], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_compiled_step_trains_as_eager(arch):
    eager, compiled = learners(arch)
    assert compiled.sae.compile_select and not eager.sae.compile_select
    train([eager, compiled], 4)
    assert compiled_select.failure is None, compiled_select.failure  # it really ran compiled
    for name, p in eager.sae.state_dict().items():
        torch.testing.assert_close(compiled.sae.state_dict()[name], p, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(compiled.since_fired, eager.since_fired)


def test_without_a_compiler_training_goes_on_eagerly_after_one_warning(tmp_path):
    """A real inductor failure: no C++ compiler on PATH or in CXX/CC, and an empty inductor cache."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_compile import learners, train
        from streamd.sae.sparse import compiled_select
        pair = learners("topk")
        train(pair, 3)
        for name, p in pair[0].sae.state_dict().items():
            assert (pair[1].sae.state_dict()[name] - p).abs().max() <= 1e-6, name
        print("failure:", compiled_select.failure)
    """)
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "CXX": str(empty / "c++"), "CC": str(empty / "cc"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if "torch.compile is not usable here" in line]
    assert len(warnings) == 1, run.stderr[-3000:]
    assert "C++ compiler" in warnings[0] and "eagerly" in warnings[0]
    assert "failure: InductorError" in run.stdout
