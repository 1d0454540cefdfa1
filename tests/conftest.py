"""Shared fixtures: a real local Kafka broker (Tansu) and a tiny random-initialised Llama with its own tokenizer."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from streamd.stream.broker import LocalBroker
from streamd.config import KafkaConfig

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
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [topics[name] for name in _TOKENIZER_TOPICS],
        trainers.BpeTrainer(
            vocab_size=TINY_VOCAB,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tok.save_pretrained(out)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out
