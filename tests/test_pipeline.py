"""End to end on one machine: text -> tiny frozen model in 2 producer processes -> real broker -> trainer ingestion."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from transformers import AutoTokenizer

from streamd import wire
from streamd.config import ConfigError, SiteSpec, StreamdConfig, load_config
from streamd.train.kafka_source import KafkaActivationSource
from streamd.metrics import TrainerMetrics, parse_samples
from streamd.identity import model_content_hash, site_id
from streamd.produce.packing import count_tokens, pack_documents
from streamd.produce.producer import ActivationProducer
from streamd.produce.text import files
from tests.streamd_testing import write_config

LAYER = 2
SITE = "mlp_out"
WORDS = "light water earth seed voice stone river field morning bread house wind".split()


def _corpus(path: Path, n_docs: int = 40) -> Path:
    """A known corpus: documents of varied length separated by blank lines (the .txt document rule)."""
    docs = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + (i * 13) % 60)) + "." for i in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _producer_cfg(kafka, model_dir: Path, corpus: Path, pid: str, **producer) -> StreamdConfig:
    return StreamdConfig(kafka=kafka.model_copy(update={"partitions": 4}), producer=dict(
        model_path=str(model_dir), sites=[SiteSpec(site=SITE, layer=LAYER)], context_length=32, batch_size=4,
        source=dict(kind="files", paths=[str(corpus)]), producer_id=pid, max_message_bytes=4096,
        torch_threads=1, metrics_port=0, **producer))


def test_two_producer_processes_deliver_every_message_once(kafka_cfg, tiny_llama_dir, tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    procs = {}
    for pid in ("prod-a", "prod-b"):
        cfg_path = write_config(_producer_cfg(kafka_cfg, tiny_llama_dir, corpus, pid), tmp_path / f"{pid}.yaml")
        with open(tmp_path / f"{pid}.log", "w") as log:
            procs[pid] = subprocess.Popen([sys.executable, "-m", "streamd", "produce", "--config", str(cfg_path)],
                                          stderr=log)
    sent = {}
    for pid, proc in procs.items():
        try:
            proc.wait(timeout=180)
        finally:
            proc.kill()
            err = (tmp_path / f"{pid}.log").read_text()
        assert proc.returncode == 0, err[-3000:]
        tokens, messages = map(int, re.search(r"published (\d+) tokens in (\d+) messages", err).groups())
        sent[pid] = (tokens, messages)

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    expected_per_producer = count_tokens(tok, files([str(corpus)], "text"))
    assert all(t == expected_per_producer for t, _ in sent.values()), (sent, expected_per_producer)

    metrics = TrainerMetrics(["x"], wire.REJECT_REASONS)
    expected_site = site_id(model_content_hash(tiny_llama_dir), SITE, LAYER)
    src = KafkaActivationSource(kafka_cfg, kafka_cfg.topic, "e2e", metrics, expected_site_id=expected_site,
                                d_in=64, queue_tokens=1 << 20)
    src.start()
    received: list[tuple[str, int]] = []
    partitions: dict[str, set[int]] = {}
    tokens, deadline = 0, time.monotonic() + 60
    want = sum(t for t, _ in sent.values())
    while tokens < want and time.monotonic() < deadline:
        chunk = src.get(timeout=0.5)
        if chunk is not None:
            assert chunk.acts.shape[1] == 64
            received.append((chunk.producer_id, chunk.seq))
            partitions.setdefault(chunk.producer_id, set()).add(chunk.key[1])
            tokens += len(chunk.acts)
    time.sleep(1)  # anything extra (a duplicate) would arrive now
    while (chunk := src.get(timeout=0.2)) is not None:
        received.append((chunk.producer_id, chunk.seq))
        tokens += len(chunk.acts)
    src.close()
    expected_ids = {(pid, s) for pid, (_, n) in sent.items() for s in range(n)}
    assert len(received) == len(set(received)), "duplicate messages"
    assert set(received) == expected_ids
    assert tokens == 2 * expected_per_producer
    # one producer's messages spread over every partition (data-parallel ranks each read a share of them)
    assert partitions == {"prod-a": {0, 1, 2, 3}, "prod-b": {0, 1, 2, 3}}, (partitions, sent)
    assert sum(metrics.messages_rejected.labels(reason=r)._value.get() for r in wire.REJECT_REASONS) == 0


def test_producer_survives_a_broker_restart(broker, tiny_llama_dir, tmp_path):
    kafka = broker.config(topic="restart", partitions=2, session_timeout_ms=6000)
    cfg = _producer_cfg(kafka, tiny_llama_dir, _corpus(tmp_path / "c.txt"), "survivor", queue_max_messages=8)
    cfg.producer.source.loop = True
    prod = ActivationProducer(cfg)
    published = prod.metrics.messages_published.labels(producer="survivor")
    depth = prod.metrics.send_queue_depth.labels(producer="survivor")
    errors: list[BaseException] = []

    def run():
        try:
            prod.run()
        except BaseException as e:  # the test fails on any
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()

    def wait_published(n: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while published._value.get() < n:
            assert time.monotonic() < deadline, f"published {published._value.get()}, waiting for {n}"
            assert not errors, errors
            time.sleep(0.1)

    def scrape() -> tuple[float, float, float]:
        """(unacknowledged messages, forward passes, tokens published) as the producer's /metrics expose them."""
        samples = parse_samples(generate_latest(prod.metrics.registry).decode())
        one = lambda name: next(v for labels, v in samples[name] if labels.get("producer", "survivor") == "survivor")
        return (one("streamd_send_queue_depth"), one("streamd_forward_seconds_count"),
                one("streamd_tokens_published_total"))

    wait_published(20, 120)
    broker.kill()
    time.sleep(3)  # the queue fills within a batch or two
    depth_mid, forwards_mid, published_mid = scrape()
    max_depth, deadline = depth_mid, time.monotonic() + 3
    while time.monotonic() < deadline:
        max_depth = max(max_depth, scrape()[0])
        time.sleep(0.05)
    depth_end, forwards_end, published_end = scrape()
    assert worker.is_alive() and not errors
    # the outage is visible in the metrics (every slot taken, nothing acknowledged) and the model waits on it:
    # no forward pass while the queue is full, so the producer's memory stays bounded
    assert depth_mid == max_depth == depth_end == 8, (depth_mid, max_depth, depth_end)
    assert forwards_end == forwards_mid and published_end == published_mid
    before = published._value.get()
    broker.restart()
    wait_published(before + 20, 120)  # memory storage: the topic came back and publishing resumed
    prod.stop()
    worker.join(timeout=120)
    assert not worker.is_alive() and not errors
    assert max(depth._value.get(), 0) == 0


