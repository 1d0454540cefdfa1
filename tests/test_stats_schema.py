"""One schema of per-step statistics (``metrics.STEP_STATS``): the gauges, the history, the progress line, the
status table and the report plots all follow it, so a statistic added or renamed there shows up everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import start_http_server

from streamd.client import report
from streamd.config import KafkaConfig, SAEConfig, TrainerConfig
from streamd.metrics import STEP_STATS, Stat, TrainerMetrics
from streamd.run.history import read_history
from streamd.train import trainer as trainer_mod
from streamd.train.learner import Learner, StepStats
from streamd.train.trainer import Progress, Trainer
from tests.streamd_testing import trainer_config

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def _learner(arch: str) -> Learner:
    t = TrainerConfig(site_id="ab", warmup_tokens=0, device="cpu")
    return Learner(SAEConfig(name=arch, architecture=arch, d_sae=64), 16, t)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_reports_every_schema_stat_and_the_gauges_take_them(arch):
    stats = _learner(arch).step(torch.randn(128, 16, generator=torch.Generator().manual_seed(1)))
    assert isinstance(stats, StepStats)
    assert isinstance(stats._values, torch.Tensor)  # device values until read
    vals = stats.read()
    assert {s.key for s in STEP_STATS} <= set(vals) and "loss_total" in vals
    assert all(isinstance(v, float) or isinstance(v, int) for v in vals.values())
    assert stats.fvu == vals["fvu"] and stats.read() is vals  # read once, cached
    TrainerMetrics([arch], []).observe_step(arch, vals)  # every key is a known gauge or loss term


def test_a_new_statistic_reaches_progress_status_and_report(monkeypatch):
    extra = Stat("l0", "relabelled", "ACTIVE", ".2f", plot="active latents")
    schema = tuple(extra if s.key == "l0" else s for s in STEP_STATS)
    monkeypatch.setattr(trainer_mod, "STEP_STATS", schema)
    monkeypatch.setattr(report, "STEP_STATS", schema)
    vals = {s.key: 0.5 for s in STEP_STATS}
    line = Progress(1024, 10.0, 1.0, {"s": vals}).line()
    assert "ACTIVE 0.50" in line and " L0 " not in line and "FVU 0.500" in line
    assert [c[0] for c in report._curves()] == [s.key for s in schema if s.plot] + ["tokens_per_second"]
    m = TrainerMetrics(["s"], [])
    m.tokens_trained.labels(sae="s").inc(1024)
    m.observe_step("s", {"l0": 7.0})
    server, _ = start_http_server(0, addr="127.0.0.1", registry=m.registry)
    try:
        out = report.status(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    header = next(ln for ln in out.splitlines() if ln.split()[:2] == ["sae", "tokens"])
    assert header.split()[2:] == [s.label for s in schema if s.label]


def test_history_lines_follow_the_schema(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32))
    cfg = trainer_config(KafkaConfig(), tmp_path / "run", every_tokens=None)
    t = Trainer(cfg, activation_file=path, progress_every_s=0.0)
    lines: list[Progress] = []
    t.on_progress = lines.append
    t.run()
    records = read_history(tmp_path / "run")
    assert records and lines
    for rec in records:
        got = rec["saes"]["t"]
        assert {s.key for s in STEP_STATS} <= set(got) and "density_histogram" in got
    final = records[-1]["saes"]["t"]
    assert final["step"] == t.learners["t"].steps and final["l0"] == pytest.approx(4.0)
    assert lines[-1].saes["t"]["fvu"] == final["fvu"]
