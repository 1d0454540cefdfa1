"""JumpReLU SAE (Rajamanoharan et al. 2024): a per-latent threshold and a direct L0 penalty.

The step function has no useful gradient, so the threshold learns through straight-through pseudo-derivatives with
a rectangle kernel of width ``jumprelu_bandwidth`` (the paper's KDE estimator). The threshold is a plain parameter
(clamped at 0 in use), not log-threshold: Adam moves a parameter by about lr per step, so a log-threshold starting
at 1e-3 would move by ~1e-3*lr per step and barely change in a run of ordinary length (SAELens issue #494;
dictionary_learning reports the same). Decoder rows are unit norm, as in Gemma Scope.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from streamd.config import SAEConfig

if TYPE_CHECKING:
    from streamd.sae.base import SAE


class JumpReLUConfig(SAEConfig):
    architecture: Literal["jumprelu"] = "jumprelu"
    l0_coefficient: float = Field(1e-3, ge=0, description="L0 weight (after warm-up)")
    jumprelu_bandwidth: float = Field(1e-3, gt=0, description="width of the straight-through kernel")
    jumprelu_init_threshold: float = Field(1e-3, gt=0)

    loss_terms = {"mse": "mse", "l0_penalty": "sparsity"}
    export_as = "jumprelu"

    def default_lr(self, d_in: int) -> float:
        return 5e-5  # DeepMind's constant

    @classmethod
    def module(cls) -> type[SAE]:
        return _module()


@cache
def _module() -> type[SAE]:
    import torch
    from torch import Tensor, nn

    from streamd.sae.base import SAE, LossOut, sum_sq

    def _rectangle(u: Tensor) -> Tensor:
        return ((u > -0.5) & (u < 0.5)).to(u)

    class _JumpReLU(torch.autograd.Function):
        """z * H(z - t); d/dz is the plain mask, d/dt ~ -(t/eps) * rect((z - t)/eps)."""

        @staticmethod
        def forward(ctx: Any, z: Tensor, t: Tensor, eps: float) -> Tensor:
            ctx.save_for_backward(z, t)
            ctx.eps = eps
            return z * (z > t)

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
            z, t = ctx.saved_tensors
            dt = -(t / ctx.eps) * _rectangle((z - t) / ctx.eps) * g
            return (z > t) * g, dt.sum(0), None

    class _Step(torch.autograd.Function):
        """H(z - t); no gradient to z, d/dt ~ -(1/eps) * rect((z - t)/eps)."""

        @staticmethod
        def forward(ctx: Any, z: Tensor, t: Tensor, eps: float) -> Tensor:
            ctx.save_for_backward(z, t)
            ctx.eps = eps
            return (z > t).to(z)

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, None]:
            z, t = ctx.saved_tensors
            dt = -(1.0 / ctx.eps) * _rectangle((z - t) / ctx.eps) * g
            return None, dt.sum(0), None

    class JumpReLUSAE(SAE):
        cfg: JumpReLUConfig

        def __init__(self, cfg: JumpReLUConfig, d_in: int, generator: torch.Generator | None = None):
            super().__init__(cfg, d_in, generator)
            self.threshold = nn.Parameter(torch.full((self.d_sae,), cfg.jumprelu_init_threshold))

        def encode(self, x: Tensor) -> Tensor:
            pre = self.pre_acts(x)
            return pre.relu() * (pre > self.threshold.relu())

        def loss(self, x: Tensor, sparsity_scale: float, dead_mask: Tensor | None = None) -> LossOut:
            pre = self.pre_acts(x)
            t, eps = self.threshold.relu(), self.cfg.jumprelu_bandwidth
            f = _JumpReLU.apply(pre.relu(), t, eps)
            x_hat = self.decode(f)
            mse = sum_sq(x_hat - x)
            l0 = _Step.apply(pre, t, eps).sum(-1).mean()
            loss = mse + self.cfg.l0_coefficient * sparsity_scale * l0
            return LossOut(loss, {"mse": mse, "l0_penalty": l0}, f, x_hat)

        def extra_export_tensors(self) -> dict[str, Tensor]:
            return {"threshold": self.threshold.detach().relu().clone()}

    JumpReLUSAE.__qualname__ = "JumpReLUSAE"
    return JumpReLUSAE


def __getattr__(name: str) -> Any:  # ``from streamd.sae.jumprelu import JumpReLUSAE`` builds it (imports torch)
    if name == "JumpReLUSAE":
        return _module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
