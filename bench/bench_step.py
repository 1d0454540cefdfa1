"""The SAE training step against its peers, side by side on the same SAEs and inputs, alternating, as ratios.

Implementations (each: forward, backward, the decoder-parallel gradient removed, grad-norm clip, Adam, unit-norm
decoder; AuxK on, with the same dead mask):

- **streamd sparse**: ``streamd.train.learner.Learner`` with the sparse TopK step (the default) on torch's sparse
  products (``trainer.triton_decoder: off``);
- **streamd dense**: the same Learner on the dense autograd path (the reference the sparse step is tested against);
- **streamd compiled** (``--compile``): the sparse step with ``trainer.compile`` (its encoder and selection through
  ``torch.compile``; the compile itself happens in the warm-up step, outside the timing);
- **streamd triton** (``--triton``, CUDA with triton): the sparse step on the Triton decoder kernels
  (``trainer.triton_decoder: on``, ``streamd/sae/triton_decoder.py``);
- **sparsify**: EleutherAI sparsify 1.3.3 ``SparseCoder`` (PyPI ``eai-sparsify``, the ``bench`` extra): its fused
  encoder with sparse backward and its ``embedding_bag`` decoder (no Triton here), ``fvu + auxk/32`` loss;
- **SAELens**: ``TopKTrainingSAE.training_forward_pass`` + backward + clip + Adam, as ``SAETrainer._train_step``
  runs it, in the side venv ``.venv-saelens`` (``scripts/saelens_venv.sh``) as one long-lived subprocess that reads
  the same input file.

Inputs: one batch of normal activations scaled to E||x|| = sqrt(d) (what the trainer feeds the SAE). Per row each
implementation runs ``--reps`` rounds of ``--steps`` timed steps after one warm-up step, rounds alternating between
implementations; the best round counts. "CPU util" is process CPU seconds / wall seconds of the best round: on this
2-core machine with 2 torch threads, a figure well under 2 means other processes took the CPU, so compare rows whose
util is near 2.

    .venv/bin/python bench/bench_step.py [--quick] [--threads 2] [--rows d256-w2048-k8,...] [--device cpu|cuda]
        [--compile] [--triton] [--no-peers]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Phase, load_average, machine_line, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
GRID = [(d, w, k) for d in (256, 576) for w in (2048, 4608, 16384, 32768) for k in (8, 32)]
QUICK = [(256, 2048, 8), (576, 4608, 32)]
# optional streamd rows, each a flag of the same name: TrainerConfig fields on top of the sparse step's
VARIANTS = {"compile": {"compile": True}, "triton": {"triton_decoder": "on"}}

# Runs in .venv-saelens: one line of JSON per command on stdin -> one line of JSON (seconds, cpu seconds) on stdout.
SAELENS_WORKER = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
torch.set_num_threads(int(sys.argv[1]))
cache = {}
for line in sys.stdin:
    cmd = json.loads(line)
    key = (cmd["d"], cmd["w"], cmd["k"])
    if key not in cache:
        cfg = TopKTrainingSAEConfig(d_in=cmd["d"], d_sae=cmd["w"], k=cmd["k"], device=cmd["device"],
                                    rescale_acts_by_decoder_norm=False)
        sae = TopKTrainingSAE(cfg)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        cache = {key: (sae, opt)}
    sae, opt = cache[key]
    x = load_file(cmd["input"])["x"].to(cmd["device"])
    dead = torch.zeros(cmd["w"], dtype=torch.bool, device=cmd["device"])
    def step(i):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=i, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    step(0)
    if cmd["device"] == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(cmd["steps"]):
        step(i + 1)
    if cmd["device"] == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}), flush=True)
"""


