"""What one drill reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    tried: int  # runs of the scenario
    faults: int  # faults injected
    survived: int  # faults the system came through as promised
    inputs: int  # inputs tried (messages, requests, ...)
    lost: int  # tokens (or downloads) lost or torn: must be 0; -1 when the drill itself broke
    note: str = ""
