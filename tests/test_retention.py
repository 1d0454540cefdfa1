"""The retention strategies' pure parts: topic names, the topics to follow, lost-log judgement (no broker)."""

from streamd.config import KafkaConfig
from streamd.stream.retention import BrokerRetention, GenerationRetention, retention_for


def test_strategy_is_chosen_from_the_config():
    assert isinstance(retention_for(KafkaConfig()), BrokerRetention)
    assert isinstance(retention_for(KafkaConfig(generation_seconds=10)), GenerationRetention)


def test_topic_names():
    broker, gens = BrokerRetention(KafkaConfig()), GenerationRetention(KafkaConfig(generation_seconds=10))
    assert broker.topic_for("acts", 1234.0) == "acts" == broker.base_topic("acts")
    assert gens.topic_for("acts", 1234.0) == "acts.g0000000123"
    assert gens.base_topic("acts.g0000000123") == "acts" and gens.base_topic("acts") == "acts"
    assert not broker.rotates and gens.rotates


def test_topics_to_follow_skip_other_bases_and_released_ones():
    gens = GenerationRetention(KafkaConfig(generation_seconds=10))
    existing = ["acts.g0000000001", "acts.g0000000002", "acts", "other.g0000000001", "acts.g1"]
    assert gens.topics_to_follow("acts", existing) == ["acts.g0000000001", "acts.g0000000002"]
    gens._released.add("acts.g0000000001")
    assert gens.topics_to_follow("acts", existing) == ["acts.g0000000002"]
    assert gens.is_released("acts.g0000000001") and not gens.is_released("acts.g0000000002")
    assert BrokerRetention(KafkaConfig()).topics_to_follow("acts", existing) == ["acts"]


def test_release_ignores_topics_that_are_not_old_generations():
    gens = GenerationRetention(KafkaConfig(generation_seconds=10))
    gens.release({("file:a.npy", 0): 5, ("acts", 0): 3}, {("file:a.npy", 0): 5, ("acts", 0): 3})  # no broker asked
    assert gens.take_released() == set()


def test_lost_logs():
    r = BrokerRetention(KafkaConfig())
    ends = {("t", 0): 0, ("t", 1): 7}
    assert r.lost_logs(ends, {("t", 0): 5, ("t", 1): 3}, {}) == [("t", 0)]  # an empty log where we had read
    assert r.lost_logs(ends, {("t", 1): 3}, {("t", 1): 2}) == []
    assert r.lost_logs(ends, {("t", 1): 3}, {("t", 0): None, ("t", 1): None}) == [("t", 0), ("t", 1)]  # commits gone
    assert r.lost_logs(ends, {("t", 1): 3}, {("t", 0): None, ("t", 1): 2}) == []