class SAELensWorker:
    """The long-lived SAELens subprocess (import once, then one timed round per request)."""

    def __init__(self, threads: int) -> None:
        self.proc = subprocess.Popen([str(SAELENS_PY), "-c", SAELENS_WORKER, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def round(self, d: int, w: int, k: int, input_path: Path, steps: int, device: str) -> Phase:
        cmd = {"d": d, "w": w, "k": k, "input": str(input_path), "steps": steps, "device": device}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the SAELens worker exited")
        r = json.loads(line)
        return Phase(wall=r["wall"], cpu=r["cpu"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def timed(step, steps: int, device: str) -> Phase:
    step()  # warm-up (allocations, lazy init)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    phase = Phase().start()
    for _ in range(steps):
        step()
    sync()
    return phase.stop()


def streamd_step(d: int, w: int, k: int, x: torch.Tensor, device: str, **trainer):
    """One Learner step on ``x``; ``trainer``: TrainerConfig fields (sparse_step, compile, triton_decoder)."""
    from streamd.config import SAEConfig, TrainerConfig
    from streamd.train.learner import Learner

    tcfg = TrainerConfig(site_id="ab", warmup_tokens=0, device=device, **trainer,
                         saes=[SAEConfig(name="b", architecture="topk", d_sae=w, k=k)])
    learner = Learner(tcfg.saes[0], d, tcfg, device)
    return lambda: learner.step(x)


def sparsify_step(d: int, w: int, k: int, x: torch.Tensor, device: str):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=w, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(w, dtype=torch.bool, device=device)

    def step() -> None:
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two rows, fewer steps (< 2 min)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", help="comma-separated dD-wW-kK, e.g. d256-w2048-k8")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-peers", action="store_true", help="streamd only")
    ap.add_argument("--compile", action="store_true", help="add the sparse step with trainer.compile")
    ap.add_argument("--triton", action="store_true", help="add the sparse step on the Triton decoder (CUDA)")
    args = ap.parse_args()
    if args.triton and args.device != "cuda":
        ap.error("--triton needs --device cuda (the Triton decoder runs on CUDA only)")
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = QUICK if args.quick else GRID
    if args.rows:
        rows = [tuple(int(p[1:]) for p in r.split("-")) for r in args.rows.split(",")]
    steps = args.steps or (3 if args.quick else 8)
    print(machine_line(args.threads))
    if args.device == "cpu":  # sparsify picks its Triton decoder whenever triton imports, CUDA or not
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    have_sparsify = not args.no_peers and importlib.util.find_spec("sparsify") is not None
    if not have_sparsify and not args.no_peers:
        print("sparsify not installed (.venv/bin/pip install -e '.[bench]'): its column is empty")
    worker = SAELensWorker(args.threads) if SAELENS_PY.exists() and not args.no_peers else None
    if worker is None and not args.no_peers:
        print(f"{SAELENS_PY} missing (scripts/saelens_venv.sh): the SAELens column is empty")
    variants = [name for name in VARIANTS if getattr(args, name)]
    headers = ["SAE", "sparse tok/s", "dense tok/s", "sparsify tok/s", "SAELens tok/s", "vs sparsify", "vs SAELens",
               "vs dense", *(h for n in variants for h in (f"{n} tok/s", f"{n} / sparse")), "CPU util"]
    out_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d, w, k in rows:
            batch = 1024 if d == 256 else 4096
            x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0))
            x *= math.sqrt(d) / x.norm(dim=-1).mean()
            input_path = Path(tmp) / "x.safetensors"
            save_file({"x": x}, str(input_path))
            x = x.to(args.device)
            impls = {"sparse": streamd_step(d, w, k, x, args.device, triton_decoder="off"),
                     "dense": streamd_step(d, w, k, x, args.device, sparse_step=False)}
            for name in variants:
                impls[name] = streamd_step(d, w, k, x, args.device, **VARIANTS[name])
            if have_sparsify:
                impls["sparsify"] = sparsify_step(d, w, k, x, args.device)
            best: dict[str, Phase] = {}
            for _ in range(args.reps):
                rounds = {name: timed(fn, steps, args.device) for name, fn in impls.items()}
                if worker is not None:
                    rounds["saelens"] = worker.round(d, w, k, input_path, steps, args.device)
                for name, ph in rounds.items():
                    if name not in best or ph.wall < best[name].wall:
                        best[name] = ph
            rate = {name: batch * steps / ph.wall for name, ph in best.items()}
            ratio = lambda peer: rate["sparse"] / rate[peer] if peer in rate else "-"  # noqa: E731
            out_rows.append([f"d {d} w {w} k {k} B {batch}", rate["sparse"], rate["dense"], rate.get("sparsify", "-"),
                             rate.get("saelens", "-"), ratio("sparsify"), ratio("saelens"), ratio("dense"),
                             *(x for n in variants for x in (rate[n], rate[n] / rate["sparse"])),
                             " ".join(f"{best[n].util:.1f}" for n in best)])
            print(table(headers[:-1] + ["CPU util (" + "/".join(best) + ")"], out_rows[-1:]), flush=True)
    if worker is not None:
        worker.close()
    print()
    print(table(headers, out_rows))
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
