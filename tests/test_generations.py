"""Bounded broker footprint: producers rotate topic generations and wait for a lagging trainer; the trainer deletes
generations it has trained and checkpointed. Real broker, tiny real model, real trainer."""

from __future__ import annotations

import threading
import time

from streamd.config import CheckpointConfig, MetricsConfig, SAEConfig, SiteSpec, StreamdConfig, TrainerConfig
from streamd.stream.kafka import make_admin
from streamd.stream.retention import parse_generation
from streamd.identity import model_content_hash, site_id_hex
from streamd.produce.producer import ActivationProducer
from streamd.train.trainer import Trainer
from tests.test_pipeline import _corpus

MAX_LAG = 6


def test_generations_are_retired_and_lag_stays_bounded(broker, tiny_llama_dir, tmp_path):
    kafka = broker.config(topic="gen", partitions=2, session_timeout_ms=6000, generation_seconds=5)
    site = SiteSpec(site="resid_post", layer=1)
    tcfg = TrainerConfig(site=site, site_id=site_id_hex(model_content_hash(tiny_llama_dir), "resid_post", 1),
                         d_in=64, buffer_tokens=512, batch_size=128, max_token_age_buffers=1.0, warmup_tokens=0, eval_tokens=0,
                         norm_estimate_tokens=256, run_dir=tmp_path / "run", torch_threads=1,
                         saes=[SAEConfig(name="s", architecture="topk", expansion_factor=2, k=4)])
    trainer = Trainer(StreamdConfig(kafka=kafka, trainer=tcfg, metrics=MetricsConfig(port=0),
                                    checkpoints=CheckpointConfig(every_tokens=None, every_seconds=1.0)))
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
    trainer.stop()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    retired = trainer.metrics.generations_retired._value.get()
    admin = make_admin(kafka)
    live = sorted(t for t in admin.list_topics() if parse_generation(t) is not None)
    admin.close()
    published = producer.seq
    assert published > 3 * MAX_LAG, "the producer never got going"
    assert retired >= 3, f"retired {retired} generations; live {live}"
    assert len(live) <= 4, live  # the current one, the previous one, and those waiting for a checkpoint
    # the gate is checked once per batch: 2 windows of 31 tokens = 62 rows, 2 messages of <= 8192 bytes beyond it
    assert worst_lag <= MAX_LAG + 2
    assert trainer.tokens > 0
