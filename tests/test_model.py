"""Frozen-model side: content hash, site ids, loading, early-stopping capture on three architectures, packing."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.config import ConfigError, SiteSpec, load_config
from streamd.identity import ModelLoadError, default_model_path, model_content_hash, site_id, site_id_hex
from streamd.produce.capture import ActivationCapture, blocks, site_module
from streamd.produce.model import load_frozen_model, strip_quantization
from streamd.produce.packing import count_tokens, pack_documents
from streamd.torch_utils import configure_threads
from streamd.produce.text import kjv, pydoc_topics

ARCHS = ("llama", "gpt2", "gpt_neox")
N_LAYERS = 4


def make_tokenizer(bos: bool = True):
    """A small byte-level BPE trained on the spot, so tests need no downloaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(["in the beginning was the word, and the word was with the text"] * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>" if bos else None, eos_token="<eos>", pad_token="<pad>"
    )


def make_tiny_model(path: Path, arch: str = "llama") -> Path:
    """A random-initialised 4-block causal LM of ``arch`` with a tokenizer, saved as an HF directory at ``path``."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "vocab_size": 320}
    config = {
        "llama": lambda: LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **special,
        ),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=256, **special),
        "gpt_neox": lambda: GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
            max_position_embeddings=256, **special,
        ),
    }[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, tmp_path_factory):
    torch.set_num_threads(2)
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return load_frozen_model(str(path), "float32", "cpu")


# --- identity ---------------------------------------------------------------------------------------------------


def test_site_id_is_first_8_bytes_of_canonical_json_sha256():
    digest = hashlib.sha256(b'{"layer":15,"model":"abc","site":"resid_post"}').digest()
    assert site_id("abc", "resid_post", 15) == int.from_bytes(digest[:8], "big")
    assert site_id_hex("abc", "resid_post", 15) == digest[:8].hex()
    ids = {site_id(h, s, layer) for h in ("abc", "abd") for s in ("resid_post", "mlp_out") for layer in (0, 1)}
    assert len(ids) == 8 and all(0 <= i < 2**64 for i in ids)


def test_content_hash_ignores_path_and_volatile_config_keys(tmp_path):
    a = make_tiny_model(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    b.mkdir(parents=True)
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    config = json.loads((b / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (b / "config.json").write_text(json.dumps(config, indent=4))
    assert model_content_hash(a) == model_content_hash(b)

    config["hidden_act"] = "relu"
    (b / "config.json").write_text(json.dumps(config))
    assert model_content_hash(b) != model_content_hash(a)


def test_content_hash_changes_with_weights_and_is_memoised_by_size_and_mtime(tmp_path):
    d = make_tiny_model(tmp_path / "m")
    weights = d / "model.safetensors"
    first = model_content_hash(d)
    st_before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(data)
    os.utime(weights, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert model_content_hash(d) == first  # same (path, size, mtime): the remembered hash, file not re-read
    os.utime(weights, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 1_000_000_000))
    assert model_content_hash(d) != first


# --- loading ----------------------------------------------------------------------------------------------------


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_frozen_model(str(missing), "float32", "cpu")
    with pytest.raises(ModelLoadError, match="holds no weight files"):
        load_frozen_model(str(tmp_path), "float32", "cpu")


def test_loaded_model_is_frozen_and_described(loaded):
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert (loaded.d_model, loaded.n_layers) == (32, N_LAYERS)
    assert loaded.arch in ARCHS
    assert len(loaded.model_hash) == 64


def test_bfloat16_load(tmp_path):
    lm = load_frozen_model(str(make_tiny_model(tmp_path / "m")), "bfloat16", "cpu")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_default_model_path_is_the_shipped_gguf():
    p = default_model_path()
    assert p.suffix == ".gguf" and p.is_file()


def test_strip_quantization_keeps_logits_exactly(tmp_path):
    """The GGUF cache path on a tiny model: copy into a fresh model, save, reload; logits must not move."""
    from transformers import AutoModelForCausalLM

    lm = load_frozen_model(str(make_tiny_model(tmp_path / "m")), "float32", "cpu")
    plain = strip_quantization(lm.model)
    plain.save_pretrained(tmp_path / "copy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.inference_mode():
        ref = lm.model(ids).logits
        assert torch.equal(plain.eval()(ids).logits, ref)
        assert torch.equal(reloaded(ids).logits, ref)


@pytest.mark.slow
def test_default_gguf_converts_once_and_reloads_fast_with_identical_logits():
    """~40 s: dequantises the shipped GGUF into a private cache, then reloads from the safetensors copy."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    first = load_frozen_model(None, "float32", "cpu")
    t0 = time.perf_counter()
    cached = load_frozen_model(None, "float32", "cpu")
    assert time.perf_counter() - t0 < 2.0
    assert cached.model_hash == first.model_hash and (cached.d_model, cached.n_layers) == (576, 30)
    gguf = default_model_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = cached.tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(cached.model(ids).logits, direct(ids).logits)


