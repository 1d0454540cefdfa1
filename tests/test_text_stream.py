"""The text topic as the one stream producers share (real broker, tiny model): `streamd feed` -> text topic ->
N producer processes in one consumer group -> activation messages carrying their tokens' provenance."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

from streamd.config import FeedConfig, SiteSpec, SourceConfig, StreamdConfig
from streamd.produce.provenance import decode_provenance
from streamd.stream.kafka import make_consumer
from tests.streamd_testing import topic_records, write_config

WORDS = "light water earth seed voice stone river field morning bread house wind".split()
TEXT_TOPIC = "texts"


def corpus(path: Path, n_docs: int) -> list[str]:
    docs = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + (i * 13) % 40)) + f" {i}."
            for i in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


def feed_cfg(kafka, corpus_path: Path, tmp_path: Path, **feed) -> StreamdConfig:
    f = dict(source=SourceConfig(kind="files", paths=[str(corpus_path)]), topic=TEXT_TOPIC, partitions=6,
             metrics_port=0, lock_ttl_seconds=2.0, state_path=tmp_path / "feed.state", max_lag=None)
    f.update(feed)
    return StreamdConfig(kafka=kafka, feed=FeedConfig(**f))


def producer_cfg(kafka, model_dir: Path, pid: str, **producer) -> StreamdConfig:
    p = dict(model_path=str(model_dir), sites=[SiteSpec(site="resid_post", layer=1)], context_length=32,
             batch_size=4, source=dict(kind="kafka", topic=TEXT_TOPIC, idle_exit_seconds=6), producer_id=pid,
             max_message_bytes=4096, torch_threads=1, metrics_port=0, queue_max_messages=16)
    p.update(producer)
    return StreamdConfig(kafka=kafka.model_copy(update={"partitions": 2}), producer=p)


def start(cmd: str, cfg: StreamdConfig, tmp_path: Path, name: str) -> subprocess.Popen:
    path = write_config(cfg, tmp_path / f"{name}.yaml")
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "streamd", cmd, "--config", str(path)], stderr=log, stdout=log)


def log_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()


def wait_assigned(tmp_path: Path, names: list[str], partitions: int, timeout: float = 90) -> None:
    """Until the producers' last assignments together cover every text partition (the group is stable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = {}
        for n in names:
            found = re.findall(r"text partitions (assigned|revoked): \[([\d, ]*)\]", log_of(tmp_path, n))
            if found and found[-1][0] == "assigned" and found[-1][1]:
                last[n] = {int(x) for x in found[-1][1].split(",")}
        if len(last) == len(names) and set().union(*last.values()) == set(range(partitions)) and \
                sum(map(len, last.values())) == partitions:
            return
        time.sleep(0.5)
    raise AssertionError("producers never shared the text topic: " + "".join(log_of(tmp_path, n)[-800:] for n in names))


def activation_provenance(kafka) -> tuple[Counter, Counter, int]:
    """From every activation message: tokens per document id, tokens per (document id, token index), messages."""
    from kafka import TopicPartition

    consumer = make_consumer(kafka, group_id=None)
    parts = [TopicPartition(kafka.topic, p) for p in sorted(consumer.partitions_for_topic(kafka.topic) or [])]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    per_doc, per_token, messages, idle = Counter(), Counter(), 0, 0
    while idle < 4:
        batch = consumer.poll(timeout_ms=500)
        idle = 0 if batch else idle + 1
        for recs in batch.values():
            for r in recs:
                messages += 1
                for part, off, doc, lo, n in decode_provenance(r.headers):
                    assert part >= 0 and off >= 0
                    per_doc[doc] += n
                    for t in range(lo, lo + n):
                        per_token[(doc, t)] += 1
    consumer.close()
    return per_doc, per_token, messages


def expected_counts(model_dir: Path, docs: list[str]) -> Counter:
    tok = AutoTokenizer.from_pretrained(model_dir)
    return Counter({i: len(ids) for i, ids in enumerate(tok(docs, add_special_tokens=False).input_ids)})


