"""Files, torch-free: the sha256 of a file, and the one cache directory every part of streamd writes under."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    """``$STREAMD_CACHE``, else ``$XDG_CACHE_HOME/streamd``, else ``~/.cache/streamd`` (empty values are unset).

    Under it: ``hashes.json`` (model content hashes), ``gguf/<hash>/`` (converted GGUF models) and
    ``pulls/<host_port>/`` (checkpoints pulled by ``load_sae`` and ``streamd eval``).
    """
    if explicit := os.environ.get("STREAMD_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "streamd"
