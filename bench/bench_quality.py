"""SAE quality on the shipped model: streamd's TopK against SAELens' TopK, with and without the token policy.

Phases (each result is kept under ``<cache root>/bench-quality/`` keyed by its parameters, so a rerun skips what
is done):

1. **cache**: activations of the shipped SmolLM2-135M (``resid_post`` of layer 15, bf16, as ``streamd up`` runs it)
   over the shipped KJV corpus, through the producer's own rows (``ActivationProducer.activation_rows``: packing,
   capture, wire dtype, token policy), once with the policy (the producer defaults) and once without
   (``skip_positions 0``, no outlier rule), ``--tokens`` rows each (a multiple of the batch). The held-out documents
   ``streamd eval`` reads (``EVAL_SKIP_DOCS`` .. + ``--eval-docs``) are left out of training.
2. **train**: streamd's TopK (``streamd up``'s SAE and trainer settings: k 32, width 4608, batch 2048, lr warm-up
   ``--warmup-tokens`` (up: 200k), linear decay over the last 20%; ``trainer.outlier_factor`` and the held-out set off, so every row
   of the file is trained once) with the Trainer's file source; SAELens 6.x ``SAETrainer`` on ``TopKTrainingSAE``
   (its side venv ``.venv-saelens``; same width, k, lr, schedule, batch and rows, in one seeded shuffled order,
   scaled by the same constant as streamd's, E||x|| = sqrt(d) from the first 32,768 rows), exported in the SAELens
   layout streamd loads.
3. **eval**: per SAE, ``streamd eval`` (``eval_checkpoint``: CE loss recovered, KL, FVU and L0 on every held-out
   token), FVU and L0 on the held-out tokens the policy keeps, and the dead fraction (latents that never fire on
   the held-out tokens).

    .venv/bin/python bench/bench_quality.py [--tokens 1048576] [--eval-docs 64] [--warmup-tokens 200000]
        [--threads 2] [--only policy|nopolicy] [--impl streamd|SAELens]   # --only / --impl: share the work
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Phase, load_average, machine_line, quiet, table  # noqa: E402

from streamd.cli import UP_DEFAULTS  # noqa: E402
from streamd.client.evaluate import EVAL_SKIP_DOCS, eval_checkpoint, held_out_texts  # noqa: E402
from streamd.client.load import load_sae  # noqa: E402
from streamd.config import load_config  # noqa: E402
from streamd.files import cache_root  # noqa: E402
from streamd.outliers import robust_mean_norm  # noqa: E402
from streamd.produce.text import iter_source  # noqa: E402
from streamd.sae.quality import fvu_l0  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
POLICY_OFF = {"producer.skip_positions": 0, "producer.outlier_factor": None}

# Runs in .venv-saelens: argv[1] is a JSON job; trains, folds decoder norms and the scale in, saves the SAE,
# prints seconds.
SAELENS_TRAIN = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
torch.manual_seed(job["seed"])
acts = load_file(job["input"])["acts"]
order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(job["seed"]))
B = job["batch"]
def batches():
    for lo in range(0, len(order) - B + 1, B):
        yield acts[order[lo:lo + B]].float() * job["scale"]
cfg = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=job["width"], k=job["k"], device="cpu",
                            normalize_activations="none")
cfg.metadata.hook_name = job["hook_name"]
sae = TopKTrainingSAE(cfg)
tcfg = SAETrainerConfig(total_training_samples=len(acts) // B * B, train_batch_size_samples=B, lr=job["lr"],
                        lr_end=job["lr"],
                        lr_warm_up_steps=job["warmup_steps"], lr_decay_steps=job["decay_steps"],
                        dead_feature_window=job["dead_window_steps"], feature_sampling_window=10**9)
t0 = time.perf_counter()
SAETrainer(tcfg, sae, batches()).fit()
seconds = time.perf_counter() - t0
sae.fold_W_dec_norm()  # unit decoder rows: rescale_acts_by_decoder_norm is then a no-op, and streamd has none
sae.cfg.rescale_acts_by_decoder_norm = False
sae.fold_activation_norm_scaling_factor(job["scale"])
sae.save_model(job["out"])
print(json.dumps({"seconds": seconds}))
"""


