"""Shared by the benchmarks: quiet logging, the machine line, CPU-time phases and plain aligned tables.

The machine is shared (load from other processes changes every figure), so each benchmark prints the load average
at start and end and, per phase, the process CPU utilisation (CPU seconds of all threads / wall seconds).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass

import torch


def quiet() -> None:
    """Only errors from streamd and kafka-python: the output is the table."""
    logging.basicConfig(level=logging.ERROR)
    for name in ("streamd", "kafka", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line(threads: int) -> str:
    return (f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, torch threads {threads}, load average (1/5/15 min) {load_average()}")


@dataclass
class Phase:
    """Wall and process CPU seconds between ``start()`` and ``stop()``."""

    wall: float = 0.0
    cpu: float = 0.0

    def start(self) -> Phase:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def stop(self) -> Phase:
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c
        return self

    @property
    def util(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0


def table(headers: list[str], rows: list[list[object]]) -> str:
    """Left-aligned first column, right-aligned numbers; floats and ints formatted by the caller or here."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
