"""Downstream quality of an SAE: splice its reconstruction into the frozen model and measure next-token loss.

ce_loss_score = (ce_zero - ce_sae) / (ce_zero - ce_clean), as in SAELens: 1 means the reconstruction loses nothing
the model uses, 0 means it is as bad as deleting the site's output. Only published positions are spliced and
scored: BOS and padding are never trained on, so replacing them would measure something the SAE never saw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from streamd.config import SiteSpec
from streamd.model import LoadedModel, first_tensor, pack_documents, site_module


@torch.inference_mode()
def ce_loss_score(
    loaded: LoadedModel,
    site: SiteSpec,
    sae_encode_decode: Callable[[Tensor], Tensor],
    texts: list[str],
    context_length: int = 128,
    batch_size: int = 8,
) -> dict[str, float]:
    """Clean, spliced and zero-ablated cross-entropy, KL(clean || spliced) per token, and ce_loss_score.

    ``sae_encode_decode`` gets float32 activations ``[N, d]`` of the published positions of a batch and returns
    their reconstruction. Losses average over next-token predictions whose input and target are both published.
    """
    model = loaded.model
    windows = list(pack_documents(loaded.tokenizer, texts, context_length))
    if not windows:
        raise ValueError("the evaluation texts hold no tokens")
    device = next(model.parameters()).device
    keep = torch.empty(0, dtype=torch.bool)
    replace: Callable[[Tensor], Tensor] | None = None

    def splice(_module, _inputs, output):
        if replace is None:
            return None
        act = first_tensor(output)
        spliced = act.clone()
        spliced[keep] = replace(act[keep].float()).to(act.dtype)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    handle = site_module(model, site.site, site.layer).register_forward_hook(splice)
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0}
    n = 0
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            ids = torch.stack([w.input_ids for w in batch]).to(device)
            keep = torch.stack([w.keep_mask for w in batch]).to(device)
            scored = keep[:, :-1] & keep[:, 1:]
            targets = ids[:, 1:, None]

            def log_probs(fn: Callable[[Tensor], Tensor] | None) -> Tensor:
                nonlocal replace
                replace = fn
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
                return logits.float().log_softmax(-1)

            clean = log_probs(None)
            sae = log_probs(sae_encode_decode)
            zero = log_probs(torch.zeros_like)
            for name, lp in (("ce_clean", clean), ("ce_sae", sae), ("ce_zero", zero)):
                totals[name] -= lp.gather(-1, targets).squeeze(-1)[scored].sum().item()
            totals["kl_sae"] += (clean.exp() * (clean - sae)).sum(-1)[scored].sum().item()
            n += int(scored.sum())
    finally:
        handle.remove()
    if n == 0:
        raise ValueError("the evaluation texts give no scored predictions (need two published tokens in a row)")
    out = {k: v / n for k, v in totals.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_score"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap != 0 else float("nan")
    out["n_tokens"] = n
    return out