def config(tokens: int, policy: bool, threads: int, warmup: int, run_dir: Path | None = None):
    """``streamd up``'s configuration, the producer's token policy on or off, training every row once."""
    sets = {**UP_DEFAULTS, "producer.torch_threads": threads, "trainer.torch_threads": threads,
            "producer.source.loop": False, "producer.producer_id": "bench-quality", "trainer.max_tokens": tokens,
            "trainer.buffer_tokens": min(UP_DEFAULTS["trainer.buffer_tokens"], tokens // 2),  # smoke runs
            "trainer.warmup_tokens": warmup,
            "trainer.eval_tokens": 0, "trainer.outlier_factor": None, "trainer.device": "cpu", "metrics.port": 0,
            "checkpoints.every_tokens": 10**12, "checkpoints.every_seconds": 10**9,
            "trainer.run_dir": str(run_dir or "unused"), **({} if policy else POLICY_OFF)}
    return load_config(defaults=sets)


def cached_json(path: Path, make) -> dict:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(make()))
        tmp.rename(path)
    return json.loads(path.read_text())


def cache_acts(cfg, docs, tokens: int, out: Path) -> dict:
    """Rows the producer would publish for ``docs`` (cycled), the first ``tokens``, to ``out`` (float16)."""
    from streamd.produce.producer import ActivationProducer

    site = (cfg.producer.sites[0].site, cfg.producer.sites[0].layer)
    prod = ActivationProducer(cfg)
    rows, n, phase = [], 0, Phase().start()
    for batch in prod.activation_rows(docs):
        rows.append(batch[site])
        n += len(rows[-1])
        if n >= tokens:
            break
    phase.stop()
    if n < tokens:
        raise ValueError(f"the documents give {n} tokens, fewer than --tokens {tokens}")
    save_file({"acts": torch.cat(rows)[:tokens].contiguous()}, str(out))
    dropped = {r: prod.metrics.outlier_tokens.labels(producer="bench-quality", site=f"{site[0]}.{site[1]}",
                                                     reason=r)._value.get() for r in ("position", "norm")}
    return {"seconds": phase.wall, "cpu_util": phase.util, "tokens_per_s": n / phase.wall, "outliers": dropped}


def train_streamd(cfg, acts: Path) -> dict:
    from streamd.train.trainer import Trainer

    shutil.rmtree(cfg.trainer.run_dir, ignore_errors=True)  # an unfinished run would resume
    phase = Phase().start()
    tokens = Trainer(cfg, activation_file=acts).run()
    phase.stop()
    return {"seconds": phase.wall, "cpu_util": phase.util, "tokens": tokens}


def train_saelens(cfg, acts: Path, out: Path, threads: int) -> dict:
    t, sae = cfg.trainer, cfg.trainer.saes[0]
    x = load_file(str(acts))["acts"]
    d_in = x.shape[1]
    # streamd's constant: E||x * scale|| = sqrt(d_in) over the first norm_estimate_tokens rows (outlier rule off)
    scale = math.sqrt(d_in) / robust_mean_norm(x[: t.norm_estimate_tokens].float().norm(dim=1), t.outlier_factor)
    del x
    job = {"input": str(acts), "out": str(out), "threads": threads, "seed": 0, "batch": t.batch_size,
           "width": sae.width(d_in), "k": sae.k, "lr": sae.learning_rate(d_in), "scale": scale,
           "warmup_steps": t.warmup_tokens // t.batch_size,
           "decay_steps": int(t.decay_fraction * t.max_tokens) // t.batch_size,
           "dead_window_steps": t.dead_window_tokens // t.batch_size, "hook_name": t.site.hook_name}
    phase = Phase().start()
    proc = subprocess.run([str(SAELENS_PY), "-c", SAELENS_TRAIN, json.dumps(job)], capture_output=True, text=True)
    phase.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"SAELens training failed:\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall": phase.wall, "scale": scale}


