"""BatchTopK SAE (Bussmann et al. 2024): keep the k*B largest activations over the whole batch in training.

Tokens then use a variable number of latents (k on average). Inference cannot depend on the batch, so a single
threshold is learned as an EMA of the smallest activation kept in each training batch; the exported model is a
JumpReLU with that threshold on every latent. Everything else (unit-norm decoder, AuxK) is TopK's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from streamd.config import SAEConfig
from streamd.sae.base import SAE
from streamd.sae.topk import TopKSAE

THRESHOLD_EMA = 0.01  # per-step weight of the newest batch minimum (SAELens' topk_threshold_lr)


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    export_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None):
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
        pos = kept[kept > 0]
        if pos.numel() == 0:
            return
        m = pos.min().to(torch.float64)
        # the first batch sets it outright, so inference is usable from the start rather than after ~100 steps
        self.threshold.copy_(torch.where(self.threshold_set, (1 - THRESHOLD_EMA) * self.threshold + THRESHOLD_EMA * m, m))
        self.threshold_set.fill_(True)

    saelens_cfg = SAE.saelens_cfg  # exported as jumprelu: TopK's k does not apply

    def extra_export_tensors(self) -> dict[str, Tensor]:
        return {"threshold": torch.full((self.d_sae,), float(self.threshold), dtype=self.b_enc.dtype, device=self.b_enc.device)}
