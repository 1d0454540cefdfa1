"""SAE configs per architecture: each architecture's own parameters, chosen by ``architecture`` through the registry;
config loading imports no torch; the examples and deployed configs load unchanged; dumps round-trip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamd.config import ConfigError, SAEConfig, StreamdConfig, load_config
from streamd.sae import ARCHITECTURES, inference_architectures, loss_term_label

ROOT = Path(__file__).resolve().parents[1]


def test_config_loading_imports_no_torch():
    code = ("import sys, streamd.config as c; "
            "c.load_config(sets=['trainer.saes=[{name: a, architecture: relu}, {name: b, architecture: jumprelu}]']); "
            "import streamd.sae, streamd.metrics; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", "import streamd.config, sys; assert 'torch' not in sys.modules"], check=True)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_architecture_selects_the_config_class_and_defaults_to_topk():
    assert [type(SAEConfig(name="x", architecture=a)).__name__ for a in ARCHITECTURES] == [
        "ReLUConfig", "TopKConfig", "BatchTopKConfig", "JumpReLUConfig"]
    plain = SAEConfig(name="x")
    assert plain.architecture == "topk" and plain.k == 32
    assert SAEConfig.model_validate({"name": "y", "architecture": "relu"}).l1_coefficient == 5.0
    for arch, cls in ARCHITECTURES.items():  # the common fields on every architecture
        c = cls(name="z", expansion_factor=2, lr=1e-3, seed=4, grad_clip=0.5)
        assert (c.width(8), c.learning_rate(8), c.seed, c.grad_clip, c.d_sae) == (16, 1e-3, 4, 0.5, None), arch


def test_a_field_of_another_architecture_is_an_error_naming_it():
    with pytest.raises(ConfigError) as e:
        load_config(sets=["trainer.saes=[{name: x, architecture: topk, l1_coefficient: 3}]"])
    assert "trainer.saes.0: " in str(e.value)
    assert "l1_coefficient is not a field of architecture topk (it belongs to relu)" in str(e.value)
    with pytest.raises(ConfigError, match=r"k is not a field of architecture jumprelu \(it belongs to topk, batchtopk\)"):
        load_config(sets=["trainer.saes=[{name: x, architecture: jumprelu, k: 3}]"])
    with pytest.raises(ConfigError, match="l1_coefficient is not a field of architecture topk"):  # no architecture
        load_config(sets=["trainer.saes=[{name: x, l1_coefficient: 3}]"])
    with pytest.raises(ConfigError, match=r"trainer.saes.0.kk: Extra inputs are not permitted"):  # a typo
        load_config(sets=["trainer.saes=[{name: x, kk: 3}]"])
    with pytest.raises(ConfigError, match="architecture 'gated' is not registered; expected one of relu, topk, "
                                          "batchtopk, jumprelu"):
        load_config(sets=["trainer.saes=[{name: x, architecture: gated}]"])
    with pytest.raises(ConfigError, match=r"trainer.saes.1.k: Input should be greater than or equal to 1"):
        load_config(sets=["trainer.saes=[{name: x}, {name: y, k: 0}]"])
    with pytest.raises(ValueError, match="l0_coefficient is not a field of architecture relu"):
        SAEConfig(name="x", architecture="relu", l0_coefficient=1.0)


def test_cli_sets_and_environment_choose_architectures(monkeypatch):
    cfg = load_config(sets=["trainer.saes=[{name: x, architecture: relu, l1_coefficient: 3}]"])
    assert [(s.name, s.architecture, s.l1_coefficient) for s in cfg.trainer.saes] == [("x", "relu", 3.0)]
    monkeypatch.setenv("STREAMD_TRAINER__SAES", '[{"name": "e", "architecture": "jumprelu", "l0_coefficient": 0.01}]')
    (s,) = load_config().trainer.saes
    assert (s.architecture, s.l0_coefficient) == ("jumprelu", 0.01)


def test_dump_round_trips_every_architecture():
    saes = "[" + ", ".join(f"{{name: s-{a}, architecture: {a}}}" for a in ARCHITECTURES) + "]"
    cfg = load_config(sets=[f"trainer.saes={saes}"])
    dumped = cfg.model_dump(mode="json")  # what a checkpoint manifest holds
    assert [s["architecture"] for s in dumped["trainer"]["saes"]] == list(ARCHITECTURES)
    assert "l1_coefficient" in dumped["trainer"]["saes"][0] and "k" not in dumped["trainer"]["saes"][0]
    again = StreamdConfig(**dumped)
    assert again == cfg and [type(s) for s in again.trainer.saes] == [type(s) for s in cfg.trainer.saes]
    assert StreamdConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_shipped_and_documented_configs_load_unchanged():
    assert [s.name for s in load_config(ROOT / "deploy" / "streamd.yaml").trainer.saes] == ["topk-k32"]
    readme = (ROOT / "README.md").read_text()
    examples = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "saes:" in b]
    assert examples
    for example in examples:  # the SAE part (the rest needs secrets from the environment)
        saes = load_config(overrides={"trainer.saes": example["trainer"]["saes"]}).trainer.saes
        assert [s.model_dump(exclude_unset=True) for s in saes] == example["trainer"]["saes"]
    assert load_config(sets=["trainer.saes=[{name: soak, architecture: topk, expansion_factor: 2, k: 16}]"])


def test_metric_labels_and_inference_exports_come_from_the_registry():
    assert {t: loss_term_label(t) for t in ("total", "mse", "l1", "l0_penalty", "auxk", "bogus")} == {
        "total": "total", "mse": "mse", "l1": "sparsity", "l0_penalty": "sparsity", "auxk": "auxk", "bogus": None}
    assert {k: v.model_fields["architecture"].default for k, v in inference_architectures().items()} == {
        "standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
    assert ARCHITECTURES["batchtopk"].export_as == "jumprelu"
