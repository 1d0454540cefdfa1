"""How the activation stream's log stays bounded, and how a reader notices a broker that lost its log.

Two strategies behind one interface, chosen from the config in one place (``retention_for``):

- ``BrokerRetention``: the broker's own retention (Kafka's time/size limits) bounds the log. Producers write to the
  configured topic, the trainer follows it through a group subscription, and nothing is ever released.
- ``GenerationRetention`` (``kafka.generation_seconds``), for brokers without retention (Tansu keeps every record):
  producers write to ``TOPIC.gNNNNNNNNNN``, a new topic every ``generation_seconds`` (aligned across producers by
  wall-clock time); the trainer follows every generation and, once a checkpoint is durable, releases (deletes) the
  generations that producers have left and whose every token is trained.

Callers see only ``Retention`` and ``retention_for``; the generation naming stays in this module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping

from kafka.errors import KafkaError

from streamd.config import KafkaConfig
from streamd.stream.kafka import delete_topic, end_offsets, ensure_topic

log = logging.getLogger(__name__)

SourceKey = tuple[str, int]  # (topic, partition)


class Retention:
    """The interface; its defaults are the broker's own retention (nothing to release).

    Producers call ``topic_for`` / ``base_topic``; the trainer calls ``prepare`` once and ``release`` after every
    durable checkpoint; the Kafka activation source calls the rest from its consumer thread. Thread-safe.
    """

    rotates = False
    """Whether the topics to follow change while running: then the reader assigns ``topics_to_follow`` itself
    (a group subscription would pause for a rebalance at every new topic) instead of subscribing to the base."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka

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

    def take_released(self) -> set[str]:
        """For the reader's thread: topics released since the last call, to stop reading and then ``delete``."""
        return set()

    def delete(self, topics: Iterable[str]) -> int:
        """Delete released topics the reader no longer reads; returns how many went (failures are retried through
        ``take_released``)."""
        return 0

    def lost_logs(self, ends: Mapping[SourceKey, int], positions: Mapping[SourceKey, int],
                  committed: Mapping[SourceKey, int | None]) -> list[SourceKey]:
        """Partitions to read again from the start because the broker lost its log (a memory broker restarted).

        ``ends``: the log end of every assigned partition; ``positions``: the next offset to hand out;
        ``committed``: the group's committed offset of each partition whose offset this reader committed. Lost:
        every such committed offset gone, or an empty log where we had read. A consumer's position survives a lost
        log, and a fetch past the end returns nothing, so without this a reader would wait for the new log to grow
        past its old position.
        """
        everything = bool(committed) and all(v is None for v in committed.values())
        return [k for k, end in ends.items() if everything or (end == 0 and positions.get(k, 0) > 0)]


class BrokerRetention(Retention):
    """The broker's own retention bounds the log (Kafka ``retention.ms`` / ``retention.bytes``)."""


class GenerationRetention(Retention):
    """Topic generations for brokers without retention: one topic per ``kafka.generation_seconds``, deleted once
    trained and checkpointed."""

    rotates = True

    def __init__(self, kafka: KafkaConfig) -> None:
        super().__init__(kafka)
        self._lock = threading.Lock()
        self._released: set[str] = set()  # never followed again, whether or not the delete went through
        self._to_delete: set[str] = set()

    def topic_for(self, base: str, now: float | None = None) -> str:
        return topic_for(self.kafka, base, time.time() if now is None else now)

    def base_topic(self, topic: str) -> str:
        return topic[: -len(".g0000000000")] if parse_generation(topic) is not None else topic

    def prepare(self, base: str) -> None:
        pass  # producers create each generation as they reach it

    def topics_to_follow(self, base: str, existing: Iterable[str]) -> list[str]:
        pattern = re.compile(generation_pattern(base))
        with self._lock:
            return [t for t in existing if pattern.match(t) and t not in self._released]

    def release(self, durable: Mapping[SourceKey, int], read: Mapping[SourceKey, int]) -> None:
        """Release generations that producers have left (older than the previous one) and whose every token is
        trained and durable: read to the log end, nothing pending below the position. Tansu's end offsets can only
        be low, and a fetch returns whole batches, so a position at or past the reported end means the last batch
        was read."""
        current = generation_of(self.kafka, time.time())
        with self._lock:
            old = sorted({t for t, _ in read if (g := parse_generation(t)) is not None and g < current - 1
                          and t not in self._released})
        if not old:
            return
        try:
            ends = end_offsets(self.kafka, old)
        except KafkaError as e:  # the broker is away: the next checkpoint tries again
            log.warning("checking generation topics for release failed: %s", e)
            return
        for topic in old:
            parts = [k for k in ends if k[0] == topic]
            if parts and all(read.get(k, 0) >= ends[k] and durable.get(k, 0) >= read.get(k, 0) for k in parts):
                with self._lock:
                    self._released.add(topic)
                    self._to_delete.add(topic)

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
            log.info("retired generation topic %s (trained and checkpointed)", topic)
        return deleted


def retention_for(kafka: KafkaConfig) -> Retention:
    """The one place the strategy is chosen from the config."""
    return GenerationRetention(kafka) if kafka.generation_seconds else BrokerRetention(kafka)


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
