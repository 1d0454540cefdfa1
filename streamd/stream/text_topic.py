"""The text topic the producers share: a reader that commits only what its owner says is done, the feeder's lock,
and the feeder's view of the topic (``TextLog``: the log it writes, the producers' group's progress). Everything
Kafka-specific about the text stream lives here.

Reading (``TextTopicReader``): the producers consume the topic in one consumer group, so Kafka divides its
partitions among them and rebalances when one joins or dies. Nothing is auto-committed: the reader asks a
``committable()`` callback (the producer's provenance tracker) for the offsets whose every activation message is
acknowledged and commits those (at most every ``commit_every_seconds``), so after a crash the documents past them
are re-read (at-least-once), never skipped. On a revocation (kafka-python 3 runs the rebalance listener on its I/O
thread, where no commit can be made) the owner forgets what it tracked (``on_revoked``), the reader seeks every
partition it is assigned to its committed offset and raises ``Rebalanced`` out of the document iterator: the owner
drops its partially built windows uncommitted and asks for a new iterator. What was acknowledged after the last
commit is published again by the partition's next owner (a duplicate, never a gap).

A broker that loses its log (Tansu on memory storage restarted) loses the topic, its records and the group's
commits. The reader tells the new log by its topic id (checked every ``LOG_CHECK_SECONDS``), never commits offsets
while the topic's id is not the one it read (the old log's offsets would skip the head of the new one), and then
leaves the group and joins it again with a new consumer (a restarted Tansu answers the old member with a stale
assignment), reading the new log from its start; to its owner this is a revocation (``Rebalanced``), counted by
``on_lost_log``. The feeder (``TextLog``) re-creates the topic and feeds again from the first document the producers
had not committed (see ``streamd.produce.feed``).

The feeder's lock (``FeederLock``): a heartbeat record every ``ttl / 4`` seconds on ``TOPIC.feeder-lock`` (one
partition). A starting feeder watches that topic for a ttl: a heartbeat of another feeder in that time means a live
one holds the topic and it refuses. Silence means the last one is dead: it claims the topic with its first heartbeat
and reads on up to that record; another feeder's record before it (one that finished watching at the same time)
claimed first, and it refuses. The partition's order decides, so of feeders started together exactly one runs. It
needs nothing but produce and fetch, so it works on Tansu and on Kafka alike. A lock topic the broker lost is
created again by the next heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.structs import OffsetAndMetadata

from streamd.config import KafkaConfig
from streamd.stream.kafka import end_offsets, ensure_topic, knows_topic, make_admin, make_consumer, make_producer, \
    topic_ids
from streamd.stream.retention import TopicIdentity

log = logging.getLogger(__name__)

LOG_CHECK_SECONDS = 2.0

DOC_HEADER = "streamd-doc"  # the feeder's document id (its index in the source's order), decimal
EPOCH_HEADER = "streamd-epoch"


class Rebalanced(Exception):
    """The reader's partitions were revoked: drop what is partially built, then call ``documents()`` again."""


@dataclass(frozen=True)
class TextRecord:
    partition: int
    offset: int
    doc_id: int  # from the feeder's header, else the offset
    value: bytes | None


