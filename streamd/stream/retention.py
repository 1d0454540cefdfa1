"""How the activation stream's log stays bounded, and how a reader notices a broker that lost its log.

Two strategies behind one interface, chosen from the config in one place (``retention_for``):

- ``BrokerRetention``: the broker's own retention (Kafka's time/size limits) bounds the log. Producers write to the
  configured topic, the trainer reads all its partitions, and nothing is ever released.
- ``GenerationRetention`` (``kafka.generation_seconds``), for brokers without retention (Tansu keeps every record):
  producers write to ``TOPIC.gNNNNNNNNNN``, a new topic every ``generation_seconds`` (aligned across producers by
  wall-clock time); the trainer follows every generation and, once a checkpoint is durable, releases (deletes) the
  generations that producers have left and whose every token is trained.

  "Left" is judged on the trainer's clock with a grace (``KafkaConfig.generation_grace_seconds``): a record may be
  retried by kafka-python for ``delivery_timeout_ms`` after it was sent, and a producer's clock may be off by
  ``clock_skew_seconds``. A generation is deleted only once every other consumer group that reads this stream (has
  committed offsets on one of its generations) has committed its end too. If a record still lands on a deleted
  generation, the broker re-creates the topic: the reader is told (``take_recreated``), reads it from the start and
  releases it again like any other.

A broker may also lose its log under a reader (a memory broker restarted): ``Retention.lost_logs`` judges which
partitions to read again from the start, with ``TopicIdentity`` telling a topic created again under its old name.

Callers see only ``Retention``, ``retention_for`` and ``TopicIdentity``; the generation naming stays in this module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping

from kafka.errors import KafkaError

from streamd.config import KafkaConfig
from streamd.stream.kafka import delete_topic, end_offsets, ensure_topic, group_offsets

log = logging.getLogger(__name__)

SourceKey = tuple[str, int]  # (topic, partition)


class Retention:
    """The interface; its defaults are the broker's own retention (nothing to release).

    Producers call ``topic_for`` / ``base_topic``; the trainer calls ``prepare`` once and ``release`` after every
    durable checkpoint; the Kafka activation source calls the rest from its consumer thread. Thread-safe.
    """

    rotates = False
    """Whether the topics to follow change while running: then the reader assigns the partitions of every topic
    of ``topics_to_follow``, not only those of the base topic."""

    def __init__(self, kafka: KafkaConfig, group_id: str | None = None) -> None:
        self.kafka = kafka
        self.group_id = group_id  # the reader's own consumer group (other groups may hold a release back)

    # --- producers --------------------------------------------------------------------------------------------

    def topic_for(self, base: str, now: float | None = None) -> str:
        """The topic to write ``base``'s activations to at wall-clock ``now`` (default: now)."""
        return base

    def base_topic(self, topic: str) -> str:
        """The base topic a topic returned by ``topic_for`` belongs to."""
        return topic

    # --- readers ----------------------------------------------------------------------------------------------

    def prepare(self, base: str) -> None:
        """Make sure a reader of ``base`` has something to follow (create the topic if the scheme needs it)."""
        ensure_topic(self.kafka, base, self.kafka.partitions)

    def topics_to_follow(self, base: str, existing: Iterable[str]) -> list[str]:
        """Of the broker's ``existing`` topics, those a reader of ``base`` follows now (released ones never)."""
        return [base]

    def release(self, durable: Mapping[SourceKey, int], read: Mapping[SourceKey, int]) -> None:
        """These offsets are durable (in a checkpoint, committed); ``read`` is the next offset not yet handed out
        per partition. Release what is fully trained. Never raises for a broker that is away (tried again at the
        next checkpoint)."""

    def is_released(self, topic: str) -> bool:
        """Whether ``topic`` was released: readers drop its positions and commits."""
        return False

    def take_recreated(self) -> set[str]:
        """For the reader's thread: deleted topics that came back (a late record re-created them) since the last
        call; ``topics_to_follow`` lists them again, and the reader reads them from the start."""
        return set()

    def take_released(self) -> set[str]:
        """For the reader's thread: topics released since the last call, to stop reading and then ``delete``."""
        return set()

    def delete(self, topics: Iterable[str]) -> int:
        """Delete released topics the reader no longer reads; returns how many went (failures are retried through
        ``take_released``)."""
        return 0

    def lost_logs(self, ends: Mapping[SourceKey, int], positions: Mapping[SourceKey, int],
                  committed: Mapping[SourceKey, int | None], recreated: Iterable[str] = ()) -> list[SourceKey]:
        """Partitions to read again from the start because the broker lost its log (a memory broker restarted).

        ``ends``: the log end of every assigned partition; ``positions``: the next offset to hand out;
        ``committed``: the group's committed offset of each partition whose offset this reader committed;
        ``recreated``: topics whose id changed (``TopicIdentity.changed``). Lost: every partition of a re-created
        topic, every partition when each such committed offset is gone, or an empty log where we had read. A
        consumer's position survives a lost log, and a fetch past the end returns nothing, so without this a
        reader would wait for the new log to grow past its old position and never read the head of it.
        """
        recreated = set(recreated)
        everything = bool(committed) and all(v is None for v in committed.values())
        return [k for k, end in ends.items()
                if k[0] in recreated or everything or (end == 0 and positions.get(k, 0) > 0)]


