"""Load the frozen model: an HF directory, a GGUF (dequantised once into the cache), or the shipped default.

Its identity (content hash, site ids) is :mod:`streamd.identity`; capturing sites is :mod:`streamd.produce.capture`;
packing text is :mod:`streamd.produce.packing`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamd.files import cache_root
from streamd.identity import ModelLoadError, default_model_path, model_content_hash
from streamd.produce.capture import blocks
from streamd.torch_utils import TORCH_DTYPES, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelLoadError", "default_model_path", "load_frozen_model", "strip_quantization"]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_hash: str
    d_model: int
    n_layers: int
    arch: str


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


def load_frozen_model(path: str | Path | None, dtype: str = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM for inference only (eval mode, no grads) from an HF directory, a .gguf, or the default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path).expanduser() if path is not None else default_model_path()
    if not src.exists():
        raise ModelLoadError(f"model path {src} does not exist (expected an HF model directory or a .gguf file)")
    if dtype not in (*TORCH_DTYPES, "auto"):
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)} or auto")
    torch_dtype = resolve_dtype(dtype, device)
    if dtype == "auto":
        log.info("model dtype auto: %s on %s", str(torch_dtype).removeprefix("torch."), device)
    model_hash = model_content_hash(src)
    hf_dir = src
    if src.is_file():
        if src.suffix != ".gguf":
            raise ModelLoadError(f"model path {src} is a file but not a .gguf")
        hf_dir = cache_root() / "gguf" / model_hash
        if not (hf_dir / "config.json").is_file():
            _convert_gguf(src, hf_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype)
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