# --- capture ----------------------------------------------------------------------------------------------------


def _count_calls(modules):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    return calls, [m.register_forward_pre_hook(hook) for m in modules]


def test_capture_stops_after_deepest_layer_and_matches_full_run(loaded):
    model, layer = loaded.model, 1
    ids = torch.randint(3, 300, (2, 12))
    base = model.base_model
    later = list(blocks(model)[layer + 1 :]) + [model.get_output_embeddings()]
    calls, handles = _count_calls(later)
    sites = [SiteSpec(site=s, layer=layer) for s in ("resid_post", "mlp_out", "attn_out")] + [SiteSpec(layer=0)]
    with ActivationCapture(model, sites) as cap:
        acts = cap(ids)
    for h in handles:
        h.remove()
    assert calls["n"] == 0
    assert set(acts) == {("resid_post", 1), ("mlp_out", 1), ("attn_out", 1), ("resid_post", 0)}

    manual = {}
    manual_handles = [
        site_module(model, s, layer).register_forward_hook(
            lambda _m, _i, out, s=s: manual.__setitem__(s, out[0] if isinstance(out, tuple) else out)
        )
        for s in ("mlp_out", "attn_out")
    ]
    calls, handles = _count_calls(later)
    with torch.inference_mode():
        hidden = base(ids, output_hidden_states=True).hidden_states
    for h in manual_handles + handles:
        h.remove()
    assert calls["n"] == N_LAYERS - layer - 1  # the counters work: a full run of the base model reaches later blocks
    torch.testing.assert_close(acts[("resid_post", 1)], hidden[2], rtol=0, atol=0)
    torch.testing.assert_close(acts[("resid_post", 0)], hidden[1], rtol=0, atol=0)
    for s in ("mlp_out", "attn_out"):
        assert acts[(s, layer)].shape == (2, 12, 32)
        torch.testing.assert_close(acts[(s, layer)], manual[s], rtol=0, atol=0)


def test_capture_of_last_block_skips_final_norm_and_lm_head(tiny_llama_dir):
    lm = load_frozen_model(str(tiny_llama_dir), "float32", "cpu")
    last = lm.n_layers - 1
    window = next(pack_documents(lm.tokenizer, pydoc_topics(), 32))
    ids = window.input_ids[None]
    calls, handles = _count_calls([lm.model.base_model.norm, lm.model.get_output_embeddings()])
    with ActivationCapture(lm.model, [SiteSpec(layer=last)]) as cap:
        acts = cap(ids)
    assert calls["n"] == 0
    manual = []
    handles.append(blocks(lm.model)[last].register_forward_hook(lambda _m, _i, out: manual.append(out)))
    with torch.inference_mode():
        lm.model(ids)
    for h in handles:
        h.remove()
    assert calls["n"] == 2
    torch.testing.assert_close(acts[("resid_post", last)], manual[0], rtol=0, atol=0)


def test_capture_removes_its_hooks_on_close(loaded):
    model = loaded.model
    modules = [site_module(model, s, 2) for s in ("resid_post", "mlp_out", "attn_out")]
    before = [len(m._forward_hooks) for m in modules]
    with ActivationCapture(model, [SiteSpec(site=s, layer=2) for s in ("resid_post", "mlp_out", "attn_out")]):
        assert all(len(m._forward_hooks) > n for m, n in zip(modules, before))
    assert [len(m._forward_hooks) for m in modules] == before


