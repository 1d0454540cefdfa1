"""Ingestion: activation chunks from Kafka (a consumer-group thread) or from cached files, behind one interface.

A chunk carries its origin (source key = topic/partition or file, offset) so the trainer can tell, at checkpoint time,
from where every untrained token can be read again. Messages that fail validation are counted by reason, logged and
skipped; they never reach the buffer and never stop the thread.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from streamd import wire
from streamd.config import KafkaConfig
from streamd.stream.kafka import delete_topic, generation_pattern, make_consumer
from streamd.metrics import TrainerMetrics

log = logging.getLogger(__name__)

SourceKey = tuple[str, int]  # (topic or file, partition)


@dataclass
class Chunk:
    acts: torch.Tensor  # [n, d] in the buffer dtype, owned (not a view on Kafka's bytes)
    key: SourceKey
    offset: int
    producer_id: str
    seq: int


class ActivationSource(Protocol):
    def start(self) -> None: ...
    def get(self, timeout: float) -> Chunk | None: ...
    def positions(self) -> dict[SourceKey, int]:
        """Per source key, the next offset not yet handed out: where to resume when nothing is pending."""
        ...
    def queued_offsets(self) -> dict[SourceKey, int]:
        """Per source key, the lowest offset read but not yet handed out."""
        ...
    def commit(self, offsets: dict[SourceKey, int]) -> None: ...
    def close(self) -> None: ...
    @property
    def exhausted(self) -> bool: ...


class TokenQueue:
    """A FIFO bounded in tokens: the reader blocks when the trainer falls behind (memory stays bounded)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self._q: collections.deque[Chunk] = collections.deque()
        self._cv = threading.Condition()

    def put(self, chunk: Chunk, stop: threading.Event) -> bool:
        with self._cv:
            while self.tokens > 0 and self.tokens + chunk.acts.shape[0] > self.max_tokens:
                if stop.is_set():
                    return False
                self._cv.wait(0.2)
            self._q.append(chunk)
            self.tokens += chunk.acts.shape[0]
            self._cv.notify_all()
            return True

    def get(self, timeout: float) -> Chunk | None:
        with self._cv:
            if not self._q:
                self._cv.wait(timeout)
            if not self._q:
                return None
            chunk = self._q.popleft()
            self.tokens -= chunk.acts.shape[0]
            self._cv.notify_all()
            return chunk

    def min_offsets(self) -> dict[SourceKey, int]:
        with self._cv:
            out: dict[SourceKey, int] = {}
            for c in self._q:
                out[c.key] = min(out.get(c.key, c.offset), c.offset)
            return out


