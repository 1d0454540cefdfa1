"""One SAE's dashboards as plain data (the JSON API and the HTML both render this): an index row for every latent
and a full dashboard for the latents shown (all live ones, or for a wide SAE a sample plus the densest and rarest).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from streamd.inspect.stats import LatentStats
from streamd.inspect.topn import PAD_ID, TopN

LOGIT_NOTE = ("approximation: the decoder row through the final norm and unembedding alone, ignoring later blocks "
              "and the rest of the residual stream")


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def select_latents(density: Tensor, max_latents: int, extremes: int, seed: int = 0) -> list[int]:
    """The latents that get a dashboard: every live one when there are at most ``max_latents``, else the
    ``extremes`` densest and rarest live ones plus a random sample (``seed``) up to ``max_latents``."""
    alive = (density > 0).nonzero().squeeze(1).cpu()
    if len(alive) <= max_latents:
        return alive.tolist()
    order = alive[density[alive].cpu().argsort(descending=True)]
    ends = min(extremes, max_latents // 2)
    chosen = set(order[:ends].tolist()) | set(order[len(order) - ends :].tolist())
    rest = order[ends : len(order) - ends]
    gen = torch.Generator().manual_seed(seed)
    chosen |= set(rest[torch.randperm(len(rest), generator=gen)[: max_latents - len(chosen)]].tolist())
    return sorted(chosen)


class _Tokens:
    """Token id -> its text, decoded once per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, tid: int) -> str:
        if tid not in self.cache:
            self.cache[tid] = self.tokenizer.decode([tid])
        return self.cache[tid]


def _examples(top: TopN, latents: list[int], tok: _Tokens, window: int) -> dict[int, list[dict[str, Any]]]:
    idx = torch.tensor(latents, dtype=torch.long, device=top.scores.device)
    scores, tokens = top.scores[idx].tolist(), top.token[idx].tolist()
    ids, acts = top.ctx_ids[idx].tolist(), top.ctx_acts[idx].tolist()
    out: dict[int, list[dict[str, Any]]] = {}
    for row, latent in enumerate(latents):
        exs = []
        for score, token, cid, cact in zip(scores[row], tokens[row], ids[row], acts[row]):
            if score <= 0:
                continue
            inside = [j for j, t in enumerate(cid) if t != PAD_ID]
            exs.append({"token": token, "center": inside.index(window), "act": _r(cact[window]),
                        "tokens": [tok(cid[j]) for j in inside], "acts": [_r(cact[j]) for j in inside]})
        out[latent] = exs
    return out


def build_dashboard(name: str, stats: LatentStats, logits: tuple[Tensor, ...], tokenizer, metrics: dict[str, float],
                    *, shown: list[int], window: int, hook: str, checkpoint: str) -> dict[str, Any]:
    """The JSON-able dashboard of one SAE (see the module docstring); ``logits`` from
    :func:`streamd.inspect.logits.logit_effects` on the ``shown`` latents' decoder rows, in that order."""
    tok = _Tokens(tokenizer)
    density, peak = stats.density.tolist(), stats.max_act.tolist()
    top = _examples(stats.top, shown, tok, window)
    q = len(stats.intervals)
    intervals = [_examples(s, shown, tok, window) for s in stats.intervals]
    shown_idx = torch.tensor(shown, dtype=torch.long, device=stats.hist.device)
    hist = stats.hist[shown_idx].long().tolist()
    up_i, up_v, dn_i, dn_v = (t.tolist() for t in logits)
    latents = {}
    for row, i in enumerate(shown):
        latents[str(i)] = {
            "i": i, "density": density[i], "max_act": _r(peak[i]), "top": top[i],
            "intervals": [{"lo": _r(peak[i] * k / q), "hi": _r(peak[i] * (k + 1) / q), "examples": intervals[k][i]}
                          for k in reversed(range(q))],
            "histogram": {"max": _r(peak[i]), "counts": hist[row]},
            "logits": {"up": [[tok(t), _r(v)] for t, v in zip(up_i[row], up_v[row])],
                       "down": [[tok(t), _r(v)] for t, v in zip(dn_i[row], dn_v[row])]},
        }
    centers = torch.where(stats.top.scores > 0, stats.top.ctx_ids[:, :, window], PAD_ID).tolist()
    index = []
    for i in range(len(density)):
        words = list(dict.fromkeys(tok(t) for t in centers[i] if t != PAD_ID))[:5]
        index.append({"i": i, "density": density[i], "max_act": _r(peak[i]), "dead": density[i] == 0,
                      "top_tokens": words, "page": str(i) in latents})
    return {"sae": name, "checkpoint": checkpoint, "hook": hook, "d_sae": len(density), "n_tokens": stats.n_tokens,
            "context_window": window, "built_at": time.time(), "metrics": metrics, "logit_note": LOGIT_NOTE,
            "index": index, "latents": latents}