def held_out_quality(sae_path: Path, kept: torch.Tensor, every: torch.Tensor) -> dict:
    """FVU / L0 on the held-out tokens the policy keeps, and the fraction of latents that never fire on any
    held-out token (cheap: not cached)."""
    sae = load_sae(sae_path)
    fires = torch.zeros(sae.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for chunk in every.split(4096):
            fires |= (sae.encode(chunk.float()) > 0).any(0)
    q = fvu_l0(sae, kept)
    return {"fvu_policy": q["fvu"], "l0_policy": q["l0"], "dead": 1 - float(fires.float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1 << 20, help="rows per activation file (rounded to the batch)")
    ap.add_argument("--eval-docs", type=int, default=64, help="held-out documents (streamd eval --docs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["policy", "nopolicy"], help="one file's phases (two processes can share the work; "
                    "the table needs both)")
    ap.add_argument("--impl", choices=["streamd", "SAELens"], help="one trainer's phases (after the cache phase)")
    ap.add_argument("--warmup-tokens", type=int, default=UP_DEFAULTS["trainer.warmup_tokens"],
                    help="lr warm-up (streamd up: 200k; lower it for a smoke run shorter than that)")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    conf = lambda tokens, policy, run_dir=None: config(tokens, policy, args.threads, args.warmup_tokens, run_dir)  # noqa: E731
    base = conf(args.tokens, True)
    tokens = args.tokens // base.trainer.batch_size * base.trainer.batch_size
    root = cache_root() / "bench-quality"
    root.mkdir(parents=True, exist_ok=True)
    print(machine_line(args.threads))
    if not SAELENS_PY.exists():
        raise SystemExit(f"{SAELENS_PY} missing: build it with scripts/saelens_venv.sh")

    held = set(range(EVAL_SKIP_DOCS, EVAL_SKIP_DOCS + args.eval_docs))
    docs = [d for i, d in enumerate(iter_source(base.producer.source)) if i not in held]
    eval_texts = held_out_texts(base, args.eval_docs)
    rows, info, key = [], {}, f"{tokens}-w{args.warmup_tokens}-holdout{args.eval_docs}"
    for policy in (True, False):
        tag = "policy" if policy else "nopolicy"
        if args.only not in (None, tag):
            continue
        cfg = conf(tokens, policy)
        acts = root / f"acts-{tag}-{tokens}-holdout{args.eval_docs}.safetensors"
        info[f"cache {tag}"] = cached_json(acts.with_suffix(".json"),
                                           lambda: cache_acts(cfg, itertools.cycle(docs), tokens, acts))
        print(f"cache {tag}: {tokens:,} tokens, {json.dumps(info[f'cache {tag}'])}", flush=True)
        # every SAE is measured on the same held-out tokens: those the policy keeps, and all of them
        held_kept = load_file_or_make(root / f"heldout-policy-{args.eval_docs}.safetensors", conf(tokens, True),
                                      eval_texts)
        held_all = load_file_or_make(root / f"heldout-nopolicy-{args.eval_docs}.safetensors",
                                     conf(tokens, False), eval_texts)
        run_dir = root / f"streamd-{tag}-{key}"
        saelens_dir = root / f"saelens-{tag}-{key}"
        train = {
            "streamd": (run_dir, lambda: train_streamd(conf(tokens, policy, run_dir), acts)),
            "SAELens": (saelens_dir, lambda: train_saelens(cfg, acts, saelens_dir, args.threads)),
        }
        for impl, (path, make) in train.items():
            if args.impl not in (None, impl):
                continue
            t = cached_json(root / f"train-{impl}-{tag}-{key}.json", make)
            print(f"train {impl} {tag}: {json.dumps(t)}", flush=True)
            (ev,) = cached_json(root / f"eval-{impl}-{tag}-{key}.json",  # streamd eval: the model, three passes
                                lambda: eval_checkpoint(cfg, str(path), n_docs=args.eval_docs, device="cpu")).values()
            ev = {**ev, **held_out_quality(path, held_kept, held_all)}
            rows.append([f"{impl}, {'token policy' if policy else 'no policy'}",
                         *(f"{ev[k]:.3f}" for k in ("ce_loss_score", "kl_sae", "fvu", "fvu_policy")), ev["l0"],
                         f"{100 * ev['dead']:.1f}%", round(t["seconds"])])
    print()
    print(f"{tokens:,} training tokens per SAE; held-out: KJV documents {EVAL_SKIP_DOCS}-"
          f"{EVAL_SKIP_DOCS + args.eval_docs - 1}, {ev['n_tokens']:,} scored predictions, {len(held_all):,} tokens "
          f"({len(held_kept):,} kept by the policy)")
    print(table(["SAE", "CE loss recovered", "KL", "FVU (all held-out)", "FVU (policy tokens)", "L0", "dead",
                 "train s"], rows))
    print(f"load average at end {load_average()}")


def load_file_or_make(path: Path, cfg, texts: list[str]) -> torch.Tensor:
    """Held-out activations as the producer (with ``cfg``'s policy) would publish them, cached."""
    if not path.exists():
        from streamd.produce.producer import ActivationProducer

        site = (cfg.producer.sites[0].site, cfg.producer.sites[0].layer)
        rows = [b[site] for b in ActivationProducer(cfg).activation_rows(texts)]
        save_file({"acts": torch.cat(rows).contiguous()}, str(path))
    return load_file(str(path))["acts"]


if __name__ == "__main__":
    main()
