"""The N highest-scoring tokens of every latent, kept with a streaming merge, each with its context.

Nothing per token is stored for all latents: a batch's ``[P, d_sae]`` activations are merged into ``[d_sae, N]``
winners and dropped. Each winner keeps its score, the token's index in the sample, and the ``2W+1`` token ids and
the latent's activations around it, so the state is :func:`state_bytes` ``= d_sae * N * (4 + 8 + (2W+1) * (4 + 4))``
bytes whatever the number of tokens (a merge holds about twice that for a moment). Everything stays on the
activations' device; nothing here syncs with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

PAD_ID = -1  # context positions outside the window


def state_bytes(d_sae: int, n: int, window: int) -> int:
    """Bytes of a :class:`TopN` state: per latent and winner a float32 score, an int64 token index, and ``2W+1``
    int32 token ids and float32 activations."""
    return d_sae * n * (4 + 8 + (2 * window + 1) * 8)


def contexts(ids: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """For windows ``ids [B, T]``: the ``[B*T, 2W+1]`` int32 token ids around every position (``PAD_ID`` outside its
    window) and the flat position of each (-1 outside), for gathering activations around a token."""
    b, t = ids.shape
    offsets = torch.arange(-window, window + 1, device=ids.device)
    pos = torch.arange(t, device=ids.device)[:, None] + offsets  # [T, C]
    inside = (pos >= 0) & (pos < t)
    flat = (torch.arange(b, device=ids.device)[:, None, None] * t + pos.clamp(0, t - 1)).reshape(b * t, -1)
    inside = inside.expand(b, t, -1).reshape(b * t, -1)
    ctx_ids = torch.where(inside, ids.reshape(-1)[flat], PAD_ID).to(torch.int32)
    return ctx_ids, torch.where(inside, flat, -1)


class TopN:
    """Per latent, the ``n`` tokens with the highest positive ``scores`` seen so far (see the module docstring).

    ``scores`` are usually the activations themselves; a random key restricted to an activation interval gives a
    uniform sample of that interval (:mod:`streamd.inspect.stats`). Empty slots have score 0.
    """

    def __init__(self, d_sae: int, n: int, window: int, device: torch.device | str = "cpu") -> None:
        c = 2 * window + 1
        self.n, self.window = n, window
        self.scores = torch.zeros(d_sae, n, device=device)
        self.token = torch.full((d_sae, n), -1, dtype=torch.long, device=device)
        self.ctx_ids = torch.full((d_sae, n, c), PAD_ID, dtype=torch.int32, device=device)
        self.ctx_acts = torch.zeros(d_sae, n, c, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scores, self.token, self.ctx_ids, self.ctx_acts))

    def update(self, scores: Tensor, acts: Tensor, first_token: int, ctx_ids: Tensor, ctx_pos: Tensor) -> None:
        """Merge a batch of ``P`` positions: ``scores`` and ``acts`` ``[P, d_sae]`` (0 where nothing fired or the
        position is not published), the sample index of position 0, and :func:`contexts` of the batch."""
        p, d_sae = acts.shape
        k = min(self.n, p)
        cand, where = scores.T.topk(k, dim=1)  # [d_sae, k] the batch's own best first: the merge stays small
        latent = torch.arange(d_sae, device=acts.device)[:, None, None]
        pos = ctx_pos[where]  # [d_sae, k, C]
        cand_acts = torch.where(pos >= 0, acts.reshape(-1)[pos.clamp_min(0) * d_sae + latent], 0.0)
        merged, pick = torch.cat([self.scores, cand], 1).topk(self.n, dim=1)
        self.scores = merged
        self.token = torch.cat([self.token, where + first_token], 1).gather(1, pick)
        c = self.ctx_ids.shape[-1]
        pick_c = pick[..., None].expand(-1, -1, c)
        self.ctx_ids = torch.cat([self.ctx_ids, ctx_ids[where]], 1).gather(1, pick_c)
        self.ctx_acts = torch.cat([self.ctx_acts, cand_acts], 1).gather(1, pick_c)
