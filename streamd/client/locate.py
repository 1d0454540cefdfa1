"""One resolver for everything that names trained SAEs: a path (SAE, checkpoint, ``checkpoints/`` or run directory,
or the ``checkpoints/latest`` pointer file) or a trainer's URL (pulled into the cache first).

``load_sae``, ``streamd eval`` and anything else that takes "a checkpoint" go through :func:`fetch` then
:func:`resolve` / :func:`sae_dir`, so they accept the same things and fail with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streamd.files import cache_root
from streamd.run.checkpoints import ID_RE, LATEST, MANIFEST, SAE_CFG, read_manifest


@dataclass
class Located:
    """What a path names: its checkpoint directory (None for a bare SAE directory), the SAE directories by name,
    and the checkpoint's manifest ({} for a bare SAE directory)."""

    checkpoint: Path | None
    saes: dict[str, Path]
    manifest: dict[str, Any] = field(default_factory=dict)


def is_url(src: str | Path) -> bool:
    return urlsplit(str(src)).scheme in ("http", "https")


def pulls_dir(url: str) -> Path:
    """Where a trainer's checkpoints are pulled by default: ``<cache root>/pulls/<host>_<port>``."""
    return cache_root() / "pulls" / urlsplit(url).netloc.replace(":", "_")


def fetch(
    path_or_url: str | Path,
    sae: str | None = None,
    *,
    token: str | None = None,
    token_file: str | Path | None = None,
    cafile: str | Path | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """A local path as is; a trainer's URL pulled (its latest checkpoint, or only ``sae`` of it) into
    ``cache_dir/<host>_<port>`` (default :func:`pulls_dir`), returning the checkpoint directory.

    What the cache already holds is reused only when it verifies against the server's description (see
    :func:`streamd.client.pull.pull`): another run on the same host and port replaces it. The token is ``token``,
    else ``token_file``, else ``$STREAMD_CHECKPOINT_TOKEN``."""
    src = str(path_or_url)
    if not is_url(src):
        return Path(src)
    from streamd.client.pull import pull

    out = cache_dir / urlsplit(src).netloc.replace(":", "_") if cache_dir is not None else pulls_dir(src)
    return pull(src, out, sae=sae, token=token, cafile=cafile, token_file=token_file)


def _pointed(pointer: Path) -> Path:
    ckid = pointer.read_text().strip()
    if not ID_RE.match(ckid):
        raise FileNotFoundError(f"{pointer} does not name a checkpoint (holds {ckid[:40]!r})")
    return pointer.parent / ckid


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory a checkpoint dir, the ``latest`` pointer, a ``checkpoints/`` dir or a run dir names."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        path = _pointed(path)
    else:
        for ckpts in (path, path / "checkpoints"):
            if (ckpts / LATEST).is_file():
                path = _pointed(ckpts / LATEST)
                break
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is not an SAE, checkpoint, or run directory with a latest checkpoint")
    return path


def resolve(path: str | Path) -> Located:
    """Every SAE ``path`` names (see the module docstring for what it may be)."""
    path = Path(path)
    if (path / SAE_CFG).is_file():
        return Located(None, {path.name: path})
    ckpt = checkpoint_dir(path)
    manifest = read_manifest(ckpt)
    return Located(ckpt, {name: ckpt / name for name in manifest["saes"]}, manifest)


def sae_dir(path: str | Path, sae: str | None = None) -> Path:
    """One SAE directory: ``path`` itself if it is one, else SAE ``sae`` of the checkpoint it names (which may be
    omitted when that checkpoint holds a single SAE)."""
    found = resolve(path)
    if found.checkpoint is None:
        return next(iter(found.saes.values()))
    names = list(found.saes)
    if sae is None and len(names) != 1:
        raise ValueError(f"checkpoint {found.checkpoint} holds SAEs {names}; name one")
    name = sae if sae is not None else names[0]
    if name not in found.saes:
        raise ValueError(f"checkpoint {found.checkpoint} has no SAE {name!r}; it has {names}")
    return found.saes[name]
