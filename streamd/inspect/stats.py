"""Every latent's statistics over one text sample: top activations, interval samples, density, histogram.

Two passes over the site's cached activations (the model does not run again): the first keeps the top-N tokens of
every latent (:class:`~streamd.inspect.topn.TopN`) and counts firings; the second, knowing each latent's maximum,
fills its activation histogram (``bins`` equal bins on (0, max]) and draws ``per_interval`` uniformly random tokens
from each of ``intervals`` equal activation intervals (as Anthropic's dashboards show: what the latent does at
middling strength, not only at its peak), a TopN keyed by a random number inside the interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamd.client.evaluate import SiteBaseline
from streamd.inspect.topn import TopN, contexts
from streamd.sae.base import SAE


@dataclass
class SampleLayout:
    """Per baseline batch, what every SAE's pass needs and the model's pass fixed: the contexts around every
    position and the sample index of its first position. Computed once per site."""

    ctx_ids: list[Tensor]
    ctx_pos: list[Tensor]
    first_token: list[int]
    window: int

    @classmethod
    def of(cls, baseline: SiteBaseline, window: int) -> SampleLayout:
        ctx_ids, ctx_pos, first = [], [], []
        offset = 0
        for b in baseline.batches:
            ids, pos = contexts(b.ids, window)
            ctx_ids.append(ids)
            ctx_pos.append(pos)
            first.append(offset)
            offset += b.ids.numel()
        return cls(ctx_ids, ctx_pos, first, window)


@dataclass
class LatentStats:
    top: TopN
    intervals: list[TopN]  # interval q holds activations in (max * q / Q, max * (q + 1) / Q]
    fires: Tensor  # [d_sae] published tokens each latent fired on
    hist: Tensor  # [d_sae, bins] counts over (0, max]
    n_tokens: int

    @property
    def max_act(self) -> Tensor:
        return self.top.scores[:, 0]

    @property
    def density(self) -> Tensor:
        return self.fires.double() / max(self.n_tokens, 1)


def _spread(feats: Tensor, keep_idx: Tensor, positions: int) -> Tensor:
    """``[n_keep, d_sae]`` -> ``[positions, d_sae]``, zero where the position is not published."""
    full = feats.new_zeros(positions, feats.shape[1])
    return full.index_copy_(0, keep_idx, feats)


@torch.inference_mode()
def latent_stats(sae: SAE, baseline: SiteBaseline, layout: SampleLayout, *, top_n: int, intervals: int,
                 per_interval: int, bins: int, seed: int = 0) -> LatentStats:
    """The two passes described in the module docstring, on the SAE's device."""
    device = sae.W_dec.device
    d_sae, w = sae.d_sae, layout.window
    top = TopN(d_sae, top_n, w, device)
    fires = torch.zeros(d_sae, dtype=torch.long, device=device)
    n_tokens = 0
    for i, b in enumerate(baseline.batches):
        feats = sae.encode(b.acts.to(device))
        fires += (feats > 0).sum(0)
        n_tokens += feats.shape[0]
        full = _spread(feats, b.keep_idx, b.ids.numel())
        top.update(full, full, layout.first_token[i], layout.ctx_ids[i], layout.ctx_pos[i])

    peak = top.scores[:, :1].clamp_min(torch.finfo(torch.float32).tiny)  # [d_sae, 1]
    hist = torch.zeros(d_sae, bins, device=device)
    samples = [TopN(d_sae, per_interval, w, device) for _ in range(intervals)]
    gen = torch.Generator(device=device).manual_seed(seed)
    offsets = torch.arange(d_sae, device=device) * bins
    for i, b in enumerate(baseline.batches):  # encoded again rather than held: [P, d_sae] per batch
        feats = sae.encode(b.acts.to(device))
        fired = feats > 0
        rel = feats / peak.T  # (0, 1] where fired
        hb = (rel * bins).ceil().long().clamp(1, bins) - 1
        hist.view(-1).scatter_add_(0, (hb + offsets).reshape(-1), fired.reshape(-1).float())
        full = _spread(feats, b.keep_idx, b.ids.numel())
        qb = (rel * intervals).ceil().long().clamp(1, intervals) - 1
        u = 1 + torch.rand(feats.shape, generator=gen, device=device)  # one key per (token, latent): each is in
        for q, s in enumerate(samples):  # one interval, so the samples of different intervals stay independent
            key = u * (fired & (qb == q))
            s.update(_spread(key, b.keep_idx, b.ids.numel()), full, layout.first_token[i],
                     layout.ctx_ids[i], layout.ctx_pos[i])
    return LatentStats(top, samples, fires, hist, n_tokens)
