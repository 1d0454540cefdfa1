"""Kafka client factories with the settings that matter for streaming ~1 MB activation messages.

kafka-python's defaults move ~4 MB/s of such messages; these settings move ~250-300 MB/s on loopback. The reasons:

- ``crc32c`` (the C package) must be importable: without it every record batch is checksummed in pure Python.
- Fetch sizes: 64 MiB per fetch, 16 MiB per partition (the defaults, 50 MiB / 1 MiB, make one round trip per message).
- ``linger_ms=5`` lets a few messages share a request; no compression (fp16 activations barely compress, and
  zstd / lz4 cost more CPU than they save on the wire).
- ``max_request_size`` must exceed the largest message, or the producer raises MessageSizeTooLargeError.
- ``enable_idempotence=False``: kafka-python's idempotent producer is permanently broken after the broker loses its
  producer-id state (a Tansu restart with memory storage; an expired producer id on Kafka): every later send fails
  with UnknownProducerIdError, then UnknownError. A stream of activations tolerates the rare duplicate a retry may
  cause; it does not tolerate a producer that never recovers.
- No client creates a topic by asking for it (``allow_auto_create_topics=False``, applied by ``_refuse_auto_create``:
  kafka-python 3.0 accepts the option but never hands it to its metadata, so every metadata request asks the broker
  to create what it names). A memory broker that restarted would otherwise re-create a topic with its default
  partition count (Tansu: 4) for the first client that asks; streamd creates topics only through ``ensure_topic``.
- A producer sends nothing to a broker that came back without its topics (``_forget_topics_when_unreachable``):
  Tansu with memory storage acknowledges records for a topic it lost, and nobody can ever read them.
- A topic's identity is its topic id (metadata v10, Kafka >= 2.8 and Tansu): a topic created again under the same
  name (a memory broker restarted) has a new id and a new log, and ``topic_ids`` lets a reader notice.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any

import kafka.errors as kerr
import kafka.record.util
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from streamd.config import KafkaConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 128 * 2**20
"""Largest message Tansu accepts (at 256 MiB it drops the connection); also the config's ceiling."""
FETCH_MAX_BYTES = 64 * 2**20
MAX_PARTITION_FETCH_BYTES = 16 * 2**20
PRODUCER_BATCH_BYTES = 2**20
"""Upper bound of a producer batch: small messages share one, a message bigger than this travels alone."""
MAX_POLL_RECORDS = 64
"""Records per poll: 64 MB of 1 MB messages, enough to keep a consumer thread busy between polls."""


def crc32c_accelerated() -> bool:
    """Whether kafka-python's record checksum is the C ``crc32c`` (the function its record code actually calls)."""
    return kafka.record.util.calc_crc32c.__defaults__[0] is not kafka.record.util.crc32c_py


@functools.cache
def _warn_if_slow_crc() -> None:
    if not crc32c_accelerated():
        log.warning(
            "kafka-python checksums record batches in pure Python (install the 'crc32c' package): "
            "consume throughput drops to ~8 MB/s"
        )


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by producer, consumer and admin client, secrets unwrapped."""
    sec = cfg.security
    kw: dict[str, Any] = {
        "bootstrap_servers": list(cfg.bootstrap_servers),
        "request_timeout_ms": cfg.request_timeout_ms,
        "security_protocol": sec.protocol,
    }
    if sec.protocol.startswith("SASL"):
        kw["sasl_mechanism"] = sec.sasl_mechanism
        if sec.sasl_username is not None:
            kw["sasl_plain_username"] = sec.sasl_username
        if sec.sasl_password is not None:
            kw["sasl_plain_password"] = sec.sasl_password.get_secret_value()
    if sec.protocol.endswith("SSL"):
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(sec, name)
            if path is not None:
                kw[name] = str(path)
        if sec.ssl_password is not None:
            kw["ssl_password"] = sec.ssl_password.get_secret_value()
        kw["ssl_check_hostname"] = sec.ssl_check_hostname
    return kw


def make_producer(cfg: KafkaConfig, *, max_request_size: int, **overrides: Any) -> KafkaProducer:
    """A producer of raw bytes (no serialisers) that survives broker restarts; ``overrides`` win.

    kafka-python 3 has no ``buffer_memory``: its accumulator is unbounded, so the caller bounds what it has in
    flight (e.g. a bounded queue in front of ``send``). Failed sends are retried until ``delivery_timeout_ms``.
    """
    _warn_if_slow_crc()
    if not 0 < max_request_size <= MAX_MESSAGE_BYTES + 2**20:
        raise ValueError(f"max_request_size={max_request_size} outside (0, {MAX_MESSAGE_BYTES + 2**20}]")
    settings: dict[str, Any] = {
        **client_kwargs(cfg),
        "acks": "all",
        "enable_idempotence": False,  # see module docstring
        "delivery_timeout_ms": cfg.delivery_timeout_ms,  # bounds how late a record lands (generation grace)
        "linger_ms": 5,
        "compression_type": None,
        "max_request_size": max_request_size,
        "batch_size": min(PRODUCER_BATCH_BYTES, max_request_size),
        "allow_auto_create_topics": False,  # see module docstring
    }
    settings.update(overrides)
    producer = _refuse_auto_create(KafkaProducer(**settings), settings["allow_auto_create_topics"])
    _forget_topics_when_unreachable(producer)
    return producer


def make_consumer(cfg: KafkaConfig, *, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer tuned for large messages; offsets are committed by the caller (``enable_auto_commit=False``).

    Not subscribed: call ``subscribe`` or ``assign``. ``auto_offset_reset="earliest"`` lets it carry on from the
    start of the log when its committed offset is gone (a broker that lost its state).
    """
    _warn_if_slow_crc()
    settings: dict[str, Any] = {
        **client_kwargs(cfg),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "allow_auto_create_topics": False,  # see module docstring
        "fetch_max_bytes": FETCH_MAX_BYTES,
        "max_partition_fetch_bytes": MAX_PARTITION_FETCH_BYTES,
        # A fetch response may hold one oversized message beyond fetch_max_bytes.
        "receive_message_max_bytes": FETCH_MAX_BYTES + MAX_MESSAGE_BYTES,
        "max_poll_records": MAX_POLL_RECORDS,
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.session_timeout_ms // 3,
    }
    settings.update(overrides)
    return _refuse_auto_create(KafkaConsumer(**settings), settings["allow_auto_create_topics"])


