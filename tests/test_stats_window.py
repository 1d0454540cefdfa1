"""Windowed training statistics: they equal a brute-force recomputation over the same tokens, and they stay readable
when a few tokens with enormous norms (attention-sink positions of real models) land in some batches."""

from __future__ import annotations

import statistics

import pytest
import torch

from streamd.config import SAEConfig, TrainerConfig
from streamd.train.learner import Learner

D_IN = 16


def batches(n: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, D_IN, generator=g) + 0.5 for _ in range(n)]


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_windowed_stats_equal_a_brute_force_recomputation(arch):
    k = {"k": 4} if arch == "topk" else {}
    tcfg = TrainerConfig(batch_size=64, buffer_tokens=1024, warmup_tokens=0, stats_window_tokens=200, device="cpu")
    learner = Learner(SAEConfig(name="w", architecture=arch, d_sae=64, **k), D_IN, tcfg)
    assert learner.window.steps == 4  # ceil(200 / 64): the window is whole steps, 256 tokens
    data = batches(9, 64, seed=1)
    learner.sae.init_b_dec(data[0])  # done here, so each step's loss is computed on the parameters saved before it
    learner.b_dec_initialized = True
    seen = []  # (x, x_hat, l0, loss, mse term) of each step, recomputed outside the learner
    for x in data:
        before = {n: p.detach().clone() for n, p in learner.sae.named_parameters()}
        stats = learner.step(x)
        sae = learner.sae
        with torch.no_grad():  # what the step saw: the parameters before its update
            saved = {n: p.detach().clone() for n, p in sae.named_parameters()}
            for n, p in sae.named_parameters():
                p.copy_(before[n])
            out = sae.loss(x, 1.0, None)
            for n, p in sae.named_parameters():
                p.copy_(saved[n])
        seen.append((x, out.x_hat.detach(), float(out.l0), float(out.loss), float(out.terms["mse"])))
        window = seen[-4:]
        xs = torch.cat([w[0] for w in window]).double()
        hats = torch.cat([w[1] for w in window]).double()
        err = float((hats - xs).pow(2).sum())
        assert stats.fvu == pytest.approx(err / float((xs - xs.mean(0)).pow(2).sum()), rel=1e-4)
        assert stats.mse == pytest.approx(err / len(xs), rel=1e-4)
        assert stats.l0 == pytest.approx(statistics.mean(w[2] for w in window), rel=1e-5)
        assert stats.loss_total == pytest.approx(statistics.mean(w[3] for w in window), rel=1e-4)
        assert stats.loss_mse == pytest.approx(statistics.mean(w[4] for w in window), rel=1e-4)
        batch_x, batch_hat = x.double(), out.x_hat.double()
        want = float((batch_hat - batch_x).pow(2).sum() / (batch_x - batch_x.mean(0)).pow(2).sum())
        assert stats.fvu_batch == pytest.approx(want, rel=1e-4)


def sparse_batches(n: int, seed: int) -> list[torch.Tensor]:
    """Tokens an SAE reconstructs well (two of 32 fixed directions each), and in every other batch one token with
    40x the norm in a random direction: it carries most of that batch's variance and is reconstructed badly."""
    atoms = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(5))
    atoms /= atoms.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        idx = torch.randint(0, 32, (128, 2), generator=g)
        x = 3 * (atoms[idx] * (1 + torch.rand(128, 2, 1, generator=g))).sum(1) + 0.05 * torch.randn(128, D_IN, generator=g)
        if i % 2 == 0:
            x[0] = 40 * torch.randn(D_IN, generator=g)
        out.append(x)
    return out


def test_window_is_smooth_where_the_batch_value_jumps():
    """Per-batch FVU swings several-fold between batches with and without a massive token; the FVU over 64 batches
    moves by less than 10% from one step to the next."""
    tcfg = TrainerConfig(batch_size=128, buffer_tokens=1024, warmup_tokens=0, stats_window_tokens=8192, device="cpu")
    learner = Learner(SAEConfig(name="w", architecture="topk", d_sae=64, k=4, lr=3e-3), D_IN, tcfg)
    for x in sparse_batches(300, seed=2):
        learner.step(x)  # train a while: the window fills, the SAE settles
    batch_fvu, window_fvu = [], []
    for x in sparse_batches(24, seed=3):
        s = learner.step(x)
        batch_fvu.append(s.fvu_batch)
        window_fvu.append(s.fvu)
    jumps = lambda v: max(abs(b - a) / a for a, b in zip(v, v[1:]))  # noqa: E731
    assert jumps(batch_fvu) > 1.0  # the last-batch value is unreadable
    assert jumps(window_fvu) < 0.1  # the windowed value is not
