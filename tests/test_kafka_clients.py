"""Client factories: security mapping, crc32c, topic admin, and the settings that let big messages through fast."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import SecretStr

from streamd.config import KafkaConfig, KafkaSecurity
from streamd.stream.kafka import (
    FETCH_MAX_BYTES,
    MAX_PARTITION_FETCH_BYTES,
    client_kwargs,
    crc32c_accelerated,
    delete_topic,
    ensure_topic,
    make_admin,
    make_consumer,
    make_producer,
)

BASE = {"bootstrap_servers": ["h1:9092", "h2:9093"], "request_timeout_ms": 30000}
SSL_FILES = {"ssl_cafile": "/ca.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}
SECURITY_CASES = {
    "PLAINTEXT": ({}, {"security_protocol": "PLAINTEXT"}),
    "SSL": (
        {"protocol": "SSL", **SSL_FILES, "ssl_password": SecretStr("kp"), "ssl_check_hostname": False},
        {"security_protocol": "SSL", **SSL_FILES, "ssl_password": "kp", "ssl_check_hostname": False},
    ),
    "SASL_PLAINTEXT": (
        {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u",
         "sasl_password": SecretStr("pw")},
        {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
         "sasl_plain_password": "pw"},
    ),
    "SASL_SSL": (
        {"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": SecretStr("pw"),
         "ssl_cafile": "/ca.pem"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
         "sasl_plain_password": "pw", "ssl_cafile": "/ca.pem", "ssl_check_hostname": True},
    ),
    "SASL_SSL-GSSAPI": (
        {"protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "ssl_check_hostname": True},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SECURITY_CASES)
def test_security_maps_to_kafka_python_settings(case):
    security, expected = SECURITY_CASES[case]
    cfg = KafkaConfig(bootstrap_servers="h1:9092,h2:9093", security=KafkaSecurity(**security))
    kw = client_kwargs(cfg)
    assert kw == {**BASE, **expected}  # secrets unwrapped, nothing of another protocol leaks in
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(kw) <= set(client.DEFAULT_CONFIG), client  # every key is one kafka-python knows


def test_kafka_python_uses_c_crc32c():
    assert crc32c_accelerated()


def test_producer_rejects_impossible_request_size():
    with pytest.raises(ValueError, match="max_request_size"):
        make_producer(KafkaConfig(), max_request_size=0)


def test_ensure_topic_is_idempotent_and_delete_frees_it(broker_session, caplog):
    cfg = broker_session.config(topic=f"t-{uuid.uuid4().hex[:8]}", partitions=3)
    ensure_topic(cfg)
    ensure_topic(cfg)  # TopicAlreadyExists is fine
    ensure_topic(cfg, partitions=5)  # existing topic kept as it is, with a warning
    assert "exists with 3 partitions (asked for 5)" in caplog.text
    admin = make_admin(cfg)
    try:
        assert len(admin.describe_topics([cfg.topic])[0]["partitions"]) == 3
        delete_topic(cfg)
        delete_topic(cfg)  # already gone: fine
        assert cfg.topic not in admin.list_topics()
    finally:
        admin.close()


def test_factories_apply_the_settings_that_matter(broker_session):
    cfg = broker_session.config(session_timeout_ms=7000)
    producer = make_producer(cfg, max_request_size=5 * 2**20, client_id="p-test")
    consumer = make_consumer(cfg, group_id="g", max_poll_records=7)
    try:
        pc, cc = producer.config, consumer.config
        assert (pc["enable_idempotence"], pc["acks"], pc["compression_type"]) == (False, -1, None)
        assert (pc["max_request_size"], pc["linger_ms"], pc["client_id"]) == (5 * 2**20, 5, "p-test")
        assert (cc["fetch_max_bytes"], cc["max_partition_fetch_bytes"]) == (FETCH_MAX_BYTES, MAX_PARTITION_FETCH_BYTES)
        assert (cc["enable_auto_commit"], cc["auto_offset_reset"], cc["max_poll_records"]) == (False, "earliest", 7)
        assert cc["session_timeout_ms"] == 7000 and cc["heartbeat_interval_ms"] < 7000 / 2
    finally:
        producer.close()
        consumer.close()


def _drain(consumer: KafkaConsumer, n: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=n - len(got)).values():
            got += records
    return got


def test_group_round_trip_resumes_at_committed_offsets(kafka_cfg):
    ensure_topic(kafka_cfg, partitions=2)
    producer = make_producer(kafka_cfg, max_request_size=2**20)
    for i in range(20):
        producer.send(kafka_cfg.topic, f"m{i}".encode(), key=f"k{i % 5}".encode())
    producer.flush()
    producer.close()

    first = make_consumer(kafka_cfg, group_id="g")
    first.subscribe([kafka_cfg.topic])
    head = _drain(first, 8)
    first.commit()
    first.close()
    second = make_consumer(kafka_cfg, group_id="g")
    second.subscribe([kafka_cfg.topic])
    rest = _drain(second, 12)
    assert _drain(second, 1, timeout=1.0) == []  # nothing beyond the 20
    second.commit()
    committed = {p: second.committed(TopicPartition(kafka_cfg.topic, p)) for p in (0, 1)}
    second.close()
    values = sorted(r.value for r in head + rest)
    assert values == sorted(f"m{i}".encode() for i in range(20))  # each exactly once across the two members
    assert sum(committed.values()) == 20


def test_messages_above_kafka_python_defaults_go_through(kafka_cfg):
    """1 MiB and 3 MiB payloads: beyond the default max_request_size (1 MiB) and partition fetch size (1 MiB)."""
    ensure_topic(kafka_cfg, partitions=1)
    sizes = [2**20] * 48 + [3 * 2**20] * 2
    producer = make_producer(kafka_cfg, max_request_size=4 * 2**20)
    t0 = time.perf_counter()
    futures = [producer.send(kafka_cfg.topic, bytes([i % 251]) * size) for i, size in enumerate(sizes)]
    producer.flush()
    produce_s = time.perf_counter() - t0
    for f in futures:
        f.get(timeout=10)
    producer.close()

    consumer = make_consumer(kafka_cfg, group_id=None)
    consumer.assign([TopicPartition(kafka_cfg.topic, 0)])
    t0 = time.perf_counter()
    got = _drain(consumer, len(sizes))
    consume_s = time.perf_counter() - t0
    consumer.close()
    assert [len(r.value) for r in got] == sizes
    assert all(r.value == bytes([i % 251]) * sizes[i] for i, r in enumerate(got))
    mb = sum(sizes) / 1e6
    print(f"\n1 MiB messages: produce {mb / produce_s:.0f} MB/s, consume {mb / consume_s:.0f} MB/s")
    # kafka-python's defaults (or a pure-Python crc) manage 4-8 MB/s here; the tuned settings ~10x more.
    assert mb / consume_s > 20
