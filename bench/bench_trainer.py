"""Trainer throughput: does streaming from Kafka keep up with the SAE step?

Measures, for one fixed SAE (TopK, d_in 576, width 4608, k 32, batch 4096) in one process:

1. a plain in-memory loop: a ``Learner`` stepping on normalised random batches already in memory;
2. the full trainer (``streamd.train.trainer.Trainer``: Kafka -> ingestion thread -> shuffle buffer -> Learner step) on a
   topic pre-filled with ~1 MB fp16 messages, run on the main thread as ``streamd train`` runs it, in steady state:
   a watcher thread stamps every move of the trainer's token counter, and only steps after the buffer is full and a
   few warm-up steps count (group join and buffer fill are excluded, and reported apart);
3. the consumer alone: ``KafkaActivationSource`` (fetch, wire decode + finiteness check, fp16 -> fp32 copy) draining
   the pre-filled topic with no training, against a bare kafka-python poll loop over the same topic (no decode).

The machine is shared, so in-memory blocks alternate with trainer runs (in-memory, run, in-memory, run, ...): each
run is compared with the blocks on either side of it, and rates are given both over all steps and per median step.

torch threads: ``--threads`` (default 2 = torch's default on a 2-core host, what ``streamd train`` runs with when
``trainer.torch_threads`` is unset), set for the process and as ``trainer.torch_threads``. torch's setting is per OS
thread: the ingestion thread's tensor ops run on an OpenMP team of the default size whatever is set here.
Run: ``.venv/bin/python bench/bench_trainer.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from kafka import TopicPartition

from _common import Phase, load_average, machine_line, quiet, table
from streamd import wire
from streamd.stream.broker import LocalBroker
from streamd.config import CheckpointConfig, KafkaConfig, MetricsConfig, SAEConfig, StreamdConfig, TrainerConfig
from streamd.train.kafka_source import KafkaActivationSource
from streamd.stream.kafka import ensure_topic, make_consumer, make_producer
from streamd.train.learner import Learner
from streamd.metrics import TrainerMetrics
from streamd.torch_utils import configure_threads
from streamd.produce.producer import split_rows
from streamd.train.trainer import Trainer

D_IN, WIDTH, K, BATCH = 576, 4608, 32, 4096
SITE_ID = 0x5EED
PRODUCERS = 4  # simulated producers, one per partition (a real producer keys every message by its id)
MAX_MESSAGE_BYTES = 1_000_000  # producer.max_message_bytes default: 864 tokens per message with token ids


@dataclass
class Steps:
    """Per-step wall times of a phase and its CPU seconds. Both the total (mean) rate and the median-step rate are
    reported: the median shrugs off bursts of load from other processes on a shared machine."""

    durations: list[float]
    cpu: float

    @classmethod
    def of(cls, stamps: list[tuple[float, float]]) -> Steps:
        """From (wall, process cpu) stamps taken at the end of consecutive steps (the first one: the start)."""
        return cls([b[0] - a[0] for a, b in zip(stamps, stamps[1:])], stamps[-1][1] - stamps[0][1])

    @classmethod
    def pooled(cls, parts: list[Steps]) -> Steps:
        return cls([d for p in parts for d in p.durations], sum(p.cpu for p in parts))

    @property
    def wall(self) -> float:
        return sum(self.durations)

    @property
    def rate(self) -> float:
        return len(self.durations) * BATCH / self.wall

    @property
    def median_rate(self) -> float:
        return BATCH / statistics.median(self.durations)

    def row(self, name: str) -> list[object]:
        return [name, len(self.durations), self.wall, self.rate, self.median_rate, self.cpu / self.wall]


def trainer_cfg(buffer_tokens: int, threads: int, max_tokens: int | None, run_dir: Path) -> TrainerConfig:
    """One group and run directory per trainer run: each reads the topic from the start."""
    return TrainerConfig(
        group_id=f"bench-{run_dir.name}", site_id=f"{SITE_ID:016x}", d_in=D_IN, buffer_tokens=buffer_tokens,
        batch_size=BATCH, device="cpu",
        saes=[SAEConfig(name="topk-k32", architecture="topk", d_sae=WIDTH, k=K)], max_tokens=max_tokens,
        torch_threads=threads, run_dir=run_dir,
    )


def prefill(kafka: KafkaConfig, n_tokens: int) -> tuple[int, int, Phase]:
    """Publish at least ``n_tokens`` random fp16 activations as a producer would (same split, token ids, one key per
    producer); returns (messages, bytes, phase)."""
    ensure_topic(kafka, kafka.topic, kafka.partitions)
    prod = make_producer(kafka, max_request_size=MAX_MESSAGE_BYTES + 4096)
    gen = torch.Generator().manual_seed(0)
    messages = nbytes = sent = 0
    futures = []
    phase = Phase().start()
    while sent < n_tokens:
        i = messages % PRODUCERS
        pid = f"bench-producer-{i}"
        rows = split_rows(10**9, D_IN, torch.float16, pid, True, MAX_MESSAGE_BYTES)
        acts = torch.randn(rows, D_IN, generator=gen).to(torch.float16)
        ids = torch.randint(0, 49152, (rows,), generator=gen, dtype=torch.int32)
        blob = wire.encode(wire.ActivationMessage(pid, messages // PRODUCERS, SITE_ID, acts, ids))
        futures.append(prod.send(kafka.topic, value=blob, key=pid.encode(), partition=i % kafka.partitions))
        messages, nbytes, sent = messages + 1, nbytes + len(blob), sent + rows
        if len(futures) >= 64:  # kafka-python's accumulator is unbounded: bound what is in flight
            for f in futures:
                f.get(timeout=60)
            futures = []
    for f in futures:
        f.get(timeout=60)
    phase.stop()
    prod.close()
    return messages, nbytes, phase


def in_memory(tcfg: TrainerConfig, warm: int, steps: int) -> Steps:
    """The reference: the same Learner on batches already in memory, normalised to E||x|| = sqrt(d_in)."""
    learner = Learner(tcfg.saes[0], D_IN, tcfg, "cpu")
    pool = torch.randn(8, BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    pool *= math.sqrt(D_IN) / pool.norm(dim=-1).mean()
    for i in range(warm):
        learner.step(pool[i % len(pool)])
    stamps = [(time.perf_counter(), time.process_time())]
    for i in range(steps):
        learner.step(pool[(warm + i) % len(pool)])
        stamps.append((time.perf_counter(), time.process_time()))
    return Steps.of(stamps)


def full_trainer(kafka: KafkaConfig, tcfg: TrainerConfig, warm: int) -> tuple[Steps, float]:
    """Run the Trainer to max_tokens on this (the main) thread, as ``streamd train`` does, while a watcher thread
    stamps each change of its token counter; the steady state spans the steps after ``warm`` full-buffer steps.
    Returns (steps, seconds from start to the end of the first step)."""
    cfg = StreamdConfig(kafka=kafka, trainer=tcfg, metrics=MetricsConfig(port=0),
                        checkpoints=CheckpointConfig(every_tokens=None, every_seconds=None))
    trainer = Trainer(cfg)
    stamps: list[tuple[float, float, int]] = []  # (wall, process cpu, tokens) when the token counter moved
    done = threading.Event()

    def watch() -> None:
        seen = trainer.tokens
        while not done.wait(0.01):
            if trainer.tokens != seen:
                seen = trainer.tokens
                stamps.append((time.perf_counter(), time.process_time(), seen))

    watcher = threading.Thread(target=watch, name="bench-watch")
    t0 = time.perf_counter()
    watcher.start()
    try:
        trainer.run()
    finally:
        done.set()
        watcher.join()
    reg = trainer.metrics.registry
    rejected = sum(reg.get_sample_value("streamd_messages_rejected_total", {"reason": r}) for r in wire.REJECT_REASONS)
    moved = [n1 - n0 for (_, _, n0), (_, _, n1) in zip(stamps, stamps[1:])]
    if rejected or trainer.tokens < tcfg.max_tokens or set(moved) != {BATCH}:
        sys.exit(f"trainer run invalid: {rejected} messages rejected, {trainer.tokens} of {tcfg.max_tokens} tokens, "
                 f"token counter moved by {sorted(set(moved))} (the 10 ms poll must see every step)")
    return Steps.of([(w, c) for w, c, _ in stamps[warm - 1 :]]), stamps[0][0] - t0


def drain_bare(kafka: KafkaConfig, n_messages: int) -> Phase:
    """kafka-python alone: assign every partition, poll until every message is in hand, touch nothing."""
    consumer = make_consumer(kafka, group_id=None)
    try:
        parts = [TopicPartition(kafka.topic, p) for p in sorted(consumer.partitions_for_topic(kafka.topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        got = 0
        phase = Phase().start()
        while got < n_messages:
            got += sum(len(recs) for recs in consumer.poll(timeout_ms=1000).values())
        return phase.stop()
    finally:
        consumer.close()


def drain_source(kafka: KafkaConfig, n_tokens: int, group: str) -> Phase:
    """The trainer's ingestion (consumer group thread, decode, checks, fp32 copy, token queue), drained by the main
    thread as fast as it can take chunks; timed from the moment its partitions are placed (group join excluded)."""
    metrics = TrainerMetrics(["x"], wire.REJECT_REASONS)
    source = KafkaActivationSource(kafka, kafka.topic, group, metrics, expected_site_id=SITE_ID, d_in=D_IN,
                                   queue_tokens=max(4 * BATCH, 65536))
    source.start()
    try:
        if not source.assigned.wait(60):
            sys.exit("KafkaActivationSource got no partitions within 60 s")
        got = 0
        phase = Phase().start()
        while got < n_tokens:
            chunk = source.get(timeout=5)
            if chunk is None:
                sys.exit(f"KafkaActivationSource stalled after {got} of {n_tokens} tokens")
            got += len(chunk.acts)
        return phase.stop()
    finally:
        source.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run for a smoke check (< 2 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the whole process (default 2)")
    args = ap.parse_args()
    quiet()
    configure_threads(args.threads)
    if args.quick:
        buffer_tokens, rounds, mem_warm, mem_steps, tr_warm, tr_steps, repeats = 2**15, 1, 1, 4, 1, 5, 1
    else:
        buffer_tokens, rounds, mem_warm, mem_steps, tr_warm, tr_steps, repeats = 2**17, 3, 2, 10, 2, 24, 3
    max_tokens = (tr_warm + tr_steps) * BATCH
    tcfg_eval = TrainerConfig().eval_tokens
    # held-out set + buffer + one batch per step (the last step's refill is read too) + one message of slack
    need = tcfg_eval + buffer_tokens + max_tokens + 1024

    print(f"bench_trainer: SAE topk d_in {D_IN}, width {WIDTH}, k {K}, batch {BATCH}; buffer {buffer_tokens:,} "
          f"tokens (float32); {'quick' if args.quick else 'default'} run")
    print(machine_line(args.threads))
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp, LocalBroker(log_dir=Path(tmp) / "broker") as b:
        kafka = b.config(topic="bench.activations", partitions=PRODUCERS, session_timeout_ms=6000)
        n_msgs, n_bytes, pub = prefill(kafka, need)
        mb = n_bytes / 1e6
        print(f"pre-filled {n_msgs} messages ({n_bytes / n_msgs / 1e6:.2f} MB each, {mb:,.0f} MB, "
              f"{need:,}+ tokens) from {PRODUCERS} producer ids in {pub.wall:.1f} s ({mb / pub.wall:,.0f} MB/s)")
        n_tokens = n_msgs * split_rows(10**9, D_IN, torch.float16, "bench-producer-0", True, MAX_MESSAGE_BYTES)

        bare, src = [], []
        for r in range(repeats):
            bare.append(drain_bare(kafka, n_msgs))
            src.append(drain_source(kafka, n_tokens, group=f"bench-drain-{r}"))

        # in-memory blocks bracket every trainer run: round r compares run r with the blocks before and after it
        mem_cfg = trainer_cfg(buffer_tokens, args.threads, None, Path(tmp) / "mem")
        mem = [in_memory(mem_cfg, mem_warm, mem_steps)]
        full, first_step = [], []
        for r in range(rounds):
            run_cfg = trainer_cfg(buffer_tokens, args.threads, max_tokens, Path(tmp) / f"run{r}")
            steps, first = full_trainer(kafka, run_cfg, tr_warm)
            full.append(steps)
            first_step.append(first)
            mem.append(in_memory(mem_cfg, mem_warm, mem_steps))

    mem_all, full_all = Steps.pooled(mem), Steps.pooled(full)
    per_round = [f.rate / statistics.mean([a.rate, b.rate]) for f, a, b in zip(full, mem, mem[1:])]
    print()
    print(table(
        ["training, steady state (all rounds)", "steps", "seconds", "tokens/s", "median-step tok/s", "CPU util"],
        [mem_all.row(f"in-memory Learner ({len(mem)} blocks)"),
         full_all.row(f"full trainer, Kafka -> buffer -> step ({rounds} runs)"),
         ["ratio full / in-memory", "", "", full_all.rate / mem_all.rate, full_all.median_rate / mem_all.median_rate,
          ""]],
    ))
    print(f"ratio per round (run vs the blocks around it): {' '.join(f'{x:.2f}' for x in per_round)}; "
          f"trainer start -> end of first step (group join, buffer fill; excluded): "
          f"{' '.join(f'{x:.1f}' for x in first_step)} s")
    print()
    med = lambda phases: statistics.median(p.wall for p in phases)  # noqa: E731
    print(table(
        [f"consumer, drain {mb:,.0f} MB (median of {repeats})", "seconds", "MB/s", "tokens/s", "CPU util"],
        [["bare kafka-python poll (no decode)", med(bare), mb / med(bare), n_tokens / med(bare),
          statistics.median(p.util for p in bare)],
         ["KafkaActivationSource (decode + fp32)", med(src), mb / med(src), n_tokens / med(src),
          statistics.median(p.util for p in src)]],
    ))
    print(f"source / bare: {med(bare) / med(src):.2f}; load average at end {load_average()}")


if __name__ == "__main__":
    main()
