"""The same ingestion path against the official Apache Kafka image, where a Docker engine can pull it (users'
machines). Here no engine answers: the test skips with the reason, and the Tansu tests cover the behaviour."""

import docker.errors
import pytest

from streamd.config import KafkaConfig
from tests.streamd_testing import consume_all, publish, random_acts


@pytest.fixture(scope="module")
def apache_kafka():
    try:
        from testcontainers.kafka import KafkaContainer

        container = KafkaContainer("apache/kafka:3.9.1")
    except docker.errors.DockerException as e:
        pytest.skip(f"no Docker engine answers ({e.__class__.__name__}); the Tansu tests cover this path")
    try:
        container.start()  # an engine that cannot pull the image (as here, even with dockerd up) fails now
    except Exception as e:
        pytest.skip(f"cannot start apache/kafka:3.9.1 ({e.__class__.__name__}: {str(e)[:120]})")
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


def test_round_trip_through_apache_kafka(apache_kafka):
    cfg = KafkaConfig(bootstrap_servers=[apache_kafka], topic="streamd-container", partitions=2)
    sent = publish(cfg, random_acts(2000, 16, seed=9), tokens_per_msg=100)
    assert consume_all(cfg, "container", len(sent)) == sent
