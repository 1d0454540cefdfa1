"""Load a trained SAE, ready for ``encode`` / ``decode`` in raw activation units, from wherever it lives."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from streamd.client.locate import fetch, sae_dir
from streamd.run.checkpoints import SAE_CFG, SAE_WEIGHTS
from streamd.sae import SAE, load_exported


def load_sae(
    path_or_url: str | Path,
    sae: str | None = None,
    token: str | None = None,
    cafile: str | Path | None = None,
    cache_dir: Path | None = None,
    *,
    token_file: str | Path | None = None,
) -> SAE:
    """An SAE from an SAE, checkpoint, ``checkpoints/`` or run directory, a ``checkpoints/latest`` file, or a
    trainer's URL.

    A URL is pulled (that SAE only) into ``cache_dir/<host_port>`` (default ``<cache root>/pulls/<host_port>``, see
    :func:`streamd.files.cache_root`); a cached copy is used only when it verifies against the server's
    description. The token is ``token``, else ``token_file``'s first line, else ``$STREAMD_CHECKPOINT_TOKEN``.
    """
    d = sae_dir(fetch(path_or_url, sae, token=token, token_file=token_file, cafile=cafile, cache_dir=cache_dir), sae)
    cfg = json.loads((d / SAE_CFG).read_text())
    return load_exported(cfg, load_file(d / SAE_WEIGHTS))
