"""SAE architectures behind one registry: adding an architecture is one file plus one entry in ``ARCHITECTURES``."""

from __future__ import annotations

import torch
from torch import Tensor

from streamd.config import SAEConfig
from streamd.sae.base import SAE, LossOut, geometric_median
from streamd.sae.batchtopk import BatchTopKSAE
from streamd.sae.jumprelu import JumpReLUSAE
from streamd.sae.relu import ReLUSAE
from streamd.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {cls.architecture: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)}

# SAELens inference architecture -> the streamd class that computes the same encode/decode
_INFERENCE = {"standard": ReLUSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE}

__all__ = ["ARCHITECTURES", "SAE", "LossOut", "build_sae", "geometric_median", "load_exported"]


def build_sae(cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> SAE:
    """A freshly initialised SAE; without ``generator`` it is seeded from ``cfg.seed`` (never the global RNG)."""
    return ARCHITECTURES[cfg.architecture](cfg, d_in, generator)


def load_exported(cfg_dict: dict, tensors: dict[str, Tensor]) -> SAE:
    """Rebuild an inference module from an exported SAELens-style cfg and its tensors (raw activation units).

    A batchtopk SAE exports as ``jumprelu`` with its threshold, so it comes back as a :class:`JumpReLUSAE`.
    """
    arch = cfg_dict["architecture"]
    if arch not in _INFERENCE:
        raise ValueError(f"unsupported SAELens architecture {arch!r}; expected one of {sorted(_INFERENCE)}")
    if not cfg_dict.get("apply_b_dec_to_input", True):
        raise ValueError("only apply_b_dec_to_input=True checkpoints are supported")
    d_in, d_sae = tensors["W_enc"].shape
    cls = _INFERENCE[arch]
    k = int(cfg_dict["k"]) if arch == "topk" else 1  # k only matters to topk
    cfg = SAEConfig(name="exported", architecture=cls.architecture, d_sae=d_sae, k=k)
    # the init is overwritten below; a fixed generator keeps loading from touching the global RNG
    sae = cls(cfg, d_in, torch.Generator().manual_seed(0)).to(device=tensors["W_enc"].device, dtype=tensors["W_enc"].dtype)
    sae.load_state_dict(tensors, strict=True)
    return sae.eval()
