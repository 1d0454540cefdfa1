"""Bounded broker footprint: producers rotate topic generations and wait for a lagging trainer; the trainer deletes
generations it has trained and checkpointed. Real broker, tiny real model, real trainer."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from streamd.config import CheckpointConfig, MetricsConfig, SAEConfig, SiteSpec, StreamdConfig, TrainerConfig
from streamd.stream.kafka import make_admin
from streamd.stream.retention import parse_generation
from streamd.identity import model_content_hash, site_id_hex
from streamd.produce.producer import ActivationProducer
from streamd.train.trainer import Trainer
from tests.test_pipeline import _corpus

MAX_LAG = 6
FAST = dict(delivery_timeout_ms=3000, request_timeout_ms=2000, clock_skew_seconds=1)  # 4 s grace: 5 s generations


def _record_ingestion(source) -> list[tuple[str, int, tuple, int]]:
    """(producer, seq, ((topic, partition), offset), tokens) of every message the source handed to the trainer."""
    seen: list[tuple[str, int, tuple, int]] = []
    put = source.queue.put

    def recording_put(chunk, stop):
        ok = put(chunk, stop)
        if ok:
            seen.append((chunk.producer_id, chunk.seq, (chunk.key, chunk.offset), len(chunk.acts)))
        return ok

    source.queue.put = recording_put
    return seen


def test_generations_are_retired_and_lag_stays_bounded(broker, tiny_llama_dir, tmp_path):
    kafka = broker.config(topic="gen", partitions=2, session_timeout_ms=6000, generation_seconds=5, **FAST)
    site = SiteSpec(site="resid_post", layer=1)
    tcfg = TrainerConfig(site=site, site_id=site_id_hex(model_content_hash(tiny_llama_dir), "resid_post", 1),
                         d_in=64, buffer_tokens=512, batch_size=128, max_token_age_buffers=1.0, warmup_tokens=0, eval_tokens=0,
                         norm_estimate_tokens=256, run_dir=tmp_path / "run", torch_threads=1,
                         trace_file=tmp_path / "trace.jsonl",
                         saes=[SAEConfig(name="s", architecture="topk", expansion_factor=2, k=4)])
    trainer = Trainer(StreamdConfig(kafka=kafka, trainer=tcfg, metrics=MetricsConfig(port=0),
                                    checkpoints=CheckpointConfig(every_tokens=None, every_seconds=1.0)))
    ingested = _record_ingestion(trainer.source)
    producer_cfg = StreamdConfig(kafka=kafka, producer=dict(
        model_path=str(tiny_llama_dir), sites=[site], context_length=32, batch_size=2, producer_id="gen-p",
        source=dict(kind="files", paths=[str(_corpus(tmp_path / "c.txt"))], loop=True), max_message_bytes=8192,
        torch_threads=1, lag_url=trainer.server.url, max_lag_messages=MAX_LAG))
    producer = ActivationProducer(producer_cfg)
    lag = producer.metrics.stream_lag_messages.labels(producer="gen-p")
    threads = [threading.Thread(target=trainer.run, daemon=True), threading.Thread(target=producer.run, daemon=True)]
    for t in threads:
        t.start()
    worst_lag, deadline = 0.0, time.monotonic() + 40
    while time.monotonic() < deadline:
        worst_lag = max(worst_lag, lag._value.get())
        time.sleep(0.1)
    producer.stop()
    threads[1].join(timeout=60)
    published = producer.seq
    deadline = time.monotonic() + 60  # the trainer reads what is left, following generations as they rotate
    while len(ingested) < published and time.monotonic() < deadline:
        time.sleep(0.2)
    trainer.stop()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    # every message published was read exactly once: none lost to a retired generation, none twice
    assert producer.metrics.messages_published.labels(producer="gen-p")._value.get() == published
    got = Counter((pid, seq) for pid, seq, _, _ in ingested)
    assert got == Counter(("gen-p", s) for s in range(published)), (
        f"missing {sorted(set(range(published)) - {s for _, s in got})[:20]}, "
        f"twice {sorted(k for k, n in got.items() if n > 1)[:20]}")
    # and what was trained came from those messages, each at most in full
    sizes = {(key[0], key[1], off): n for _, _, key_off, n in ingested for key, off in [key_off]}
    trained = Counter()
    for line in (tmp_path / "trace.jsonl").read_text().splitlines():
        for topic, part, off, n in json.loads(line)["served"]:
            trained[(topic, part, off)] += n
    assert trained and set(trained) <= set(sizes)
    assert all(n <= sizes[k] for k, n in trained.items())

    retired = trainer.metrics.generations_retired._value.get()
    admin = make_admin(kafka)
    live = sorted(t for t in admin.list_topics() if parse_generation(t) is not None)
    admin.close()
    assert published > 3 * MAX_LAG, "the producer never got going"
    assert retired >= 3, f"retired {retired} generations; live {live}"
    assert len(live) <= 4, live  # the current one, the previous one, and those waiting for a checkpoint
    # the gate is checked once per batch: 2 windows of 31 tokens = 62 rows, 2 messages of <= 8192 bytes beyond it
    assert worst_lag <= MAX_LAG + 2
    assert trainer.tokens > 0


def test_a_record_landing_on_a_retired_generation_is_read(broker, tmp_path):
    """A late record (kafka-python's retries, a skewed clock) on a generation the trainer deleted: the broker
    re-creates the topic; the reader notices, reads it from the start and counts it."""
    import torch

    from streamd import wire
    from streamd.metrics import TrainerMetrics
    from streamd.stream.kafka import ensure_topic, make_producer
    from streamd.stream.retention import retention_for
    from streamd.train.kafka_source import KafkaActivationSource

    kafka = broker.config(topic="late", partitions=1, generation_seconds=5, **FAST)
    old = retention_for(kafka).topic_for("late", time.time() - 60)  # long abandoned
    ensure_topic(kafka, old, 1)
    producer = make_producer(kafka, max_request_size=2**20)

    def send(seq):
        msg = wire.ActivationMessage(producer_id="p", seq=seq, site_id=7, acts=torch.ones(4, 8, dtype=torch.float16))
        producer.send(old, wire.encode(msg)).get(timeout=10)

    send(0)
    metrics = TrainerMetrics(["x"], wire.REJECT_REASONS)
    retention = retention_for(kafka, "late-group")
    src = KafkaActivationSource(kafka, "late", "late-group", metrics, expected_site_id=7, d_in=8,
                                queue_tokens=1 << 16, retention=retention)
    src.start()
    try:
        got = [src.get(timeout=20)]
        assert got[0] is not None and got[0].seq == 0
        positions = src.positions()
        retention.release(positions, positions)  # trained and durable: released, then deleted by the reader
        deadline = time.monotonic() + 20
        while metrics.generations_retired._value.get() < 1:
            assert time.monotonic() < deadline, "the generation was never retired"
            time.sleep(0.1)
        producer.close()
        # a client that lets the broker create topics it asks for (kafka-python's default; streamd's never do)
        producer = make_producer(kafka, max_request_size=2**20, allow_auto_create_topics=True)
        send(1)  # the late record: the broker re-creates the topic for it
        chunk = src.get(timeout=30)
        assert chunk is not None and (chunk.producer_id, chunk.seq) == ("p", 1), "the late record was never read"
        assert metrics.generations_recreated._value.get() == 1
        assert metrics.late_messages._value.get() == 1
    finally:
        src.close()
        producer.close()
