"""Tiny random Llamas with their own byte-level BPE tokenizer, saved for ``from_pretrained`` (offline).

One builder for the tests' ``tiny_llama_dir`` fixture and the soak bench (``bench/soak_up.py`` puts the repository
root on ``sys.path`` to import it). The tokenizer is trained here on the standard library's Python docs (always
installed): ``<|endoftext|>`` = 0 is bos and eos, ``<|pad|>`` = 1, and it adds no special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def build_tiny_llama(
    out: Path,
    *,
    vocab_size: int,
    topics: Sequence[str],
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    seed: int = 0,
) -> Path:
    """Save a random-initialised (``seed``) LlamaForCausalLM and a ``vocab_size`` BPE trained on pydoc ``topics``
    into ``out``; returns ``out``."""
    import torch
    from pydoc_data.topics import topics as pydoc_topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [pydoc_topics[name] for name in topics],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tok.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out
