"""ReLU SAE, Anthropic's April-2024 recipe.

The L1 penalty weights each activation by its decoder row norm, so the decoder needs no norm constraint (shrinking a
row while growing the activation no longer lowers the penalty). Decoder rows start at norm 0.1, encoder = decoder^T.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from streamd.config import SAEConfig

if TYPE_CHECKING:
    from streamd.sae.base import SAE


class ReLUConfig(SAEConfig):
    architecture: Literal["relu"] = "relu"
    l1_coefficient: float = Field(5.0, ge=0, description="sparsity weight (after warm-up)")

    loss_terms = {"mse": "mse", "l1": "sparsity"}
    export_as = "standard"

    def default_lr(self, d_in: int) -> float:
        return 5e-5  # Anthropic's constant

    @classmethod
    def module(cls) -> type[SAE]:
        return _module()


@cache
def _module() -> type[SAE]:
    from torch import Tensor

    from streamd.sae.base import SAE, LossOut, sum_sq

    class ReLUSAE(SAE):
        cfg: ReLUConfig
        decoder_init_norm = 0.1
        unit_norm_decoder = False

        def encode(self, x: Tensor) -> Tensor:
            return self.pre_acts(x).relu()

        def loss(self, x: Tensor, sparsity_scale: float, dead_mask: Tensor | None = None) -> LossOut:
            f = self.encode(x)
            x_hat = self.decode(f)
            mse = sum_sq(x_hat - x)
            l1 = (f * self.W_dec.norm(dim=-1)).sum(-1).mean()
            loss = mse + self.cfg.l1_coefficient * sparsity_scale * l1
            return LossOut(loss, {"mse": mse, "l1": l1}, f, x_hat)

    ReLUSAE.__qualname__ = "ReLUSAE"
    return ReLUSAE


def __getattr__(name: str) -> Any:  # ``from streamd.sae.relu import ReLUSAE`` builds the module class (imports torch)
    if name == "ReLUSAE":
        return _module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
