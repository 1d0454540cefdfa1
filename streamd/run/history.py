"""A bounded on-disk log of training metrics, one JSON object per line, for plots after (or during) a run.

Prometheus keeps what it scrapes, but a run without a Prometheus server still needs its curves; this file is that
record. It is bounded: when ``metrics.jsonl`` would grow past ``max_bytes`` it becomes ``metrics.jsonl.1``
(replacing the previous one), so at most about 2 x ``max_bytes`` is kept.

Record format (written by the trainer at its progress cadence)::

    {"time": float, "tokens": int, "tokens_per_second": float, "buffer_fill": float,
     "saes": {"<name>": {<key>: float for every key of metrics.STEP_STATS>, "loss_<term>": float, ...,
                         "density_histogram": {bucket: fraction}}}}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

FILENAME = "metrics.jsonl"


def _finite(obj: Any) -> Any:
    """NaN / inf become null: JSON has no spelling for them and a reader must not choke on one bad step."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class MetricsHistory:
    """Appends records to ``path`` (normally ``RUN/metrics.jsonl``), rotating to ``path.1`` past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(_finite(record), separators=(",", ":"), allow_nan=False) + "\n").encode()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_bytes:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            size = 0
        append_line(self.path, line, size)


def append_line(path: Path, line: bytes, size: int | None = None) -> None:
    """Append one whole line or nothing: a write that fails (ENOSPC) is cut back off before the error propagates, so
    a torn record never glues itself onto the next one. ``size``: the file's size before, when known."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if size is None:
            size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run, oldest first: the rotated file, then the current one. A torn last line is skipped."""
    current = Path(run_dir) / FILENAME
    records: list[dict[str, Any]] = []
    for p in (current.with_name(FILENAME + ".1"), current):
        if not p.is_file():
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash mid-write
    return records
