"""The retention strategies' pure parts: topic names, the topics to follow, lost-log judgement (no broker)."""

from streamd.config import KafkaConfig
from streamd.stream.retention import BrokerRetention, GenerationRetention, TopicIdentity, retention_for

FAST = dict(delivery_timeout_ms=5000, clock_skew_seconds=2)  # a generation grace of 7 s: 10 s generations are valid


def test_strategy_is_chosen_from_the_config():
    assert isinstance(retention_for(KafkaConfig()), BrokerRetention)
    assert isinstance(retention_for(KafkaConfig(generation_seconds=10, **FAST)), GenerationRetention)


def test_topic_names():
    broker, gens = BrokerRetention(KafkaConfig()), GenerationRetention(KafkaConfig(generation_seconds=10, **FAST))
    assert broker.topic_for("acts", 1234.0) == "acts" == broker.base_topic("acts")
    assert gens.topic_for("acts", 1234.0) == "acts.g0000000123"
    assert gens.base_topic("acts.g0000000123") == "acts" and gens.base_topic("acts") == "acts"
    assert not broker.rotates and gens.rotates


def test_topics_to_follow_skip_other_bases_and_released_ones():
    gens = GenerationRetention(KafkaConfig(generation_seconds=10, **FAST))
    existing = ["acts.g0000000001", "acts.g0000000002", "acts", "other.g0000000001", "acts.g1"]
    assert gens.topics_to_follow("acts", existing) == ["acts.g0000000001", "acts.g0000000002"]
    gens._released.add("acts.g0000000001")
    assert gens.topics_to_follow("acts", existing) == ["acts.g0000000002"]
    assert gens.is_released("acts.g0000000001") and not gens.is_released("acts.g0000000002")
    assert BrokerRetention(KafkaConfig()).topics_to_follow("acts", existing) == ["acts"]


def test_release_ignores_topics_that_are_not_old_generations():
    gens = GenerationRetention(KafkaConfig(generation_seconds=10, **FAST))
    gens.release({("file:a.npy", 0): 5, ("acts", 0): 3}, {("file:a.npy", 0): 5, ("acts", 0): 3})  # no broker asked
    assert gens.take_released() == set()


def test_lost_logs():
    r = BrokerRetention(KafkaConfig())
    ends = {("t", 0): 0, ("t", 1): 7}
    assert r.lost_logs(ends, {("t", 0): 5, ("t", 1): 3}, {}) == [("t", 0)]  # an empty log where we had read
    assert r.lost_logs(ends, {("t", 1): 3}, {("t", 1): 2}) == []
    assert r.lost_logs(ends, {("t", 1): 3}, {("t", 0): None, ("t", 1): None}) == [("t", 0), ("t", 1)]  # commits gone
    assert r.lost_logs(ends, {("t", 1): 3}, {("t", 0): None, ("t", 1): 2}) == []
    assert r.lost_logs(ends, {("t", 0): 5, ("t", 1): 3}, {}, recreated={"t"}) == [("t", 0), ("t", 1)]  # new topic id


def test_topic_identity_tells_a_topic_created_again_under_its_name():
    ident = TopicIdentity()
    assert ident.changed({"t": "id-1", "u": None}) == set()  # first sight; a topic without an id is not judged
    assert ident.confirmed("t", "id-1") and ident.confirmed("u", None)
    assert ident.changed({"t": None}) == set() and not ident.confirmed("t", None)  # gone: no commits, judged later
    assert ident.changed({"t": "id-2"}) == {"t"}  # back with a new log
    assert ident.confirmed("t", "id-2") and not ident.confirmed("t", "id-1")
    assert ident.changed({"t": "id-2"}) == set()
    ident.forget(["t"])  # deleted on purpose: the next one is judged afresh
    assert ident.changed({"t": "id-3"}) == set()


# --- generation grace, other groups, re-created topics (issue 13) ------------------------------------------------