def test_capture_rejects_layer_out_of_range(loaded):
    with pytest.raises(ValueError, match=f"has {N_LAYERS} blocks"):
        ActivationCapture(loaded.model, [SiteSpec(layer=N_LAYERS)])


# --- packing ----------------------------------------------------------------------------------------------------

TOK = make_tokenizer()
TOK_NO_BOS = make_tokenizer(bos=False)
WORDS = ["the", "word", "was", "in", "beginning", "text", "with", "and", "zebra", "!"]


def _check_packing(tok, docs: list[str], T: int, skip: int = 0) -> None:
    windows = list(pack_documents(tok, docs, T, skip))
    assert windows == [] or all(w.input_ids.shape == (T,) and w.keep_mask.shape == (T,) for w in windows)
    kept = [int(t) for w in windows for t in w.input_ids[w.keep_mask]]
    expected = [t for d in docs for t in tok(d, add_special_tokens=False).input_ids]
    assert kept == expected  # nothing lost, duplicated or reordered
    assert sum(int(w.keep_mask.sum()) for w in windows) == count_tokens(tok, docs)
    specials = {tok.bos_token_id, tok.pad_token_id}
    for w in windows:
        assert not any(int(t) in specials for t in w.input_ids[w.keep_mask])
        if tok.bos_token_id is not None:
            assert int(w.input_ids[0]) == tok.bos_token_id
    head = 0 if tok.bos_token_id is None else 1
    for i, w in enumerate(windows):  # the token policy: positions head..head+skip repeat the last window's tail
        assert w.carried == (0 if i == 0 else skip)
        assert not w.keep_mask[head : head + w.carried].any()
        if w.carried:
            assert torch.equal(w.input_ids[head : head + skip], windows[i - 1].input_ids[T - skip :])
    for w in windows[:-1]:  # only the last window carries padding; others mask BOS (and the carried tokens) only
        rest = w.input_ids[head + w.carried :][~w.keep_mask[head + w.carried :]]
        assert rest.eq(tok.bos_token_id if tok.bos_token_id is not None else -1).all()


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join), max_size=12),
    T=st.integers(2, 24),
    bos=st.booleans(),
    skip=st.integers(0, 3),
)
def test_packing_keeps_every_token_once_in_order(docs, T, bos, skip):
    skip = min(skip, T - 2)  # a window keeps at least one new position
    _check_packing(TOK if bos else TOK_NO_BOS, docs, T, skip)


def test_packing_rejects_a_skip_that_leaves_no_position():
    with pytest.raises(ValueError, match="skip_positions"):
        list(pack_documents(TOK, ["the word"], 4, 3))
    with pytest.raises(ConfigError, match="skip_positions"):
        load_config(sets=["producer.context_length=4", "producer.skip_positions=3"])


def test_packing_layout_and_determinism():
    docs = ["the word", "in the beginning was the word and the word was with the text"]
    T = 8
    first, second = list(pack_documents(TOK, docs, T)), list(pack_documents(TOK, docs, T))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.keep_mask, b.keep_mask)
    a = TOK(docs[0], add_special_tokens=False).input_ids
    w0 = first[0]
    assert w0.input_ids[: 1 + len(a) + 1].tolist() == [TOK.bos_token_id, *a, TOK.bos_token_id]  # BOS separates docs
    last = first[-1]
    assert int(last.keep_mask.sum()) < T - 1 and last.input_ids[~last.keep_mask][1:].eq(TOK.pad_token_id).all()


def test_pack_shipped_corpus_counts_agree():
    docs = [d for _, d in zip(range(300), kjv())]
    windows = list(pack_documents(TOK, docs, 128))
    assert sum(int(w.keep_mask.sum()) for w in windows) == count_tokens(TOK, docs) > 10_000


def test_configure_threads():
    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1
        configure_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
