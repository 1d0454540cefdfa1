"""Small torch helpers shared by producer, trainer, eval and benches: dtype names and the thread count."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Config dtype names (``ModelDType``) -> torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure_threads(n: int | None) -> None:
    """Pin torch's intra-op (and, if still possible, inter-op) thread count for this process; None keeps torch's."""
    if n is None:
        return
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; intra-op threads are what matter here
        log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())