class TextTopicReader:
    """Records of ``topic`` in consumer group ``group_id``, committed only as far as ``committable()`` says."""

    def __init__(self, kafka: KafkaConfig, topic: str, group_id: str, *,
                 committable: Callable[[], dict[int, int]] | None = None,
                 on_revoked: Callable[[], None] | None = None, on_lost_log: Callable[[], None] | None = None,
                 idle_exit_seconds: float | None = None, commit_every_seconds: float = 0.5) -> None:
        self.kafka, self.topic, self.group_id = kafka, topic, group_id
        self.committable = committable
        self.on_revoked, self.on_lost_log = on_revoked, on_lost_log
        self.idle_exit_seconds, self.commit_every_seconds = idle_exit_seconds, commit_every_seconds
        self.committed: dict[int, int] = {}
        self.commits = 0
        self._revoked = self._reseek = False
        self._buffered: list[TextRecord] = []
        self._last_commit = self._log_check = 0.0
        self._identity = TopicIdentity()
        self.consumer = self._subscribe()

    def _subscribe(self):
        consumer = make_consumer(self.kafka, group_id=self.group_id, max_poll_records=500)
        reader = self

        # kafka-python 3 calls the listener on its I/O thread, where nothing may block (no commit, no offset
        # fetch): it only takes note; records() does the work on the polling thread after the poll.
        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                if revoked:
                    reader._revoked = True
                    if reader.on_revoked is not None:
                        reader.on_revoked()
                    log.info("text partitions revoked: %s", sorted(tp.partition for tp in revoked))

            def on_partitions_assigned(self, assigned):
                reader._reseek = True
                log.info("text partitions assigned: %s", sorted(tp.partition for tp in assigned))

        consumer.subscribe([self.topic], listener=_Listener())
        return consumer

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment())

    def commit(self, force: bool = False) -> None:
        """Commit what the owner says is done (only partitions still assigned, only forward)."""
        if self.committable is None:
            return
        now = time.monotonic()
        if not force and now - self._last_commit < self.commit_every_seconds:
            return
        self._last_commit = now
        assigned = {tp.partition for tp in self.consumer.assignment()}
        todo = {p: off for p, off in self.committable().items()
                if p in assigned and off > self.committed.get(p, -1)}
        if not todo or not self._identity.confirmed(self.topic, topic_ids(self.consumer, [self.topic])[self.topic]):
            return  # nothing new, or the log read is gone: its offsets must not reach a new one
        try:
            self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(off, "", -1)
                                  for p, off in todo.items()})
        except Exception as e:  # a rebalance in progress, the broker away: the next commit carries it
            log.warning("text offset commit failed (%s: %s); retried with the next", type(e).__name__, e)
            return
        self.committed.update(todo)
        self.commits += 1

    def records(self) -> Iterator[TextRecord]:
        """Records in partition order; raises ``Rebalanced`` after a revocation; ends after ``idle_exit_seconds``
        without a record (when set)."""
        last = None  # the idle clock starts at the first record: a producer may start before the feeder
        while True:
            while self._buffered:  # a poll's records may take the owner a while: commits and checks go on
                self._check_log()
                self.commit()
                yield self._buffered.pop(0)
            self._check_log()
            batch = self.consumer.poll(timeout_ms=300)
            self.commit()
            got = [TextRecord(tp.partition, r.offset, _doc_id(r), r.value)
                   for tp, recs in sorted(batch.items(), key=lambda kv: kv[0].partition) for r in recs]
            if self._reseek:
                # Every assigned partition starts again at its committed offset, kept ones too: the documents
                # read past it were (or are now) dropped with the partial windows. The log is checked first, so
                # that its id is known before any record of it is handed out.
                self._reseek = False
                self._check_log(now=True)
                self.committed.clear()
                for tp in self.consumer.assignment():
                    off = self.consumer.committed(tp)
                    if off is None:
                        self.consumer.seek_to_beginning(tp)
                    else:
                        self.consumer.seek(tp, off)
                got = []
            if self._revoked:
                self._revoked = False
                self._buffered = []
                raise Rebalanced()
            if got:
                last = time.monotonic()
                self._buffered = got
            elif (self.idle_exit_seconds is not None and last is not None
                  and time.monotonic() - last > self.idle_exit_seconds):
                return

    def _check_log(self, now: bool = False) -> None:
        """Every few seconds (``now``: at once): whether the topic was created again (a new id: the broker lost the
        log). Then the group membership starts over on a new consumer, the new log is read from its start (the
        group's commits went with the old one), and the owner drops what it built, as on a revocation."""
        if not now and time.monotonic() - self._log_check < LOG_CHECK_SECONDS:
            return
        self._log_check = time.monotonic()
        if not self._identity.changed(topic_ids(self.consumer, [self.topic])):
            return
        log.warning("text topic %s was created again (the broker lost its log): joining group %s again and "
                    "reading the new log from its start; what this producer read and had not committed is fed "
                    "again by the feeder", self.topic, self.group_id)
        if self.on_lost_log is not None:
            self.on_lost_log()
        self.consumer.close(autocommit=False)
        self.consumer = self._subscribe()
        self.committed.clear()
        self._buffered, self._reseek, self._revoked = [], False, False
        if self.on_revoked is not None:
            self.on_revoked()
        raise Rebalanced()

    def close(self) -> None:
        self.commit(force=True)
        self.consumer.close(autocommit=False)


def _doc_id(record) -> int:
    for k, v in record.headers or ():
        if k == DOC_HEADER:
            try:
                return int(v)
            except ValueError:
                break
    return record.offset


# --- the feeder's side --------------------------------------------------------------------------------------------