import pytest  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from streamd.cli import UP_DEFAULTS  # noqa: E402
from streamd.stream import retention as retention_mod  # noqa: E402

T = "acts.g0000000001"  # generation 1 of 10 s: ends at t=20 on the trainer's clock


def test_generation_seconds_must_outlast_the_delivery_timeout_and_clock_skew():
    with pytest.raises(ValidationError, match="generation grace"):
        KafkaConfig(generation_seconds=120)  # equal to kafka-python's delivery timeout: no room for skew
    assert KafkaConfig().generation_grace_seconds == 150  # 120 s delivery timeout + 30 s skew
    KafkaConfig(generation_seconds=150)
    KafkaConfig(generation_seconds=UP_DEFAULTS["kafka.generation_seconds"])  # what `up` uses is valid
    KafkaConfig(generation_seconds=5, delivery_timeout_ms=3000, clock_skew_seconds=2)


def _gens(monkeypatch, ends, groups=None, group_id="mine"):
    gens = GenerationRetention(KafkaConfig(generation_seconds=10, **FAST), group_id)
    asked = {}
    monkeypatch.setattr(retention_mod, "end_offsets", lambda cfg, topics: {k: v for k, v in ends.items()
                                                                          if k[0] in topics})
    monkeypatch.setattr(retention_mod, "group_offsets",
                        lambda cfg, exclude=None: asked.setdefault("exclude", exclude) and dict(groups or {}))
    monkeypatch.setattr(retention_mod, "delete_topic", lambda cfg, topic: None)
    return gens, asked


def test_release_waits_out_the_grace_on_the_trainers_clock(monkeypatch):
    gens, asked = _gens(monkeypatch, {(T, 0): 3})
    done = {(T, 0): 3}
    gens.clock = lambda: 26.9  # generation 1 ended at 20; grace 5 s + 2 s
    gens.release(done, done)
    assert gens.take_released() == set()
    gens.clock = lambda: 27.0
    gens.release(done, done)
    assert gens.take_released() == {T}
    assert asked["exclude"] == "mine"  # our own group never holds a release back


def test_release_waits_for_every_other_group_reading_the_stream(monkeypatch):
    ends = {(T, 0): 3, (T, 1): 2}
    done = dict(ends)
    groups = {"other-run": {(T, 0): 3, (T, 1): 1},  # behind on partition 1
              "unrelated": {("else.g0000000001", 0): 0}}  # reads another stream: ignored
    gens, _ = _gens(monkeypatch, ends, groups)
    gens.clock = lambda: 100.0
    gens.release(done, done)
    assert gens.take_released() == set()
    groups["other-run"][(T, 1)] = 2
    groups["late-run"] = {("acts.g0000000002", 0): 4}  # reads this stream, has not committed T at all
    gens.release(done, done)
    assert gens.take_released() == set()
    del groups["late-run"]
    gens.release(done, done)
    assert gens.take_released() == {T}


def test_a_deleted_generation_that_comes_back_is_followed_again(monkeypatch):
    gens, _ = _gens(monkeypatch, {(T, 0): 3})
    gens.clock = lambda: 100.0
    gens.release({(T, 0): 3}, {(T, 0): 3})
    assert gens.delete(gens.take_released()) == 1
    assert gens.topics_to_follow("acts", ["acts.g0000000005"]) == ["acts.g0000000005"]
    assert gens.take_recreated() == set()
    # a late record re-created it: followed again, reported once, and no longer released
    assert gens.topics_to_follow("acts", [T, "acts.g0000000005"]) == [T, "acts.g0000000005"]
    assert gens.take_recreated() == {T} and gens.take_recreated() == set()
    assert not gens.is_released(T)
    # released again once read (here: re-created empty, nothing to read), without a position of ours
    monkeypatch.setattr(retention_mod, "end_offsets", lambda cfg, topics: {(T, 0): 0})
    gens.release({}, {})
    assert gens.take_released() == {T}
