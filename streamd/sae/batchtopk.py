"""BatchTopK SAE (Bussmann et al. 2024): keep the k*B largest activations over the whole batch in training.

Tokens then use a variable number of latents (k on average). Inference cannot depend on the batch, so a single
threshold is learned as an EMA of the smallest activation kept in each training batch; the exported model is a
JumpReLU with that threshold on every latent. Everything else (parameters, unit-norm decoder, AuxK) is TopK's.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from streamd.sae import topk

if TYPE_CHECKING:
    from streamd.sae.base import SAE

THRESHOLD_EMA = 0.01  # per-step weight of the newest batch minimum (SAELens' topk_threshold_lr)


class BatchTopKConfig(topk.TopKConfig):
    architecture: Literal["batchtopk"] = "batchtopk"  # type: ignore[assignment]

    export_as = "jumprelu"
    export_loaded_by = "jumprelu"  # a JumpReLU with the learned threshold on every latent

    @classmethod
    def module(cls) -> type[SAE]:
        return _module()


@cache
def _module() -> type[SAE]:
    import torch
    from torch import Tensor

    from streamd.sae.base import SAE

    class BatchTopKSAE(topk.TopKConfig.module()):  # type: ignore[misc]
        cfg: BatchTopKConfig
        batch_topk = True

        def __init__(self, cfg: BatchTopKConfig, d_in: int, generator: torch.Generator | None = None):
            super().__init__(cfg, d_in, generator)
            # float64: the EMA adds 1% steps to a small number for millions of steps
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
            self.register_buffer("threshold_set", torch.zeros((), dtype=torch.bool))

        def encode(self, x: Tensor) -> Tensor:
            f = self.pre_acts(x).relu()
            return f * (f > self.threshold.to(f.dtype))

        def train_acts(self, pre: Tensor) -> Tensor:
            f = pre.relu()
            flat = f.flatten()
            vals, idx = flat.topk(min(self.cfg.k * f.shape[0], flat.numel()), sorted=False)
            kept = torch.zeros_like(flat).scatter_(0, idx, vals).view_as(f)
            self.update_threshold(vals)
            return kept

        @torch.no_grad()
        def update_threshold(self, kept: Tensor) -> None:
            """EMA of the smallest positive kept value, computed on the device (no host round trip)."""
            m = torch.where(kept > 0, kept, float("inf")).min().to(torch.float64)
            seen = torch.isfinite(m)  # a batch with no positive value leaves the threshold as it is
            # the first batch sets it outright, so inference is usable from the start rather than after ~100 steps
            ema = (1 - THRESHOLD_EMA) * self.threshold + THRESHOLD_EMA * m
            new = torch.where(self.threshold_set, ema, m)
            self.threshold.copy_(torch.where(seen, new, self.threshold))
            self.threshold_set.logical_or_(seen)

        after_selection = update_threshold

        saelens_cfg = SAE.saelens_cfg  # exported as jumprelu: TopK's k does not apply

        def extra_export_tensors(self) -> dict[str, Tensor]:
            t = float(self.threshold)
            return {"threshold": torch.full((self.d_sae,), t, dtype=self.b_enc.dtype, device=self.b_enc.device)}

    BatchTopKSAE.__qualname__ = "BatchTopKSAE"
    return BatchTopKSAE


def __getattr__(name: str) -> Any:  # ``from streamd.sae.batchtopk import BatchTopKSAE`` builds it (imports torch)
    if name == "BatchTopKSAE":
        return _module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
