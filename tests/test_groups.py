"""Every run has its own consumer group (issue 13): derived from the run directory unless given, recorded there on
the first start and kept on resume."""

from __future__ import annotations

import numpy as np

from streamd.config import CheckpointConfig, MetricsConfig, SAEConfig, StreamdConfig, TrainerConfig
from streamd.identity import run_group_id
from streamd.train.trainer import Trainer


def test_a_group_is_derived_per_run_and_kept(tmp_path):
    a, b = tmp_path / "one" / "default", tmp_path / "two" / "default"  # alike names, e.g. two hosts' runs/default
    ga, gb = run_group_id(a), run_group_id(b)
    assert ga != gb and ga.startswith("streamd-default-") and gb.startswith("streamd-default-")
    assert run_group_id(a) == ga == (a / "group_id").read_text().strip()  # resumed: the recorded one
    assert run_group_id(a, "given") == "given" and run_group_id(a) == "given"  # a given group wins, and sticks


def test_the_trainer_uses_and_records_its_run_group(tmp_path):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((512, 8)).astype(np.float32))

    def trainer(run: str) -> Trainer:
        tcfg = TrainerConfig(run_dir=tmp_path / run, buffer_tokens=64, batch_size=32, eval_tokens=0, torch_threads=1,
                             saes=[SAEConfig(name="s", architecture="topk", expansion_factor=2, k=2)])
        return Trainer(StreamdConfig(trainer=tcfg, metrics=MetricsConfig(port=0),
                                     checkpoints=CheckpointConfig(every_tokens=None, every_seconds=None)),
                       activation_file=acts, loop_file=True)

    groups = []
    for run in ("r1", "r2", "r1"):
        t = trainer(run)
        groups.append(t.tcfg.group_id)
        t.server.stop()
        t.lock.release()
    assert groups[0] != groups[1] and groups[0] == groups[2]
    assert (tmp_path / "r1" / "group_id").read_text().strip() == groups[0]


def test_group_offsets_reads_other_groups_commits_from_the_broker(broker):
    from kafka import OffsetAndMetadata, TopicPartition

    from streamd.stream.kafka import ensure_topic, group_offsets, make_consumer

    cfg = broker.config(topic="grp", partitions=2)
    ensure_topic(cfg)
    for group, off in (("mine", 5), ("theirs", 2)):
        c = make_consumer(cfg, group_id=group)
        c.commit({TopicPartition("grp", 1): OffsetAndMetadata(off, "", -1)})
        c.close()
    assert group_offsets(cfg, exclude="mine") == {"theirs": {("grp", 1): 2}}
