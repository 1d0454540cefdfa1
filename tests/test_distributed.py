"""Data-parallel training against a real local broker: ranks are processes (gloo on the CPU), started by
``streamd train --world-size N`` or by hand with RANK / WORLD_SIZE and the rendezvous file in the environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch

from streamd.config import SAEConfig, TrainerConfig
from streamd.run.checkpoints import CheckpointStore
from streamd.stream.kafka import group_offsets
from streamd.train.distributed import Collective
from streamd.train.launch import rank_env
from streamd.train.learner import Learner
from tests.streamd_testing import check_offsets_exact, publish, random_acts, topic_messages, trace_counts, \
    trainer_config, write_config

TIMEOUT_S = 10.0  # the collective timeout in these tests
SAES = [  # the sparse step, BatchTopK (its threshold is agreed on) and a dense architecture
    SAEConfig(name="topk", architecture="topk", expansion_factor=4, k=4),
    SAEConfig(name="btk", architecture="batchtopk", expansion_factor=4, k=4),
    SAEConfig(name="relu", architecture="relu", expansion_factor=4),
]


def _train(cfg_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamd", "train", "--config", str(cfg_path), *args],
                          capture_output=True, text=True, timeout=timeout)


def _rank_traces(trace: Path) -> list[Path]:
    """Rank 0's trace under the configured name, rank r's as ``NAME.rankR.jsonl``."""
    return [trace] + sorted(trace.parent.glob(f"{trace.stem}.rank*{trace.suffix}"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _merged(traces: list[Path], upto_tokens: int | None = None) -> Counter:
    out: Counter = Counter()
    for t in traces:
        out.update(trace_counts(t, upto_tokens))
    return out


def _final_offsets(run: Path, topic: str) -> tuple[int, dict[int, int]]:
    store = CheckpointStore(run, 2, writer=False)
    latest = store.latest()
    return json.loads((latest / "manifest.json").read_text())["tokens"], store.read_offsets(latest)[topic]


def _learners(collective: Collective | None) -> list[Learner]:
    tcfg = TrainerConfig(batch_size=128, buffer_tokens=1024, warmup_tokens=0, dead_window_tokens=200, device="cpu")
    # not BatchTopK: it keeps the top k x B of each rank's batch, not of the union (README, data-parallel)
    out = [Learner(s, 16, tcfg, "cpu", collective) for s in SAES if s.architecture != "batchtopk"]
    for learner in out:
        learner.b_dec_initialized = True  # a per-rank geometric median is not the union's: compared apart
    return out


def _batches() -> list[torch.Tensor]:
    return [random_acts(128, 16, seed=10 + i) * 2 for i in range(4)]


def _rank_steps(rank: int, rendezvous: Path, out: Path) -> None:
    """One rank of two: 96 and 32 tokens of each batch (unequal, so the token weighting shows); at step 1 rank 1
    brings nothing (a zero-weight step)."""
    os.environ.update(rank_env(rank, 2, rendezvous))
    torch.set_num_threads(1)
    coll = Collective(torch.device("cpu"), TIMEOUT_S)
    learners = _learners(coll)
    for step, x in enumerate(_batches()):
        part = (x, x[:0])[rank] if step == 1 else (x[:96], x[96:])[rank]
        for learner in learners:
            learner.step(part, len(x))
    if rank == 0:
        torch.save([lr.state_dict() for lr in learners], out)
    coll.close()


def test_two_ranks_step_as_one_process_on_the_union_of_their_batches(tmp_path):
    """The token-weighted all-reduce is the gradient of the mean loss over both ranks' tokens: two ranks with
    unequal shares (and a zero-weight step) end where one process stepping on the whole batches does, and their
    counters (fires, dead latents, tokens, statistics windows) are the same."""
    torch.multiprocessing.spawn(_rank_steps, args=(tmp_path / "rendezvous", tmp_path / "dp.pt"), nprocs=2)
    parallel = torch.load(tmp_path / "dp.pt")
    single = _learners(None)
    for x in _batches():
        for learner in single:
            learner.step(x)
    for got, learner in zip(parallel, single):
        want = learner.state_dict()
        assert got["tokens_seen"] == want["tokens_seen"] == 512 and got["steps"] == 4
        for key in ("since_fired", "window_fires"):
            assert torch.equal(got[key], want[key]), (learner.cfg.name, key)
        for key, v in want["sae"].items():
            assert torch.allclose(got["sae"][key].double(), v.double(), rtol=1e-4, atol=1e-6), (
                learner.cfg.name, key)
        assert torch.allclose(got["stats_window"]["ring"], want["stats_window"]["ring"], rtol=1e-5)


def _kafka(broker, partitions: int):
    return broker.config(topic=f"test-{uuid.uuid4().hex[:12]}", partitions=partitions, session_timeout_ms=6000)


@pytest.mark.parametrize("partitions,ranks", [(5, 2), (2, 3)])  # uneven shares; an idle rank (CI time: not 4/2)
def test_ranks_train_one_sae_with_equal_weights_and_every_token_once(broker, tmp_path, partitions, ranks):
    """Every rank's weights are bitwise equal after every step; every message below the final checkpoint's offsets
    was trained once (by one rank), none twice; uneven partition counts and an idle rank (3 ranks, 2 partitions)
    neither deadlock nor stop the others."""
    kafka = _kafka(broker, partitions)
    publish(kafka, random_acts(20_000, 16, seed=1), tokens_per_msg=50, partitions=partitions)
    run = tmp_path / "run"
    cfg = trainer_config(kafka, run, every_tokens=2048, trace_file=run / "trace.jsonl", max_tokens=10_240,
                         collective_timeout_seconds=TIMEOUT_S, max_token_age_buffers=2, group_id="dp", saes=SAES)
    done = _train(write_config(cfg, tmp_path / "c.yaml"), "--world-size", str(ranks))
    assert done.returncode == 0, done.stderr[-3000:]

    traces = _rank_traces(run / "trace.jsonl")
    assert len(traces) == ranks
    lines = [_lines(t) for t in traces]
    assert all(len(r) == len(lines[0]) for r in lines), [len(r) for r in lines]
    for step, per_rank in enumerate(zip(*lines)):
        assert len({r["tokens"] for r in per_rank}) == 1, f"step {step}: token counts differ {per_rank}"
        assert len({r["params"] for r in per_rank}) == 1, f"step {step}: the ranks' weights differ"
    tokens, offsets = _final_offsets(run, kafka.topic)
    assert tokens == lines[0][-1]["tokens"] >= 10_240
    served = [trace_counts(t) for t in traces]
    readers = {r for r in range(ranks) if any(p % ranks == r for p in range(partitions))}
    assert {r for r in range(ranks) if served[r]} == readers  # every rank with a partition trained, the idle none
    for r, counts in enumerate(served):  # each partition is read by one rank
        assert {p for _, p, _ in counts} <= {p for p in range(partitions) if p % ranks == r}
    below = check_offsets_exact(topic_messages(kafka), offsets, _merged(traces), kafka.topic)
    assert below > 40
    # rank 0 committed every partition's offset to the group, those of the other ranks' partitions included
    committed = group_offsets(kafka)["dp"]
    assert {p: committed[(kafka.topic, p)] for p in range(partitions)} == offsets


def test_sigkill_of_a_rank_stops_the_other_and_restarts_lose_nothing(broker, tmp_path):
    """Ranks started by hand (RANK / WORLD_SIZE, as torchrun or --world-size do). SIGKILL rank 1: rank 0 stops with
    a clear error within the collective
    timeout, its last checkpoint on disk; a restart with 1 rank and then with 2 leaves nothing below the final
    offsets untrained, and trains nothing twice that a checkpoint had covered."""
    kafka = _kafka(broker, 4)
    # twice what the three runs train: Tansu reports a partition's end below its last batch (132 for 150 records
    # here), and a resume offset past that end is read again from the earliest (kafka_source: a lost log)
    publish(kafka, random_acts(60_000, 16, seed=2), tokens_per_msg=50, partitions=4)
    messages = topic_messages(kafka)
    run = tmp_path / "run"

    def config(name: str, **kw) -> Path:
        cfg = trainer_config(kafka, run, trace_file=run / f"{name}.jsonl", collective_timeout_seconds=TIMEOUT_S,
                             max_token_age_buffers=2, **kw)
        return write_config(cfg, tmp_path / f"{name}.yaml")

    cfg1 = config("run1", every_tokens=2048)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "streamd", "train", "--config", str(cfg1)], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, env=rank_env(r, 2, tmp_path / "rendezvous")) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:] if procs[0].poll() else ""
            assert time.monotonic() < deadline, "the first run made no checkpoint"
            ck = (run / "checkpoints" / "latest").exists() and _final_offsets(run, kafka.topic)[0]
            trace = run / "run1.jsonl"
            if ck and ck >= 6000 and trace.exists() and _lines(trace)[-1]["tokens"] > ck:
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        err = procs[0].communicate(timeout=TIMEOUT_S + 30)[1]
        stopped_s = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0
    assert "rank 0 of 2" in err and "failed" in err, err[-3000:]
    assert stopped_s < TIMEOUT_S + 20
    ck_tokens, ck_offsets = _final_offsets(run, kafka.topic)

    def durable(traces: list[Path], offsets: dict[int, int], upto: int | None = None) -> Counter:
        """A run's work that its last checkpoint covers: below that checkpoint's offsets."""
        c = _merged(traces, upto)
        return Counter({k: n for k, n in c.items() if k[2] < offsets[k[1]]})

    trained = durable(_rank_traces(run / "run1.jsonl"), ck_offsets, ck_tokens)
    previous = ck_offsets
    for name, ranks in (("run2", 1), ("run3", 2)):
        done = _train(config(name, every_tokens=None, max_tokens=_final_offsets(run, kafka.topic)[0] + 6144),
                      "--world-size", str(ranks))
        assert done.returncode == 0, done.stderr[-3000:]
        now = _merged(_rank_traces(run / f"{name}.jsonl"))
        again = [k for k in now if k[2] < previous[k[1]]]
        assert not again, f"{name} trained messages its checkpoint had covered: {again[:5]}\n{done.stderr[-3000:]}"
        previous = _final_offsets(run, kafka.topic)[1]
        trained.update(durable(_rank_traces(run / f"{name}.jsonl"), previous))
    assert check_offsets_exact(messages, previous, trained, kafka.topic) > 150


def test_data_parallel_refuses_generations_and_files(tmp_path, kafka_cfg):
    cfg = trainer_config(kafka_cfg.model_copy(update={"generation_seconds": 200}), tmp_path / "run")
    done = _train(write_config(cfg, tmp_path / "c.yaml"), "--world-size", "2", timeout=60)
    assert done.returncode == 2 and "kafka.generation_seconds" in done.stderr and "one rank" in done.stderr
    cfg = trainer_config(kafka_cfg, tmp_path / "run")
    done = _train(write_config(cfg, tmp_path / "c.yaml"), "--world-size", "2", "--source", str(tmp_path / "a.npy"),
                  timeout=60)
    assert done.returncode == 2 and "a cached file is trained by one process" in done.stderr
    done = _train(tmp_path / "c.yaml", "--world-size", "0", timeout=60)
    assert done.returncode == 2 and "'0' is not a number of ranks" in done.stderr


def test_a_sweep_in_two_runs_each_reads_the_whole_stream(broker, tmp_path):
    """Scale-out without all-reduce: two trainer processes, each its own run (and so its own consumer group), each
    training its part of a sweep on the whole stream, concurrently."""
    kafka = _kafka(broker, 4)
    publish(kafka, random_acts(8000, 16, seed=3), tokens_per_msg=50, partitions=4)
    messages = topic_messages(kafka)
    runs = {}
    for k in (4, 8):
        run = tmp_path / f"k{k}"
        cfg = trainer_config(kafka, run, every_tokens=None, trace_file=run / "trace.jsonl", max_tokens=6144,
                             max_token_age_buffers=2, saes=[SAEConfig(name=f"topk-k{k}", architecture="topk",
                                                                      expansion_factor=4, k=k)])
        runs[run] = subprocess.Popen([sys.executable, "-m", "streamd", "train", "--config",
                                      str(write_config(cfg, tmp_path / f"k{k}.yaml"))],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for run, proc in runs.items():
        assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
    groups = {(run / "group_id").read_text().strip() for run in runs}
    assert len(groups) == 2
    for run in runs:
        tokens, offsets = _final_offsets(run, kafka.topic)
        assert tokens == 6144 and (run / "checkpoints" / "latest").exists()
        # each run saw every partition and trained its prefix of the whole stream, not a share of it
        assert check_offsets_exact(messages, offsets, trace_counts(run / "trace.jsonl"), kafka.topic) > 40
        assert {p for _, p, _ in trace_counts(run / "trace.jsonl")} == {0, 1, 2, 3}


def test_sigterm_to_the_launcher_stops_every_rank_with_a_final_checkpoint(broker, tmp_path):
    """``--world-size`` passes SIGTERM on; the ranks agree to stop at the same step and write one final checkpoint
    of everything trained. Time-based checkpoints (each rank's clock says when) are agreed on, not deadlocked.
    Rank 0 serves the run's metrics, with its world size."""
    kafka = _kafka(broker, 2)
    publish(kafka, random_acts(6000, 16, seed=4), tokens_per_msg=50, partitions=2)
    run = tmp_path / "run"
    cfg = trainer_config(kafka, run, every_tokens=None, trace_file=run / "trace.jsonl",
                         collective_timeout_seconds=TIMEOUT_S)
    cfg.checkpoints.every_seconds = 0.3
    proc = subprocess.Popen([sys.executable, "-m", "streamd", "train", "--config",
                             str(write_config(cfg, tmp_path / "c.yaml")), "--world-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[1]  # "metrics: URL  checkpoints: DIR", from rank 0 only
        assert 'streamd_world_size 2.0' in urllib.request.urlopen(url, timeout=10).read().decode()
        deadline = time.monotonic() + 120
        while not ((run / "trace.jsonl").exists() and _lines(run / "trace.jsonl")[-1:]
                   and (run / "checkpoints" / "latest").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    lines = [_lines(t) for t in _rank_traces(run / "trace.jsonl")]
    assert len(lines) == 2 and lines[0] == [{**r, "served": r0["served"]} for r, r0 in zip(lines[1], lines[0])]
    tokens, _ = _final_offsets(run, kafka.topic)
    assert tokens == lines[0][-1]["tokens"] > 0
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert int(latest[:6]) >= 2  # a time-based checkpoint before the final one


# rank 0's store fails its first checkpoint (ENOSPC from the one place it writes bytes), then works again
_FAIL_FIRST_CHECKPOINT = """
import errno, os, sys
from streamd.run import checkpoints
real, failed = checkpoints.write_bytes, []
def write_bytes(path, data):
    if os.environ["RANK"] == "0" and not failed:
        failed.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")
    real(path, data)
checkpoints.write_bytes = write_bytes
from streamd.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def test_a_checkpoint_that_failed_on_rank_0_is_written_when_its_back_off_ends(broker, tmp_path):
    """Only rank 0 knows that a checkpoint failed; it says so at the next step exchange, and the ranks write it as
    soon as the back-off is over, not at the next due time (as the one-process loop keeps a failed one due)."""
    kafka = _kafka(broker, 2)
    publish(kafka, random_acts(16_000, 16, seed=5), tokens_per_msg=50, partitions=2)
    run = tmp_path / "run"
    cfg = trainer_config(kafka, run, every_tokens=4096, max_tokens=12_288, collective_timeout_seconds=TIMEOUT_S,
                         checkpoints={"retry_seconds": 1e-3, "retry_max_seconds": 1e-3})
    cfg.checkpoints.keep_last = 10
    path = write_config(cfg, tmp_path / "c.yaml")
    procs = [subprocess.Popen([sys.executable, "-c", _FAIL_FIRST_CHECKPOINT, str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=rank_env(r, 2, tmp_path / "rendezvous"))
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "checkpoint at 4096 tokens failed" in errs[0]
    store = CheckpointStore(run, 10, writer=False)
    written = sorted(c.tokens for c in store.list())
    # the one that failed at 4096 is written a step later, before the next one is due at 8192
    assert any(4096 < t < 8192 for t in written), written
    assert written[-1] == 12_288
