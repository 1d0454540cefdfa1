"""Fetch a checkpoint from a running trainer's server (``load_sae`` is :mod:`streamd.client.load`).

``pull`` downloads into a ``.tmp-pull-*`` directory inside ``out``, checks every file's sha256 against both the
description and the ``X-Checkpoint-SHA256`` header, and only then renames it into ``out/<id>``: a reader of ``out``
sees a complete checkpoint or none, and a failed pull leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from streamd.run.checkpoints import ID_RE, MANIFEST, NAME_RE, fsync_dir

log = logging.getLogger(__name__)


class PullError(RuntimeError):
    """A pull failed: server unreachable, unauthorized, nothing to pull, or a file did not match its sha256."""


def _opener(token: str | None, cafile: str | Path | None, timeout: float):
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def open_url(url: str):
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout, context=ctx)
        except urllib.error.HTTPError as e:
            hint = " (wrong or missing token?)" if e.code == 401 else ""
            raise PullError(f"GET {url}: HTTP {e.code} {e.reason}{hint}") from e
        except (urllib.error.URLError, OSError) as e:
            raise PullError(f"GET {url}: {e}") from e

    return open_url


def _select(desc: dict[str, Any], sae: str | None) -> dict[str, dict[str, Any]]:
    """Every file of the checkpoint, or the manifest plus one SAE's directory."""
    files: dict[str, dict[str, Any]] = desc["files"]
    for rel in files:
        if not all(NAME_RE.match(p) for p in rel.split("/")) or rel.count("/") > 1:
            raise PullError(f"server listed an unsafe file name {rel!r}")
    if sae is None:
        return files
    if sae not in desc["saes"]:
        raise PullError(f"checkpoint {desc['id']} has no SAE {sae!r}; it has {desc['saes']}")
    return {rel: f for rel, f in files.items() if rel == MANIFEST or rel.startswith(f"{sae}/")}


def _download(open_url, url: str, dest: Path, want: str) -> None:
    h = hashlib.sha256()
    with open_url(url) as resp, open(dest, "wb") as f:
        header = resp.headers.get("X-Checkpoint-SHA256")
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    got = h.hexdigest()
    if got != want or (header is not None and header != want):
        raise PullError(f"{url}: sha256 {got} does not match the checkpoint's {want} (header {header})")


def pull(
    url: str,
    out: Path,
    sae: str | None = None,
    token: str | None = None,
    cafile: str | Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """Pull the server's latest checkpoint (every file, or the manifest and one SAE) into ``out/<id>``.

    Returns ``out/<id>``. Parts already present there (placed atomically by an earlier pull) are kept, so pulling
    a second SAE of the same checkpoint adds its directory.
    """
    base = url.rstrip("/")
    open_url = _opener(token, cafile, timeout)
    with open_url(f"{base}/checkpoints/latest") as resp:
        try:
            desc = json.load(resp)
        except ValueError as e:
            raise PullError(f"{base}/checkpoints/latest did not return JSON: {e}") from e
    ckid = str(desc.get("id", ""))
    if not ID_RE.match(ckid):
        raise PullError(f"server returned a malformed checkpoint id {ckid!r}")
    wanted = _select(desc, sae)
    out = Path(out)
    target = out / ckid
    # Units are what gets renamed into place: top-level files and whole SAE directories.
    present = {p.name for p in target.iterdir()} if target.is_dir() else set()
    units = {rel.split("/")[0] for rel in wanted} - present
    if not units:
        return target
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-pull-{ckid}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        for rel, meta in sorted(wanted.items()):
            if rel.split("/")[0] not in units:
                continue
            (tmp / rel).parent.mkdir(exist_ok=True)
            _download(open_url, f"{base}/checkpoints/{ckid}/{quote(rel)}", tmp / rel, meta["sha256"])
        for d in {(tmp / rel).parent for rel in wanted}:
            fsync_dir(d)
        if target.is_dir():
            for unit in units:
                os.rename(tmp / unit, target / unit)
            fsync_dir(target)
            tmp.rmdir()
        else:
            os.rename(tmp, target)
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pulled checkpoint %s (%s) into %s", ckid, sae or "all SAEs", target)
    return target
