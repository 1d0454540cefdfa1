"""SAE architectures and the Learner: shapes, constraints, sparsity mechanics, export in raw units, schedules,
token-based feature statistics, and exact resume."""

from __future__ import annotations

import io

import pytest
import torch

from streamd.config import SAEConfig, TrainerConfig
from streamd.metrics import DENSITY_BUCKETS
from streamd.train.learner import Learner, schedule
from streamd.sae import ARCHITECTURES, build_sae, load_exported
from streamd.sae.jumprelu import JumpReLUSAE

default_lr = SAEConfig.learning_rate  # the lr an SAE trains with: lr if set, else its architecture's default

torch.set_num_threads(2)
ARCHS = sorted(ARCHITECTURES)
D_IN = 16


def cfg_for(arch: str, **kw) -> SAEConfig:
    base = {"name": f"t-{arch}", "architecture": arch, "d_sae": 64, "k": 4, "jumprelu_bandwidth": 0.5}
    fields = ARCHITECTURES[arch].model_fields  # each architecture takes only its own parameters
    return SAEConfig(**{**{k: v for k, v in base.items() if k in fields}, **kw})


def tcfg(**kw) -> TrainerConfig:
    base = {"batch_size": 128, "buffer_tokens": 1024, "warmup_tokens": 0}
    return TrainerConfig(**{**base, **kw})


def data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 2 + 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_loss_terms(arch):
    sae = build_sae(cfg_for(arch), D_IN)
    x = data(32)
    assert sae.W_enc.shape == (D_IN, 64) and sae.W_dec.shape == (64, D_IN)
    assert sae.b_enc.shape == (64,) and sae.b_dec.shape == (D_IN,)
    assert sae.encode(x).shape == (32, 64) and sae(x).shape == (32, D_IN)
    out = sae.loss(x, 1.0)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.feats.shape == (32, 64) and out.x_hat.shape == (32, D_IN)
    assert "mse" in out.terms and all(v.dim() == 0 for v in out.terms.values())


def test_seeded_from_cfg_not_global_rng():
    torch.manual_seed(123)
    a = build_sae(cfg_for("topk", seed=7), D_IN)
    torch.manual_seed(456)
    b = build_sae(cfg_for("topk", seed=7), D_IN)
    c = build_sae(cfg_for("topk", seed=8), D_IN)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)
    assert torch.equal(a.W_enc, a.W_dec.T)


def test_relu_decoder_init_norm():
    sae = build_sae(cfg_for("relu"), D_IN)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.full((64,), 0.1), atol=1e-6)


