"""Shared fixtures: a real local Kafka broker (Tansu) and a tiny random-initialised Llama with its own tokenizer
(built by :mod:`tests.models`)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from streamd.stream.broker import LocalBroker
from streamd.config import KafkaConfig
from tests.models import build_tiny_llama

TINY_VOCAB = 512
# A few KB of real English for the tiny tokenizer: the standard library's Python docs (always installed).
_TOKENIZER_TOPICS = ("assignment", "for", "if", "while", "with", "try", "function", "class", "import", "lambda")


@pytest.fixture
def broker(tmp_path: Path):
    """A fresh broker per test (starts in ~0.2 s); its log is ``tmp_path/broker/tansu.log``."""
    b = LocalBroker(log_dir=tmp_path / "broker")
    with b:
        yield b
        b.kill()  # memory storage has nothing to flush; SIGTERM would wait ~5 s for clients a test left open


@pytest.fixture(scope="session")
def broker_session(tmp_path_factory: pytest.TempPathFactory):
    """One broker for the whole session: give every test its own topic (see ``kafka_cfg``)."""
    b = LocalBroker(log_dir=tmp_path_factory.mktemp("broker-session"))
    with b:
        yield b
        b.kill()


@pytest.fixture
def kafka_cfg(broker: LocalBroker) -> KafkaConfig:
    """Points at the test's own broker, with a unique topic (not created: ``ensure_topic`` or a producer does)."""
    return broker.config(topic=f"test-{uuid.uuid4().hex[:12]}", session_timeout_ms=6000)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory ``from_pretrained`` loads offline: a 4-layer LlamaForCausalLM (d_model 64, 4 heads, 2 KV heads,
    random weights, seed 0) and a 512-token byte-level BPE tokenizer trained here on Python's docs.

    Token ids: ``<|endoftext|>`` = 0 is bos and eos, ``<|pad|>`` = 1; the tokenizer adds no special tokens.
    """
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=TINY_VOCAB, topics=_TOKENIZER_TOPICS,
                            hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
