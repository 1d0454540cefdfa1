"""What the trainer reads from: activation chunks with their origin, behind one interface (``ActivationSource``).

A chunk carries its origin (source key = topic/partition or file, offset) so the trainer can tell, at checkpoint time,
from where every untrained token can be read again. Implementations: ``kafka_source.KafkaActivationSource`` (the
stream) and ``file_source.FileActivationSource`` (cached activations).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

SourceKey = tuple[str, int]  # (topic or file, partition)


@dataclass
class Chunk:
    acts: torch.Tensor  # [n, d] as it arrived (fp16 from the wire), owned; the buffer converts on its device
    key: SourceKey
    offset: int
    producer_id: str
    seq: int


def staged(acts: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """One owned host copy at the arriving dtype; page-locked for a GPU trainer, so the buffer's copy to the device
    is asynchronous and moves the wire's bytes (fp16: half of fp32), converted there."""
    out = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=pin_memory)
    return out.copy_(acts)


class ActivationSource(Protocol):
    def start(self) -> None: ...
    def get(self, timeout: float) -> Chunk | None: ...
    def positions(self) -> dict[SourceKey, int]:
        """Per source key, the next offset not yet handed out: where to resume when nothing is pending."""
        ...
    def queued_offsets(self) -> dict[SourceKey, int]:
        """Per source key, the lowest offset read but not yet handed out."""
        ...
    def log_ids(self) -> dict[str, str]:
        """Per topic, the id of the log its positions are in (empty where there is none): a resume into another
        log under the same name must not seek these offsets in it."""
        ...
    def commit(self, offsets: dict[SourceKey, int]) -> None:
        """These resume offsets are in a durable checkpoint: record those of them the source can keep (a consumer
        group's committed offsets; a file keeps nothing)."""
        ...
    def close(self) -> None: ...
    @property
    def exhausted(self) -> bool: ...


class TokenQueue:
    """A FIFO bounded in tokens: the reader blocks when the trainer falls behind (memory stays bounded)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self._q: collections.deque[Chunk] = collections.deque()
        self._cv = threading.Condition()

    def put(self, chunk: Chunk, stop: threading.Event) -> bool:
        with self._cv:
            while self.tokens > 0 and self.tokens + chunk.acts.shape[0] > self.max_tokens:
                if stop.is_set():
                    return False
                self._cv.wait(0.2)
            self._q.append(chunk)
            self.tokens += chunk.acts.shape[0]
            self._cv.notify_all()
            return True

    def get(self, timeout: float) -> Chunk | None:
        with self._cv:
            if not self._q:
                self._cv.wait(timeout)
            if not self._q:
                return None
            chunk = self._q.popleft()
            self.tokens -= chunk.acts.shape[0]
            self._cv.notify_all()
            return chunk

    def min_offsets(self) -> dict[SourceKey, int]:
        with self._cv:
            out: dict[SourceKey, int] = {}
            for c in self._q:
                out[c.key] = min(out.get(c.key, c.offset), c.offset)
            return out
