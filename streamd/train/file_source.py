"""Cached activations (``.npy`` or ``.safetensors``, [n_tokens, d_in]) as an activation source."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from streamd.train.source import Chunk, SourceKey, staged


FINITE_CHECK_BYTES = 64 << 20  # the finiteness check reads this much of the file at a time


class FileActivationSource:
    """Cached activations (``.npy`` or ``.safetensors``, [n_tokens, d_in]) trained the same way as the stream.

    The offset is the row index, so resume works as for Kafka; ``loop`` restarts at row 0 when the file ends.
    """

    def __init__(self, path: Path, chunk_tokens: int, loop: bool = False, start_row: int = 0,
                 pin_memory: bool = False) -> None:
        self.path, self.chunk_tokens, self.loop, self.pin_memory = Path(path), chunk_tokens, loop, pin_memory
        self.acts = load_activation_file(self.path)
        self.key = self.key_for(self.path)
        self._row = 0 if loop and start_row >= len(self.acts) else start_row  # a finished run stays finished
        self.exhausted = False

    @classmethod
    def key_for(cls, path: Path) -> SourceKey:
        """The source key of a file's rows (its name: a checkpoint resumes the same file wherever it lies)."""
        return (f"file:{Path(path).name}", 0)

    @property
    def d_in(self) -> int:
        return self.acts.shape[1]

    def start(self) -> None:
        pass

    def get(self, timeout: float) -> Chunk | None:
        if self._row >= len(self.acts):
            if not self.loop:
                self.exhausted = True
                return None
            self._row = 0
        lo, hi = self._row, min(self._row + self.chunk_tokens, len(self.acts))
        self._row = hi
        chunk = staged(self.acts[lo:hi], self.pin_memory)  # owned: never a view on the read-only map
        return Chunk(chunk, self.key, lo, self.path.name, lo // self.chunk_tokens)

    def positions(self) -> dict[SourceKey, int]:
        return {self.key: self._row}

    def queued_offsets(self) -> dict[SourceKey, int]:
        return {}

    def log_ids(self) -> dict[str, str]:
        return {}  # a file is its own identity

    def commit(self, offsets: dict[SourceKey, int]) -> None:
        pass  # the checkpoint's offsets are the only record of how far a file was read

    def close(self) -> None:
        pass


def load_activation_file(path: Path) -> torch.Tensor:
    """Load a [n_tokens, d_in] activation array from ``.npy`` (memory-mapped) or ``.safetensors`` (one tensor)."""
    if not path.is_file():
        raise FileNotFoundError(f"activation file {path} does not exist")
    if path.suffix == ".npy":
        import numpy as np

        arr = np.load(path, mmap_mode="r")  # chunks are copied out as they are read: the map stays read-only
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(arr)  # a view on the map, strides and all: nothing is read into memory here
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"{path} must hold exactly one tensor, found {sorted(tensors)}")
        t = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path}: expected a .npy or .safetensors file")
    if t.dim() != 2:
        raise ValueError(f"{path}: activations must be [n_tokens, d_in], got shape {tuple(t.shape)}")
    rows = max(1, FINITE_CHECK_BYTES // max(1, t.shape[1] * t.element_size()))
    for lo in range(0, len(t), rows):  # in chunks: a whole-array check would allocate n x d bytes at once
        if not torch.isfinite(t[lo : lo + rows]).all():
            bad = lo + int((~torch.isfinite(t[lo : lo + rows])).any(dim=1).nonzero()[0])
            raise ValueError(f"{path}: holds non-finite values (first in row {bad})")
    return t
