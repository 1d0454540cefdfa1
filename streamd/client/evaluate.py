"""Downstream quality of an SAE: splice its reconstruction into the frozen model and measure next-token loss.

ce_loss_score = (ce_zero - ce_sae) / (ce_zero - ce_clean), as in SAELens: 1 means the reconstruction loses nothing
the model uses, 0 means it is as bad as deleting the site's output. Only published positions are spliced and
scored: BOS and padding are never trained on, so replacing them would measure something the SAE never saw.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from streamd.run.checkpoints import SAE_CFG
from streamd.config import SiteSpec, StreamdConfig
from streamd.identity import site_id_hex
from streamd.produce.capture import ActivationCapture, first_tensor, site_module
from streamd.produce.model import LoadedModel, load_frozen_model
from streamd.produce.packing import pack_documents
from streamd.torch_utils import configure_threads, resolve_device
from streamd.client import locate
from streamd.client.load import load_sae
from streamd.client.pull import resolve_token
from streamd.sae.quality import fvu_l0
from streamd.produce.text import iter_source

log = logging.getLogger(__name__)


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


# Held-out text: ``EVAL_SKIP_DOCS`` documents into the source, past the ones a run's first messages (the trainer's
# eval set and norm estimate) come from. A run that looped over its corpus has trained on these documents too; a
# dictionary far smaller than the tokens it saw cannot memorise them, so this stays a fair measure.
EVAL_SKIP_DOCS = 500
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")


def _site_of(sae_dir: Path) -> SiteSpec:
    hook = json.loads((sae_dir / SAE_CFG).read_text())["metadata"]["hook_name"]
    m = _HOOK_RE.match(hook or "")
    if m is None:
        raise ValueError(f"{sae_dir / SAE_CFG}: hook_name {hook!r} is not blocks.LAYER.hook_SITE")
    return SiteSpec(layer=int(m.group(1)), site=m.group(2))


def held_out_texts(cfg: StreamdConfig, n_docs: int, skip_docs: int = EVAL_SKIP_DOCS) -> list[str]:
    """``n_docs`` documents of ``cfg.producer.source`` after the first ``skip_docs`` (one pass, no looping); a
    source too short for that gives its last ``n_docs``."""
    source = cfg.producer.source
    if source.kind == "kafka":
        raise ValueError("eval reads text from a corpus, files or stdin: a kafka text source would take documents "
                         "from the producers' consumer group")
    docs = list(itertools.islice(iter_source(source.model_copy(update={"loop": False})), skip_docs + n_docs))
    return docs[skip_docs:] if len(docs) == skip_docs + n_docs else docs[-n_docs:]


@torch.inference_mode()
def _site_activations(loaded: LoadedModel, site: SiteSpec, texts: list[str], context_length: int,
                      batch_size: int) -> Tensor:
    """float32 activations ``[N, d]`` of the published positions, in the windows ``ce_loss_score`` splices."""
    windows = list(pack_documents(loaded.tokenizer, texts, context_length))
    device = next(loaded.model.parameters()).device
    out = []
    with ActivationCapture(loaded.model, [site]) as capture:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            acts = capture(torch.stack([w.input_ids for w in batch]).to(device))[(site.site, site.layer)]
            out.append(acts[torch.stack([w.keep_mask for w in batch]).to(device)].float())
    return torch.cat(out)


def eval_checkpoint(cfg: StreamdConfig, checkpoint: str, n_docs: int = 64,
                    skip_docs: int = EVAL_SKIP_DOCS, *, token: str | None = None,
                    token_file: str | Path | None = None, cafile: str | Path | None = None,
                    device: str = "auto") -> dict[str, dict[str, float]]:
    """Per SAE of a checkpoint: ce_clean, ce_sae, ce_zero, kl_sae, ce_loss_score, n_tokens, and fvu / l0 on the
    same held-out activations.

    ``checkpoint`` is an SAE, checkpoint or run directory, a ``checkpoints/latest`` file, or a trainer's URL (the
    whole latest checkpoint is pulled into the ``load_sae`` cache with the token ``token``, else ``token_file``'s,
    else ``$STREAMD_CHECKPOINT_TOKEN``, else ``metrics.checkpoint_token``); see
    :mod:`streamd.client.locate`. The model comes from ``cfg.producer`` (model_path, dtype, context_length,
    batch_size) and runs on ``device`` (``auto``: a GPU when there is one; not ``producer.device``: an evaluation is
    not a producer); the site from each SAE's ``hook_name``; the text from :func:`held_out_texts`.
    """
    if locate.is_url(checkpoint):
        own = cfg.metrics.checkpoint_token
        token = resolve_token(token, token_file) or (own.get_secret_value() if own else None)
    found = locate.resolve(locate.fetch(checkpoint, token=token, cafile=cafile))
    sae_dirs, manifest = found.saes, found.manifest
    p = cfg.producer
    configure_threads(p.torch_threads)
    dev = resolve_device(device)
    loaded = load_frozen_model(p.model_path, p.dtype, dev)
    texts = held_out_texts(cfg, n_docs, skip_docs)
    acts: dict[tuple[str, int], Tensor] = {}
    out = {}
    for name, sae_dir in sae_dirs.items():
        site = _site_of(sae_dir)
        sae = load_sae(sae_dir).to(dev)
        if sae.d_in != loaded.d_model:
            raise ValueError(f"SAE {name} has d_in {sae.d_in}, the model's d_model is {loaded.d_model}")
        trained_on = manifest.get("site_id")
        if trained_on and trained_on != site_id_hex(loaded.model_hash, site.site, site.layer):
            log.warning("SAE %s was trained on site id %s; %s of this model has another: is it the same model?",
                        name, trained_on, site.hook_name)
        out[name] = ce_loss_score(loaded, site, sae, texts, p.context_length, p.batch_size)
        key = (site.site, site.layer)
        if key not in acts:
            acts[key] = _site_activations(loaded, site, texts, p.context_length, p.batch_size)
        q = fvu_l0(sae, acts[key])
        out[name].update(fvu=q["fvu"], l0=q["l0"])
    return out