def _cluster(client: KafkaProducer | KafkaConsumer):
    """kafka-python 3.0's metadata cache of a producer or consumer (private: the one place that reaches it)."""
    return client._metadata if isinstance(client, KafkaProducer) else client._client.cluster


def _refuse_auto_create(client, allow: bool):
    """Make the client's metadata requests carry ``allow_auto_create_topics`` (kafka-python 3.0 drops it)."""
    _cluster(client).config["allow_auto_create_topics"] = allow
    return client


def _forget_topics_when_unreachable(producer: KafkaProducer) -> None:
    """kafka-python keeps a topic's partition leaders across a broker restart and sends queued records as soon as it
    reconnects, before a metadata refresh could show that the topic is gone. Here a broker connection that breaks
    drops every topic's partitions from the producer's metadata at that moment, so records wait until a refresh lists
    their topic again: once it exists again, created with its partitions by ``ensure_topic`` (the producer's own loop
    does that). Only connections closed by an error count (an idle connection closed on purpose does not)."""
    cluster = _cluster(producer)
    manager = producer._sender._client._manager
    get_connection = manager.get_connection

    def forget(_exc) -> None:
        with cluster._lock:
            cluster._partitions = {}
            cluster._broker_partitions = collections.defaultdict(set)

    def get_connection_watched(node_id, *args, **kwargs):
        new = node_id not in manager._conns
        conn = get_connection(node_id, *args, **kwargs)
        if new:
            conn.close_future.add_errback(forget)
        return conn

    manager.get_connection = get_connection_watched


def topic_ids(client: KafkaProducer | KafkaConsumer, topics) -> dict[str, str | None]:
    """The id of each topic in the client's latest metadata (None: not in it, or a broker without topic ids), then a
    metadata refresh is asked for, so the next call sees the broker as it is by then."""
    cluster = _cluster(client)
    ids = {t: cluster.topic_id(t) for t in topics}
    cluster.request_update()
    return {t: None if i is None else str(i) for t, i in ids.items()}


def knows_topic(client: KafkaProducer | KafkaConsumer, topic: str) -> bool:
    """Whether the client's latest metadata has partitions for ``topic`` (a lost topic drops out of it)."""
    return bool(_cluster(client).partitions_for_topic(topic))


def make_admin(cfg: KafkaConfig, **overrides: Any) -> KafkaAdminClient:
    return KafkaAdminClient(**{**client_kwargs(cfg), **overrides})


def ensure_topic(cfg: KafkaConfig, topic: str | None = None, partitions: int | None = None) -> None:
    """Create ``topic`` (default ``cfg.topic``) unless it exists; returns once its partitions have leaders.

    An existing topic is left as it is; a partition count other than the one asked for is logged, not changed.
    """
    topic = topic or cfg.topic
    partitions = partitions or cfg.partitions
    admin = make_admin(cfg)
    try:
        admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": cfg.replication_factor}},
            wait_for_metadata=True,
        )
        log.info("created topic %s with %d partitions", topic, partitions)
    except kerr.TopicAlreadyExistsError:
        (desc,) = admin.describe_topics([topic])
        if len(desc["partitions"]) != partitions:
            log.warning("topic %s exists with %d partitions (asked for %d)", topic, len(desc["partitions"]), partitions)
    finally:
        admin.close()


def delete_topic(cfg: KafkaConfig, topic: str | None = None) -> None:
    """Delete ``topic`` (default ``cfg.topic``); a topic that does not exist is not an error.

    On Tansu this is the only way to free the memory a topic holds (it enforces no retention).
    """
    admin = make_admin(cfg)
    try:
        admin.delete_topics([topic or cfg.topic])
    except kerr.UnknownTopicOrPartitionError:
        pass
    finally:
        admin.close()


def end_offsets(cfg: KafkaConfig, topics: list[str]) -> dict[tuple[str, int], int]:
    """Log-end offset of every partition of ``topics`` (on Tansu: the base offset of the last batch + 1, a lower
    bound of the true end; callers must only use it where an underestimate is safe)."""
    consumer = make_consumer(cfg, group_id=None)
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        return {(tp.topic, tp.partition): off for tp, off in consumer.end_offsets(parts).items()} if parts else {}
    finally:
        consumer.close()


def group_offsets(cfg: KafkaConfig, exclude: str | None = None) -> dict[str, dict[tuple[str, int], int]]:
    """Every consumer group the broker knows (but ``exclude``) with its committed offset per (topic, partition)."""
    admin = make_admin(cfg)
    try:
        groups = sorted(g["group_id"] for g in admin.list_groups() if g["group_id"] != exclude)
        if not groups:
            return {}
        try:
            found = admin.list_group_offsets({g: None for g in groups})
        except kerr.UnsupportedVersionError:  # OffsetFetch before v8: one group per request
            found = {g: admin.list_group_offsets({g: None})[g] for g in groups}
        return {g: {(tp.topic, tp.partition): om.offset for tp, om in offsets.items() if om.offset >= 0}
                for g, offsets in found.items()}
    finally:
        admin.close()