class KafkaActivationSource:
    """Consumes the activation topic in a consumer group on a background thread (kafka-python is not thread-safe,
    so every consumer call, commits included, happens on that thread)."""

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
        dtype: torch.dtype = torch.float32,
        start_offsets: dict[SourceKey, int] | None = None,
        reread_below: dict[SourceKey, int] | None = None,
        pin_memory: bool = False,
        torch_threads: int | None = None,
    ) -> None:
        self.kafka, self.topic, self.group_id, self.metrics = kafka, topic, group_id, metrics
        self.expected_site_id, self.d_in = expected_site_id, d_in
        self.dtype, self.pin_memory, self.torch_threads = dtype, pin_memory, torch_threads
        self.start_offsets = dict(start_offsets or {})
        self.reread_below = dict(reread_below or {})
        self.queue = TokenQueue(queue_tokens)
        self._stop = threading.Event()
        self._positions: dict[SourceKey, int] = {}
        self._commit_req: dict[SourceKey, int] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="streamd-ingest", daemon=True)
        self.error: BaseException | None = None
        self.assigned = threading.Event()
        self._fresh: set[TopicPartition] = set()
        self._to_retire: set[str] = set()
        self._committed_parts: set[SourceKey] = set()  # partitions whose committed offset we wrote
        self._retired: set[str] = set()

    exhausted = False  # a stream never ends

    def start(self) -> None:
        self._thread.start()

    def get(self, timeout: float) -> Chunk | None:
        if self.error is not None:
            raise RuntimeError("ingestion thread failed") from self.error
        return self.queue.get(timeout)

    def positions(self) -> dict[SourceKey, int]:
        with self._lock:
            return dict(self._positions)

    def retire(self, topic: str) -> None:
        """Ask the consumer thread to stop reading a generation topic and delete it (it is trained and
        checkpointed). The thread unassigns it first: a fetch of a deleted topic makes Tansu create it again."""
        with self._lock:
            self._to_retire.add(topic)
            for key in [k for k in self._positions if k[0] == topic]:
                del self._positions[key]
            if self._commit_req:
                self._commit_req = {k: v for k, v in self._commit_req.items() if k[0] != topic}

    def queued_offsets(self) -> dict[SourceKey, int]:
        return self.queue.min_offsets()

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
            generations = bool(self.kafka.generation_seconds)
            try:
                if not generations:
                    consumer.subscribe([self.topic], listener=_Rebalance(self, consumer))
                while not self._stop.is_set():
                    polled: dict = {}
                    try:
                        if generations:
                            consumer = self._follow_generations(consumer)
                        self._maybe_commit(consumer)
                        self._check_broker(consumer)
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
        acts = msg.acts.to(self.dtype, copy=True)
        if self.pin_memory:
            acts = acts.pin_memory()
        self.metrics.tokens_consumed.labels(producer=msg.producer_id).inc(msg.n_tokens)
        last = self.metrics.producer_last_seq.labels(producer=msg.producer_id)
        last.set(max(last._value.get(), msg.seq))
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
        if not req:
            return
        try:
            consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in req.items()},
                            timeout_ms=10_000)
            self._committed_parts |= set(req)
        except KafkaError as e:  # the checkpoint holds these offsets too, and they win on resume
            log.warning("committing offsets to group %s failed: %s", self.group_id, e)

    _lag_at = 0.0

    def _check_broker(self, consumer) -> None:
        """Every few seconds: consumer lag from end offsets (right on Kafka; low on Tansu, see README), and a broker
        that lost its data (Tansu's memory storage after a restart): an empty log where we had read, or the group's
        committed offsets gone. A consumer's position survives that, and Tansu answers fetches past the end with
        nothing, so without this the trainer would wait for the new log to grow past the old position."""
        if time.monotonic() - self._lag_at < 5:
            return
        self._lag_at = time.monotonic()
        parts = consumer.assignment()
        if not parts:
            return
        ends = consumer.end_offsets(list(parts))
        positions = self.positions()
        judged = [tp for tp in parts if (tp.topic, tp.partition) in self._committed_parts]
        lost = bool(judged) and all(consumer.committed(tp) is None for tp in judged)
        for tp, end in ends.items():
            pos = positions.get((tp.topic, tp.partition), 0)
            self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(end - pos, 0))
            if lost or (end == 0 and pos > 0):
                log.warning("%s[%d]: the broker lost its log (position %d, end %d): reading from the earliest",
                            tp.topic, tp.partition, pos, end)
                self.metrics.offset_resets.inc()
                consumer.seek_to_beginning(tp)
                with self._lock:
                    self._positions[(tp.topic, tp.partition)] = 0
        if lost:
            self._committed_parts.clear()

    _generations_at = 0.0

    def _follow_generations(self, consumer):
        """Generation mode: assign every partition of every generation topic, checked every few seconds. A group
        subscription would pause consumption for a rebalance (seconds) at each new topic; one trainer per group
        reads the whole stream anyway, and commits still go to the group. Returns the consumer to use next."""
        with self._lock:
            retiring, self._to_retire = self._to_retire, set()
        if retiring:
            consumer = self._retire_now(consumer, retiring)
        if time.monotonic() - self._generations_at < 3:
            return consumer
        self._generations_at = time.monotonic()
        pattern = re.compile(generation_pattern(self.topic))
        topics = [t for t in consumer.topics() if pattern.match(t) and t not in self._retired]
        parts = {TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()}
        current = consumer.assignment()
        if parts != current:
            consumer.assign(sorted(parts))
            self._fresh |= parts - current
            log.info("following generations: %s", sorted(topics))
        return consumer

    def _retire_now(self, consumer, topics: set[str]):
        """Delete retired topics with a new consumer: kafka-python keeps refreshing metadata of every topic it ever
        read, even unassigned, and Tansu re-creates a topic on a metadata request. Kept partitions resume exactly
        where this thread stopped handing records out."""
        keep = sorted(tp for tp in consumer.assignment() if tp.topic not in topics)
        consumer.close(autocommit=False)
        self._retired |= topics  # never assigned again, whether or not the delete goes through now
        for topic in sorted(topics):
            try:
                delete_topic(self.kafka, topic)
            except KafkaError as e:
                log.warning("deleting %s failed, will retry: %s", topic, e)
                with self._lock:
                    self._to_retire.add(topic)
                continue
            self.metrics.generations_retired.inc()
            log.info("retired generation topic %s (trained and checkpointed)", topic)
        while True:
            try:
                consumer = make_consumer(self.kafka, group_id=self.group_id)
                break
            except KafkaError as e:
                log.warning("re-creating the consumer failed, retrying: %s", e)
                if self._stop.wait(1.0):
                    raise
        consumer.assign(keep)
        positions = self.positions()
        for tp in keep:
            if (tp.topic, tp.partition) in positions:
                consumer.seek(tp, positions[(tp.topic, tp.partition)])
            else:
                self._fresh.add(tp)
        return consumer

    def _position_assigned(self, consumer) -> set[TopicPartition]:
        """Place newly assigned partitions (paused by the listener): checkpoint offsets win over the group's
        committed ones; an offset past the log end (a broker that lost its data) falls back to the earliest with a
        metric and a log line. Runs outside the listener: kafka-python 3 forbids blocking calls inside it."""
        fresh, self._fresh = self._fresh, set()
        if not fresh:
            return fresh
        try:
            ends = consumer.end_offsets(list(fresh))
        except KafkaError:
            self._fresh |= fresh  # still paused: placed on the next round
            raise
        for tp in fresh:
            key = (tp.topic, tp.partition)
            want = self.start_offsets.pop(key, None)
            if want is None:
                want = consumer.committed(tp)
            if want is None:
                consumer.seek_to_beginning(tp)
            elif want > ends.get(tp, 0):
                log.warning("offset %d of %s[%d] is past the log end %d: reading from the earliest",
                            want, tp.topic, tp.partition, ends.get(tp, 0))
                self.metrics.offset_resets.inc()
                self.reread_below.pop(key, None)
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, want)
        consumer.resume(*fresh)
        self.assigned.set()
        return fresh