def test_gradient_projection_removes_parallel_component():
    sae = build_sae(cfg_for("topk"), D_IN)
    g = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = g.clone()
    sae.before_optimizer_step()
    w = sae.W_dec.detach()
    assert (sae.W_dec.grad * w).sum(-1).abs().max() < 1e-5
    # the perpendicular part is untouched
    perp = g - (g * w).sum(-1, keepdim=True) * w
    assert torch.allclose(sae.W_dec.grad, perp, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_unit_norm_decoder_maintained(arch):
    learner = Learner(cfg_for(arch, lr=1e-2), D_IN, tcfg())
    for i in range(10):
        learner.step(data(128, seed=i))
    assert torch.allclose(learner.sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_topk_l0_is_k():
    sae = build_sae(cfg_for("topk", k=5), D_IN)
    sae.init_b_dec(data(256))
    x = data(256, seed=1)
    assert torch.equal((sae.encode(x) > 0).sum(-1), torch.full((256,), 5))
    assert torch.equal((sae.loss(x, 1.0).feats > 0).sum(-1), torch.full((256,), 5))


def test_topk_auxk_only_with_dead_latents():
    sae = build_sae(cfg_for("topk"), D_IN)
    x = data(64)
    assert sae.loss(x, 1.0).terms["auxk"] == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = sae.loss(x, 1.0, dead)
    assert out.terms["auxk"] > 0
    out.loss.backward()
    # AuxK reaches the dead latents' encoders, which the main TopK loss may not
    assert sae.W_enc.grad[:, :10].abs().sum() > 0


def test_batchtopk_mean_l0_is_k_and_threshold_learned():
    sae = build_sae(cfg_for("batchtopk", k=4), D_IN)
    x = data(128)
    out = sae.loss(x, 1.0)
    kept = out.feats.detach()[out.feats > 0]
    assert kept.numel() == 4 * 128  # k per token on average, not per token
    assert (out.feats > 0).sum(-1).float().std() > 0
    assert sae.threshold_set and float(sae.threshold) == pytest.approx(float(kept.min()), rel=1e-6)
    first = float(sae.threshold)
    out2 = sae.loss(data(128, seed=1), 1.0)
    m2 = float(out2.feats.detach()[out2.feats > 0].min())
    assert float(sae.threshold) == pytest.approx(0.99 * first + 0.01 * m2, rel=1e-6)
    # after training the inference threshold gives about k per token on the same distribution
    learner = Learner(cfg_for("batchtopk", k=4, lr=3e-3), D_IN, tcfg())
    for i in range(150):
        learner.step(data(128, seed=100 + i))
    assert 2 <= learner.held_out_metrics(data(1024, seed=9))["l0"] <= 8


def test_jumprelu_threshold_gets_gradient():
    sae = build_sae(cfg_for("jumprelu"), D_IN)
    x = data(256)
    out = sae.loss(x, 1.0)
    out.terms["l0_penalty"].backward()
    g = sae.threshold.grad
    # raising a threshold can only lower L0: gradient never positive, and negative where pre-acts sit near it
    assert (g <= 0).all() and (g < 0).sum() > 10
    sae.zero_grad()
    sae.loss(x, 1.0).terms["mse"].backward()
    assert sae.threshold.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip_in_raw_units(arch):
    learner = Learner(cfg_for(arch, lr=1e-2), D_IN, tcfg())
    scale = 0.37
    raw = data(512) * 3
    for i in range(5):  # move every parameter (and batchtopk's threshold) away from its init
        learner.step(raw[i * 64 : (i + 1) * 64] * scale)
    sae = learner.sae
    cfg = {**sae.saelens_cfg(), "d_in": D_IN, "d_sae": 64}
    exported = load_exported(cfg, sae.export_tensors(scale))
    expected_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    assert cfg["architecture"] == expected_arch
    if arch == "topk":
        assert cfg["k"] == 4
    if expected_arch == "jumprelu":
        assert isinstance(exported, JumpReLUSAE)
    with torch.no_grad():
        f_trained = sae.encode(raw * scale)
        f_exported = exported.encode(raw)
        assert (f_trained > 0).sum() > 0
        assert torch.allclose(f_exported, f_trained, atol=1e-4, rtol=1e-4)
        assert torch.allclose(exported(raw), sae(raw * scale) / scale, atol=1e-4, rtol=1e-4)


def test_load_exported_rejects_unknown_architecture():
    sae = build_sae(cfg_for("topk"), D_IN)
    with pytest.raises(ValueError, match="gated"):
        load_exported({"architecture": "gated"}, sae.export_tensors(1.0))


def test_default_lr():
    assert default_lr(cfg_for("topk", d_sae=16384), 128) == pytest.approx(2e-4)
    assert default_lr(cfg_for("batchtopk", d_sae=4 * 16384), 128) == pytest.approx(1e-4)
    assert default_lr(cfg_for("relu"), 128) == 5e-5 and default_lr(cfg_for("jumprelu"), 128) == 5e-5
    assert default_lr(cfg_for("topk", lr=1e-3), 128) == 1e-3


def test_schedule_warmup_then_constant_without_max_tokens():
    t = tcfg(warmup_tokens=1000)
    assert schedule(250, t) == (0.25, 0.25)
    assert schedule(1000, t) == (1.0, 1.0)
    assert schedule(10**12, t) == (1.0, 1.0)  # no decay unless max_tokens is set


def test_schedule_decays_only_with_max_tokens():
    t = tcfg(warmup_tokens=100, max_tokens=1000, decay_fraction=0.2)
    assert schedule(50, t) == (0.5, 0.5)
    assert schedule(800, t) == (1.0, 1.0)
    lr, sp = schedule(900, t)
    assert lr == pytest.approx(0.5) and sp == 1.0  # the sparsity penalty does not decay
    assert schedule(1000, t)[0] == 0.0


def test_learner_applies_schedule():
    learner = Learner(cfg_for("relu", lr=1e-3), D_IN, tcfg(warmup_tokens=512))
    s = learner.step(data(128))
    assert s.tokens == 128 and s.lr == pytest.approx(1e-3 * 128 / 512) and s.sparsity_scale == pytest.approx(0.25)
    assert learner.opt.param_groups[0]["lr"] == pytest.approx(s.lr)


def test_dead_and_dense_latents_counted_in_tokens():
    t = tcfg(dead_window_tokens=1000, density_window_tokens=512, dense_threshold=0.5)
    learner = Learner(cfg_for("relu", d_sae=32), D_IN, t)
    with torch.no_grad():  # latent 3 can never fire; latent 5 always does
        learner.sae.W_enc[:, 3] = 0
        learner.sae.b_enc[3] = -1e6
        learner.sae.W_enc[:, 5] = 0
        learner.sae.b_enc[5] = 1e3
    for n in range(1, 7):
        s = learner.step(data(256, seed=n))
        assert int(learner.since_fired[3]) == 256 * n
        assert int(learner.since_fired[5]) == 0
        # dead once more than 1000 tokens passed without firing: after the 4th batch of 256, not before
        assert bool(learner.dead_mask()[3]) == (256 * n > 1000)
        assert bool(learner.dense_mask()[5]) and not bool(learner.dense_mask()[3])
    assert s.dead_fraction >= 1 / 32 and s.dense_fraction >= 1 / 32
    hist = learner.density_histogram()
    assert sum(hist.values()) == pytest.approx(1.0)
    assert hist["never"] >= 1 / 32 and hist["-0.5"] >= 1 / 32  # density 1.0 lands in the top bucket
    assert list(hist) == list(DENSITY_BUCKETS)  # the labels the metrics, report and dashboard use, and no others


def test_density_histogram_bucket_edges():
    """[e, e + 0.5) per lower edge; below 1e-8 counts in the first bucket, density 1.0 in the last."""
    learner = Learner(cfg_for("topk"), D_IN, tcfg())
    d_sae = learner.sae.d_sae
    fires = torch.zeros(d_sae, dtype=torch.int64)
    fires[:4] = torch.tensor([10**9, 10**6, 3162278, 1])  # densities 1, 1e-3, 10^-2.5 (rounded up), 1e-9
    learner.last_fires, learner.last_tokens = fires, 10**9
    hist = learner.density_histogram()
    assert hist["-0.5"] == hist["-3.0"] == hist["-2.5"] == hist["-8.0"] == pytest.approx(1 / d_sae)
    assert hist["never"] == pytest.approx((d_sae - 4) / d_sae)


def test_evaluate_reports_metrics():
    learner = Learner(cfg_for("topk"), D_IN, tcfg())
    learner.step(data(128))
    m = learner.held_out_metrics(data(300, seed=5))
    assert set(m) == {"fvu", "l0", "mse"}
    assert 0 < m["fvu"] < 2 and m["l0"] == pytest.approx(4.0) and m["mse"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_continues_identically(arch):
    t = tcfg(warmup_tokens=1000, dead_window_tokens=300, density_window_tokens=300)
    a = Learner(cfg_for(arch, lr=1e-2), D_IN, t)
    for i in range(4):
        a.step(data(128, seed=i))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = Learner(cfg_for(arch, lr=1e-2, seed=99), D_IN, t)  # a different init, overwritten by the load
    b.load_state_dict(torch.load(buf, weights_only=True))
    for i in range(4, 8):
        sa, sb = a.step(data(128, seed=i)), b.step(data(128, seed=i))
        assert sa == sb
    for (name, pa), pb in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.since_fired, b.since_fired) and a.density_histogram() == b.density_histogram()