def test_bad_input_gets_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    out = subprocess.run([sys.executable, "-m", "streamd", "produce", "--model", str(missing), "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and str(missing) in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "streamd", "config", "show", "--set", "producer.sites=[{site: mlp}]"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "producer.sites.0.site" in out.stderr and "'resid_post', 'mlp_out' or 'attn_out'" in out.stderr
    with pytest.raises(ConfigError, match="trainer.batch_size"):
        load_config(sets=["trainer.batch_size=0"])
    with pytest.raises(ConfigError, match="topic is set to a value"):
        load_config(sets=["kafka.topic=x", "kafka.topic.y=1"])
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((100, 8), dtype=np.float32))
    out = subprocess.run([sys.executable, "-m", "streamd", "train", "--source", str(small), "--metrics-port", "0",
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "holds 100 tokens" in out.stderr and "Traceback" not in out.stderr


def test_float16_overflow_is_caught_at_the_producer(kafka_cfg, tiny_llama_dir, tmp_path, caplog):
    """A model whose activations exceed float16's 65504 (here: a forward hook scales one position of every window):
    the producer drops those tokens before encoding, counts them and says once which wire dtype to use; the trainer
    sees no message rejected as non_finite."""
    import logging

    from streamd.produce.capture import blocks, first_tensor

    cfg = _producer_cfg(kafka_cfg, tiny_llama_dir, _corpus(tmp_path / "c.txt", n_docs=12), "big")
    cfg.producer.sites = [SiteSpec(site="resid_post", layer=1)]
    prod = ActivationProducer(cfg)
    assert prod.wire_dtype == torch.float16

    def blow_up(_module, _inputs, output):
        first_tensor(output)[:, 5] *= 1e8  # the residual stream carries it to layer 1's output

    hook = blocks(prod.loaded.model)[0].register_forward_hook(blow_up)
    with caplog.at_level(logging.ERROR, logger="streamd.produce.producer"):
        published = prod.run()
    hook.remove()
    dropped = prod.metrics.tokens_dropped.labels(producer="big", reason="overflow")._value.get()
    sent = prod.metrics.tokens_published.labels(producer="big")._value.get()
    assert dropped > 0 and sent == published - dropped
    said = [r.getMessage() for r in caplog.records if "wire_dtype: bfloat16" in r.getMessage()]
    assert len(said) == 1, said  # once, however many batches overflow

    metrics = TrainerMetrics(["x"], wire.REJECT_REASONS)
    expected_site = site_id(model_content_hash(tiny_llama_dir), "resid_post", 1)
    src = KafkaActivationSource(kafka_cfg.model_copy(update={"partitions": 4}), kafka_cfg.topic, "big", metrics,
                                expected_site_id=expected_site, d_in=64, queue_tokens=1 << 20)
    src.start()
    tokens, deadline = 0, time.monotonic() + 60
    try:
        while tokens < sent and time.monotonic() < deadline:
            chunk = src.get(timeout=0.5)
            if chunk is not None:
                assert bool(torch.isfinite(chunk.acts).all())
                tokens += len(chunk.acts)
    finally:
        src.close()
    assert tokens == sent
    assert metrics.messages_rejected.labels(reason="non_finite")._value.get() == 0


def _publish_recorder(prod: ActivationProducer) -> list[torch.Tensor]:
    """Replace the producer's send with a list of the rows it would publish (the broker is only asked for topics)."""
    sent: list[torch.Tensor] = []
    prod._publish = lambda pub, topic, sid, rows, ids, prov: sent.append(rows.float())  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize("policy", ["default", "off"])
def test_token_policy_keeps_massive_position_1_tokens_off_the_wire(kafka_cfg, tiny_llama_dir, tmp_path, policy):
    """A model whose position right after BOS is massive (a forward hook scales it, as the shipped SmolLM2 does at
    windows that begin mid-document, see bench/README.md): by default no such token is published (the continuing
    windows repeat their first token there as context; the first window's, a document start here, falls to the
    norm rule), both are counted and no other token is lost; with the policy off every one of them is published."""
    from streamd.produce.capture import first_tensor, site_module

    corpus = _corpus(tmp_path / "c.txt", n_docs=30)
    off = dict(skip_positions=0, outlier_factor=None) if policy == "off" else {}
    cfg = _producer_cfg(kafka_cfg, tiny_llama_dir, corpus, "sink", **off)
    prod = ActivationProducer(cfg)
    sent = _publish_recorder(prod)

    def sink(_module, _inputs, output):
        first_tensor(output)[:, 1] *= 100.0

    hook = site_module(prod.loaded.model, SITE, LAYER).register_forward_hook(sink)
    try:
        prod.run()
    finally:
        hook.remove()
    norms = torch.cat([r.norm(dim=1) for r in sent])
    massive = int((norms > 8 * norms.median()).sum())
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    windows = list(pack_documents(tok, files([str(corpus)], "text"), 32, cfg.producer.skip_positions))
    n_windows, n_tokens = len(windows), count_tokens(tok, files([str(corpus)], "text"))
    counted = {r: prod.metrics.outlier_tokens.labels(producer="sink", site=f"{SITE}.{LAYER}", reason=r)._value.get()
               for r in ("position", "norm")}
    if policy == "off":
        assert massive == n_windows and len(norms) == n_tokens and counted == {"position": 0, "norm": 0}
    else:
        assert massive == 0
        assert counted == {"position": n_windows - 1, "norm": 1}  # the first window's position 1: the norm rule
        assert len(norms) == n_tokens - 1  # every other token published once


@pytest.mark.parametrize("policy", ["default", "off"])
def test_activation_rows_are_the_rows_run_publishes(kafka_cfg, tiny_llama_dir, tmp_path, policy):
    """``activation_rows`` (what bench/bench_quality.py caches) gives, batch by batch, exactly the rows ``run``
    publishes for the same documents, token policy included (position 1 made massive as above)."""
    from streamd.produce.capture import first_tensor, site_module

    corpus = _corpus(tmp_path / "c.txt", n_docs=30)
    off = dict(skip_positions=0, outlier_factor=None) if policy == "off" else {}
    cfg = _producer_cfg(kafka_cfg, tiny_llama_dir, corpus, "rows", **off)
    published, cached = ActivationProducer(cfg), ActivationProducer(cfg)
    sent = _publish_recorder(published)

    def sink(_module, _inputs, output):
        first_tensor(output)[:, 1] *= 100.0

    hooks = [site_module(p.loaded.model, SITE, LAYER).register_forward_hook(sink) for p in (published, cached)]
    try:
        published.run()
        rows = [b[(SITE, LAYER)].float() for b in cached.activation_rows(files([str(corpus)], "text"))]
    finally:
        for h in hooks:
            h.remove()
    assert len(rows) == len(sent) and all(torch.equal(a, b) for a, b in zip(rows, sent))
    dropped = cached.metrics.outlier_tokens.labels(producer="rows", site=f"{SITE}.{LAYER}", reason="norm")._value.get()
    assert dropped == (0 if policy == "off" else 1)
