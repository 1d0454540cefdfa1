"""Helpers shared by the trainer and pipeline tests: configs, publishing activations, reading trainer traces."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml

from streamd import wire
from streamd.config import CheckpointConfig, KafkaConfig, MetricsConfig, SAEConfig, StreamdConfig, TrainerConfig
from streamd.stream.kafka import ensure_topic, make_producer

SITE_ID = 0xAB


def trainer_config(kafka: KafkaConfig, run_dir: Path, *, d_in: int = 16, every_tokens: int | None = 4096,
                   saes: list[SAEConfig] | None = None, checkpoints: dict | None = None,
                   **trainer: object) -> StreamdConfig:
    t = dict(site_id=f"{SITE_ID:016x}", d_in=d_in, buffer_tokens=1024, batch_size=128, warmup_tokens=0,
             eval_tokens=0, run_dir=run_dir, device="cpu", torch_threads=1, norm_estimate_tokens=512,
             saes=saes or [SAEConfig(name="t", architecture="topk", expansion_factor=4, k=4)])
    t.update(trainer)
    return StreamdConfig(
        kafka=kafka, trainer=TrainerConfig(**t), metrics=MetricsConfig(port=0),
        checkpoints=CheckpointConfig(every_tokens=every_tokens, every_seconds=None, keep_last=2, **(checkpoints or {})),
    )


def write_config(cfg: StreamdConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def publish(kafka: KafkaConfig, acts: torch.Tensor, *, producer_id: str = "p", tokens_per_msg: int = 64,
            site_id: int = SITE_ID, topic: str | None = None, extra: list[bytes] = (),
            partitions: int | None = None) -> dict[tuple[str, int], int]:
    """Publish ``acts`` in messages of ``tokens_per_msg`` rows (plus raw ``extra`` payloads, e.g. poison), spread
    over partitions by key, or with ``partitions`` round-robin over that many; returns {(producer_id, seq): n_tokens}."""
    topic = topic or kafka.topic
    ensure_topic(kafka, topic, kafka.partitions)
    prod = make_producer(kafka, max_request_size=2**20)
    sent, futs = {}, []
    for seq, lo in enumerate(range(0, len(acts), tokens_per_msg)):
        rows = acts[lo : lo + tokens_per_msg].to(torch.float16)
        msg = wire.ActivationMessage(producer_id, seq, site_id, rows)
        futs.append(prod.send(topic, value=wire.encode(msg), key=f"{producer_id}-{seq % 7}".encode(),
                              partition=None if partitions is None else seq % partitions))
        sent[(producer_id, seq)] = len(rows)
    futs += [prod.send(topic, value=blob, key=b"poison") for blob in extra]
    for f in futs:
        f.get(timeout=30)
    prod.close()
    return sent


def random_acts(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def trace_counts(path: Path, upto_tokens: int | None = None) -> Counter:
    """Tokens trained per (topic, partition, offset), from a trainer trace, up to a token count (a checkpoint)."""
    out: Counter = Counter()
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if upto_tokens is not None and rec["tokens"] > upto_tokens:
            break
        for topic, part, off, n in rec["served"]:
            out[(topic, part, off)] += n
    return out


def topic_records(kafka: KafkaConfig, topic: str, *, to_end: bool = False, idle_polls: int = 4,
                  poll_ms: int = 500) -> list:
    """The records of ``topic`` from the start of each partition, read until ``idle_polls`` polls in a row return
    nothing; with ``to_end``, stop as soon as every partition reached its end offset at the start (a topic still
    written to; Tansu's end offset may be below the last batch, so a finished topic is read with ``to_end`` False)."""
    from kafka import TopicPartition

    from streamd.stream.kafka import make_consumer

    consumer = make_consumer(kafka, group_id=None)
    try:
        deadline = time.monotonic() + 10  # a new client may not know the topic's partitions yet
        while not (known := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not known:
            return []
        parts = [TopicPartition(topic, p) for p in sorted(known)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts) if to_end else {}
        out, idle = [], 0
        while idle < idle_polls and not (to_end and all(consumer.position(tp) >= end for tp, end in ends.items())):
            batch = consumer.poll(timeout_ms=poll_ms)
            idle = 0 if batch else idle + 1
            out += [r for recs in batch.values() for r in recs]
        return out
    finally:
        consumer.close()


def topic_messages(kafka: KafkaConfig, topic: str | None = None) -> dict[tuple[str, int, int], tuple[str, int, int]]:
    """Every valid activation message in the topic: (topic, partition, offset) -> (producer id, seq, n_tokens)."""
    out = {}
    for r in topic_records(kafka, topic or kafka.topic, idle_polls=5):
        try:
            m = wire.decode(r.value)
        except wire.WireError:
            continue
        out[(r.topic, r.partition, r.offset)] = (m.producer_id, m.seq, m.n_tokens)
    return out


def consume_all(kafka: KafkaConfig, group: str, n_messages: int, timeout: float = 60) -> dict[tuple[str, int], int]:
    """Read the topic with the trainer's ingestion in consumer group ``group`` until ``n_messages`` arrived (or the
    timeout); returns {(producer_id, seq): n_tokens}."""
    import time

    from streamd.train.kafka_source import KafkaActivationSource
    from streamd.metrics import TrainerMetrics

    src = KafkaActivationSource(kafka, kafka.topic, group, TrainerMetrics(["t"], wire.REJECT_REASONS),
                                expected_site_id=SITE_ID, d_in=None, queue_tokens=1 << 20)
    src.start()
    got, deadline = {}, time.monotonic() + timeout
    while len(got) < n_messages and time.monotonic() < deadline:
        chunk = src.get(timeout=0.5)
        if chunk is not None:
            got[(chunk.producer_id, chunk.seq)] = len(chunk.acts)
    src.close()
    return got


def check_offsets_exact(messages: dict[tuple[str, int, int], tuple[str, int, int]], offsets: dict[int, int],
                        trained: Counter, topic: str) -> int:
    """A checkpoint's resume offsets against what was trained, exactly: every partition that holds messages is named;
    no message was trained more than its tokens; each partition's offset is its first message not trained in full
    (one past its last message where all were). Returns how many messages lie below the offsets."""
    parts: dict[int, list[tuple[int, int]]] = {}
    for (t, part, off), (_, _, n) in messages.items():
        if t == topic:
            parts.setdefault(part, []).append((off, n))
    missing = sorted(set(parts) - set(offsets))
    assert not missing, f"partitions {missing} hold messages but are missing from the offsets {offsets}"
    over = [(k, c) for k, c in trained.items() if k[0] == topic and c > messages[k][2]]
    assert not over, f"messages trained more than once within the counted work: {over[:5]}"
    below = 0
    for part, msgs in parts.items():
        msgs.sort()
        first_short = next((off for off, n in msgs if trained[(topic, part, off)] != n), msgs[-1][0] + 1)
        assert offsets[part] == first_short, (
            f"partition {part}: resume offset {offsets[part]}, but the first message not trained in full is "
            f"{first_short} (trained {trained[(topic, part, first_short)]} tokens)")
        below += sum(1 for off, _ in msgs if off < first_short)
    return below
