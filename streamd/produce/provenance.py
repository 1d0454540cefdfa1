"""Provenance of published tokens, and the producer's text-offset commits that follow the broker's acks.

Every activation message carries the provenance of its rows in a Kafka record header ``streamd-prov``: JSON, a list
of spans ``[partition, offset, doc_id, tok_lo, n]`` in row order: ``n`` consecutive rows are tokens ``tok_lo ..
tok_lo+n-1`` of document ``doc_id`` (text topic ``partition`` and ``offset``; -1 for sources not read from the text
topic). A header is invisible to the wire format: trainers of any version read the message as before (and ignore
it); readers that want it use ``decode_provenance``.

``CommitTracker``: a text offset may be committed only once every activation message built from documents up to
it is acknowledged by the broker. The producer tells it each document as it is read (``add``), each message as it
is sent and acknowledged (``sent`` / ``acked``), and how far the packer has placed every token (``built``); the text
reader commits ``committable()``. Thread-safe (acks arrive on kafka-python's I/O thread).
"""

from __future__ import annotations

import json
import threading
from collections import deque

import torch

from streamd.produce.text import DocMeta

PROV_HEADER = "streamd-prov"


def spans(ords: torch.Tensor, poss: torch.Tensor, metas: dict[int, DocMeta]) -> list[list[int]]:
    """Runs of rows from one document, as ``[partition, offset, doc_id, tok_lo, n]``."""
    out: list[list[int]] = []
    if not len(ords):
        return out
    o, p = ords.tolist(), poss.tolist()
    start = 0
    for i in range(1, len(o) + 1):
        if i == len(o) or o[i] != o[start] or p[i] != p[i - 1] + 1:
            m = metas.get(o[start]) or DocMeta(-1)
            out.append([m.partition, m.offset, m.doc_id, p[start], i - start])
            start = i
    return out


def encode_provenance(span_list: list[list[int]]) -> bytes:
    return json.dumps(span_list, separators=(",", ":")).encode()


def decode_provenance(headers) -> list[list[int]] | None:
    """The spans of a consumed record's headers (``ConsumerRecord.headers``), None without them."""
    for k, v in headers or ():
        if k == PROV_HEADER:
            return json.loads(v)
    return None


class CommitTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # ordinal -> messages sent, not yet acknowledged
        self._queues: dict[int, deque[tuple[int, int]]] = {}  # partition -> (ordinal, offset) in read order
        self._built = -1
        self._next: dict[int, int] = {}  # partition -> next offset to commit
        self.done = 0  # documents that became committable, ever

    def add(self, ordinal: int, meta: DocMeta) -> None:
        if meta.partition < 0:
            return
        with self._lock:
            self._queues.setdefault(meta.partition, deque()).append((ordinal, meta.offset))

    def sent(self, ordinals: set[int]) -> None:
        with self._lock:
            for o in ordinals:
                self._pending[o] = self._pending.get(o, 0) + 1

    def acked(self, ordinals: set[int]) -> None:
        with self._lock:
            for o in ordinals:
                n = self._pending.get(o)
                if n is None:
                    continue  # forgotten at a revocation
                if n <= 1:
                    del self._pending[o]
                else:
                    self._pending[o] = n - 1

    def built(self, through: int) -> None:
        with self._lock:
            self._built = max(self._built, through)

    def committable(self) -> dict[int, int]:
        """Per partition, the offset after the last document that, with every one before it, is done."""
        with self._lock:
            for part, q in self._queues.items():
                while q and q[0][0] <= self._built and q[0][0] not in self._pending:
                    self._next[part] = q.popleft()[1] + 1
                    self.done += 1
            return dict(self._next)

    def reset(self) -> None:
        """Forget everything (the partitions were revoked: another producer re-reads what was not committed)."""
        with self._lock:
            self._pending.clear()
            self._queues.clear()
            self._next.clear()
            self._built = -1
