"""The inspector's cost: (a) the feature browser's index page of a 16k-latent SAE, (b) one inspection of a 4608-wide
TopK SAE (k 32, random weights: the cost does not depend on what it learned) at resid_post of layer 15 of the shipped
SmolLM2-135M over N held-out tokens (pydoc, context 128, batch 8).

(a) renders ``index_page`` from a dashboard with 16,384 index rows (each sort, and a search) and reports its size.
(b) splits one inspection into its phases: the site baseline (the clean and zero-ablated passes, once per site and
sample, reused by every later checkpoint), then per SAE the spliced pass + FVU/L0, the two encoding passes of the
latent statistics, the logit effects and building the dashboard; and reports the peak RSS of the process and the
top-N state (``streamd.inspect.topn.state_bytes``). An inspection of a later checkpoint costs the per-SAE phases only.
One untimed warm-up batch first.

torch threads 2. Run: ``.venv/bin/python bench/bench_inspect.py [--quick] [--tokens 50000] [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from _common import Phase, load_average, machine_line, quiet, table
from streamd.client.evaluate import site_baseline, spliced_scores
from streamd.config import InspectConfig, SiteSpec
from streamd.inspect.dashboard import build_dashboard, select_latents
from streamd.inspect.html import SORTS, index_page
from streamd.inspect.logits import logit_effects
from streamd.inspect.sample import sample_windows
from streamd.inspect.stats import SampleLayout, latent_stats
from streamd.inspect.static import SAE_LINKS as LINKS
from streamd.inspect.topn import state_bytes
from streamd.produce.model import load_frozen_model
from streamd.produce.text import pydoc_topics
from streamd.sae import load_exported
from streamd.sae.quality import fvu_l0
from streamd.torch_utils import configure_threads

THREADS, CONTEXT, BATCH = 2, 128, 8
SITE = SiteSpec(site="resid_post", layer=15)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_index(width: int) -> list[list[object]]:
    rng = random.Random(0)
    words = [f"tok{i}" for i in range(500)]
    index = [{"i": i, "density": 0.0 if i % 50 == 0 else rng.random() ** 4, "max_act": rng.random() * 10,
              "dead": i % 50 == 0, "top_tokens": rng.sample(words, 5), "page": i % 4 == 0} for i in range(width)]
    dash = {"sae": "w16k", "checkpoint": "0" * 20, "hook": SITE.hook_name, "d_sae": width, "n_tokens": 16384,
            "metrics": {"ce_loss_score": 0.9, "kl": 0.1, "fvu": 0.2, "l0": 32.0}, "index": index, "latents": {}}
    rows = []
    for sort in [*SORTS, "density&q=tok7"]:
        key, _, query = sort.partition("&q=")
        p = Phase().start()
        page = index_page(dash, key, LINKS, query, search=True)
        p.stop()
        rows.append([f"index ?sort={sort}", width, p.wall * 1000, len(page) / 1e6])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1,024 tokens")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    quiet()
    configure_threads(THREADS)
    tokens = 1024 if args.quick else args.tokens
    print(machine_line(THREADS))
    print(table(["page", "latents", "render ms", "MB"], bench_index(16384)))
    print()

    loaded = load_frozen_model(None, args.dtype, "cpu")
    windows = sample_windows(loaded.tokenizer, pydoc_topics(), CONTEXT, tokens)
    n_tok = int(sum(w.keep_mask.sum() for w in windows))
    gen = torch.Generator().manual_seed(0)
    d = loaded.d_model
    w_dec = torch.randn(args.width, d, generator=gen)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    sae = load_exported({"architecture": "topk", "k": 32, "apply_b_dec_to_input": True},
                        {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(args.width), "W_dec": w_dec,
                         "b_dec": torch.zeros(d)}).requires_grad_(False)
    cfg = InspectConfig()
    site_baseline(loaded, SITE, windows[:BATCH], BATCH)  # untimed warm-up batch (first-call allocations)
    rss0 = rss_mb()
    phases: list[tuple[str, Phase]] = []

    def phase(name: str, fn):
        p = Phase().start()
        out = fn()
        phases.append((name, p.stop()))
        return out

    base = phase("site baseline (clean + zero-ablated passes)", lambda: site_baseline(loaded, SITE, windows, BATCH))
    layout = phase("sample layout (contexts)", lambda: SampleLayout.of(base, cfg.context_window))
    phase("spliced pass + FVU/L0", lambda: (spliced_scores(loaded, base, sae), fvu_l0(sae, base.acts)))
    stats = phase("latent statistics (2 encodings)", lambda: latent_stats(
        sae, base, layout, top_n=cfg.top_n, intervals=cfg.intervals, per_interval=cfg.per_interval,
        bins=cfg.histogram_bins))
    shown = select_latents(stats.density, cfg.max_latents, cfg.extremes)
    logits = phase("logit effects", lambda: logit_effects(loaded, sae.W_dec[shown], cfg.logit_tokens))
    phase("dashboard (JSON-able)", lambda: build_dashboard(
        "bench", stats, logits, loaded.tokenizer, {}, shown=shown, window=cfg.context_window, hook=SITE.hook_name,
        checkpoint="0"))
    per_sae = sum(p.wall for name, p in phases[2:])
    print(f"inspection: {n_tok:,} held-out tokens ({len(windows)} windows), {args.width}-wide TopK k 32, "
          f"{args.dtype}, {len(shown):,} dashboards")
    print(table(["phase", "wall s", "CPU util", "tok/s"],
                [[name, p.wall, p.util, n_tok / p.wall] for name, p in phases]
                + [["per SAE (a later checkpoint)", per_sae, 0.0, n_tok / per_sae],
                   ["first inspection (baseline + per SAE)", phases[0][1].wall + phases[1][1].wall + per_sae, 0.0,
                    n_tok / (phases[0][1].wall + phases[1][1].wall + per_sae)]]))
    print(f"peak RSS {rss_mb():,.0f} MB (model loaded: {rss0:,.0f} MB); top-N state "
          f"{state_bytes(args.width, cfg.top_n, cfg.context_window) / 1e6:.1f} MB; load average at end "
          f"{load_average()}; {time.strftime('%H:%M')}")


if __name__ == "__main__":
    main()
