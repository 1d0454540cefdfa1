"""Reconstruction quality, defined once: FVU (squared error over squared deviation from the mean) and L0.

:func:`fvu` is the single-batch tensor form (the learner's per-step statistic: no host sync); :func:`fvu_l0` is the
chunked form over a whole held-out set (the trainer's evaluation and ``streamd eval``), where the mean is the global
mean of ``x`` and every chunk is encoded with the SAE's inference ``encode``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from streamd.sae.base import SAE


def fvu_terms(x: Tensor, x_hat: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(squared error, squared deviation of ``x`` from ``mean``), summed over tokens and features, in float32.

    ``mean`` defaults to the batch mean of ``x``."""
    x = x.float()
    if mean is None:
        mean = x.mean(0)
    return (x_hat.float() - x).pow(2).sum(), (x - mean).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained of one batch (0-d tensor, on the batch's device)."""
    err, dev = fvu_terms(x, x_hat)
    return err / dev.clamp_min(1e-12)


@torch.no_grad()
def fvu_l0(sae: SAE, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """``fvu``, ``l0`` (mean active latents per token) and ``mse`` (squared error summed over features, averaged
    over tokens) of ``sae.encode`` / ``decode`` on ``x [N, d_in]``, ``batch_size`` rows at a time on the SAE's
    device."""
    device = sae.W_dec.device
    mean = x.float().mean(0).to(device)
    err = dev = l0 = 0.0
    for chunk in x.split(batch_size):
        c = chunk.to(device, torch.float32)
        f = sae.encode(c)
        e, d = fvu_terms(c, sae.decode(f), mean)
        err, dev, l0 = err + float(e), dev + float(d), l0 + float((f > 0).sum())
    n = max(x.shape[0], 1)
    return {"fvu": err / max(dev, 1e-12), "l0": l0 / n, "mse": err / n}