class _Reject(Exception):
    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class _Rebalance(ConsumerRebalanceListener):
    """Pauses newly assigned partitions until the consumer thread has placed them (see ``_position_assigned``)."""

    def __init__(self, source: KafkaActivationSource, consumer) -> None:
        self.source, self.consumer = source, consumer

    def on_partitions_revoked(self, revoked) -> None:
        log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))
        if assigned:
            self.consumer.pause(*assigned)
            self.source._fresh |= set(assigned)


class FileActivationSource:
    """Cached activations (``.npy`` or ``.safetensors``, [n_tokens, d_in]) trained the same way as the stream.

    The offset is the row index, so resume works as for Kafka; ``loop`` restarts at row 0 when the file ends.
    """

    def __init__(self, path: Path, chunk_tokens: int, dtype: torch.dtype = torch.float32, loop: bool = False,
                 start_row: int = 0) -> None:
        self.path, self.chunk_tokens, self.dtype, self.loop = Path(path), chunk_tokens, dtype, loop
        self.acts = load_activation_file(self.path)
        self.key: SourceKey = (f"file:{self.path.name}", 0)
        self._row = 0 if loop and start_row >= len(self.acts) else start_row  # a finished run stays finished
        self.exhausted = False

    @property
    def d_in(self) -> int:
        return self.acts.shape[1]

    def start(self) -> None:
        pass

    def get(self, timeout: float) -> Chunk | None:
        if self._row >= len(self.acts):
            if not self.loop:
                self.exhausted = True
                return None
            self._row = 0
        lo, hi = self._row, min(self._row + self.chunk_tokens, len(self.acts))
        self._row = hi
        return Chunk(self.acts[lo:hi].to(self.dtype), self.key, lo, self.path.name, lo // self.chunk_tokens)

    def positions(self) -> dict[SourceKey, int]:
        return {self.key: self._row}

    def queued_offsets(self) -> dict[SourceKey, int]:
        return {}

    def commit(self, offsets: dict[SourceKey, int]) -> None:
        pass

    def close(self) -> None:
        pass


def load_activation_file(path: Path) -> torch.Tensor:
    """Load a [n_tokens, d_in] activation array from ``.npy`` (memory-mapped) or ``.safetensors`` (one tensor)."""
    if not path.is_file():
        raise FileNotFoundError(f"activation file {path} does not exist")
    if path.suffix == ".npy":
        import numpy as np

        arr = np.load(path, mmap_mode="r")  # chunks are copied out as they are read: the map stays read-only
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(arr))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"{path} must hold exactly one tensor, found {sorted(tensors)}")
        t = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path}: expected a .npy or .safetensors file")
    if t.dim() != 2:
        raise ValueError(f"{path}: activations must be [n_tokens, d_in], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{path}: holds non-finite values")
    return t
