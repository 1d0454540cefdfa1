"""The tokens whose logits a latent raises and lowers most: its decoder row through the final norm and unembedding.

An approximation (the "direct logit effect" of SAE dashboards): it treats the row as if it reached the unembedding
alone, so it ignores every later block (exact only for the last layer's residual stream), the rest of the
residual stream that the norm divides by, and the norm's own bias (``norm(0)`` is subtracted). It ranks tokens, it
does not predict how much a logit moves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from streamd.produce.capture import final_norm
from streamd.produce.model import LoadedModel


@torch.inference_mode()
def logit_effects(loaded: LoadedModel, w_dec: Tensor, k: int, chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(up_ids, up_vals, down_ids, down_vals)``, each ``[d_sae, k]``, for decoder rows ``w_dec [d_sae, d]``,
    ``chunk`` rows at a time (a chunk's logits are ``chunk x vocab`` floats)."""
    model = loaded.model
    norm, head = final_norm(model), model.get_output_embeddings()
    param = next(model.parameters())
    rows = w_dec.to(param.device, param.dtype)
    offset = head(norm(rows.new_zeros(1, rows.shape[1]))).float()
    k = min(k, offset.shape[-1])
    out: list[list[Tensor]] = [[], [], [], []]
    for part in rows.split(chunk):
        eff = head(norm(part)).float() - offset
        up, down = eff.topk(k, dim=-1), (-eff).topk(k, dim=-1)
        for acc, t in zip(out, (up.indices, up.values, down.indices, -down.values)):
            acc.append(t)
    return tuple(torch.cat(parts) for parts in out)  # type: ignore[return-value]