class TextLog:
    """The feeder's text topic as the broker holds it now: created again when the broker lost it, a new log told
    from the one written so far by its topic id, and the producers' group's progress on it."""

    def __init__(self, kafka: KafkaConfig, topic: str, partitions: int, group_id: str) -> None:
        self.kafka, self.topic, self.partitions, self.group_id = kafka, topic, partitions, group_id
        self._identity = TopicIdentity()

    def renewed(self, producer) -> bool:
        """Whether the topic holds a new log since the last call (its id changed; True once per new log). When the
        producer's metadata lacks the topic (a broker that lost it, or a connection that broke) the topic is
        created unless it exists, and this waits until the producer's metadata lists it, so its sends go to it.
        A broker that is away raises KafkaError."""
        if not knows_topic(producer, self.topic):
            ensure_topic(self.kafka, self.topic, self.partitions)
            producer.partitions_for(self.topic)  # waits for the metadata to list it (at most max_block_ms)
        return bool(self._identity.changed(topic_ids(producer, [self.topic])))

    def committed(self) -> dict[int, int]:
        """The producers' group's committed offset per partition (none for a partition it has not committed)."""
        admin = make_admin(self.kafka)
        try:
            found = admin.list_group_offsets({self.group_id: None}).get(self.group_id, {})
        finally:
            admin.close()
        return {tp.partition: om.offset for tp, om in found.items() if tp.topic == self.topic and om.offset >= 0}

    def lag(self, known_ends: dict[int, int], committed: dict[int, int]) -> int:
        """Documents not yet committed by the group: per partition the end (the larger of what the feeder knows it
        wrote and the broker's end offset, which Tansu underestimates) minus the committed offset."""
        ends = {p: off for (t, p), off in end_offsets(self.kafka, [self.topic]).items() if t == self.topic}
        for p, off in known_ends.items():
            ends[p] = max(ends.get(p, 0), off)
        return sum(max(0, end - committed.get(p, 0)) for p, end in ends.items())


class FeederLockHeld(RuntimeError):
    pass


class FeederLock:
    """One feeder per text topic: heartbeats on ``TOPIC.feeder-lock`` (see the module docstring)."""

    def __init__(self, kafka: KafkaConfig, topic: str, ttl: float) -> None:
        self.kafka, self.lock_topic, self.ttl = kafka, f"{topic}.feeder-lock", ttl
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None

    def acquire(self) -> None:
        """Take the topic, or raise FeederLockHeld naming the feeder that holds (or claimed) it."""
        ensure_topic(self.kafka, self.lock_topic, 1)
        consumer = make_consumer(self.kafka, group_id=None)
        tp = TopicPartition(self.lock_topic, 0)
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        consumer.seek(tp, max(0, end - 64))  # Tansu's end offset is low: read a little before it
        started = time.time()
        try:
            self._read(consumer, started, until=lambda r: False, deadline=time.monotonic() + self.ttl,
                       why="is feeding")
            # a beat waits at most a ttl for metadata: one that cannot be sent is retried at the next, not queued
            self._producer = make_producer(self.kafka, max_request_size=2**16, max_block_ms=int(self.ttl * 1000))
            claim = self._beat()  # silence for a ttl: claim the topic, then see whether another claimed first
            if not self._read(consumer, started, until=lambda r: r.offset >= claim.offset,
                              deadline=time.monotonic() + max(self.ttl, 30.0), why="claimed it first and is feeding"):
                raise RuntimeError(f"the feeder's claim on {self.lock_topic} (offset {claim.offset}) could not be "
                                   "read back; is the broker answering fetches?")
        except BaseException:
            self.release()
            raise
        finally:
            consumer.close()
        self._thread = threading.Thread(target=self._run, name="streamd-feeder-lock", daemon=True)
        self._thread.start()

    def _read(self, consumer, started: float, until, deadline: float, why: str) -> bool:
        """Read the lock topic until ``until(record)`` (True) or the deadline (False); another feeder's record
        written since we started (a dead one's beats stop) means it holds the topic: raise."""
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                for r in recs:
                    if until(r):
                        return True
                    try:
                        beat = json.loads(r.value)
                    except ValueError:
                        continue
                    if beat.get("owner") != self.owner and beat.get("ts", 0) >= started - 0.5:
                        raise FeederLockHeld(
                            f"another feeder ({beat.get('owner')}) {why} {self.lock_topic[:-13]} (it heartbeats "
                            f"on {self.lock_topic}); one feeder per text topic")
        return False

    def _beat(self):
        """One heartbeat, acknowledged; returns its record metadata (offset). A lock topic the producer's
        metadata lost (a memory broker restarted: the lock went with the log) is created again first."""
        if not knows_topic(self._producer, self.lock_topic):
            ensure_topic(self.kafka, self.lock_topic, 1)
        return self._producer.send(
            self.lock_topic, json.dumps({"owner": self.owner, "ts": time.time()}).encode()).get(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._beat()
            except Exception as e:
                log.warning("feeder lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._producer is not None:
            self._producer.close(timeout=5)
