"""Checkpoints on disk: atomic, self-describing, SAELens-loadable.

Layout under ``RUN/checkpoints/``::

    <id>/manifest.json                 run description + sha256 of every other file (written last)
    <id>/trainer_state.pt              the trainer's resume state (opaque here)
    <id>/offsets.json                  {"<topic>": {"<partition>": offset}}
    <id>/<sae>/cfg.json                SAELens 6.x config
    <id>/<sae>/sae_weights.safetensors W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec (+ threshold ...)
    <id>/<sae>/sparsity.safetensors    {"sparsity": log10 feature density [d_sae]}
    latest                             text file holding the newest complete id

A checkpoint is written into ``.tmp-<id>-<rand>/``, fsynced, then renamed into place, so any ``<id>/`` directory is
complete; ``latest`` moves only after that. Retention renames a victim back to ``.tmp-*`` before deleting it, so a
crash mid-delete never leaves a half checkpoint that looks complete. A crash leaves at most ``.tmp-*`` debris, which
the next writer removes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from streamd.files import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ID_RE = re.compile(r"^[0-9]{12,20}$")
# A path component that cannot be ".", "..", hidden, or carry a separator.
NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
OFFSETS = "offsets.json"
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_SPARSITY = "sparsity.safetensors"
LATEST = "latest"
# SAELens reads cfg.json as its pre-6.0 format unless metadata names a 6.x version.
SAELENS_CFG_VERSION = "6.0.0"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """Writing, reading or verifying a checkpoint failed; ``__cause__`` holds the underlying error if any."""


@dataclass
class SAEExport:
    """One SAE as the trainer hands it over: weights in raw activation units (any input scaling folded in).

    ``cfg`` holds the architecture's SAELens keys (``architecture``, ``apply_b_dec_to_input``, ``k``, ...);
    the store fills in ``d_in``, ``d_sae``, ``dtype``, ``device``, ``hook_name`` and ``metadata``.
    """

    name: str
    cfg: dict[str, Any]
    weights: dict[str, torch.Tensor]
    sparsity: torch.Tensor


@dataclass
class CheckpointInfo:
    id: str
    tokens: int
    created_at: str
    saes: list[str]
    path: Path


SEQ_DIGITS, TOKEN_DIGITS = 6, 14


def checkpoint_id(seq: int, tokens: int) -> str:
    """The ``seq``-th checkpoint of a run, at ``tokens`` tokens: 20 digits, write sequence first.

    Ids sort (numerically, as retention sorts them) in write order even after a rollback to an older checkpoint,
    and never repeat within a run, so a resumed run never re-points ``latest`` at an older directory that holds
    other weights and offsets. Ids of streamd 0.1 (12 digits, tokens only) read as sequence 0.
    """
    if tokens < 0 or not 0 < seq < 10**SEQ_DIGITS or tokens >= 10**TOKEN_DIGITS:
        raise ValueError(f"checkpoint sequence {seq} / tokens {tokens} out of range")
    return f"{seq:0{SEQ_DIGITS}d}{tokens:0{TOKEN_DIGITS}d}"


def checkpoint_seq(ckid: str) -> int:
    """The write sequence number of an id (0 for the 12-digit ids of streamd 0.1)."""
    return int(ckid[:SEQ_DIGITS]) if len(ckid) == SEQ_DIGITS + TOKEN_DIGITS else 0


def write_bytes(path: Path, data: bytes) -> None:
    """Every byte the store puts on disk goes through here (one place for tests to inject ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / MANIFEST}: {e}") from e


def _json_bytes(obj: Any) -> bytes:
    # default=str: a Path or similar in the trainer's config dict must not abort a checkpoint.
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _sae_files(sae: SAEExport, hook_name: str, tokens: int, run_meta: dict[str, Any]) -> dict[str, bytes]:
    """The three files of one SAE directory, with the SAELens config completed from the weights' shapes."""
    if not NAME_RE.match(sae.name):
        raise ValueError(f"SAE name {sae.name!r} is not a safe directory name")
    w = {k: v.detach().to("cpu").contiguous() for k, v in sae.weights.items()}
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - w.keys()
    if missing:
        raise ValueError(f"SAE {sae.name}: weights lack {sorted(missing)}")
    d_in, d_sae = w["W_enc"].shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for key, shape in expected.items():
        if tuple(w[key].shape) != shape:
            raise ValueError(f"SAE {sae.name}: {key} has shape {tuple(w[key].shape)}, expected {shape}")
    if tuple(sae.sparsity.shape) != (d_sae,):
        raise ValueError(f"SAE {sae.name}: sparsity has shape {tuple(sae.sparsity.shape)}, expected ({d_sae},)")
    cfg = {
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.cfg,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": _dtype_name(w["W_enc"]),
        "device": "cpu",
        "metadata": {
            **sae.cfg.get("metadata", {}),
            "hook_name": hook_name,
            "hook_head_index": None,
            "model_name": run_meta.get("model_name"),
            "context_size": run_meta.get("context_size"),
            "prepend_bos": run_meta.get("prepend_bos", True),
            "sae_lens_version": SAELENS_CFG_VERSION,
            "sae_lens_training_version": None,
            "streamd_version": run_meta.get("streamd_version"),
            "tokens_trained": tokens,
        },
    }
    sparsity = sae.sparsity.detach().to("cpu", torch.float32).contiguous()
    return {
        f"{sae.name}/{SAE_CFG}": _json_bytes(cfg),
        f"{sae.name}/{SAE_WEIGHTS}": safetensors_bytes(w),
        f"{sae.name}/{SAE_SPARSITY}": safetensors_bytes({"sparsity": sparsity}),
    }


