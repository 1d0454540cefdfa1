"""The interface every SAE architecture implements, and the parts they share.

Parameters follow the SAELens layout (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``) so a
checkpoint is a plain tensor dict SAELens can load. Every architecture subtracts ``b_dec`` from the input before
encoding (SAELens ``apply_b_dec_to_input=True``). Training runs on normalised activations ``x * scale``;
:meth:`SAE.export_tensors` folds the scale back in so exported weights work on raw activations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from streamd.config import SAEConfig


@dataclass
class LossOut:
    """One training forward pass: the loss to minimise, its scalar parts, and what the learner's statistics need.

    A dense pass gives ``feats``; a sparse one gives ``fires`` and ``l0`` directly and no ``feats``.
    """

    loss: Tensor
    terms: dict[str, Tensor]
    feats: Tensor | None  # [B, d_sae] activations used for the reconstruction (dense passes)
    x_hat: Tensor
    fires: Tensor | None = None  # [d_sae] tokens each latent fired on in this batch
    l0: Tensor | None = None  # mean active latents per token (0-d)

    def __post_init__(self) -> None:
        if self.fires is None:
            active = self.feats.detach() > 0
            self.fires, self.l0 = active.sum(0), active.sum(-1).float().mean()


def geometric_median(x: Tensor, iters: int = 20, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations from the mean: a robust centre, so a few outlier tokens do not drag ``b_dec``."""
    x = x.float()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(eps)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


def pre_activations(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """``(x - b_dec) @ W_enc + b_enc``; for a batch ``[B, d]`` one fused ``addmm`` (the dense and the sparse step
    share it, so they select the same latents bit for bit)."""
    xc = x - b_dec
    return torch.addmm(b_enc, xc, w_enc) if xc.dim() == 2 else xc @ w_enc + b_enc


def sum_sq(err: Tensor) -> Tensor:
    """Squared error summed over features, averaged over tokens: the reconstruction term of every loss here."""
    return err.pow(2).sum(-1).mean()


class SAE(nn.Module, ABC):
    """Abstract SAE. Subclasses set the class attributes below and implement ``encode`` and ``loss``.

    Its name and what it exports as come from its config (``cfg.architecture``, ``cfg.export_as``).
    """

    decoder_init_norm: float = 1.0
    unit_norm_decoder: bool = True  # rows of W_dec kept at norm 1 (gradient projection + renormalisation)
    init_b_dec_from_data: bool = False  # the learner calls init_b_dec on the first batch
    sparse_step: bool = False  # implements sparse_loss (the learner then uses it unless trainer.sparse_step is off)

    def __init__(self, cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.d_sae = cfg.width(d_in)
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(self.d_sae, d_in, generator=generator)
        w_dec *= self.decoder_init_norm / w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # encoder = decoder^T (every recipe here), stored latent-major: W_enc is the [d_in, d_sae] view of a
        # [d_sae, d_in] matrix, so the sparse step's gradient (computed per latent row) and Adam's state keep that
        # layout with no transposing copy, and the encoder matmul reads it as torch.nn.Linear does
        self.W_enc = nn.Parameter(w_dec.clone().T)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x: Tensor) -> Tensor:
        return pre_activations(x, self.W_enc, self.b_enc, self.b_dec)

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Inference activations [B, d_sae] (what an exported checkpoint computes in SAELens)."""

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @abstractmethod
    def loss(self, x: Tensor, sparsity_scale: float, dead_mask: Tensor | None = None) -> LossOut:
        """Training loss on a batch. ``sparsity_scale`` in [0, 1] is the penalty warm-up; ``dead_mask`` [d_sae]
        marks latents the learner considers dead (used by AuxK; ignored elsewhere)."""

    def sparse_loss(self, x: Tensor, sparsity_scale: float, dead_mask: Tensor | None = None) -> LossOut:
        """The same loss and gradients as :meth:`loss`, computed on the active latents only (``sparse_step``)."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse step")

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor) -> None:
        self.b_dec.copy_(geometric_median(sample).to(self.b_dec))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Drop the gradient component along each unit-norm decoder row: it can only change the norm, which the
        renormalisation would undo, and Adam would otherwise spend its step size on it."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def saelens_cfg(self) -> dict:
        """SAELens 6.x config keys for the inference architecture (the checkpoint module adds d_in, d_sae, ...)."""
        return {
            "architecture": self.cfg.export_as,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }

    @torch.no_grad()
    def export_tensors(self, scale: float) -> dict[str, Tensor]:
        """Weights in raw activation units, given training saw ``x * scale``.

        With ``W_enc' = W_enc * scale`` and ``b_dec' = b_dec / scale`` the pre-activations on raw ``x`` equal the
        trained ones on ``x * scale``, so ``b_enc`` and thresholds are unchanged; ``W_dec / scale`` and ``b_dec'``
        return the reconstruction in raw units.
        """
        return {
            "W_enc": (self.W_enc * scale).detach().clone().contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": (self.W_dec / scale).detach().clone().contiguous(),
            "b_dec": (self.b_dec / scale).detach().clone(),
            **self.extra_export_tensors(),
        }

    def extra_export_tensors(self) -> dict[str, Tensor]:
        """Scale-free extra tensors of the inference architecture (e.g. ``threshold``)."""
        return {}
