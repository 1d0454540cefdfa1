"""CE-loss score by splicing: identity reconstruction scores 1 with KL 0, zero scores 0; only published tokens count;
the clean and zero-ablated passes run once per (text, site), whatever the number of SAEs scored against them."""

from __future__ import annotations

import math

import pytest
import torch

from streamd.config import SiteSpec
from streamd.client.evaluate import ce_loss_score, site_baseline, spliced_scores
from streamd.produce.capture import blocks, site_module
from streamd.produce.model import load_frozen_model
from streamd.produce.packing import count_tokens, pack_documents
from tests.test_model import make_tiny_model  # Llama and GPT-2 (tuple outputs) builders

TEXTS = [
    "in the beginning was the word",
    "and the word was with the text, and the text was the word",
    "the beginning",
] * 3


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request, tmp_path_factory):
    torch.set_num_threads(2)
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return load_frozen_model(str(path), "float32", "cpu")


@pytest.mark.parametrize("site", ["resid_post", "mlp_out", "attn_out"])
def test_identity_scores_one_and_zero_scores_zero(loaded, site):
    spec = SiteSpec(site=site, layer=1)
    seen = []

    def identity(x):
        seen.append(x.shape)
        return x

    ident = ce_loss_score(loaded, spec, identity, TEXTS, context_length=16, batch_size=2)
    assert ident["ce_zero"] != ident["ce_clean"]  # the ablation changes the model, so the score is defined
    assert ident["ce_sae"] == ident["ce_clean"] and ident["kl_sae"] == 0.0
    assert ident["ce_loss_score"] == 1.0
    assert all(len(s) == 2 and s[1] == loaded.d_model for s in seen)
    assert sum(s[0] for s in seen) == count_tokens(loaded.tokenizer, TEXTS)  # only published positions spliced

    zero = ce_loss_score(loaded, spec, torch.zeros_like, TEXTS, context_length=16, batch_size=2)
    assert zero["ce_sae"] == zero["ce_zero"] and zero["ce_loss_score"] == 0.0 and zero["kl_sae"] > 0
    assert zero["ce_clean"] == ident["ce_clean"]


def test_scored_positions_skip_bos_and_padding(loaded):
    windows = list(pack_documents(loaded.tokenizer, TEXTS, 16))
    expected = sum(int((w.keep_mask[:-1] & w.keep_mask[1:]).sum()) for w in windows)
    out = ce_loss_score(loaded, SiteSpec(layer=0), lambda x: x, TEXTS, context_length=16, batch_size=3)
    assert out["n_tokens"] == expected < sum(len(w.input_ids) - 1 for w in windows)


def test_noisy_reconstruction_is_between_and_kl_positive(loaded):
    torch.manual_seed(0)
    spec = SiteSpec(layer=2)

    def noisy(x):
        return x + 0.5 * x.std() * torch.randn_like(x)

    out = ce_loss_score(loaded, spec, noisy, TEXTS, context_length=16, batch_size=4)
    assert out["kl_sae"] > 0 and math.isfinite(out["ce_loss_score"]) and out["ce_sae"] != out["ce_clean"]


def test_hook_removed_even_when_the_sae_fails(loaded):
    module = site_module(loaded.model, "mlp_out", 1)
    before = len(module._forward_hooks)

    def broken(x):
        raise RuntimeError("sae exploded")

    with pytest.raises(RuntimeError, match="sae exploded"):
        ce_loss_score(loaded, SiteSpec(site="mlp_out", layer=1), broken, TEXTS, context_length=16)
    assert len(module._forward_hooks) == before
    with pytest.raises(ValueError, match="no tokens"):
        ce_loss_score(loaded, SiteSpec(layer=1), lambda x: x, ["", ""], context_length=16)
    with pytest.raises(ValueError, match="no scored predictions"):
        ce_loss_score(loaded, SiteSpec(layer=1), lambda x: x, ["x", "y"], context_length=16)  # BOS x BOS y


def test_baseline_runs_once_for_every_reconstruction(loaded):
    """Two forward passes per batch for the baseline, then one per batch and reconstruction; the clean loss is the
    model's own next-token loss (its full forward, logits included) on the scored positions."""
    windows = list(pack_documents(loaded.tokenizer, TEXTS, 16))
    calls = []
    handle = blocks(loaded.model)[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        base = site_baseline(loaded, SiteSpec(layer=1), windows, batch_size=4)
        n_batches = len(base.batches)
        assert n_batches == 2 and len(calls) == 2 * n_batches
        ident, zero = (spliced_scores(loaded, base, fn) for fn in (lambda x: x, torch.zeros_like))
        assert len(calls) == 4 * n_batches
    finally:
        handle.remove()
    assert ident["ce_loss_score"] == 1.0 and zero["ce_loss_score"] == 0.0 and ident["ce_zero"] == zero["ce_zero"]
    assert base.acts.shape == (count_tokens(loaded.tokenizer, TEXTS), loaded.d_model)

    ids = torch.stack([w.input_ids for w in windows])
    keep = torch.stack([w.keep_mask for w in windows])
    scored = keep[:, :-1] & keep[:, 1:]
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, use_cache=False).logits[:, :-1][scored]
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][scored])
    assert ident["ce_clean"] == pytest.approx(float(nll), rel=1e-5)
