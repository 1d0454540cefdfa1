"""SAE architectures behind one registry: an architecture is one file under ``streamd/sae/`` plus one registry line.

The file defines a subclass of :class:`streamd.config.SAEConfig` (which holds the fields every SAE has: name,
expansion_factor, d_sae, lr, seed, grad_clip) that declares everything else streamd needs to know about it:

- its parameters: pydantic fields, with ``architecture: Literal["<name>"] = "<name>"`` naming it;
- ``default_lr(d_in)``: the learning rate when ``lr`` is not set;
- ``loss_terms``: the keys of its ``LossOut.terms`` -> the ``term`` label of the ``streamd_loss`` metric (``total``,
  ``mse``, ``sparsity``, ``auxk``, or a new label of its own); ``mse`` is required;
- ``export_as``: the SAELens architecture of its export (``cfg.json``); ``export_loaded_by``: the streamd architecture
  that loads such an export back (None: itself, through ``from_export``, which rebuilds its config from the export);
- ``module()``: its :class:`streamd.sae.base.SAE` subclass (the ``torch.nn.Module`` that trains it).

The registry line is ``register(TheConfig)``: below for the built-in architectures; a plugin (or a test) calls it at
run time. Entries of ``trainer.saes`` (and ``SAEConfig(...)``) are validated by the class registered under their
``architecture``, so the config accepts an architecture registered after ``streamd.config`` was imported, and a field
of another architecture is an error naming both. Metric labels and ``load_exported`` read the registry as well.

No torch at import: config loading (``streamd config show``, ``streamd broker``, clients) must not import torch, yet
validating an SAE needs its architecture's config class. So this package and the built-in architecture files import
no torch at module level: a config class is plain pydantic, and the module class is built by a cached function that
imports torch on first use (``TheConfig.module()``; ``from streamd.sae.topk import TopKSAE`` also works). ``SAE``,
``LossOut`` and ``geometric_median`` are loaded from :mod:`streamd.sae.base` when first accessed. An architecture
registered at run time may import torch at module level: only whoever registers it imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, get_args

from streamd.config import SAEConfig
from streamd.sae import batchtopk, jumprelu, relu, topk

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from streamd.sae.base import SAE, LossOut, geometric_median

ARCHITECTURES: dict[str, type[SAEConfig]] = {}  # streamd architecture name -> its config class

__all__ = ["ARCHITECTURES", "SAE", "LossOut", "build_sae", "geometric_median", "inference_architectures",
           "load_exported", "loss_term_label", "register", "unregister"]


def register(config: type[SAEConfig]) -> type[SAEConfig]:
    """Make an architecture available under its ``architecture`` name (also usable as a class decorator).

    Registering the same class again is a no-op; another class under a registered name is an error.
    """
    if not (isinstance(config, type) and issubclass(config, SAEConfig)) or config is SAEConfig:
        raise TypeError(f"an architecture is a subclass of streamd.config.SAEConfig, got {config!r}")
    field = config.model_fields["architecture"]
    name = field.default
    if not isinstance(name, str) or get_args(field.annotation) != (name,):
        raise TypeError(f"{config.__name__} must declare architecture: Literal[NAME] = NAME")
    if ARCHITECTURES.get(name) is config:
        return config
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered ({ARCHITECTURES[name].__qualname__})")
    if config.loss_terms.get("mse") != "mse":
        raise TypeError(f"{config.__name__}.loss_terms must map 'mse' to 'mse' (every step reports it)")
    for term, label in config.loss_terms.items():
        if loss_term_label(term) not in (None, label):
            raise ValueError(f"{config.__name__}: loss term {term!r} already means {loss_term_label(term)!r}")
    if not isinstance(getattr(config, "export_as", None), str):
        raise TypeError(f"{config.__name__} must declare export_as (its SAELens architecture)")
    loader = inference_architectures().get(config.export_as)
    if config.export_loaded_by is None and loader is not None:
        raise ValueError(f"{config.__name__}: SAELens architecture {config.export_as!r} is already loaded back by "
                         f"{loader.model_fields['architecture'].default}; set export_loaded_by")
    ARCHITECTURES[name] = config
    return config


def unregister(name: str) -> None:
    """Remove an architecture registered at run time (tests, plugins)."""
    del ARCHITECTURES[name]


def loss_term_label(term: str) -> str | None:
    """The metric ``term`` label of a loss term an architecture reports (``total`` is the loss itself); None if no
    registered architecture declares it."""
    if term == "total":
        return "total"
    for config in ARCHITECTURES.values():
        if term in config.loss_terms:
            return config.loss_terms[term]
    return None


def inference_architectures() -> Mapping[str, type[SAEConfig]]:
    """SAELens architecture -> the config class of the streamd architecture that loads such an export back."""
    return {c.export_as: c for c in ARCHITECTURES.values() if c.export_loaded_by is None}


def build_sae(cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> SAE:
    """A freshly initialised SAE; without ``generator`` it is seeded from ``cfg.seed`` (never the global RNG)."""
    return cfg.module()(cfg, d_in, generator)


def load_exported(cfg_dict: dict, tensors: dict[str, Tensor]) -> SAE:
    """Rebuild an inference module from an exported SAELens-style cfg and its tensors (raw activation units).

    A batchtopk SAE exports as ``jumprelu`` with its threshold, so it comes back as a JumpReLU SAE.
    """
    import torch

    arch = cfg_dict["architecture"]
    loaders = inference_architectures()
    if arch not in loaders:
        raise ValueError(f"unsupported SAELens architecture {arch!r}; expected one of {sorted(loaders)}")
    if not cfg_dict.get("apply_b_dec_to_input", True):
        raise ValueError("only apply_b_dec_to_input=True checkpoints are supported")
    d_in, d_sae = tensors["W_enc"].shape
    cfg = loaders[arch].from_export(cfg_dict, d_sae)
    # the init is overwritten below; a fixed generator keeps loading from touching the global RNG
    sae = build_sae(cfg, d_in, torch.Generator().manual_seed(0))
    sae = sae.to(device=tensors["W_enc"].device, dtype=tensors["W_enc"].dtype)
    sae.load_state_dict(tensors, strict=True)
    return sae.eval()


def __getattr__(name: str) -> Any:  # the torch-side names, imported on first use
    if name in ("SAE", "LossOut", "geometric_median"):
        from streamd.sae import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The registry: one line per architecture file (and its module in the import at the top).
register(relu.ReLUConfig)
register(topk.TopKConfig)
register(batchtopk.BatchTopKConfig)
register(jumprelu.JumpReLUConfig)
