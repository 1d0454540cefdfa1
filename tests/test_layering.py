"""Layering: the trainer loop, the intake and the checkpointer know the retention strategy only by its interface,
never kafka-python, and never the broker or the retention scheme by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import streamd

ROOT = Path(streamd.__file__).parent
MODULES = ["train/trainer.py", "train/intake.py", "train/checkpointer.py"]
RETENTION = "streamd.stream.retention"
PUBLIC_RETENTION = {"Retention", "retention_for"}
NAMES = ("tansu", "generation", "kafkaerror")


def _imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name) per imported name; name None for ``import module``."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(node.module or "", a.name) for a in node.names]
    return out


@pytest.mark.parametrize("rel", MODULES)
def test_no_kafka_python_and_only_the_public_retention_interface(rel):
    tree = ast.parse((ROOT / rel).read_text())
    for module, name in _imports(tree):
        assert module != "kafka" and not module.startswith("kafka."), f"{rel} imports kafka-python ({module})"
        assert module != "streamd.stream.kafka", f"{rel} imports the Kafka client helpers"
        if module == RETENTION:
            assert name in PUBLIC_RETENTION, f"{rel} imports {name} from {RETENTION}, not its public interface"
        assert not (module == "streamd.stream" and name == "retention"), f"{rel} imports the retention module whole"
        assert not module.startswith(RETENTION + "."), f"{rel} imports {module}"


@pytest.mark.parametrize("rel", MODULES)
def test_the_broker_and_the_retention_scheme_are_not_named(rel):
    text = (ROOT / rel).read_text().lower()
    for word in NAMES:
        assert word not in text, f"{rel} names {word!r}"


def test_the_public_interface_exists():
    from streamd.stream import retention

    assert PUBLIC_RETENTION <= set(dir(retention))
