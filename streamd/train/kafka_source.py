"""The stream as an activation source: a consumer thread reads the activation topic(s) into a token-bounded queue.

Messages that fail validation are counted by reason, logged and skipped; they never reach the buffer and never stop
the thread. Which topics are read, what is released once trained, and when the broker lost its log are the
retention strategy's call (``streamd.stream.retention``); every kafka-python call stays on the consumer thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import torch
from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from streamd import wire
from streamd.config import KafkaConfig
from streamd.metrics import TrainerMetrics
from streamd.stream.kafka import make_consumer, topic_ids
from streamd.stream.retention import Retention, TopicIdentity, retention_for
from streamd.train.distributed import partition_share
from streamd.train.source import Chunk, SourceKey, TokenQueue, staged

log = logging.getLogger(__name__)

LAG_CHECK_SECONDS = 5.0
FOLLOW_CHECK_SECONDS = 3.0


class KafkaActivationSource:
    """Reads the activation topic on a background thread (kafka-python is not thread-safe, so every consumer call,
    commits included, happens on that thread) and commits to the run's consumer group.

    Partitions are assigned directly, never through a group subscription: one trainer (or one rank's share) reads
    its partitions whole, so membership buys nothing, a rebalance pauses reading, and a restarted memory broker
    (Tansu) kept a re-joining member in a rebalance for minutes (the broker-restart drill)."""

    def __init__(
        self,
        kafka: KafkaConfig,
        topic: str,
        group_id: str,
        metrics: TrainerMetrics,
        *,
        expected_site_id: int | None,
        d_in: int | None,
        queue_tokens: int,
        start_offsets: dict[SourceKey, int] | None = None,
        start_ids: dict[str, str] | None = None,
        reread_below: dict[SourceKey, int] | None = None,
        pin_memory: bool = False,
        torch_threads: int | None = None,
        retention: Retention | None = None,
        share: tuple[int, int] | None = None,
    ) -> None:
        self.kafka, self.topic, self.group_id, self.metrics = kafka, topic, group_id, metrics
        # (rank, world size): this rank's partitions, assigned directly; one trainer, (0, 1), reads them all
        self.share = share or (0, 1)
        self.retention = retention or retention_for(kafka, group_id)
        metrics.consumer_group.labels(group=group_id).set(1)
        self.expected_site_id, self.d_in = expected_site_id, d_in
        self.pin_memory, self.torch_threads = pin_memory, torch_threads
        self.start_offsets = {k: v for k, v in (start_offsets or {}).items() if self._mine(k[1])}
        self.start_ids = dict(start_ids or {})  # the log (topic id) the start offsets are in, where known
        self.reread_below = dict(reread_below or {})
        self.queue = TokenQueue(queue_tokens)
        self._stop = threading.Event()
        self._positions: dict[SourceKey, int] = {}
        # where each partition was placed (or the checkpoint's offset while not yet placed): its position until a
        # record of it is handed out, so a checkpoint names every partition, read in this run or not
        self._placed: dict[SourceKey, int] = dict(self.start_offsets)
        self._commit_req: dict[SourceKey, int] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="streamd-ingest", daemon=True)
        self.error: BaseException | None = None
        self.assigned = threading.Event()
        self.exhausted = False  # a stream never ends
        self._fresh: set[TopicPartition] = set()  # assigned, paused until placed by _position_assigned
        self._committed_parts: set[SourceKey] = set()  # partitions whose committed offset we wrote
        self._last_seq: dict[str, int] = {}  # per producer, the highest seq consumed
        self._lag_at = 0.0
        self._follow_at = 0.0
        self._recreated: set[str] = set()  # topics a late record re-created after their release: read from the start
        self._identity = TopicIdentity()  # topic ids seen: a new one means the broker lost the log
        self._log_ids: dict[str, str] = {}  # the log each topic's positions are in (changes with them, under _lock)

    def start(self) -> None:
        self._thread.start()

    def get(self, timeout: float) -> Chunk | None:
        if self.error is not None:
            raise RuntimeError("ingestion thread failed") from self.error
        return self.queue.get(timeout)

    def positions(self) -> dict[SourceKey, int]:
        with self._lock:
            merged = {**self._placed, **self._positions}
        return {k: v for k, v in merged.items() if not self.retention.is_released(k[0])}

    def queued_offsets(self) -> dict[SourceKey, int]:
        return self.queue.min_offsets()

    def log_ids(self) -> dict[str, str]:
        with self._lock:
            return dict(self._log_ids)

    def commit(self, offsets: dict[SourceKey, int]) -> None:
        """Ask the consumer thread to commit these offsets to the group (after a durable checkpoint)."""
        with self._lock:
            self._commit_req = dict(offsets)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # --- consumer thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads:  # torch's thread count is per OS thread: the trainer's setting does not reach here
            torch.set_num_threads(self.torch_threads)
        try:
            consumer = make_consumer(self.kafka, group_id=self.group_id)
            try:
                while not self._stop.is_set():
                    polled: dict = {}
                    try:
                        if self.retention.rotates:
                            consumer = self._follow(consumer)
                        else:
                            self._assign_share(consumer)
                        self._maybe_commit(consumer)
                        consumer = self._check_broker(consumer)
                        polled = consumer.poll(timeout_ms=200)
                        fresh = self._position_assigned(consumer)
                    except KafkaError as e:  # a broker that went away: keep trying, it may come back
                        log.warning("Kafka error in the consumer thread, retrying in 1 s: %s", e)
                        for tp, records in polled.items():  # fetched but not handed out: fetch them again
                            if records and tp in consumer.assignment():
                                consumer.seek(tp, records[0].offset)
                        self._stop.wait(1.0)
                        continue
                    for tp, records in polled.items():
                        if tp in fresh:
                            continue  # fetched before the seek below; read again from the right offset
                        if not all(self._handle(tp, rec) for rec in records):
                            break  # stopping: leave the loop through the final commit below
                self._maybe_commit(consumer)
            finally:
                consumer.close(autocommit=False)
        except BaseException as e:  # surfaced to the trainer through get()
            log.exception("ingestion thread failed")
            self.error = e

    def _handle(self, tp: TopicPartition, rec) -> bool:
        """Validate one record and queue it; False when a stop came while the queue was full."""
        key = (tp.topic, tp.partition)
        size = len(rec.value) if rec.value is not None else 0
        self.metrics.messages_consumed.inc()
        self.metrics.bytes_consumed.inc(size)
        try:
            msg = wire.decode(rec.value if rec.value is not None else b"")
            if self.expected_site_id is not None and msg.site_id != self.expected_site_id:
                raise _Reject("site_id", f"site_id {msg.site_id:016x} != expected {self.expected_site_id:016x}")
            if self.d_in is None:
                self.d_in = msg.d_model
            elif msg.d_model != self.d_in:
                raise _Reject("d_model", f"d_model {msg.d_model} != expected {self.d_in}")
        except (wire.WireError, _Reject) as e:
            self.metrics.messages_rejected.labels(reason=e.reason).inc()
            log.warning("rejected message %s[%d]@%d: %s", tp.topic, tp.partition, rec.offset, e)
            self._advance(key, rec.offset)
            return True
        if rec.offset < self.reread_below.get(key, -1):
            self.metrics.duplicates_reread.inc()
        if tp.topic in self._recreated:
            self.metrics.late_messages.inc()
        acts = staged(msg.acts, self.pin_memory)  # owned: Kafka's bytes are not kept
        self.metrics.tokens_consumed.labels(producer=msg.producer_id).inc(msg.n_tokens)
        last = max(self._last_seq.get(msg.producer_id, msg.seq), msg.seq)
        self._last_seq[msg.producer_id] = last
        self.metrics.producer_last_seq.labels(producer=msg.producer_id).set(last)
        chunk = Chunk(acts=acts, key=key, offset=rec.offset, producer_id=msg.producer_id, seq=msg.seq)
        if not self.queue.put(chunk, self._stop):
            return False  # never handed out: the position stays on it
        self._advance(key, rec.offset)  # only after the put: positions never run ahead of the queue
        return True

    def _advance(self, key: SourceKey, offset: int) -> None:
        with self._lock:
            self._positions[key] = offset + 1

    def _maybe_commit(self, consumer) -> None:
        with self._lock:
            req, self._commit_req = self._commit_req, None
        self._commit(consumer, req or {})

    def _commit(self, consumer, req: dict[SourceKey, int]) -> None:
        # Never offsets of a lost log onto its successor: past what we handed out (asked for before a reset), or of
        # a topic whose id is not the one we read (the reset is still to come).
        req = {k: v for k, v in req.items() if not self.retention.is_released(k[0])}
        if not req:
            return
        positions, ids = self.positions(), topic_ids(consumer, {t for t, _ in req})
        req = {k: v for k, v in req.items() if v <= positions.get(k, v) and self._identity.confirmed(k[0], ids[k[0]])}
        if not req:
            return
        try:
            consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in req.items()},
                            timeout_ms=10_000)
            self._committed_parts |= set(req)
        except KafkaError as e:  # the checkpoint holds these offsets too, and they win on resume
            log.warning("committing offsets to group %s failed: %s", self.group_id, e)

    def _check_broker(self, consumer):
        """Every few seconds: consumer lag from end offsets (right on Kafka; low on Tansu, see README), and the
        partitions whose log the broker lost (the retention strategy's judgement), read again from the start.
        Returns the consumer to use next."""
        if time.monotonic() - self._lag_at < LAG_CHECK_SECONDS:
            return consumer
        self._lag_at = time.monotonic()
        parts = consumer.assignment()
        # the topic is watched even while nothing is assigned (it is gone, or its metadata not yet known)
        watched = {tp.topic for tp in parts} if self.retention.rotates else {self.topic}
        ids = topic_ids(consumer, watched)
        recreated = self._identity.changed(ids)
        if recreated and not self.retention.rotates:
            return self._reopen(consumer, recreated, ids)
        if not parts:
            return consumer
        ends = {(tp.topic, tp.partition): end for tp, end in consumer.end_offsets(list(parts)).items()}
        positions = self.positions()
        committed = {(tp.topic, tp.partition): consumer.committed(tp)
                     for tp in parts if (tp.topic, tp.partition) in self._committed_parts}
        for (topic, part), end in ends.items():
            pos = positions.get((topic, part), 0)
            self.metrics.consumer_lag.labels(topic=topic, partition=str(part)).set(max(end - pos, 0))
        lost = self.retention.lost_logs(ends, positions, committed, recreated)
        for key in lost:
            consumer.seek_to_beginning(TopicPartition(*key))
        self._start_over(lost, recreated, ends, ids)
        return consumer

    def _start_over(self, keys, recreated: set[str], ends: dict[SourceKey, int],
                    ids: Mapping[str, str | None]) -> None:
        """These partitions' log is lost: their positions go to the new log's start (0), counted and logged; a
        re-created topic's positions are in its new log (``ids``) from now on."""
        with self._lock:
            self._log_ids.update({t: ids[t] for t in recreated if ids.get(t) is not None})
        positions = self.positions()
        for topic, part in keys:
            log.warning("%s[%d]: the broker lost its log (%s; position %d, end %s): reading the new log from its "
                        "start", topic, part, "the topic was created again" if topic in recreated else
                        "its log or committed offsets are gone", positions.get((topic, part), 0),
                        ends.get((topic, part), "unknown"))
            self.metrics.offset_resets.inc()
            self.metrics.lost_logs.inc()
            self.reread_below.pop((topic, part), None)
            with self._lock:
                self._positions[(topic, part)] = self._placed[(topic, part)] = 0
        self._committed_parts -= set(keys)  # their commits went with the log: judged again once re-committed

    def _reopen(self, consumer, topics: set[str], ids: Mapping[str, str | None]):
        """The topic read was created again (a memory broker restarted): every partition of it starts over at the
        new log's start, read by a new consumer (the old one holds fetch positions and leader epochs of the lost
        log). Returns the new consumer."""
        keys = sorted(k for k in self.positions() if k[0] in topics)
        self._start_over(keys, topics, {}, ids)
        self._fresh = {tp for tp in self._fresh if tp.topic not in topics}
        consumer.close(autocommit=False)
        consumer = self._new_consumer()
        self._follow_at = 0.0  # the partitions are assigned again at the next round
        return consumer

    def _follow(self, consumer):
        """Rotating topics: assign every partition of every topic to follow, checked every few seconds. A group
        subscription would pause consumption for a rebalance (seconds) at each new topic; one trainer per group
        reads the whole stream anyway, and commits still go to the group. Returns the consumer to use next."""
        released = self.retention.take_released()
        if released:
            consumer = self._drop(consumer, released)
            self._recreated -= released
            self._identity.forget(released)
        if time.monotonic() - self._follow_at < FOLLOW_CHECK_SECONDS:
            return consumer
        topics = self.retention.topics_to_follow(self.topic, consumer.topics())
        back = self.retention.take_recreated()
        if back:
            self.metrics.generations_recreated.inc(len(back))
            self._recreated |= back
            self._identity.forget(back)  # read from the start below, not reset again as a lost log
            with self._lock:
                for topic in back:
                    self._log_ids.pop(topic, None)  # learnt again when placed
            # the consumer may still hold positions on the deleted topics: place them again from the start
            self._fresh |= {tp for tp in consumer.assignment() if tp.topic in back}
        self._follow_at = time.monotonic()
        parts = {TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()}
        current = consumer.assignment()
        if parts != current:
            consumer.assign(sorted(parts))
            self._fresh |= parts - current
            log.info("following generations: %s", sorted(topics))
        return consumer

    def _mine(self, partition: int) -> bool:
        return partition_share(partition, *self.share)

    def _assign_share(self, consumer) -> None:
        """Assign this rank's partitions of the topic (all of them for one trainer), checked every few seconds so
        partitions added later are read too. Data-parallel ranks could not use a subscription anyway: a rebalance
        would move partitions between ranks while their tokens sit in another rank's buffer (read twice)."""
        if time.monotonic() - self._follow_at < FOLLOW_CHECK_SECONDS:
            return
        known = consumer.partitions_for_topic(self.topic)
        if known:  # until the metadata names them: again at the next round
            self._follow_at = time.monotonic()
        parts = {TopicPartition(self.topic, p) for p in known or () if self._mine(p)}
        current = consumer.assignment()
        if parts - current:
            consumer.assign(sorted(parts | current))
            self._fresh |= parts - current
            log.info("rank %d of %d reads partitions %s of %s", *self.share, sorted(tp.partition for tp in parts),
                     self.topic)

    def _drop(self, consumer, topics: set[str]):
        """Stop reading released topics, then let the strategy delete them, with a new consumer: kafka-python keeps
        refreshing metadata of every topic it ever read, even unassigned, and Tansu re-creates a topic on a
        metadata request (or a fetch). Kept partitions resume exactly where this thread stopped handing records
        out."""
        keep = sorted(tp for tp in consumer.assignment() if tp.topic not in topics)
        consumer.close(autocommit=False)
        with self._lock:
            for key in [k for k in self._positions if k[0] in topics]:
                del self._positions[key]
            for key in [k for k in self._placed if k[0] in topics]:
                del self._placed[key]
            for topic in topics:
                self._log_ids.pop(topic, None)
        self.metrics.generations_retired.inc(self.retention.delete(topics))
        consumer = self._new_consumer()
        consumer.assign(keep)
        positions = self.positions()
        for tp in keep:
            if (tp.topic, tp.partition) in positions:
                consumer.seek(tp, positions[(tp.topic, tp.partition)])
            else:
                self._fresh.add(tp)
        return consumer

    def _new_consumer(self):
        while True:
            try:
                return make_consumer(self.kafka, group_id=self.group_id)
            except KafkaError as e:
                log.warning("re-creating the consumer failed, retrying: %s", e)
                if self._stop.wait(1.0):
                    raise

    def _position_assigned(self, consumer) -> set[TopicPartition]:
        """Place newly assigned partitions (records fetched before the seek are dropped by the caller): checkpoint
        offsets win over the group's committed ones; an offset past the log end (a broker that lost its data) falls
        back to the earliest with a metric and a log line."""
        fresh, self._fresh = self._fresh, set()
        if not fresh:
            return fresh
        try:
            ends = consumer.end_offsets(list(fresh))
        except KafkaError:
            self._fresh |= fresh  # still paused: placed on the next round
            raise
        ids = topic_ids(consumer, {tp.topic for tp in fresh})
        for tp in fresh:
            key = (tp.topic, tp.partition)
            want = self.start_offsets.pop(key, None)
            was = self.start_ids.get(tp.topic)
            if want is not None and None not in (was, ids[tp.topic]) and was != ids[tp.topic]:
                log.warning("%s[%d]: the checkpoint's offset %d is in another log of the topic (id %s, now %s: the "
                            "broker lost the log it was read from): reading the new log from its start", tp.topic,
                            tp.partition, want, was, ids[tp.topic])
                self.metrics.offset_resets.inc()
                self.metrics.lost_logs.inc()
                self.reread_below.pop(key, None)
                consumer.seek_to_beginning(tp)
                with self._lock:
                    self._placed[key] = 0
                    self._log_ids[tp.topic] = ids[tp.topic]
                continue
            if tp.topic in self._recreated:  # its old offsets (ours, the group's) belong to the deleted topic
                log.warning("%s[%d] re-created after its release holds %d record(s): reading them", tp.topic,
                            tp.partition, ends.get(tp, 0))
                self.reread_below.pop(key, None)
                consumer.seek_to_beginning(tp)
                with self._lock:
                    self._placed[key] = 0
                continue
            if want is None:
                want = consumer.committed(tp)
            if want is None:
                consumer.seek_to_beginning(tp)
                want = 0  # the earliest: at or below the log start
            elif want > ends.get(tp, 0):
                log.warning("offset %d of %s[%d] is past the log end %d: reading from the earliest",
                            want, tp.topic, tp.partition, ends.get(tp, 0))
                self.metrics.offset_resets.inc()
                self.reread_below.pop(key, None)
                consumer.seek_to_beginning(tp)
                want = 0
            else:
                consumer.seek(tp, want)
            with self._lock:
                self._placed[key] = want
                if ids[tp.topic] is not None:
                    self._log_ids.setdefault(tp.topic, ids[tp.topic])
        # Commit where each partition starts (where a resume would start anyway), so that the group holds an offset
        # for every partition read from the first moment: a broker that then loses its log loses these commits too,
        # which is how the lost log is noticed even before the first checkpoint (see Retention.lost_logs).
        self._commit(consumer, {(tp.topic, tp.partition): consumer.position(tp) for tp in fresh})
        consumer.resume(*fresh)
        self.assigned.set()
        return fresh


class _Reject(Exception):
    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
