"""A toy architecture in one file, the way a plugin adds one: TopK whose kept activations must also clear a floor.

Everything streamd needs is declared here: its parameters (TopK's plus ``floor``), its default lr, its loss terms
(TopK's plus ``below_floor``, reported under a new metric label), its export (a SAELens-style ``cfg.json`` with its own
architecture name, loaded back by itself) and its module. ``streamd.sae.register(FloorTopKConfig)`` makes it usable;
unlike the built-in files, a run-time architecture may import torch at module level (only whoever registers it
imports it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from streamd.sae.base import LossOut
from streamd.sae.topk import TopKConfig, TopKSAE


class FloorTopKConfig(TopKConfig):
    architecture: Literal["floortopk"] = "floortopk"  # type: ignore[assignment]
    floor: float = Field(0.05, ge=0, description="kept activations below this are zeroed")

    loss_terms = {**TopKConfig.loss_terms, "below_floor": "below_floor"}
    export_as = "floortopk"

    def default_lr(self, d_in: int) -> float:
        return 1e-3

    @classmethod
    def module(cls) -> type[FloorTopKSAE]:
        return FloorTopKSAE

    @classmethod
    def from_export(cls, saelens_cfg: dict[str, Any], d_sae: int) -> FloorTopKConfig:
        return cls(name="exported", d_sae=d_sae, k=int(saelens_cfg["k"]), floor=float(saelens_cfg["floor"]))


class FloorTopKSAE(TopKSAE):  # type: ignore[misc, valid-type]
    cfg: FloorTopKConfig
    sparse_step = False  # the floor changes the selection: the dense path

    def topk(self, pre: Tensor) -> Tensor:
        f = super().topk(pre)
        return f * (f >= self.cfg.floor)

    def loss(self, x: Tensor, sparsity_scale: float, dead_mask: Tensor | None = None) -> LossOut:
        out = super().loss(x, sparsity_scale, dead_mask)
        # per token, how many of the k slots the floor emptied (reported, not optimised)
        out.terms["below_floor"] = min(self.cfg.k, self.d_sae) - out.l0
        return out

    def saelens_cfg(self) -> dict:
        return {**super().saelens_cfg(), "floor": self.cfg.floor}