class CheckpointStore:
    """The ``checkpoints/`` directory of one run.

    ``writer=True`` (the trainer, which holds the run's LOCK) creates the directory and removes stale ``.tmp-*``
    debris; readers (the server, ``load_sae``) pass ``writer=False`` so they never touch a write in progress.
    """

    def __init__(self, run_dir: Path, keep_last: int = 3, *, writer: bool = True) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.writer = writer
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in self.dir.glob(TMP_PREFIX + "*"):
                log.warning("removing stale %s left by an interrupted checkpoint", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ---- writing -------------------------------------------------------------------------------------------------

    def write(
        self,
        tokens: int,
        saes: list[SAEExport],
        trainer_state: dict[str, Any],
        offsets: dict[str, dict[Any, int]],
        manifest: dict[str, Any],
        hook_name: str,
    ) -> Path:
        """Write one complete checkpoint and point ``latest`` at it; return its directory.

        On any OSError the partial write is removed, ``latest`` and earlier checkpoints are left as they were, and
        CheckpointError is raised with the OSError as cause. On ENOSPC the store first frees every checkpoint but the
        one ``latest`` names (the newest good one) and tries once more. Every call writes a new checkpoint under a
        new id (see :func:`checkpoint_id`).
        ``manifest`` keys ``model_name``, ``context_size``, ``prepend_bos``, ``streamd_version`` also go into each
        SAE's SAELens metadata.
        """
        if not self.writer:
            raise CheckpointError("this CheckpointStore was opened read-only (writer=False)")
        if len({s.name for s in saes}) != len(saes) or not saes:
            raise ValueError(f"need one or more SAEs with unique names, got {[s.name for s in saes]}")
        ckid = checkpoint_id(self._next_seq(), tokens)
        final = self.dir / ckid

        files: dict[str, bytes] = {}
        for sae in saes:
            files.update(_sae_files(sae, hook_name, tokens, manifest))
        state = io.BytesIO()
        torch.save(trainer_state, state)
        files[TRAINER_STATE] = state.getvalue()
        files[OFFSETS] = _json_bytes({t: {str(p): int(o) for p, o in parts.items()} for t, parts in offsets.items()})
        full_manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "id": ckid,
            "tokens": tokens,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hook_name": hook_name,
            "saes": [s.name for s in saes],
            "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())},
        }
        files[MANIFEST] = _json_bytes(full_manifest)  # last: its presence marks the temp dir as fully written

        try:
            self._write_dir(ckid, files, [s.name for s in saes])
        except OSError as e:
            if e.errno != errno.ENOSPC or not self._free_space():
                raise self._failed(ckid, e) from e
            log.warning("checkpoint %s: no space left on device; freed older checkpoints, trying once more", ckid)
            try:
                self._write_dir(ckid, files, [s.name for s in saes])
            except OSError as e2:
                raise self._failed(ckid, e2) from e2
        log.info("checkpoint %s written (%d files, %.1f MB)", ckid, len(files), sum(map(len, files.values())) / 1e6)
        self._apply_retention()
        return final

    @staticmethod
    def _failed(ckid: str, e: OSError) -> CheckpointError:
        reason = "no space left on device" if e.errno == errno.ENOSPC else str(e)
        return CheckpointError(f"writing checkpoint {ckid} failed: {reason}")

    def _write_dir(self, ckid: str, files: dict[str, bytes], sae_names: list[str]) -> None:
        """Temp dir, files, fsyncs, rename, pointer; on OSError nothing of it is left and the error propagates."""
        final = self.dir / ckid
        tmp = self.dir / f"{TMP_PREFIX}{ckid}-{secrets.token_hex(4)}"
        renamed = False
        try:
            tmp.mkdir()
            for name in sae_names:
                (tmp / name).mkdir()
            for rel, data in files.items():
                write_bytes(tmp / rel, data)
            for name in sae_names:
                fsync_dir(tmp / name)
            fsync_dir(tmp)
            os.rename(tmp, final)
            renamed = True
            fsync_dir(self.dir)
            self._commit_latest(ckid)
        except OSError:
            self._discard(final if renamed else tmp)
            raise

    def _free_space(self) -> bool:
        """Out of space: remove every checkpoint but the one ``latest`` names. True when anything was removed."""
        keep = self._latest_id()
        if keep is None or not (self.dir / keep).is_dir():
            return False  # without a good checkpoint to keep, nothing is deleted to make room
        doomed = [p for p in self.dir.iterdir() if ID_RE.match(p.name) and p.is_dir() and p.name != keep]
        for p in doomed:
            log.warning("no space left: removing checkpoint %s (keeping %s)", p.name, keep)
            self._discard(p)
        return bool(doomed)

    def _next_seq(self) -> int:
        """One more than any sequence number on disk or named by ``latest``."""
        ids = [p.name for p in self.dir.iterdir() if ID_RE.match(p.name)] + [self._latest_id() or "0" * 12]
        return 1 + max(checkpoint_seq(i) for i in ids)

    def _commit_latest(self, ckid: str) -> None:
        tmp = self.dir / f"{TMP_PREFIX}latest-{secrets.token_hex(4)}"
        try:
            write_bytes(tmp, (ckid + "\n").encode())
            os.replace(tmp, self.dir / LATEST)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        try:  # the pointer has moved: from here on a failure must not undo the checkpoint it names
            fsync_dir(self.dir)
        except OSError as e:
            log.warning("fsync of %s after moving latest failed: %s", self.dir, e)

    def _discard(self, path: Path) -> None:
        """Remove a checkpoint dir without ever leaving a partial ``<id>/``: rename it to ``.tmp-*`` first."""
        if not path.exists():
            return
        doomed = path
        if not path.name.startswith(TMP_PREFIX):
            doomed = self.dir / f"{TMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}"
            try:
                os.rename(path, doomed)
            except OSError as e:
                log.warning("could not remove checkpoint %s: %s", path, e)
                return
        shutil.rmtree(doomed, ignore_errors=True)

    def _apply_retention(self) -> None:
        """Keep the newest ``keep_last`` checkpoints and whatever ``latest`` names; failures only warn."""
        pointed = self._latest_id()
        ids = sorted((p.name for p in self.dir.iterdir() if ID_RE.match(p.name) and p.is_dir()), key=int)
        for ckid in ids[: max(0, len(ids) - self.keep_last)]:
            if ckid != pointed:
                log.info("retention: removing checkpoint %s", ckid)
                self._discard(self.dir / ckid)

    # ---- reading -------------------------------------------------------------------------------------------------

    def _latest_id(self) -> str | None:
        try:
            ckid = (self.dir / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return ckid if ID_RE.match(ckid) else None

    def latest(self) -> Path | None:
        """The directory ``latest`` names, or None when there is no pointer (or it names a missing checkpoint)."""
        ckid = self._latest_id()
        return self.dir / ckid if ckid and (self.dir / ckid).is_dir() else None

    def latest_id(self) -> str | None:
        """The id ``latest`` names (well-formed, whether or not that directory exists), or None."""
        return self._latest_id()

    def ids(self) -> list[str]:
        """Ids of the checkpoint directories on disk, in write order (oldest first), readable or not."""
        if not self.dir.is_dir():
            return []
        return sorted((p.name for p in self.dir.iterdir() if ID_RE.match(p.name) and p.is_dir()), key=int)

    def path(self, ckid: str) -> Path | None:
        """The directory of checkpoint ``ckid`` if it is a well-formed id that exists."""
        return self.dir / ckid if ID_RE.match(ckid) and (self.dir / ckid).is_dir() else None

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first; unreadable ones are logged and skipped."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted((p for p in self.dir.iterdir() if ID_RE.match(p.name)), key=lambda p: int(p.name)):
            try:
                m = read_manifest(p)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", p.name, e)
                continue
            out.append(CheckpointInfo(p.name, int(m["tokens"]), m["created_at"], list(m["saes"]), p))
        return out

    @staticmethod
    def read_offsets(path: Path) -> dict[str, dict[int, int]]:
        """The consumer offsets saved with a checkpoint: {topic: {partition: next offset to read}}."""
        try:
            raw = json.loads((Path(path) / OFFSETS).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read offsets of {path}: {e}") from e
        return {topic: {int(p): int(o) for p, o in parts.items()} for topic, parts in raw.items()}

    @staticmethod
    def read_trainer_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The trainer's state dict. Loaded with ``weights_only=True``: tensors, numbers, strings, containers only."""
        try:
            return torch.load(Path(path) / TRAINER_STATE, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises pickle / runtime errors of many kinds on a bad file
            raise CheckpointError(f"cannot read trainer state of {path}: {e}") from e

    @staticmethod
    def verify(path: Path) -> dict[str, Any]:
        """Re-hash every file against the manifest; return the manifest, or raise CheckpointError naming each fault."""
        path = Path(path)
        manifest = read_manifest(path)
        listed: dict[str, str] = manifest.get("files", {})
        faults = []
        for rel, want in sorted(listed.items()):
            f = path / rel
            if not f.is_file():
                faults.append(f"{rel}: missing")
            elif (got := sha256_file(f)) != want:
                faults.append(f"{rel}: sha256 {got[:12]}... != manifest {want[:12]}...")
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
        faults += [f"{rel}: not in manifest" for rel in sorted(on_disk - listed.keys())]
        if faults:
            raise CheckpointError(f"checkpoint {path} failed verification:\n  " + "\n  ".join(faults))
        return manifest
