"""Capture activation sites of a frozen model, and stop its forward pass after the deepest one.

The producer only needs activations up to the deepest hooked block, so capture raises out of the forward pass as
soon as that block has run: later blocks, the final norm and the lm_head are never computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from streamd.config import SiteSpec

# Decoder-block lists, relative to ``model.base_model``: Llama-likes, GPT-2, GPT-NeoX, OPT.
_BLOCK_PATHS = ("layers", "h", "decoder.layers")
_SUBMODULES = {"attn_out": ("self_attn", "attn", "attention"), "mlp_out": ("mlp",)}


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


_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "decoder.final_layer_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the unembedding (Llama ``norm``, GPT-2 ``ln_f``, NeoX / OPT
    ``final_layer_norm``)."""
    base = getattr(model, "base_model", model)
    for dotted in _FINAL_NORMS:
        try:
            return base.get_submodule(dotted)
        except AttributeError:
            continue
    raise ValueError(f"don't know where the final norm of {type(model).__name__} is (looked for {_FINAL_NORMS})")


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
