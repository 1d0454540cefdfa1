"""The local Tansu broker's lifecycle, against the real binary: start, answer, crash, restart, CLI shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import TopicPartition

from streamd.stream.broker import LocalBroker, free_port
from streamd.config import KafkaConfig
from streamd.stream.kafka import ensure_topic, make_admin, make_consumer, make_producer

ROOT = Path(__file__).resolve().parents[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _poll_values(consumer, n: int, timeout: float = 30.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=300, max_records=n - len(got)).values():
            got += [r.value for r in records]
    return got


def test_broker_starts_answers_and_logs(broker):
    host, port = broker.bootstrap.split(":")
    assert host == "127.0.0.1" and int(port) == broker.port and broker.running
    admin = make_admin(broker.config())
    try:
        assert admin.list_topics() == []
    finally:
        admin.close()
    assert f"listening on: tcp://{broker.bootstrap}" in broker.log_path.read_text()


def test_wait_ready_fails_fast_when_the_broker_is_gone(tmp_path):
    b = LocalBroker(log_dir=tmp_path)
    with pytest.raises(RuntimeError, match="not running"):
        b.wait_ready(timeout=5)
    b.start()
    b.wait_ready()
    b.kill()
    assert not b.running and not _accepts(b.port)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="not running"):
        b.wait_ready(timeout=5)
    assert time.monotonic() - t0 < 1


def test_second_broker_on_a_taken_port_reports_its_log(broker, tmp_path):
    other = LocalBroker(broker.port, log_dir=tmp_path / "other")
    with pytest.raises(RuntimeError, match="not running") as err, other:
        pass
    assert "tansu" in str(err.value).lower()  # the broker's own output comes with the error
    assert not other.running


def test_clients_carry_on_after_kill_and_restart_on_the_same_port(broker):
    """Memory storage loses topics, data and offsets; our producer (not idempotent) keeps sending and a consumer
    of the same group starts over at the beginning of the new log (``auto_offset_reset="earliest"``).

    A consumer that stays subscribed across the restart keeps its fetch position, and Tansu answers a fetch
    beyond the end of the new log with nothing instead of OFFSET_OUT_OF_RANGE: it would skip the new log's head.
    """
    cfg = broker.config(topic="t", partitions=1)
    ensure_topic(cfg)
    producer = make_producer(cfg, max_request_size=2**20)
    try:
        for i in range(10):
            producer.send(cfg.topic, f"before-{i}".encode())
        producer.flush()
        before = make_consumer(cfg, group_id="g")
        before.subscribe([cfg.topic])
        assert _poll_values(before, 10) == [f"before-{i}".encode() for i in range(10)]
        before.commit()
        before.close()

        port = broker.port
        broker.kill()
        broker.restart()
        assert broker.port == port and broker.running
        # Re-create the topic before sending: Tansu acknowledges sends to a topic it lost, and nobody can read them.
        ensure_topic(cfg)
        # An idempotent producer would fail from here on with UnknownProducerIdError.
        futures = [producer.send(cfg.topic, f"after-{i}".encode()) for i in range(3)]
        assert all(f.get(timeout=30).offset < 3 for f in futures)
    finally:
        producer.close()
    after = make_consumer(cfg, group_id="g")
    after.subscribe([cfg.topic])
    try:
        got = _poll_values(after, 3) + _poll_values(after, 1, timeout=1)  # and nothing from before the crash
        assert sorted(got) == [b"after-0", b"after-1", b"after-2"]
    finally:
        after.close()


def test_s3_storage_keeps_messages_and_offsets_across_restarts(tmp_path):
    """Durable mode: SeaweedFS holds Tansu's data, so a killed broker and a whole new one find it again."""
    data = tmp_path / "s3"
    with LocalBroker(storage="s3", log_dir=tmp_path / "a", data_dir=data) as b:
        cfg = b.config(topic="durable", partitions=1)
        ensure_topic(cfg)
        producer = make_producer(cfg, max_request_size=2**20)
        for i in range(6):
            producer.send(cfg.topic, f"m{i}".encode())
        producer.flush()
        producer.close()
        consumer = make_consumer(cfg, group_id="g")
        consumer.assign([TopicPartition(cfg.topic, 0)])  # commits to group "g" without a (slow) group join
        assert _poll_values(consumer, 2) == [b"m0", b"m1"]
        consumer.commit()
        consumer.close()
        b.kill()
        b.restart()
        assert _committed_and_rest(cfg) == (2, [b"m2", b"m3", b"m4", b"m5"])
    with LocalBroker(b.port, storage="s3", log_dir=tmp_path / "b", data_dir=data) as again:
        assert _committed_and_rest(again.config(topic="durable")) == (2, [b"m2", b"m3", b"m4", b"m5"])


def _committed_and_rest(cfg) -> tuple[int | None, list[bytes]]:
    consumer = make_consumer(cfg, group_id="g")
    consumer.assign([TopicPartition(cfg.topic, 0)])
    try:
        rest = _poll_values(consumer, 4)
        return consumer.committed(TopicPartition(cfg.topic, 0)), rest
    finally:
        consumer.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_broker_creates_the_topic_and_stops_on_signal(sig, tmp_path):
    port = free_port()
    code = (
        "import sys; from streamd.stream.broker import run_broker; from streamd.config import KafkaConfig; "
        f"sys.exit(run_broker(KafkaConfig(bootstrap_servers=['127.0.0.1:{port}']), topic='cli', partitions=3, "
        f"log_dir={str(tmp_path)!r}))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"bootstrap 127.0.0.1:{port}" in line, line + proc.stderr.read()
        admin = make_admin(KafkaConfig(bootstrap_servers=[f"127.0.0.1:{port}"]))
        try:
            assert len(admin.describe_topics(["cli"])[0]["partitions"]) == 3
        finally:
            admin.close()
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        assert "broker stopped" in proc.stdout.read()
        assert not _accepts(port)  # the Tansu child is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
