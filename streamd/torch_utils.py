"""Small torch helpers shared by producer, trainer, eval and benches: dtype names, the thread count, a torch call
whose one-time warning is noise, a function compiled where the host can compile it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# Config dtype names (``ModelDType``) -> torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls in hardware: a CUDA device that supports bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere torch emulates them (on an AVX2-only EPYC here, 0.9 GFLOP/s against 35 for
    float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, private
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A config's model dtype: ``auto`` is bfloat16 where the device computes it natively (half the memory and,
    there, faster), else float32; any other name is itself."""
    if name != "auto":
        return TORCH_DTYPES[name]
    return torch.bfloat16 if native_bf16(torch.device(device)) else torch.float32


def resolve_device(name: str) -> torch.device:
    """A config's device: ``auto`` is CUDA when there is one, else the CPU; a CUDA device on a host without CUDA is an
    error now (naming the setting's value), not a failure deep inside the first copy to it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a torch device (cpu, cuda, cuda:N, auto): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this host has no usable CUDA (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda or 'none'}); use cpu or auto")
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls: the SAE step's bulk
    return dev


def to_cpu(obj: Any) -> Any:
    """Every tensor in a nest of dicts, lists and tuples on the CPU (saved state must load on any host)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def configure_threads(n: int | None) -> None:
    """Pin torch's intra-op (and, if still possible, inter-op) thread count for this process; None keeps torch's."""
    if n is None:
        return
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; intra-op threads are what matter here
        log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())


class QuietOnce:
    """``fn`` with one of torch's once-per-process warnings silenced, scoped to the call (no process-wide filter).

    After the first call the plain function runs: torch has issued its warning by then, and entering
    ``catch_warnings`` on every call would reset every module's warning registry (re-showing other "once"
    warnings) and is not thread-safe.
    """

    def __init__(self, fn: Callable[..., Any], message: str) -> None:
        self.fn, self.message, self.quiet = fn, message, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.quiet:
            return self.fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=self.message, category=UserWarning)
            out = self.fn(*args, **kwargs)
        self.quiet = True
        return out


class CompiledOrEager:
    """``fn`` through ``torch.compile`` where this host can compile it, else ``fn`` itself after one warning.

    Compilation happens at a call (the first, and again for a new shape), and it fails there on a host without a
    working C++ compiler, on a platform inductor does not support, or on an inductor bug; ``fn`` must therefore be
    free of side effects, so that the failed call can simply run again eagerly. Any exception from the compiled
    call is retried eagerly: one that eager raises too was ``fn``'s own and propagates (compilation stays on);
    otherwise compilation is off for good, and the warning names the reason. Nothing is compiled before the first
    call (importing a module that holds one costs nothing).
    """

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn, self.what = fn, what
        self._compiled: Callable[..., Any] | None = None
        self.failure: str | None = None  # why compilation is off, once it is

    def __call__(self, *args: Any) -> Any:
        if self.failure is not None:
            return self.fn(*args)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn)
            return self._compiled(*args)
        except Exception as e:  # noqa: BLE001 - whatever compiling raised; eager decides below whose error it is
            out = self.fn(*args)
            lines = str(e).strip().splitlines()
            self.failure = f"{type(e).__name__}: {lines[0] if lines else ''}"
            log.warning("torch.compile is not usable here, %s runs eagerly (%s)", self.what, self.failure)
            return out
