"""The sparse TopK / BatchTopK step (``streamd.sae.sparse``) against the dense autograd path it replaces: the same
losses and gradients on random inputs with AuxK running, and the same parameters after 10 learner steps."""

from __future__ import annotations

import copy

import pytest
import torch

from streamd.config import SAEConfig, TrainerConfig
from streamd.sae import build_sae
from streamd.sae.sparse import batch_topk_codes, topk_codes
from streamd.train.learner import Learner

D_IN, D_SAE, K, AUX_K = 24, 192, 6, 20
# on a GPU host the same checks run on CUDA too (cuSPARSE products, device-side selection)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sae_cfg(arch: str, **kw) -> SAEConfig:
    return SAEConfig(name=arch, architecture=arch, d_sae=D_SAE, k=K, aux_k=AUX_K, **kw)


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def dead(n_dead: int, seed: int) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    return mask


def perturbed(arch: str) -> torch.nn.Module:
    """An SAE away from its symmetric init (non-zero biases), so every gradient term is exercised."""
    sae = build_sae(sae_cfg(arch), D_IN)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.2)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
    return sae


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, AUX_K // 2, 3 * AUX_K])  # none, fewer than aux_k (scaled down), many
def test_gradients_equal_the_dense_path(arch, n_dead, device):
    dense = perturbed(arch).to(device)
    sparse = copy.deepcopy(dense)
    x, mask = inputs(96, 1).to(device), dead(n_dead, 2).to(device)
    ref = dense.loss(x, 1.0, mask)
    out = sparse.sparse_loss(x, 1.0, mask)
    assert out.feats is None and out.fires.shape == (D_SAE,)
    for name in ("mse", "auxk"):
        torch.testing.assert_close(out.terms[name], ref.terms[name], rtol=1e-5, atol=1e-6)
    assert (float(ref.terms["auxk"].detach()) > 0) == (n_dead > 0)  # AuxK ran exactly when latents were dead
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.fires.long(), (ref.feats > 0).sum(0)) and float(out.l0) == pytest.approx(float(ref.l0))
    ref.loss.backward()
    out.loss.backward()
    for (name, p_dense), p_sparse in zip(dense.named_parameters(), sparse.parameters()):
        assert p_dense.grad is not None and float(p_dense.grad.abs().max()) > 0, name
        torch.testing.assert_close(p_sparse.grad, p_dense.grad, rtol=1e-4, atol=1e-5, msg=name)
    if arch == "batchtopk":
        assert torch.equal(sparse.threshold, dense.threshold) and bool(sparse.threshold_set)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_ten_learner_steps_match_the_dense_path(arch, device):
    tcfg = dict(batch_size=128, buffer_tokens=1024, warmup_tokens=0, dead_window_tokens=10_000, device=device)
    learners = [Learner(sae_cfg(arch, lr=3e-3), D_IN, TrainerConfig(sparse_step=s, **tcfg), device)
                for s in (True, False)]
    assert learners[0].sparse and not learners[1].sparse
    for step in range(10):
        for lr in learners:  # 2 * aux_k latents silent for long (again each step: they fire once AuxK trains them)
            lr.since_fired[dead(2 * AUX_K, 3)] = 20_000
        x = inputs(128, 10 + step)
        stats = [lr.step(x) for lr in learners]
        assert stats[0].read()["loss_auxk"] > 0
        assert stats[0].read() == pytest.approx(stats[1].read(), rel=1e-3, abs=1e-5)
    sparse, dense = (lr.sae.state_dict() for lr in learners)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(learners[0].since_fired, learners[1].since_fired)


def test_codes_are_csr_rows():
    pre = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    crow, col, val = topk_codes(pre, 3)
    assert crow.tolist() == [0, 3, 6, 9, 12, 15] and set(col[:3].tolist()) == set(pre[0].topk(3).indices.tolist())
    crow, col, val = batch_topk_codes(pre, 3)
    assert int(crow[-1]) == 15 and bool((val > 0).all() or (val >= 0).all())
    dense = torch.zeros_like(pre)
    for row in range(5):
        dense[row, col[crow[row]:crow[row + 1]]] = val[crow[row]:crow[row + 1]]
    flat = pre.relu().flatten()
    torch.testing.assert_close(dense.flatten().sort().values[-15:], flat.sort().values[-15:])


def test_learner_keeps_the_dense_path_for_other_architectures_and_when_asked():
    t = dict(batch_size=64, buffer_tokens=1024, device="cpu")
    assert not Learner(SAEConfig(name="r", architecture="relu", d_sae=32), D_IN, TrainerConfig(**t)).sparse
    assert not Learner(sae_cfg("topk"), D_IN, TrainerConfig(sparse_step=False, **t)).sparse


@pytest.mark.parametrize("sparse", [True, False])
def test_encoder_gradient_and_adam_state_keep_the_latent_major_layout(sparse):
    """W_enc [d_in, d_sae] is stored latent-major; a gradient in another layout would be copied into it every step."""
    t = TrainerConfig(batch_size=64, buffer_tokens=1024, device="cpu", sparse_step=sparse)
    learner = Learner(sae_cfg("topk"), D_IN, t)
    learner.step(inputs(64, 3))
    w = learner.sae.W_enc
    assert w.stride() == (1, D_IN) and w.shape == (D_IN, D_SAE)
    assert w.grad.stride() == w.stride()
    assert learner.opt.state[w]["exp_avg"].stride() == w.stride()


def test_adam_is_fused_and_stays_fused_after_resuming_a_state_saved_without():
    t = TrainerConfig(batch_size=64, buffer_tokens=1024, device="cpu")
    learner = Learner(sae_cfg("topk"), D_IN, t)
    learner.step(inputs(64, 4))
    state = copy.deepcopy(learner.state_dict())  # as from disk: the optimizer would share its moments otherwise
    for group in state["optimizer"]["param_groups"]:  # as an older streamd (plain Adam) saved it
        group["fused"] = None
    resumed = Learner(sae_cfg("topk"), D_IN, t)
    resumed.load_state_dict(state)
    assert learner.opt.param_groups[0]["fused"] and resumed.opt.param_groups[0]["fused"]
    resumed.step(inputs(64, 5))
    learner.step(inputs(64, 5))
    assert torch.equal(resumed.sae.W_enc, learner.sae.W_enc)
