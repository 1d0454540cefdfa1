"""The torch-free helpers: one cache root, one file hash; and the trainer's site id needs no language-model code."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from streamd.files import cache_root, sha256_file


def test_cache_root_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STREAMD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "streamd"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset (XDG base directory spec)
    assert cache_root() == tmp_path / "home" / ".cache" / "streamd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "streamd"
    monkeypatch.setenv("STREAMD_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"  # taken as is: no "streamd" appended
    monkeypatch.setenv("STREAMD_CACHE", "")
    assert cache_root() == tmp_path / "xdg" / "streamd"


def test_sha256_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # spans several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()


def test_trainer_site_id_imports_no_model_code(tmp_path: Path) -> None:
    """identity and files are torch-free; the trainer computes its expected site id without the produce package."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    script = f"""
import os, sys
os.environ["STREAMD_CACHE"] = {str(tmp_path / "cache")!r}
import streamd.identity, streamd.files
assert "torch" not in sys.modules, "identity/files pulled in torch"
from streamd.config import StreamdConfig
from streamd.train.trainer import expected_site_id
cfg = StreamdConfig(trainer={{"model_path": {str(model)!r}}})
sid = expected_site_id(cfg)
want = streamd.identity.site_id(streamd.identity.model_content_hash({str(model)!r}), "resid_post", cfg.trainer.site.layer)
assert sid == want, (sid, want)
bad = sorted(m for m in sys.modules if m.startswith(("streamd.produce", "transformers")))
assert not bad, bad
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
