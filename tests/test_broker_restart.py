"""A memory broker that restarts loses every topic, record and committed offset (issue 13, broker_restart drill).

Real Tansu, restarted under live clients: the topic must come back with its configured partitions (no client lets
the broker auto-create it with its default of 4), and a reader that held positions in the old log must read the
new log from its start, even when a checkpoint commits the old positions to the new broker first.
"""

from __future__ import annotations

import threading
import time

from streamd import wire
from streamd.metrics import ProducerMetrics, TrainerMetrics
from streamd.produce.producer import Publisher
from streamd.stream.kafka import ensure_topic, make_admin, make_consumer
from streamd.train.kafka_source import KafkaActivationSource
from tests.streamd_testing import SITE_ID, publish, random_acts


def _partitions(kafka, topic: str) -> int:
    admin = make_admin(kafka)
    try:
        (desc,) = admin.describe_topics([topic])
        return len(desc["partitions"])
    finally:
        admin.close()


def _read(src: KafkaActivationSource, want: set, timeout: float) -> set:
    """(producer, seq) of every chunk read until ``want`` is covered or ``timeout``."""
    got: set = set()
    deadline = time.monotonic() + timeout
    while not want <= got and time.monotonic() < deadline:
        chunk = src.get(timeout=0.5)
        if chunk is not None:
            got.add((chunk.producer_id, chunk.seq))
    return got


def test_a_reader_reads_the_new_log_from_its_start_after_a_restart(broker):
    kafka = broker.config(topic="lost", partitions=2, session_timeout_ms=6000)
    before = publish(kafka, random_acts(4000, 16, seed=1), producer_id="before", tokens_per_msg=50)
    metrics = TrainerMetrics(["t"], wire.REJECT_REASONS)
    src = KafkaActivationSource(kafka, "lost", "restart-group", metrics, expected_site_id=SITE_ID, d_in=16,
                                queue_tokens=1 << 20)
    src.start()
    try:
        assert _read(src, set(before), 30) >= set(before)
        old = src.positions()
        assert sum(old.values()) == len(before)
        src.commit(old)  # a checkpoint
        time.sleep(6)  # a lag / lost-log check on the old log: its topic id is known
        broker.kill()
        broker.restart()
        time.sleep(1)  # the consumer reconnects; its metadata asks for the topic (a broker may auto-create it)
        src.commit(old)  # a checkpoint taken before the trainer noticed: the old log's offsets, on the new broker
        time.sleep(1)
        # the new log: fewer records per partition than the reader's old position, then more than it
        after = publish(kafka, random_acts(1000, 16, seed=2), producer_id="after", tokens_per_msg=50)
        time.sleep(6)
        after |= publish(kafka, random_acts(8000, 16, seed=3), producer_id="after2", tokens_per_msg=50)
        missing = set(after) - _read(src, set(after), 60)
        assert not missing, f"{len(missing)} of {len(after)} messages sent after the restart never read"
        assert _partitions(kafka, "lost") == 2  # created again by us, not by the broker's default
        assert metrics.lost_logs._value.get() >= 2  # both partitions, counted
        assert src.error is None
    finally:
        src.close()


def test_a_producer_creates_a_lost_topic_again_with_its_partitions(broker):
    """Messages unacknowledged when the broker died are delivered to the topic created again with the configured
    partition count (kafka-python asked the broker to auto-create it with 4)."""
    kafka = broker.config(topic="lost-p", partitions=3)
    ensure_topic(kafka)
    metrics = ProducerMetrics("p")
    pub = Publisher(kafka, ["lost-p"], metrics, capacity=8, max_request_size=2**20, partitions=3,
                    stop=threading.Event())
    acked: list[int] = []
    try:
        for i in range(5):
            assert pub.publish("lost-p", b"k%d" % i, b"before", 1, on_ack=lambda i=i: acked.append(i))
        deadline = time.monotonic() + 20
        while len(acked) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        broker.kill()
        for i in range(5, 10):  # queued while the broker is away
            assert pub.publish("lost-p", b"k%d" % i, b"during", 1, on_ack=lambda i=i: acked.append(i))
        broker.restart()
        deadline = time.monotonic() + 40
        while len(acked) < 10:
            assert time.monotonic() < deadline, f"acknowledged {sorted(acked)}"
            time.sleep(0.1)
    finally:
        pub.close(timeout=10)
    assert _partitions(kafka, "lost-p") == 3
    consumer = make_consumer(kafka, group_id=None)
    try:
        from kafka import TopicPartition

        parts = [TopicPartition("lost-p", p) for p in range(3)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < 5 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got += [r.value for r in records]
        assert got == [b"during"] * 5  # readable in the new log, nothing from before the crash
    finally:
        consumer.close()
