"""One inspection: every SAE of a checkpoint against the held-out sample -> metrics and dashboards.

The clean and zero-ablated passes (:func:`streamd.client.evaluate.site_baseline`) and the sample's layout are
computed once per site and kept for every later checkpoint; an SAE then costs one spliced forward pass, two
encodings of the cached activations and its logit effects.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from streamd.client import locate
from streamd.client.evaluate import SiteBaseline, check_fits, site_baseline, site_of, spliced_scores
from streamd.client.load import load_sae
from streamd.config import InspectConfig, SiteSpec, StreamdConfig
from streamd.inspect.dashboard import build_dashboard, select_latents
from streamd.inspect.logits import logit_effects
from streamd.inspect.stats import SampleLayout, latent_stats
from streamd.inspect.sample import held_out_source, held_out_texts, sample_windows
from streamd.produce.model import LoadedModel, load_frozen_model
from streamd.produce.packing import Window
from streamd.sae.quality import fvu_l0
from streamd.torch_utils import configure_threads, resolve_device

log = logging.getLogger(__name__)


def build_inspector(cfg: StreamdConfig) -> Inspector:
    """The model of ``cfg.producer`` (model_path, dtype, context_length, batch_size, torch_threads) on
    ``inspect.device`` and ``inspect.tokens`` of held-out text (:mod:`streamd.inspect.sample`)."""
    p = cfg.producer
    configure_threads(p.torch_threads)
    loaded = load_frozen_model(p.model_path, p.dtype, resolve_device(cfg.inspect.device))
    windows = sample_windows(loaded.tokenizer, held_out_texts(cfg), p.context_length, cfg.inspect.tokens,
                             p.skip_positions)
    log.info("inspector: %d windows of held-out text (%s)", len(windows), held_out_source(cfg)[0].model_dump(
        exclude_defaults=True))
    return Inspector(loaded, windows, cfg.inspect, p.batch_size)


class Inspector:
    """Inspects checkpoints of SAEs on ``loaded``'s sites over fixed ``windows`` of held-out text."""

    def __init__(self, loaded: LoadedModel, windows: list[Window], cfg: InspectConfig, batch_size: int = 8) -> None:
        self.loaded, self.windows, self.cfg, self.batch_size = loaded, windows, cfg, batch_size
        self._sites: dict[tuple[str, int], tuple[SiteBaseline, SampleLayout]] = {}

    def site(self, site: SiteSpec) -> tuple[SiteBaseline, SampleLayout]:
        key = (site.site, site.layer)
        if key not in self._sites:
            base = site_baseline(self.loaded, site, self.windows, self.batch_size)
            self._sites[key] = (base, SampleLayout.of(base, self.cfg.context_window))
        return self._sites[key]

    def inspect(self, found: locate.Located) -> dict[str, dict[str, Any]]:
        """Dashboards by SAE name of every SAE ``found`` (see :func:`streamd.client.evaluate.fetch_checkpoint`)."""
        ckid = found.manifest.get("id") or next(iter(found.saes.values())).name
        out = {}
        for name, sae_dir in found.saes.items():
            t0 = time.monotonic()
            site = site_of(sae_dir)
            sae = load_sae(sae_dir).to(next(self.loaded.model.parameters()).device)
            check_fits(name, sae, site, self.loaded, found.manifest.get("site_id"))
            out[name] = self.inspect_sae(name, sae, site, str(ckid))
            log.info("inspected %s of checkpoint %s in %.1f s", name, ckid, time.monotonic() - t0)
        return out

    def inspect_sae(self, name: str, sae, site: SiteSpec, checkpoint: str) -> dict[str, Any]:
        c = self.cfg
        base, layout = self.site(site)
        scores = spliced_scores(self.loaded, base, sae)
        q = fvu_l0(sae, base.acts)
        metrics = {"ce_loss_score": scores["ce_loss_score"], "kl": scores["kl_sae"], "fvu": q["fvu"], "l0": q["l0"],
                   "ce_clean": scores["ce_clean"], "ce_sae": scores["ce_sae"], "ce_zero": scores["ce_zero"],
                   "n_scored": scores["n_tokens"]}
        stats = latent_stats(sae, base, layout, top_n=c.top_n, intervals=c.intervals, per_interval=c.per_interval,
                             bins=c.histogram_bins, seed=c.seed)
        shown = select_latents(stats.density, c.max_latents, c.extremes, c.seed)
        logits = logit_effects(self.loaded, sae.W_dec[shown], c.logit_tokens)
        return build_dashboard(name, stats, logits, self.loaded.tokenizer, metrics, shown=shown,
                               window=c.context_window, hook=site.hook_name, checkpoint=checkpoint)
