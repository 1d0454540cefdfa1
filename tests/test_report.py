"""Metrics history on disk (bounded, ordered, robust to a torn line), the PNG report, and `streamd status` against a
live /metrics endpoint."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import start_http_server

from streamd.run.history import FILENAME, MetricsHistory, read_history
from streamd.metrics import DENSITY_BUCKETS, TrainerMetrics
from streamd.client.report import status, write_report


def record(i: int, saes=("topk-k32", "relu-l1")) -> dict:
    """A synthetic history record in the trainer's format, with curves that move (so plots are not empty)."""
    hist = dict.fromkeys(DENSITY_BUCKETS, 0.0)
    hist.update({"-4.0": 0.2, "-3.0": 0.5, "-2.0": 0.2, "never": 0.1})
    return {
        "time": 1.7e9 + i, "tokens": 4096 * (i + 1), "tokens_per_second": 1000.0 + 10 * math.sin(i), "buffer_fill": 1.0,
        "saes": {name: {"l0": 32.0 + j + 5 * math.exp(-i / 20), "fvu": 0.9 * math.exp(-i / 30) + 0.05 * (j + 1),
                        "mse": 0.01, "loss": 0.02, "dead_fraction": min(0.5, i / 200), "dense_fraction": 0.01,
                        "lr": 2e-4, "density_histogram": hist}
                 for j, name in enumerate(saes)},
    }


def test_history_rotation_is_bounded_and_ordered(tmp_path):
    h = MetricsHistory(tmp_path / FILENAME, max_bytes=10_000)
    for i in range(200):
        h.append(record(i))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [FILENAME, FILENAME + ".1"]  # exactly one rotated file is kept
    for name in files:
        assert (tmp_path / name).stat().st_size <= 10_000
    got = read_history(tmp_path)
    tokens = [r["tokens"] for r in got]
    assert tokens == sorted(tokens) and tokens[-1] == record(199)["tokens"]
    assert tokens == [4096 * (i + 1) for i in range(200 - len(got), 200)]  # a contiguous tail, nothing lost within
    assert len(got) < 200


def test_history_survives_torn_line_and_non_finite_values(tmp_path):
    h = MetricsHistory(tmp_path / FILENAME, max_bytes=1_000_000)
    bad = record(0)
    bad["saes"]["topk-k32"]["fvu"] = float("nan")
    h.append(bad)
    h.append(record(1))
    with open(tmp_path / FILENAME, "a") as f:
        f.write('{"time": 1.7e9, "tokens": 9')  # crash mid-write
    got = read_history(tmp_path)
    assert [r["tokens"] for r in got] == [4096, 8192]
    assert got[0]["saes"]["topk-k32"]["fvu"] is None
    assert read_history(tmp_path / "missing") == []


def test_a_write_cut_short_by_a_full_disk_is_removed(tmp_path, monkeypatch):
    """ENOSPC after part of a line: the part is cut off again, so the next record is not glued onto a torn one."""
    import errno
    import os

    from streamd.run import history

    h = MetricsHistory(tmp_path / FILENAME, max_bytes=1_000_000)
    h.append(record(0))
    real_write, calls = os.write, {"n": 0}

    def half_then_full(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(history.os, "write", half_then_full)
    with pytest.raises(OSError):
        h.append(record(1))
    monkeypatch.setattr(history.os, "write", real_write)
    h.append(record(2))
    assert [r["tokens"] for r in read_history(tmp_path)] == [4096, 3 * 4096]


def test_report_writes_plots(tmp_path):
    run = tmp_path / "run"
    h = MetricsHistory(run / FILENAME, max_bytes=1_000_000)
    for i in range(120):
        h.append(record(i))
    paths = write_report(run, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["dead_fraction.png", "feature_density.png", "fvu.png", "l0.png", "tokens_per_second.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p


def test_report_without_history_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path, tmp_path / "out")


def test_status_reads_a_live_trainer():
    m = TrainerMetrics(["topk-k32", "relu-l1"], ["decode", "magic"], version="1.2.3")
    m.tokens_trained.labels(sae="topk-k32").inc(123_456)
    m.tokens_trained.labels(sae="relu-l1").inc(123_456)
    m.tokens_per_second.set(2048)
    m.observe_step("topk-k32", {"l0": 32.0, "fvu": 0.125, "dead_fraction": 0.015625, "step": 30})
    m.buffer_fill_ratio.set(0.75)
    m.consumer_lag.labels(topic="t", partition="0").set(3)
    m.consumer_lag.labels(topic="t", partition="1").set(4)
    m.messages_rejected.labels(reason="magic").inc(2)
    m.checkpoint_last_success.set(time.time() - 42)
    m.training_ready.set(1)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=m.registry)
    try:
        out = status(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert "version 1.2.3" in out and "training ready" in out
    assert "tokens trained   123,456" in out and "tokens/s 2,048" in out
    assert "buffer fill      75%" in out
    assert "consumer lag     7 messages" in out
    assert "magic=2" in out and "decode" not in out
    assert "4" in out.split("last checkpoint")[1].split("s ago")[0]  # 42 or 43 s
    row = next(line for line in out.splitlines() if line.strip().startswith("topk-k32"))
    assert row.split()[1:] == ["123,456", "30", "32", "0.125", "0.01562"]


def test_status_before_training_and_before_any_checkpoint():
    m = TrainerMetrics(["s"], [])
    server, _ = start_http_server(0, addr="127.0.0.1", registry=m.registry)
    try:
        out = status(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert "not ready" in out and "last checkpoint  never" in out and "rejected         none" in out
