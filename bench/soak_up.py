"""Soak: push a fixed volume of activations through the real ``streamd up`` and show its footprint stays bounded.

Tansu keeps every record in memory (~1 GB of RSS per GB held), so ``up`` bounds the broker by writing to topic
generations (``kafka.generation_seconds``) that the trainer deletes once trained and checkpointed, and by holding
the producer back when it is ``producer.max_lag_messages`` ahead of the trainer. This runs ``python -m streamd up``
as a subprocess until the producer has published ``--gb`` of activation payload (tokens x d_model x 2 bytes, fp16
on the wire), then sends SIGINT and waits for a clean exit. Every ``--every`` seconds it samples the RSS of the
broker (tansu), the producer and the ``up`` process (the trainer), the disk use of the run directory, the tokens
trained, and the generation topics alive on the broker.

Model: a random-initialised 2-layer LlamaForCausalLM with SmolLM2's width (d_model 576, 9 heads, 3 KV heads, MLP
1536) and a 1024-token BPE trained here on Python's docs, hooked at resid_post of layer 1, in ``producer.dtype: auto``
(bfloat16 where the CPU computes it natively, 2x the tokens/s of float32 there; float32 elsewhere). The SAE is small
(topk, expansion 2, k 16) so the trainer keeps up. Generations of 20 s, a checkpoint every 20 s; the rest is
``up``'s defaults. A generation is deleted only once all its tokens have left the shuffle buffer, which takes up
to ``trainer.max_token_age_buffers`` (8) buffer-fulls of 65,536 tokens: ~0.6 GB of payload before the first
deletion. ``--quick`` (0.3 GB) therefore also sets 5 s generations and checkpoints and a max token age of 1 buffer,
so the delete cycle runs several times within it.

Verdict: a footprint is bounded if its peak from warm-up (the first generation deleted) or the 25% row, whichever
comes later, to the end stays under 2x its value there. A broker that kept everything would grow with the volume
pushed (~1 GB of RSS per GB).

``--minutes M --shipped`` is the long soak instead: ``up`` with its own defaults (the shipped SmolLM2-135M, the KJV
corpus, the default SAE, the inspector) for ``M`` minutes, sampled every ``--every`` seconds (60 for it). Its
verdict is "flat": each process's peak over the last quarter of the samples after warm-up is within 10% of its
peak over the first quarter (the broker's footprint is a sawtooth, one generation up and down, so peaks are
compared, not points). The same verdict holds for the volume runs.

Run: ``.venv/bin/python bench/soak_up.py [--quick | --gb 3 | --minutes 60 --shipped] [--set SECTION.FIELD=VALUE ...]
[--keep]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.models
from _common import load_average, table
from tests.models import build_tiny_llama
from streamd.stream.broker import free_port
from streamd.config import KafkaConfig
from streamd.metrics import fetch_samples
from streamd.stream.kafka import make_admin
from streamd.stream.retention import generation_pattern

D_MODEL, WIRE_BYTES = 576, 2  # fp16 on the wire (producer.wire_dtype default)
TOPIC = KafkaConfig().topic
STALL_SECONDS = 180.0
EXIT_SECONDS = 180.0


def build_model(out: Path) -> None:
    """A 2-layer random LlamaForCausalLM of d_model 576 and a byte-level BPE tokenizer, saved for from_pretrained
    (offline: the tokenizer is trained on the standard library's docs)."""
    from pydoc_data.topics import topics

    build_tiny_llama(out, vocab_size=1024, topics=sorted(topics)[:60], hidden_size=D_MODEL, intermediate_size=1536,
                     num_layers=2, num_heads=9, num_kv_heads=3)


# The soak's settings on top of up's defaults (model, run dir and ports are added per run).
SOAK_SETS = {
    "producer.sites": "[{site: resid_post, layer: 1}]", "trainer.site": "{site: resid_post, layer: 1}",
    "producer.dtype": "auto", "trainer.device": "cpu",
    "trainer.saes": "[{name: soak, architecture: topk, expansion_factor: 2, k: 16}]",
    "kafka.generation_seconds": "20", "checkpoints.every_seconds": "20", "checkpoints.every_tokens": "null",
    # short generations need a short generation grace (delivery timeout + clock skew, loopback: no skew)
    "kafka.delivery_timeout_ms": "10000", "kafka.request_timeout_ms": "5000", "kafka.clock_skew_seconds": "0",
}
QUICK_SETS = {"kafka.generation_seconds": "5", "checkpoints.every_seconds": "5",
              "kafka.delivery_timeout_ms": "4000", "kafka.request_timeout_ms": "3000",
              "trainer.max_token_age_buffers": "1"}


@dataclass
class Ports:
    trainer: int
    producer: int
    inspector: int


def up_command(model: Path | None, run_dir: Path, ports: Ports, sets: dict[str, str]) -> list[str]:
    """``python -m streamd up`` with the soak's settings (none but ports and run dir when ``model`` is None: up's own
    defaults on the shipped model), then ``sets`` (later wins)."""
    own = {} if model is None else {**SOAK_SETS, "producer.model_path": str(model), "trainer.model_path": str(model)}
    every = {**own, "trainer.run_dir": str(run_dir), "metrics.port": str(ports.trainer),
             "producer.metrics_port": str(ports.producer), "inspect.port": str(ports.inspector), **sets}
    cmd = [sys.executable, "-m", "streamd", "--log-level", "WARNING", "up"]
    for key, value in every.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


# --- probes ---------------------------------------------------------------------------------------------------


def rss_bytes(pid: int | None) -> int | None:
    """VmRSS of a live process (Linux /proc), None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def children(pid: int) -> dict[int, list[str]]:
    """Direct children of ``pid``: {child pid: argv}, from the parent field of /proc/*/stat."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
    return out


def find_roles(up_pid: int) -> dict[str, int]:
    """{role: pid} of ``up`` (the trainer, with the feeder thread when there is one) and its children: the broker
    (tansu), each producer (``producer``, ``producer 2``, ...) and the inspector."""
    roles = {"up/trainer": up_pid}
    n_producers = 0
    for pid, argv in sorted(children(up_pid).items()):
        if argv and Path(argv[0]).name.startswith("tansu"):  # calfkit names it tansu-vX.Y.Z-HASH
            roles["broker"] = pid
        elif "produce" in argv:
            n_producers += 1
            roles["producer" if n_producers == 1 else f"producer {n_producers}"] = pid
        elif "inspect" in argv:
            roles["inspector"] = pid
    return roles


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (as du counts them)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def count_checkpoints(run_dir: Path) -> int:
    """Complete checkpoints on disk (directories named by their token count)."""
    try:
        return sum(1 for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    except OSError:
        return 0


def scrape(port: int) -> dict[str, float]:
    """Samples of a /metrics endpoint by name (labels dropped: each name used here has one series), {} if down."""
    try:
        samples = fetch_samples(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except OSError:
        return {}
    return {name: series[-1][1] for name, series in samples.items()}


def live_generations(admin) -> int | None:
    """Generation topics the broker holds now (a metadata request for all topics creates none)."""
    if admin is None:
        return None
    pattern = re.compile(generation_pattern(TOPIC))
    try:
        return sum(1 for t in admin.list_topics() if pattern.match(t))
    except Exception:  # the broker is stopping
        return None


@dataclass
class Sample:
    t: float
    payload: int  # bytes of activations published (tokens x d_model x 2)
    trained: int
    rss: dict[str, int | None]  # by role (find_roles)
    disk: int
    checkpoints: int
    generations: int | None
    retired: int
    lag: float | None
    inspections: int | None  # None: no inspector answered
    ce_loss_score: float | None


@dataclass
class Goal:
    """Stop once ``volume`` payload bytes are published, or after ``seconds`` (the long soak)."""
    volume: int | None = None
    seconds: float | None = None

    def fraction(self, s: Sample) -> float:
        return s.payload / self.volume if self.volume else s.t / self.seconds

    def describe(self) -> str:
        return f"{self.volume / 1e9:g} GB of activation payload" if self.volume else f"{self.seconds / 60:g} minutes"


# --- the run ----------------------------------------------------------------------------------------------------


def bootstrap_from(log_path: Path) -> str | None:
    """The broker address ``up`` prints on its 'broker' line."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("broker "):
            return line.split()[1]
    return None


def soak(goal: Goal, every: float, sets: dict[str, str], work: Path, shipped: bool) -> tuple[list[Sample], dict]:
    """Run ``up`` until ``goal`` is reached; returns (samples, how it exited)."""
    model, run_dir = None if shipped else work / "model", work / "run"
    if model is not None:
        build_model(model)
    ports = Ports(free_port(), free_port(), free_port())
    out_path = work / "up.out"
    with open(out_path, "wb") as out:
        up = subprocess.Popen(up_command(model, run_dir, ports, sets), stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    samples: list[Sample] = []
    admin, roles = None, {}
    last_progress, last_payload = t0, -1
    try:
        while up.poll() is None:
            roles = {**roles, **find_roles(up.pid)}  # children appear one by one; keep a gone one's pid
            if admin is None and (bootstrap := bootstrap_from(out_path)):
                admin = make_admin(KafkaConfig(bootstrap_servers=[bootstrap]))
            tm, pm, im = scrape(ports.trainer), scrape(ports.producer), scrape(ports.inspector)
            pub_tokens = int(pm.get("streamd_tokens_published_total", 0))
            inspections = im.get("streamd_inspect_inspections_total")
            s = Sample(
                t=time.monotonic() - t0, payload=pub_tokens * D_MODEL * WIRE_BYTES,
                trained=int(tm.get("streamd_tokens_trained_total", 0)),
                rss={role: rss_bytes(pid) for role, pid in roles.items()},
                disk=disk_bytes(run_dir), checkpoints=count_checkpoints(run_dir), generations=live_generations(admin),
                retired=int(tm.get("streamd_generations_retired_total", 0)), lag=pm.get("streamd_stream_lag_messages"),
                inspections=None if inspections is None else int(inspections),
                ce_loss_score=im.get("streamd_inspect_ce_loss_score"),
            )
            samples.append(s)
            print(f"  t {s.t:6.0f}s  pushed {s.payload / 1e9:6.3f} GB  trained {s.trained:>10,}  "
                  + "  ".join(f"{role} {mb(v)} MB" for role, v in s.rss.items())
                  + f"  disk {mb(s.disk)} MB  generations {s.generations}  retired {s.retired}  lag {s.lag}"
                  + (f"  inspections {s.inspections} ce {s.ce_loss_score}" if s.inspections is not None else ""),
                  flush=True)
            if goal.fraction(s) >= 1:
                break
            if s.payload > last_payload:
                last_progress, last_payload = time.monotonic(), s.payload
            elif time.monotonic() - last_progress > STALL_SECONDS:
                print(f"STALLED: nothing published for {STALL_SECONDS:.0f} s", flush=True)
                break
            time.sleep(every)
        exit_info = stop(up)
    finally:
        if up.poll() is None:
            up.kill()
        if admin is not None:
            admin.close()
    exit_info["reached"] = bool(samples) and goal.fraction(samples[-1]) >= 1
    exit_info["output_tail"] = out_path.read_text(errors="replace")[-3000:]
    exit_info["orphans"] = [pid for role, pid in roles.items() if role != "up/trainer" and rss_bytes(pid) is not None]
    return samples, exit_info


def stop(up: subprocess.Popen) -> dict:
    """SIGINT ``up`` (as Ctrl-C would) and wait for it: final checkpoint, producer flushed, broker stopped."""
    if up.poll() is not None:
        return {"rc": up.returncode, "seconds": 0.0}
    t = time.monotonic()
    up.send_signal(signal.SIGINT)
    try:
        rc = up.wait(EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        up.kill()
        rc = f"killed after {EXIT_SECONDS:.0f} s"
    return {"rc": rc, "seconds": time.monotonic() - t}


# --- the report -------------------------------------------------------------------------------------------------


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def warm(samples: list[Sample]) -> Sample | None:
    """The first sample after warm-up: a whole cycle has run (a generation trained, checkpointed and deleted) and,
    where an inspector runs, its first inspection is done (it holds the model and the baseline from then on)."""
    return next((s for s in samples if s.retired > 0 and s.inspections != 0), None)


def milestones(samples: list[Sample], goal: Goal) -> list[tuple[str, Sample]]:
    """The rows: warm-up over, the first sample at or past 25/50/75% of the goal, the last."""
    rows = []
    if (start := warm(samples)) is not None:
        rows.append(("start", start))
    for frac in (0.25, 0.5, 0.75):
        hit = next((s for s in samples if goal.fraction(s) >= frac), None)
        if hit is not None:
            rows.append((f"{frac:.0%}", hit))
    if samples:
        rows.append(("end", samples[-1]))
    return sorted(rows, key=lambda row: row[1].t)


FLAT = 1.10  # a footprint is flat if its late peak is within 10% of its early peak
BOUND = 2.0  # ... bounded if its peak stays under 2x its value when the run was warm and a quarter done


def footprints(samples: list[Sample]) -> dict[str, list[tuple[float, int | None]]]:
    """{name: [(t, bytes)]} for every process seen and the run directory's disk use."""
    names = list(dict.fromkeys(role for s in samples for role in s.rss))
    out = {f"{role} RSS": [(s.t, s.rss.get(role)) for s in samples] for role in names}
    out["run dir disk"] = [(s.t, s.disk) for s in samples]
    return out


def bounded_verdict(samples: list[Sample], goal: Goal) -> bool | None:
    """Peak from the later of warm-up and 25% to the end under BOUND x its value there (the volume runs' verdict)."""
    quarter = next((s for s in samples if goal.fraction(s) >= 0.25), None)
    start = warm(samples)
    if quarter is None or start is None:
        print("no bounded verdict: the run did not reach 25%, or retired no generation (too short: a generation "
              "is deleted only once all its tokens have left the shuffle buffer, up to 8 buffer-fulls later)")
        return None
    t_base = max(quarter.t, start.t)
    print(f"bounded (peak from the later of warm-up and 25%, t {t_base:.0f} s, to the end vs {BOUND:g}x its value "
          "there):")
    results: list[bool | None] = []
    for name, series in footprints(samples).items():
        base = next((v for t, v in series if t >= t_base and v is not None), None)
        values = [v for t, v in series if t >= t_base and v is not None]
        if not base or not values:
            print(f"  {name}: not measured")
            results.append(None)
            continue
        peak = max(values)
        results.append(peak < BOUND * base)
        print(f"  {name}: {mb(base)} MB then, peak after {mb(peak)} MB ({peak / base:.2f}x) -> "
              f"{'bounded' if results[-1] else 'GROWING'}")
    return False if False in results else None if None in results else True


def flat_verdict(samples: list[Sample]) -> bool | None:
    """Peak over the last quarter of the samples after warm-up within FLAT x the peak over their first quarter."""
    start = warm(samples)
    after = [s for s in samples if start is not None and s.t >= start.t]
    if len(after) < 8:
        print("no flat verdict: fewer than 8 samples after warm-up")
        return None
    q = len(after) // 4
    early_t, late_t = (after[0].t, after[q - 1].t), (after[-q].t, after[-1].t)
    print(f"flat (peak over t {late_t[0]:.0f}-{late_t[1]:.0f} s vs peak over t {early_t[0]:.0f}-{early_t[1]:.0f} s, "
          f"within {FLAT - 1:.0%}):")
    results: list[bool | None] = []
    for name, series in footprints(after).items():
        early = [v for _t, v in series[:q] if v is not None]
        late = [v for _t, v in series[-q:] if v is not None]
        if not early or not late:
            print(f"  {name}: not measured")
            results.append(None)
            continue
        ratio = max(late) / max(early)
        results.append(ratio <= FLAT)
        print(f"  {name}: early peak {mb(max(early))} MB, late peak {mb(max(late))} MB ({ratio:.3f}x) -> "
              f"{'flat' if results[-1] else 'GROWING'}")
    return False if False in results else None if None in results else True


def report(samples: list[Sample], goal: Goal) -> bool | None:
    """Print the table and both verdicts; returns the goal's verdict (flat for a timed soak, bounded for a volume)."""
    roles = list(dict.fromkeys(role for s in samples for role in s.rss))
    rows, prev, out = milestones(samples, goal), None, []
    for label, s in rows:
        rate = "-" if prev is None or s.t <= prev.t else f"{(s.trained - prev.trained) / (s.t - prev.t):,.0f}"
        gens = "-" if s.generations is None else s.generations
        insp = "-" if s.inspections is None else s.inspections
        out.append([label, f"{s.t:,.0f}", f"{s.payload / 1e9:.3f}", s.trained, *(mb(s.rss.get(r)) for r in roles),
                    mb(s.disk), s.checkpoints, gens, s.retired, insp, rate])
        prev = s
    print(table(["at", "elapsed s", "pushed GB", "tokens trained", *(f"{r} MB" for r in roles), "disk MB", "ckpts",
                 "live gens", "retired", "inspections", "tok/s"], out))
    bounded = bounded_verdict(samples, goal)
    flat = flat_verdict(samples)
    return flat if goal.seconds else bounded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=3.0, help="activation payload to push, GB (default 3)")
    ap.add_argument("--quick", action="store_true", help="0.3 GB, with a faster delete cycle (see above)")
    ap.add_argument("--minutes", type=float, help="run this long instead of to a volume (the long soak)")
    ap.add_argument("--shipped", action="store_true", help="up's own defaults on the shipped model, not the soak's")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="passed on to `streamd up` after the soak's own settings (repeatable)")
    ap.add_argument("--every", type=float, help="seconds between samples (default 5; 60 with --minutes)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory and model (printed)")
    args = ap.parse_args()
    goal = Goal(seconds=args.minutes * 60) if args.minutes else Goal(volume=int((0.3 if args.quick else args.gb) * 1e9))
    every = args.every or (60.0 if args.minutes else 5.0)
    sets = {**(QUICK_SETS if args.quick else {}), **dict(item.split("=", 1) for item in args.set)}
    work = Path(tempfile.mkdtemp(prefix="streamd-soak-"))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores, load average (1/5/15 min) {load_average()}")
    print(f"soak: {goal.describe()} through `streamd up` (work dir {work}); settings:")
    shown = {**({} if args.shipped else SOAK_SETS), **sets}
    print("  " + (" ".join(f"{k}={v}" for k, v in shown.items()) or "up's defaults, shipped model"), flush=True)
    try:
        samples, exit_info = soak(goal, every, sets, work, args.shipped)
        print()
        ok = report(samples, goal)
        clean = exit_info["rc"] == 0 and not exit_info["orphans"] and exit_info["reached"]
        print(f"exit: rc {exit_info['rc']} {exit_info['seconds']:.1f} s after SIGINT"
              f"{', left running: ' + str(exit_info['orphans']) if exit_info['orphans'] else ''}"
              f"{'' if exit_info['reached'] else ' (stopped before the goal was reached)'}")
        if not clean:
            print("--- tail of up's output ---\n" + exit_info["output_tail"])
        verdict = {True: "FLAT" if goal.seconds else "BOUNDED", False: "GROWING" if goal.seconds else "NOT BOUNDED",
                   None: "none (too short)"}[ok]
        print(f"verdict: {verdict}; {'clean' if clean else 'UNCLEAN'} exit")
        print(f"load average at end (1/5/15 min) {load_average()}")
        return 0 if ok is not False and clean else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
