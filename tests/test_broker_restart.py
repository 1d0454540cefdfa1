"""A memory broker that restarts loses every topic, record and committed offset (issue 13, broker_restart drill).

Real Tansu, restarted under live clients: the topic must come back with its configured partitions (no client lets
the broker auto-create it with its default of 4), and a reader that held positions in the old log must read the
new log from its start, even when a checkpoint commits the old positions to the new broker first. The text stream
(feeder -> text topic -> producer -> trainer) must come through the same restart: the feeder re-creates its topics
and feeds again from the first document the producers had not finished, the producer reads the new text log from
its start, and the trainer keeps training.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from streamd import wire
from streamd.config import SiteSpec, SourceConfig
from streamd.identity import model_content_hash, site_id_hex
from streamd.metrics import ProducerMetrics, TrainerMetrics
from streamd.produce.feed import Feeder
from streamd.produce.producer import ActivationProducer, Publisher
from streamd.produce.provenance import decode_provenance
from streamd.run.checkpoints import CheckpointStore
from streamd.stream.kafka import ensure_topic, make_admin, make_consumer
from streamd.train.kafka_source import KafkaActivationSource
from streamd.train.trainer import Trainer
from tests.streamd_testing import SITE_ID, publish, random_acts, topic_records, trainer_config
from tests.test_text_stream import TEXT_TOPIC, corpus, feed_cfg, producer_cfg


def _partitions(kafka, topic: str) -> int:
    admin = make_admin(kafka)
    try:
        (desc,) = admin.describe_topics([topic])
        return len(desc["partitions"])
    finally:
        admin.close()


def _doc(record) -> int:
    return int(dict(record.headers)["streamd-doc"])


def _first_unfinished(kafka, group: str) -> int | None:
    """The first document (in feed order) of the text topic that ``group`` has not committed, as far as a look at
    the topic and then at the group's offsets shows (None: every document read is committed)."""
    records = topic_records(kafka, TEXT_TOPIC, to_end=True, idle_polls=3, poll_ms=400)
    texts = {(r.partition, r.offset): _doc(r) for r in records}
    admin = make_admin(kafka)
    try:
        committed = {tp.partition: om.offset for tp, om in admin.list_group_offsets({group: None})[group].items()}
    finally:
        admin.close()
    ends = {}
    for p, off in texts:
        ends[p] = max(ends.get(p, 0), off + 1)
    firsts = [texts[(p, committed.get(p, 0))] for p in ends if (p, committed.get(p, 0)) in texts]
    return min(firsts, default=None)


def _published_docs(kafka) -> set[int]:
    """Document ids in the provenance of every activation message of the activation topic now."""
    records = topic_records(kafka, kafka.topic, to_end=True, idle_polls=3, poll_ms=400)
    return {doc for r in records for _, _, doc, _, _ in decode_provenance(r.headers)}


