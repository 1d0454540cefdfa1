"""Data-parallel step: tokens/s of 1 rank against N ranks, and what the collectives cost per step.

Each rank is a process with 1 torch thread stepping a ``Learner`` on in-memory normalised random batches of
``batch`` tokens (its own; ``batch_size`` is per rank), exactly as ``Trainer._run_parallel`` steps it: per step the
control ``exchange`` (gloo, a few floats per rank) and ``Collective.reduce_step`` (the gradient, fire-count and
statistics all-reduce between backward and clipping). 1 rank is the plain path (no process group: nothing to
reduce). Reported per row: tokens/s over all ranks (global tokens per median step), the median step, the share of
the step spent in the two collectives, and the bytes all-reduced per step and rank.

On a 2-core machine 2 ranks of 1 thread use both cores that 1 rank leaves to other processes, and the ranks share
memory bandwidth: this shows what the collectives cost, not how training scales on separate GPUs.
Run: ``.venv/bin/python bench/bench_distributed.py [--quick] [--ranks 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import load_average, machine_line, quiet, table
from streamd.config import SAEConfig, TrainerConfig
from streamd.train.distributed import Collective
from streamd.train.launch import rank_env
from streamd.train.learner import Learner

ROWS = {  # name: (d_in, width, k, batch per rank)
    "d256-w4608-k32-b2048": (256, 4608, 32, 2048),
    "d576-w4608-k32-b4096": (576, 4608, 32, 4096),
}


def worker(row: str, steps: int, out: Path) -> None:
    """One rank: warm up, then time ``steps`` steps (and, with a process group, the collectives inside them)."""
    torch.set_num_threads(1)
    d, width, k, batch = ROWS[row]
    world = int(os.environ.get("WORLD_SIZE", 1))
    coll = Collective(torch.device("cpu"), 120.0) if world > 1 else None
    tcfg = TrainerConfig(batch_size=batch, buffer_tokens=batch, warmup_tokens=0, device="cpu")
    learner = Learner(SAEConfig(name="b", architecture="topk", d_sae=width, k=k, seed=0), d, tcfg, "cpu", coll)
    gen = torch.Generator().manual_seed(coll.rank if coll else 0)
    xs = [torch.randn(batch, d, generator=gen) for _ in range(4)]
    spent = {"reduce": 0.0, "exchange": 0.0}
    if coll is not None:
        reduce = coll.reduce_step

        def timed_reduce(*args):
            t0 = time.perf_counter()
            r = reduce(*args)
            spent["reduce"] += time.perf_counter() - t0
            return r
        coll.reduce_step = timed_reduce
    durations = []
    for i in range(steps + 2):
        if i == 2:  # after the warm-up steps
            spent = {"reduce": 0.0, "exchange": 0.0}
        t0 = time.perf_counter()
        total = batch
        if coll is not None:
            rows = coll.exchange([batch, 0.0, 0.0, d, 0.0, 0.0])
            spent["exchange"] += time.perf_counter() - t0
            total = int(rows[:, 0].sum())
        learner.step(xs[i % len(xs)], total)
        if i >= 2:
            durations.append(time.perf_counter() - t0)
    if coll is None or coll.rank == 0:
        out.write_text(json.dumps({
            "durations": durations, "global_tokens": total, "reduce": spent["reduce"], "exchange": spent["exchange"],
            "bytes": coll.bytes_reduced if coll else 0}))
    if coll is not None:
        coll.close()


def measure(row: str, ranks: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--worker", row, "--steps", str(steps), "--out", str(out)]
        procs = [subprocess.Popen(cmd, env=rank_env(r, ranks, Path(tmp) / "rendezvous")) for r in range(ranks)]
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise RuntimeError(f"rank exited with {p.returncode}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    quiet()
    if args.worker:
        return worker(args.worker, args.steps, args.out)
    steps = args.steps or (5 if args.quick else 20)
    rows_to_run = list(ROWS)[:1] if args.quick else list(ROWS)
    print(machine_line(1), f"; {steps} timed steps per rank after 2 warm-up steps")
    out = []
    for row in rows_to_run:
        for ranks in (1, args.ranks):
            r = measure(row, ranks, steps)
            med = statistics.median(r["durations"])
            wall = sum(r["durations"])
            out.append([row, ranks, r["global_tokens"], f"{r['global_tokens'] / med:,.0f}", f"{med * 1e3:.0f}",
                        f"{r['reduce'] / wall:.1%}" if ranks > 1 else "-",
                        f"{r['exchange'] / wall:.1%}" if ranks > 1 else "-",
                        f"{r['bytes'] / 1e6:.2f}" if ranks > 1 else "-"])
    print(table(["SAE / batch per rank", "ranks", "tokens/step", "tok/s", "step ms", "all-reduce share",
                 "exchange share", "MB all-reduced/step"], out))
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
