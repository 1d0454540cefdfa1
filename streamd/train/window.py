"""Training statistics over a recent token window instead of the last batch.

A few tokens with enormous norms (the attention-sink positions of real models) decide a batch's FVU: one batch with
such a token reads 0.4, the next without it 0.03. Sums over the last ``trainer.stats_window_tokens`` tokens move
smoothly. Each step adds one row of sums (tokens, squared error, squared norm, active latents, loss terms times
tokens, and the sum of ``x``, from which the window's variance comes); the rows of the last ``steps`` steps sit in a
ring on the device, so a step adds work but never waits for the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class StatWindow:
    """Sums of per-step rows over the last ``ceil(window_tokens / batch_size)`` steps (float64, on ``device``)."""

    def __init__(self, window_tokens: int, batch_size: int, device: torch.device) -> None:
        self.steps = max(1, math.ceil(window_tokens / batch_size))
        self.device = device
        self.ring: Tensor | None = None
        self.added = 0

    def add(self, row: Tensor) -> Tensor:
        """Add one step's row; returns the sums over the window (the ring's rows of the last ``steps`` steps)."""
        if self.ring is None or self.ring.shape[1] != row.numel():
            self.ring, self.added = torch.zeros(self.steps, row.numel(), dtype=torch.float64, device=self.device), 0
        self.ring[self.added % self.steps] = row
        self.added += 1
        return self.ring.sum(0)

    def state_dict(self) -> dict:
        return {"ring": self.ring, "added": self.added}

    def load_state_dict(self, state: dict) -> None:
        ring = state["ring"]
        if ring is not None and ring.shape[0] == self.steps:  # another window length: start afresh
            self.ring, self.added = ring.to(self.device, torch.float64).clone(), int(state["added"])


def step_row(x: Tensor, x_hat: Tensor, l0: Tensor, losses: list[Tensor]) -> Tensor:
    """The row one step adds: [tokens, squared error, squared norm, active latents, *(loss * tokens), *sum of x]."""
    x, n = x.double(), x.shape[0]
    err = (x_hat.double() - x).pow(2).sum()
    head = [x.new_tensor(float(n)), err, x.pow(2).sum(), l0.double() * n] + [v.double() * n for v in losses]
    return torch.cat([torch.stack(head), x.sum(0)])


def window_values(sums: Tensor, n_losses: int) -> Tensor:
    """(fvu, mse, l0, *losses) of a window from its summed rows (see :func:`step_row`)."""
    n, err, sq, active = sums[0], sums[1], sums[2], sums[3]
    total = sums[4 + n_losses:]
    deviation = (sq - total.pow(2).sum() / n).clamp_min(1e-12)  # sum of ||x - mean||^2 over the window
    return torch.cat([torch.stack([err / deviation, err / n, active / n]), sums[4:4 + n_losses] / n])