def _start_thread(target) -> tuple[threading.Thread, list]:
    errors: list = []

    def run():
        try:
            target()
        except BaseException as e:  # asserted on by the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def _wait(cond, timeout: float, what) -> None:
    """Until ``cond()``; ``what`` (a string, or a callable giving one at the timeout) names it in the failure."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what() if callable(what) else what}"
        time.sleep(0.2)


# Not in CI (about a minute; CI is near its 20-minute limit): `pytest -m drill tests/test_broker_restart.py` runs
# it, as the broker_restart_text drill. While the trainer subscribed to its group, 3 of 7 runs failed (2 with the
# trainer held in a rebalance); with direct assignment 6 of 7 passed, the failure in the old topic reader (fixed),
# then 4 of 4.
@pytest.mark.drill
def test_the_text_stream_survives_a_memory_broker_restart(broker, tiny_llama_dir, tmp_path, caplog):
    """Feeder, producer and trainer under one memory-broker restart: nothing hangs or stalls; the feeder feeds
    again from no later than the first document the producers had not finished, and every document of the new
    text log reaches the activation stream."""
    kafka = broker.config(topic="acts", partitions=2, session_timeout_ms=6000)
    ensure_topic(kafka)
    corpus(tmp_path / "docs.txt", 20000)  # more than the test feeds: feed order = document id, one epoch
    fcfg = feed_cfg(kafka, tmp_path / "docs.txt", tmp_path, max_lag=300, commit_every_seconds=0.2,
                    source=SourceConfig(kind="files", paths=[str(tmp_path / "docs.txt")]))
    feeder = Feeder(fcfg)
    producer = ActivationProducer(producer_cfg(kafka, tiny_llama_dir, "p0", source=dict(kind="kafka",
                                                                                         topic=TEXT_TOPIC)))
    site = SiteSpec(site="resid_post", layer=1)
    trainer = Trainer(trainer_config(kafka, tmp_path / "run", d_in=64, site=site, buffer_tokens=512,
                                     site_id=site_id_hex(model_content_hash(tiny_llama_dir), site.site, site.layer)))
    threads = [_start_thread(x.run) for x in (trainer, producer, feeder)]
    caplog.set_level("WARNING")
    try:
        _wait(lambda: trainer.tokens > 0 and feeder.fed > 150, 180, "training on the fed text")
        unfinished = _first_unfinished(kafka, feeder.group)
        broker.kill()
        fed_kill, trained_kill, seq_kill = feeder.fed, trainer.tokens, producer.seq
        time.sleep(2)
        broker.restart(60)
        _wait(lambda: feeder.fed > fed_kill + 150 and trainer.tokens > trained_kill + 2048, 180,
              lambda: f"feeding and training to go on after the restart (fed {feeder.fed} vs {fed_kill} at the kill, "
              f"trained {trainer.tokens} vs {trained_kill}, producer seq {producer.seq} vs {seq_kill})")
        refeed = re.search(r"re-feeding from epoch 0 document (\d+)", caplog.text)
        assert refeed, "the feeder did not say where it feeds again from:\n" + caplog.text[-3000:]
        start = int(refeed[1])
        # the documents fed again reach the activation stream (the last ones fed may wait for more text to fill
        # their window: not asked for here)
        wanted = set(range(start, start + 100))
        _wait(lambda: wanted <= _published_docs(kafka), 120, "the documents fed again to be published")
    finally:
        for x in (feeder, producer, trainer):
            x.stop()
        for t, _ in threads:
            t.join(120)
    assert not [e for _, errs in threads for e in errs], [e for _, errs in threads for e in errs]
    assert unfinished is None or start <= unfinished  # nothing the producers had not finished is skipped
    # the new text log: every document from the restart point on, at least once (what was in flight when the
    # broker died is sent on into the new log and may be fed again)
    new_texts = sorted(_doc(r) for r in topic_records(kafka, TEXT_TOPIC, idle_polls=3, poll_ms=400))
    assert new_texts[0] == start and set(new_texts) == set(range(start, new_texts[-1] + 1))
    assert feeder.metrics.lost_logs.labels(topic=TEXT_TOPIC)._value.get() == 1
    assert producer.metrics.text_lost_logs.labels(producer="p0")._value.get() == 1


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


def test_a_checkpoint_of_a_lost_log_is_not_resumed_into_the_new_one(broker, tmp_path):
    """The broker loses its log between a checkpoint and the resume from it (a memory broker restarted while the
    trainer was down, or before the trainer noticed): the checkpoint's offsets name records of the old log, and the
    new log, grown past them, must be read from its start, not from those offsets."""
    kafka = broker.config(topic="ck-lost", partitions=2, session_timeout_ms=6000)
    run = tmp_path / "run"
    publish(kafka, random_acts(12000, 16, seed=1), producer_id="before", tokens_per_msg=50)
    first = Trainer(trainer_config(kafka, run, every_tokens=1024, max_token_age_buffers=1.0))
    thread, errors = _start_thread(first.run)
    _wait(lambda: sum(first.source.positions().values()) >= 240 and first.tokens >= 8192, 60,
          "the first run to read the old log and train")
    first.stop()
    thread.join(60)
    assert not errors, errors
    store = CheckpointStore(run, 2, writer=False)
    assert sum(store.read_offsets(store.latest())["ck-lost"].values()) > 20  # the new log will grow past them
    broker.kill()
    broker.restart()
    publish(kafka, random_acts(8000, 16, seed=2), producer_id="after", tokens_per_msg=50)
    second = Trainer(trainer_config(kafka, run, every_tokens=None))
    consumed = second.metrics.tokens_consumed.labels(producer="after")
    thread, errors = _start_thread(second.run)
    try:
        deadline = time.monotonic() + 40
        while consumed._value.get() < 8000 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        second.stop()
        thread.join(60)
    assert not errors, errors
    assert consumed._value.get() == 8000, "the resumed run skipped the head of the new log"
    assert second.metrics.lost_logs._value.get() == 2  # both partitions, counted


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
