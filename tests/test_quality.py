"""FVU and L0 are defined once (streamd.sae.quality): chunking does not change them, and they mean what they say."""

from __future__ import annotations

import pytest
import torch

from streamd.config import SAEConfig
from streamd.sae import build_sae
from streamd.sae.quality import fvu, fvu_l0

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_chunked_fvu_l0_is_the_whole_batch_value(arch: str) -> None:
    g = torch.Generator().manual_seed(0)
    k = {"k": 5} if "topk" in arch else {}  # k is a parameter of the TopK family only
    sae = build_sae(SAEConfig(name=arch, architecture=arch, d_sae=48, **k), 12, g).eval()
    x = torch.randn(301, 12, generator=g) * 2 + 1  # a non-zero mean: the deviation is from it, not from 0
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    want_fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert float(fvu(x, x_hat)) == pytest.approx(want_fvu, rel=1e-5)
    for bs in (1, 7, 128, 4096):
        m = fvu_l0(sae, x, bs)
        assert m["fvu"] == pytest.approx(want_fvu, rel=1e-5)
        assert m["l0"] == pytest.approx(float((f > 0).sum(-1).float().mean()), rel=1e-6)
        assert m["mse"] == pytest.approx(float((x_hat - x).pow(2).sum(-1).mean()), rel=1e-5)


def test_fvu_of_the_mean_is_one_and_of_x_is_zero() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    assert float(fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)
    assert float(fvu(x, x)) == 0.0