def finish(procs: dict[str, subprocess.Popen], tmp_path: Path, timeout: float = 120) -> None:
    for name, p in procs.items():
        try:
            p.wait(timeout=timeout)
        finally:
            p.kill()
        assert p.returncode == 0, log_of(tmp_path, name)[-3000:]


def test_three_producers_divide_the_text_exactly_once(kafka_cfg, tiny_llama_dir, tmp_path):
    docs = corpus(tmp_path / "docs.txt", 150)
    names = ["p0", "p1", "p2"]
    procs = {n: start("produce", producer_cfg(kafka_cfg, tiny_llama_dir, n), tmp_path, n) for n in names}
    from streamd.stream.kafka import ensure_topic

    ensure_topic(kafka_cfg, TEXT_TOPIC, 6)
    wait_assigned(tmp_path, names, 6)
    feeder = start("feed", feed_cfg(kafka_cfg, tmp_path / "docs.txt", tmp_path), tmp_path, "feeder")
    finish({"feeder": feeder}, tmp_path)
    finish(procs, tmp_path)

    per_doc, per_token, _ = activation_provenance(kafka_cfg)
    assert per_doc == expected_counts(tiny_llama_dir, docs)  # (document id, token count) multisets equal
    assert set(per_token.values()) == {1}
    published = [int(re.search(r"published (\d+) tokens", log_of(tmp_path, n)).group(1)) for n in names]
    assert all(published), published  # every producer took a share
    assert json.loads((tmp_path / "feed.state").read_text())["next"] == len(docs)


def test_a_killed_producer_s_documents_are_taken_over(kafka_cfg, tiny_llama_dir, tmp_path):
    docs = corpus(tmp_path / "docs.txt", 400)
    names = ["k0", "k1", "k2"]
    procs = {n: start("produce", producer_cfg(kafka_cfg, tiny_llama_dir, n, source=dict(
        kind="kafka", topic=TEXT_TOPIC, idle_exit_seconds=12)), tmp_path, n) for n in names}
    from streamd.stream.kafka import ensure_topic

    ensure_topic(kafka_cfg, TEXT_TOPIC, 6)
    wait_assigned(tmp_path, names, 6)
    feeder = start("feed", feed_cfg(kafka_cfg, tmp_path / "docs.txt", tmp_path), tmp_path, "feeder")
    time.sleep(4)
    procs["k0"].send_signal(signal.SIGKILL)
    procs["k0"].wait()
    finish({"feeder": feeder}, tmp_path)
    finish({n: procs[n] for n in names[1:]}, tmp_path)

    per_doc, per_token, _ = activation_provenance(kafka_cfg)
    expected = expected_counts(tiny_llama_dir, docs)
    missing = [(d, t) for d, n in expected.items() for t in range(n) if not per_token[(d, t)]]
    assert not missing, f"{len(missing)} tokens never published, e.g. {missing[:5]}"
    duplicates = sum(per_token.values()) - sum(expected.values())
    print(f"duplicate tokens after SIGKILL: {duplicates} of {sum(expected.values())}")
    assert duplicates < 0.5 * sum(expected.values())
    assert "revoked" in log_of(tmp_path, "k1") + log_of(tmp_path, "k2")


def test_two_feeders_started_together_cannot_both_run(kafka_cfg):
    """Both watch the lock topic in silence for the same ttl: the partition's order of their claims decides, so
    exactly one takes the topic and the other refuses naming it (three rounds, each on its own topic)."""
    import threading

    from streamd.stream.text_topic import FeederLock, FeederLockHeld

    for round_ in range(3):
        locks = [FeederLock(kafka_cfg, f"texts-race-{round_}", ttl=2.0) for _ in range(2)]
        outcome: dict[int, object] = {}

        def take(i: int) -> None:
            try:
                locks[i].acquire()
                outcome[i] = "held"
            except FeederLockHeld as e:
                outcome[i] = e

        threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        try:
            held = [i for i, o in outcome.items() if o == "held"]
            assert len(outcome) == 2 and len(held) == 1, outcome
            refused = outcome[1 - held[0]]
            assert locks[held[0]].owner in str(refused) and "claimed it first" in str(refused)
        finally:
            for lock in locks:
                lock.release()


