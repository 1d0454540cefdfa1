"""A new architecture is one file (tests/toy_arch.py) plus one registry line: it is configured, trained by the
trainer from an activation file, checkpointed, reported in metrics, and loaded back with ``streamd.load_sae``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

import streamd
from streamd.config import ConfigError, KafkaConfig, SAEConfig, StreamdConfig, load_config
from streamd.sae import ARCHITECTURES, register, unregister
from streamd.train.trainer import Trainer
from tests.streamd_testing import random_acts, trainer_config
from tests.toy_arch import FloorTopKConfig, FloorTopKSAE


@pytest.fixture
def floortopk():
    register(FloorTopKConfig)  # the registry line
    yield FloorTopKConfig
    unregister("floortopk")  # the other tests see the built-in architectures only


def test_toy_architecture_configures_from_yaml_values(floortopk):
    cfg = load_config(sets=["trainer.saes=[{name: toy, architecture: floortopk, k: 3, floor: 0.1}, {name: plain}]"])
    toy, plain = cfg.trainer.saes
    assert type(toy) is FloorTopKConfig and (toy.k, toy.floor) == (3, 0.1)
    assert plain.architecture == "topk"
    assert StreamdConfig(**cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ConfigError, match=r"floor is not a field of architecture topk \(it belongs to floortopk\)"):
        load_config(sets=["trainer.saes=[{name: x, architecture: topk, floor: 0.1}]"])
    assert SAEConfig(name="y", architecture="floortopk").learning_rate(16) == 1e-3


def test_unregistered_architecture_is_a_config_error():
    assert "floortopk" not in ARCHITECTURES
    with pytest.raises(ConfigError, match="architecture 'floortopk' is not registered; expected one of relu, topk"):
        load_config(sets=["trainer.saes=[{name: x, architecture: floortopk}]"])


def test_toy_architecture_trains_checkpoints_and_loads_back(floortopk, tmp_path: Path):
    path = tmp_path / "acts.npy"
    np.save(path, random_acts(2048, 16, seed=3).numpy())
    saes = [SAEConfig(name="toy", architecture="floortopk", expansion_factor=4, k=4, floor=0.05),
            SAEConfig(name="ref", architecture="topk", expansion_factor=4, k=4)]
    cfg = trainer_config(KafkaConfig(), tmp_path / "run", saes=saes, every_tokens=None)
    t = Trainer(cfg, activation_file=path)
    assert t.run() > 0
    learner = t.learners["toy"]
    assert isinstance(learner.sae, FloorTopKSAE) and learner.base_lr == 1e-3 and learner.steps > 0
    metrics = generate_latest(t.metrics.registry).decode()
    assert 'streamd_loss{sae="toy",term="below_floor"}' in metrics  # the architecture's own metric label
    assert 'streamd_loss{sae="toy",term="auxk"}' in metrics

    loaded = streamd.load_sae(str(tmp_path / "run"), sae="toy")
    assert type(loaded) is FloorTopKSAE and (loaded.cfg.k, loaded.cfg.floor) == (4, 0.05)
    x = random_acts(256, 16, seed=4)
    with torch.no_grad():
        f_trained = learner.sae.encode(x * t.scale)
        f = loaded.encode(x)
        assert f.count_nonzero() > 0
        torch.testing.assert_close(f, f_trained, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x), learner.sae(x * t.scale) / t.scale, rtol=1e-4, atol=1e-5)
