"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, unit-norm decoder, AuxK.

AuxK: the ``aux_k`` largest pre-activations among dead latents reconstruct the main model's residual error (through
``W_dec``, no bias); this gives dead latents a gradient towards directions the live ones miss. Weight ``aux_coefficient`` (paper: 1/32),
scaled down when fewer than ``aux_k`` latents are dead (as SAELens does).
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from streamd.config import SAEConfig

if TYPE_CHECKING:
    from streamd.sae.base import SAE


class TopKConfig(SAEConfig):
    architecture: Literal["topk"] = "topk"
    k: int = Field(32, ge=1, description="latents kept per token (batchtopk: on average)")
    aux_k: int | None = Field(None, ge=1, description="dead latents used by AuxK; default d_in // 2")
    aux_coefficient: float = Field(1 / 32, ge=0, description="AuxK weight")

    loss_terms = {"mse": "mse", "auxk": "auxk"}
    export_as = "topk"

    def default_lr(self, d_in: int) -> float:
        return 2e-4 / math.sqrt(self.width(d_in) / 16384)  # Gao et al.'s width scaling

    @classmethod
    def module(cls) -> type[SAE]:
        return _module()

    @classmethod
    def from_export(cls, saelens_cfg: dict[str, Any], d_sae: int) -> TopKConfig:
        return cls(name="exported", d_sae=d_sae, k=int(saelens_cfg["k"]))


@cache
def _module() -> type[SAE]:
    import torch
    from torch import Tensor

    from streamd.sae.base import SAE, LossOut, sum_sq
    from streamd.sae.sparse import SparseTopKLoss, TorchOps

    class TopKSAE(SAE):
        cfg: TopKConfig
        init_b_dec_from_data = True
        sparse_step = True  # a subclass that changes the selection (topk / train_acts) must set this False
        batch_topk = False  # the sparse step's selection: per token (TopK) or over the batch (BatchTopK)
        # the learner sets these from trainer.compile and trainer.triton_decoder (see streamd.sae.sparse)
        compile_select = False  # the sparse step's encoder and selection compiled
        sparse_ops: Any = TorchOps  # its decoder products

        def encode(self, x: Tensor) -> Tensor:
            return self.topk(self.pre_acts(x))

        def topk(self, pre: Tensor) -> Tensor:
            vals, idx = pre.topk(min(self.cfg.k, self.d_sae), dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

        def train_acts(self, pre: Tensor) -> Tensor:
            """The activations used for reconstruction in training (batchtopk overrides this)."""
            return self.topk(pre)

        def loss(self, x: Tensor, sparsity_scale: float, dead_mask: Tensor | None = None) -> LossOut:
            pre = self.pre_acts(x)
            f = self.train_acts(pre)
            x_hat = self.decode(f)
            mse = sum_sq(x_hat - x)
            auxk = self.auxk_loss(pre, (x - x_hat).detach(), dead_mask)
            terms = {"mse": mse, "auxk": auxk}
            return LossOut(mse + self.cfg.aux_coefficient * auxk, terms, f, x_hat)

        def sparse_loss(self, x: Tensor, sparsity_scale: float, dead_mask: Tensor | None = None) -> LossOut:
            aux_k = self.cfg.aux_k or self.d_in // 2
            # a tensor, not a float: no device-to-host copy of the dead count (see streamd.sae.sparse)
            aux_scale = (x.new_zeros(()) if dead_mask is None else dead_mask.sum().to(x.dtype) / aux_k).clamp(max=1.0)
            loss, mse, auxk, x_hat, fires, l0, kept = SparseTopKLoss.apply(
                x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, dead_mask, self.cfg.k, self.batch_topk, aux_k,
                self.cfg.aux_coefficient, aux_scale, self.compile_select, self.sparse_ops)
            self.after_selection(kept)
            return LossOut(loss, {"mse": mse, "auxk": auxk}, None, x_hat, fires, l0)

        def after_selection(self, kept: Tensor) -> None:
            """The ReLU'd values the sparse step selected (BatchTopK learns its threshold from them)."""

        def auxk_loss(self, pre: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
            n_dead = 0 if dead_mask is None else int(dead_mask.sum())
            if n_dead == 0:
                return pre.new_zeros(())
            aux_k = self.cfg.aux_k or self.d_in // 2
            k = min(aux_k, n_dead)
            masked = pre.masked_fill(~dead_mask, float("-inf"))
            vals, idx = masked.topk(k, dim=-1, sorted=False)
            # no ReLU: dead latents' pre-activations are mostly negative, and a ReLU would cut off their gradient
            aux_f = torch.zeros_like(pre).scatter_(-1, idx, vals)
            return min(n_dead / aux_k, 1.0) * sum_sq(aux_f @ self.W_dec - residual)

        def saelens_cfg(self) -> dict:
            return {**super().saelens_cfg(), "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    TopKSAE.__qualname__ = "TopKSAE"
    return TopKSAE


def __getattr__(name: str) -> Any:  # ``from streamd.sae.topk import TopKSAE`` builds the module class (imports torch)
    if name == "TopKSAE":
        return _module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
