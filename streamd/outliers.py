"""Massive-activation tokens: a norm far above the typical one (attention sinks; see bench/README.md, "token policy").

A handful of such tokens carry a large share of a site's variance, so an MSE loss spends its gradient on them and a
mean-norm scale estimate is skewed. Producer and trainer both drop a token whose norm is above ``factor`` x the
running median norm of their stream; this module holds that rule (torch only, no I/O).
"""

from __future__ import annotations

import torch

OUTLIER_REASONS = ("position", "norm")
"""``streamd_outlier_tokens_total{reason}``: a skipped window position (producer.skip_positions), or a norm above
outlier_factor x the running median."""


class NormOutliers:
    """Running median of recent token norms (the last ``window`` seen, outliers included: the median is robust) and
    the rule ``norm > factor x median``. The first call's median comes from its own tokens."""

    def __init__(self, factor: float, window: int = 16384) -> None:
        if factor <= 1:
            raise ValueError(f"outlier factor must be > 1, got {factor}")
        self.factor, self.window = factor, window
        self._norms = torch.empty(0)

    @property
    def median(self) -> float | None:
        return float(self._norms.median()) if len(self._norms) else None

    def inliers(self, norms: torch.Tensor) -> torch.Tensor:
        """Bool mask of the tokens to keep (NaN / inf norms are kept: others count and drop those); updates the
        running median with these norms first."""
        norms = norms.detach().float().cpu()
        finite = torch.isfinite(norms)
        self._norms = torch.cat([self._norms, norms[finite]])[-self.window :]
        if not len(self._norms):
            return torch.ones(len(norms), dtype=torch.bool)
        limit = self.factor * float(self._norms.median())
        return ~(finite & (norms > limit))


def robust_mean_norm(norms: torch.Tensor, factor: float | None) -> float:
    """Mean norm of the tokens at most ``factor`` x the median norm (all of them when ``factor`` is None): the scale
    estimate that a few massive tokens cannot skew."""
    norms = norms.float()
    if factor is not None and len(norms):
        norms = norms[norms <= factor * norms.median()]
    return float(norms.mean())