def test_feeder_restart_skips_nothing_and_a_second_feeder_refuses(kafka_cfg, tmp_path):
    n_docs = 60000  # enough that the first feeder is still feeding when the second one has started and refused
    corpus(tmp_path / "docs.txt", n_docs)
    cfg = feed_cfg(kafka_cfg, tmp_path / "docs.txt", tmp_path, commit_every_seconds=0.2)
    first = start("feed", cfg, tmp_path, "feeder1")
    state = tmp_path / "feed.state"
    deadline = time.monotonic() + 60
    while not (state.is_file() and json.loads(state.read_text())["next"] > 500):
        assert time.monotonic() < deadline and first.poll() is None, log_of(tmp_path, "feeder1")[-2000:]
        time.sleep(0.05)
    second = start("feed", cfg, tmp_path, "feeder2")
    assert second.wait(timeout=60) == 1
    assert "another feeder" in log_of(tmp_path, "feeder2")
    assert first.poll() is None, "the first feeder finished before the kill: make the corpus bigger"
    first.send_signal(signal.SIGKILL)
    first.wait()
    resume_at = json.loads(state.read_text())["next"]
    assert 0 < resume_at < n_docs
    finish({"feeder3": start("feed", cfg, tmp_path, "feeder3")}, tmp_path)
    assert f"document {resume_at} of its order" in log_of(tmp_path, "feeder3")

    seen = Counter(int(dict(r.headers)["streamd-doc"]) for r in topic_records(kafka_cfg, TEXT_TOPIC))
    assert set(seen) == set(range(n_docs)), f"skipped: {sorted(set(range(n_docs)) - set(seen))[:10]}"
    resent = [d for d, c in seen.items() if c > 1]
    assert all(d >= resume_at for d in resent)  # nothing acknowledged before the saved position is re-sent
    print(f"feeder restart: resumed at {resume_at}, {len(resent)} documents re-sent")


def test_the_feeder_waits_for_the_producers_and_says_why_when_they_commit_nothing(kafka_cfg, tmp_path, monkeypatch,
                                                                                   caplog):
    """feed.max_lag: with no producer committing, the feeder stops near max_lag documents, is counted as throttled,
    and after a while without a commit says why it may wait (producers down, or max_lag below what they hold); a
    commit by the producers' group lets it go on."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from streamd.produce import feed as feed_mod

    monkeypatch.setattr(feed_mod, "STALL_WARN_SECONDS", 1.0)
    corpus(tmp_path / "docs.txt", 5000)
    feeder = feed_mod.Feeder(feed_cfg(kafka_cfg, tmp_path / "docs.txt", tmp_path, max_lag=40))
    caplog.set_level("WARNING")
    thread = threading.Thread(target=feeder.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while "are the producers running" not in caplog.text.lower():
            assert time.monotonic() < deadline and thread.is_alive(), caplog.text[-2000:]
            time.sleep(0.1)
        held = feeder.fed
        # checked at least every max_lag documents, and a check sees only acknowledged ones: a check passes with up
        # to max_lag in flight, then max_lag more go out before the next
        assert 40 <= held <= 3 * 40 + 1, held
        time.sleep(1.0)
        assert feeder.fed == held  # it stopped
        assert feeder.metrics.throttled.labels(topic=TEXT_TOPIC)._value.get() == 1
        assert "feed.max_lag 40" in caplog.text
        consumer = make_consumer(kafka_cfg, group_id=feeder.group)  # the producers' group commits everything
        try:
            parts = [TopicPartition(TEXT_TOPIC, p) for p in range(6)]
            ends = consumer.end_offsets(parts)
            consumer.commit({tp: OffsetAndMetadata(end + 64, "", -1) for tp, end in ends.items()})
        finally:
            consumer.close()
        while feeder.fed <= held:
            assert time.monotonic() < deadline, f"fed {feeder.fed} after the commit, {held} before"
            time.sleep(0.1)
    finally:
        feeder.stop()
        thread.join(30)