class TopicIdentity:
    """Remembers the id each topic had when a reader first saw it, to notice one created again under its name (a
    memory broker that restarted, or a client that re-created a deleted topic): a new id is a new log, whose
    offsets say nothing about the old one's. Topics without ids (brokers before Kafka 2.8) are never judged here.
    For the reader's thread only."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}

    def changed(self, current: Mapping[str, str | None]) -> set[str]:
        """Of ``current`` (topic -> its id now, None when the broker does not list it), the topics whose id is not
        the one remembered; the new ids are remembered from now on. A topic the broker does not list now (lost,
        not yet created again) is judged once it is back."""
        out = set()
        for topic, tid in current.items():
            if tid is None:
                continue
            if self._ids.get(topic, tid) != tid:
                out.add(topic)
            self._ids[topic] = tid
        return out

    def confirmed(self, topic: str, tid: str | None) -> bool:
        """Whether ``tid`` (the topic's id now) is the log this reader has read, so offsets of it may be committed:
        False while the topic is gone or has a new id the reader has not yet reset to."""
        known = self._ids.get(topic)
        return known is None or known == tid

    def forget(self, topics: Iterable[str]) -> None:
        """Deleted on purpose (a released generation): a new one under the name is judged afresh."""
        for topic in topics:
            self._ids.pop(topic, None)


class BrokerRetention(Retention):
    """The broker's own retention bounds the log (Kafka ``retention.ms`` / ``retention.bytes``)."""


class GenerationRetention(Retention):
    """Topic generations for brokers without retention: one topic per ``kafka.generation_seconds``, deleted once
    trained and checkpointed."""

    rotates = True

    def __init__(self, kafka: KafkaConfig, group_id: str | None = None) -> None:
        super().__init__(kafka, group_id)
        self._lock = threading.Lock()
        self._released: set[str] = set()  # not followed (unless re-created after the delete)
        self._to_delete: set[str] = set()
        self._deleted: set[str] = set()  # deleted by us: seen again means a late record re-created it
        self._recreated: set[str] = set()  # re-created, not yet taken by the reader
        self._revived: set[str] = set()  # re-created and followed again: released even if nothing was read
        self.clock = time.time  # the trainer's wall clock (tests replace it)

    def topic_for(self, base: str, now: float | None = None) -> str:
        return topic_for(self.kafka, base, time.time() if now is None else now)

    def base_topic(self, topic: str) -> str:
        return topic[: -len(".g0000000000")] if parse_generation(topic) is not None else topic

    def prepare(self, base: str) -> None:
        pass  # producers create each generation as they reach it

    def topics_to_follow(self, base: str, existing: Iterable[str]) -> list[str]:
        pattern = re.compile(generation_pattern(base))
        with self._lock:
            back = {t for t in existing if t in self._deleted}
            for topic in sorted(back):
                log.warning("generation topic %s was deleted and is back (a late record re-created it, sent within "
                            "the producer's retries or by a skewed clock): reading it again", topic)
            self._deleted -= back
            self._released -= back
            self._recreated |= back
            self._revived |= back
            return [t for t in existing if pattern.match(t) and t not in self._released]

    def take_recreated(self) -> set[str]:
        with self._lock:
            out, self._recreated = self._recreated, set()
        return out

    def abandoned(self, topic: str, now: float | None = None) -> bool:
        """Whether producers have left generation ``topic`` for good: it ended (by the trainer's clock) at least
        the grace ago, so no record still retried, nor one from a skewed clock, can land on it."""
        g = parse_generation(topic)
        now = self.clock() if now is None else now
        return g is not None and (g + 1) * self.kafka.generation_seconds + self.kafka.generation_grace_seconds <= now

    def release(self, durable: Mapping[SourceKey, int], read: Mapping[SourceKey, int]) -> None:
        """Release generations that producers have left (``abandoned``) and whose every token is trained and
        durable: read to the log end, nothing pending below the position, and every other group that reads this
        stream committed past the end as well. Tansu's end offsets can only be low, and a fetch returns whole
        batches, so a position at or past the reported end means the last batch was read."""
        now = self.clock()
        with self._lock:
            old = sorted({t for t in {t for t, _ in read} | self._revived
                          if self.abandoned(t, now) and t not in self._released})
        if not old:
            return
        try:
            ends = end_offsets(self.kafka, old)
            others = group_offsets(self.kafka, exclude=self.group_id)
        except KafkaError as e:  # the broker is away: the next checkpoint tries again
            log.warning("checking generation topics for release failed: %s", e)
            return
        readers = {g: offs for g, offs in others.items() if any(self._same_stream(t, old) for t, _ in offs)}
        for topic in old:
            parts = [k for k in ends if k[0] == topic]
            with self._lock:
                revived = topic in self._revived
            if not (parts or revived):
                continue
            if not all(read.get(k, 0) >= ends[k] and durable.get(k, 0) >= read.get(k, 0) for k in parts):
                continue
            behind = sorted(g for g, offs in readers.items() if any(offs.get(k, -1) < ends[k] for k in parts))
            if behind:
                log.info("keeping %s: consumer group(s) %s have not committed its end", topic, ", ".join(behind))
                continue
            with self._lock:
                self._released.add(topic)
                self._to_delete.add(topic)
                self._revived.discard(topic)

    def _same_stream(self, topic: str, candidates: list[str]) -> bool:
        """Whether ``topic`` is a generation of the same base as one of ``candidates``."""
        base = self.base_topic(topic)
        return parse_generation(topic) is not None and any(self.base_topic(c) == base for c in candidates)

    def is_released(self, topic: str) -> bool:
        with self._lock:
            return topic in self._released

    def take_released(self) -> set[str]:
        with self._lock:
            out, self._to_delete = self._to_delete, set()
        return out

    def delete(self, topics: Iterable[str]) -> int:
        deleted = 0
        for topic in sorted(topics):
            try:
                delete_topic(self.kafka, topic)
            except KafkaError as e:
                log.warning("deleting %s failed, will retry: %s", topic, e)
                with self._lock:
                    self._to_delete.add(topic)
                continue
            deleted += 1
            with self._lock:
                self._deleted.add(topic)
            log.info("retired generation topic %s (trained and checkpointed)", topic)
        return deleted


def retention_for(kafka: KafkaConfig, group_id: str | None = None) -> Retention:
    """The one place the strategy is chosen from the config; ``group_id``: the reader's consumer group."""
    return GenerationRetention(kafka, group_id) if kafka.generation_seconds else BrokerRetention(kafka, group_id)


# --- generation topic names ------------------------------------------------------------------------------------

def generation_of(cfg: KafkaConfig, now: float) -> int:
    """The topic generation a producer writes to at wall-clock ``now`` (aligned across producers)."""
    return int(now // cfg.generation_seconds)


def topic_for(cfg: KafkaConfig, base: str, now: float) -> str:
    """The topic to write ``base``'s activations to now: ``base`` itself, or its current generation."""
    return f"{base}.g{generation_of(cfg, now):010d}" if cfg.generation_seconds else base


def generation_pattern(base: str) -> str:
    """The regex matching every generation topic of ``base``."""
    return rf"^{re.escape(base)}\.g\d{{10}}$"


def parse_generation(topic: str) -> int | None:
    m = re.search(r"\.g(\d{10})$", topic)
    return int(m.group(1)) if m else None
