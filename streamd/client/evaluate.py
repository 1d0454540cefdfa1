"""Downstream quality of an SAE: splice its reconstruction into the frozen model and measure next-token loss.

ce_loss_score = (ce_zero - ce_sae) / (ce_zero - ce_clean), as in SAELens: 1 means the reconstruction loses nothing
the model uses, 0 means it is as bad as deleting the site's output. Only published positions are spliced and
scored: BOS and padding are never trained on, so replacing them would measure something the SAE never saw.

The clean and zero-ablated passes depend only on the text and the site, so :func:`site_baseline` runs them once
and keeps what every SAE's spliced pass is compared against (:func:`spliced_scores`): the clean and zero-ablated
target losses, the clean input of the unembedding at the scored positions (KL re-projects it: one matmul, no
transformer block) and the site's activations at the published positions (FVU, L0, the inspector's dashboards).
Its size is ``tokens x d_model x 2`` floats plus two floats per token.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from streamd.run.checkpoints import SAE_CFG
from streamd.config import SiteSpec, StreamdConfig
from streamd.identity import site_id_hex
from streamd.produce.capture import first_tensor, site_module
from streamd.produce.model import LoadedModel, load_frozen_model
from streamd.produce.packing import Window, pack_documents
from streamd.torch_utils import configure_threads, resolve_device
from streamd.client import locate
from streamd.client.load import load_sae
from streamd.client.pull import resolve_token
from streamd.sae.quality import fvu_l0
from streamd.produce.text import iter_source

log = logging.getLogger(__name__)

Reconstruct = Callable[[Tensor], Tensor]


@dataclass
class BaselineBatch:
    """One batch of windows and what its clean and zero-ablated passes left (all on the model's device)."""

    ids: Tensor  # [B, T] input ids
    keep_idx: Tensor  # [n_keep] flat indices into [B*T] of the published positions (spliced, activations kept)
    scored_idx: Tensor  # [n_scored] flat indices into [B*(T-1)] of predictions whose input and target are published
    targets: Tensor  # [n_scored] the token each scored prediction should give
    hidden: Tensor  # [n_scored, d_model] clean input of the unembedding at the scored positions
    nll_clean: Tensor  # [n_scored] float32
    nll_zero: Tensor  # [n_scored] float32 (the site's output zeroed at the published positions)
    acts: Tensor  # [n_keep, d_model] float32 clean activations of the site at the published positions


@dataclass
class SiteBaseline:
    """The clean and zero-ablated passes over one text sample at one site (see the module docstring)."""

    site: SiteSpec
    batches: list[BaselineBatch]

    @property
    def n_scored(self) -> int:
        return sum(int(b.nll_clean.numel()) for b in self.batches)

    @property
    def acts(self) -> Tensor:
        """float32 activations ``[N, d]`` of the published positions, in window order."""
        return torch.cat([b.acts for b in self.batches])


class _Splice:
    """A forward hook on the site: records its clean output at the published positions and, when ``replace`` is
    set, substitutes ``replace(output)`` there. Positions are flat indices (no boolean mask: no host sync)."""

    def __init__(self, loaded: LoadedModel, site: SiteSpec) -> None:
        self.loaded, self.replace, self.keep_idx, self.seen = loaded, None, None, None
        self._handle = site_module(loaded.model, site.site, site.layer).register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        act = first_tensor(output)
        flat = act.reshape(-1, act.shape[-1])
        self.seen = flat.index_select(0, self.keep_idx).float()
        if self.replace is None:
            return None
        spliced = flat.index_copy(0, self.keep_idx, self.replace(self.seen).to(act.dtype)).view_as(act)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    def hidden(self, ids: Tensor, keep_idx: Tensor, scored_idx: Tensor, replace: Reconstruct | None) -> Tensor:
        """The input of the unembedding at the scored positions, with the site replaced by ``replace``."""
        self.keep_idx, self.replace = keep_idx, replace
        out = self.loaded.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return out[:, :-1].reshape(-1, out.shape[-1]).index_select(0, scored_idx)

    def log_probs(self, hidden: Tensor) -> Tensor:
        return self.loaded.model.get_output_embeddings()(hidden).float().log_softmax(-1)

    def close(self) -> None:
        self._handle.remove()


def _nll(log_probs: Tensor, targets: Tensor) -> Tensor:
    return -log_probs.gather(-1, targets[:, None]).squeeze(-1)


@torch.inference_mode()
def site_baseline(loaded: LoadedModel, site: SiteSpec, windows: Sequence[Window], batch_size: int = 8) -> SiteBaseline:
    """Run the clean and zero-ablated passes over ``windows`` once (see the module docstring)."""
    if not windows:
        raise ValueError("the evaluation texts hold no tokens")
    device = next(loaded.model.parameters()).device
    splice = _Splice(loaded, site)
    batches = []
    try:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            ids = torch.stack([w.input_ids for w in chunk]).to(device)
            keep = torch.stack([w.keep_mask for w in chunk]).to(device)
            scored = keep[:, :-1] & keep[:, 1:]
            keep_idx, scored_idx = keep.reshape(-1).nonzero().squeeze(1), scored.reshape(-1).nonzero().squeeze(1)
            targets = ids[:, 1:].reshape(-1)[scored_idx]
            hidden = splice.hidden(ids, keep_idx, scored_idx, None)
            acts = splice.seen
            nll_clean = _nll(splice.log_probs(hidden), targets)
            nll_zero = _nll(splice.log_probs(splice.hidden(ids, keep_idx, scored_idx, torch.zeros_like)), targets)
            batches.append(BaselineBatch(ids, keep_idx, scored_idx, targets, hidden, nll_clean, nll_zero, acts))
    finally:
        splice.close()
    if not any(b.nll_clean.numel() for b in batches):
        raise ValueError("the evaluation texts give no scored predictions (need two published tokens in a row)")
    return SiteBaseline(site, batches)


@torch.inference_mode()
def spliced_scores(loaded: LoadedModel, baseline: SiteBaseline, sae_encode_decode: Reconstruct) -> dict[str, float]:
    """Clean, spliced and zero-ablated cross-entropy, KL(clean || spliced) per token, and ce_loss_score, against a
    baseline: one spliced forward pass per batch.

    ``sae_encode_decode`` gets float32 activations ``[N, d]`` of the published positions of a batch and returns
    their reconstruction. Losses average over next-token predictions whose input and target are both published.
    """
    splice = _Splice(loaded, baseline.site)
    sums = torch.zeros(4, dtype=torch.float64, device=baseline.batches[0].ids.device)
    try:
        for b in baseline.batches:
            if not len(b.scored_idx):  # a shape, known on the host
                continue
            clean = splice.log_probs(b.hidden)
            sae = splice.log_probs(splice.hidden(b.ids, b.keep_idx, b.scored_idx, sae_encode_decode))
            nll_sae = _nll(sae, b.targets)
            sums += torch.stack([b.nll_clean.sum(), nll_sae.sum(), b.nll_zero.sum(),
                                 (clean.exp() * (clean - sae)).sum()]).double()
    finally:
        splice.close()
    n = baseline.n_scored
    out = {k: v / n for k, v in zip(("ce_clean", "ce_sae", "ce_zero", "kl_sae"), sums.tolist())}  # one host copy
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_score"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap != 0 else float("nan")
    out["n_tokens"] = n
    return out


def ce_loss_score(
    loaded: LoadedModel,
    site: SiteSpec,
    sae_encode_decode: Reconstruct,
    texts: list[str],
    context_length: int = 128,
    batch_size: int = 8,
) -> dict[str, float]:
    """:func:`spliced_scores` of one reconstruction against a fresh :func:`site_baseline` of ``texts``."""
    windows = list(pack_documents(loaded.tokenizer, texts, context_length))
    return spliced_scores(loaded, site_baseline(loaded, site, windows, batch_size), sae_encode_decode)


# Held-out text: ``EVAL_SKIP_DOCS`` documents into the source, past the ones a run's first messages (the trainer's
# eval set and norm estimate) come from. A run that looped over its corpus has trained on these documents too; a
# dictionary far smaller than the tokens it saw cannot memorise them, so this stays a fair measure.
EVAL_SKIP_DOCS = 500
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")


def site_of(sae_dir: Path) -> SiteSpec:
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


def checkpoint_token(cfg: StreamdConfig, token: str | None = None, token_file: str | Path | None = None) -> str | None:
    """The token for a trainer's URL: ``token``, else ``token_file``'s, else ``$STREAMD_CHECKPOINT_TOKEN``, else
    ``metrics.checkpoint_token`` (the run's own)."""
    own = cfg.metrics.checkpoint_token
    return resolve_token(token, token_file) or (own.get_secret_value() if own else None)


def fetch_checkpoint(cfg: StreamdConfig, checkpoint: str | Path, *, token: str | None = None,
                     token_file: str | Path | None = None, cafile: str | Path | None = None,
                     cache_dir: Path | None = None) -> locate.Located:
    """Every SAE ``checkpoint`` names; a trainer's URL is pulled whole first (:func:`checkpoint_token`)."""
    if locate.is_url(checkpoint):
        token = checkpoint_token(cfg, token, token_file)
    return locate.resolve(locate.fetch(checkpoint, token=token, cafile=cafile, cache_dir=cache_dir))


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
    found = fetch_checkpoint(cfg, checkpoint, token=token, token_file=token_file, cafile=cafile)
    sae_dirs, manifest = found.saes, found.manifest
    p = cfg.producer
    configure_threads(p.torch_threads)
    dev = resolve_device(device)
    loaded = load_frozen_model(p.model_path, p.dtype, dev)
    # the producer's token policy: positions it never publishes (skip_positions) are neither spliced nor scored
    windows = list(pack_documents(loaded.tokenizer, held_out_texts(cfg, n_docs, skip_docs), p.context_length,
                                  p.skip_positions))
    baselines: dict[tuple[str, int], SiteBaseline] = {}
    out = {}
    for name, sae_dir in sae_dirs.items():
        site = site_of(sae_dir)
        sae = load_sae(sae_dir).to(dev)
        check_fits(name, sae, site, loaded, manifest.get("site_id"))
        key = (site.site, site.layer)
        if key not in baselines:
            baselines[key] = site_baseline(loaded, site, windows, p.batch_size)
        out[name] = spliced_scores(loaded, baselines[key], sae)
        q = fvu_l0(sae, baselines[key].acts)
        out[name].update(fvu=q["fvu"], l0=q["l0"])
    return out


def check_fits(name: str, sae, site: SiteSpec, loaded: LoadedModel, trained_on: str | None) -> None:
    """Refuse an SAE whose width does not match the model's site; warn when it was trained on another site id."""
    if sae.d_in != loaded.d_model:
        raise ValueError(f"SAE {name} ({site.hook_name}) has d_in {sae.d_in}, the model's d_model is "
                         f"{loaded.d_model}")
    if site.layer >= loaded.n_layers:
        raise ValueError(f"SAE {name} reads hook {site.hook_name}, the model has layers 0..{loaded.n_layers - 1}")
    if trained_on and trained_on != site_id_hex(loaded.model_hash, site.site, site.layer):
        log.warning("SAE %s was trained on site id %s; %s of this model has another: is it the same model?",
                    name, trained_on, site.hook_name)
