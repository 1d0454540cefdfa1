"""Intake: from an activation source into the shuffle buffer.

Tokens whose norm is above ``trainer.outlier_factor`` x the running median norm are dropped from each chunk as it
arrives (massive-activation tokens, see ``streamd.outliers``); the chunk keeps its offset, so for resume a dropped
token counts as trained. Each chunk then goes to the held-out eval set first, then to the sample that fixes the norm scale, then into the buffer.
The intake also keeps the table of source keys (buffer slots store an index into it) and the chunk the full buffer
could not take, so it can say, at checkpoint time, from where every untrained token can be read again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import torch

from streamd.config import TrainerConfig
from streamd.metrics import TrainerMetrics
from streamd.outliers import NormOutliers, robust_mean_norm
from streamd.train.buffer import ShuffleBuffer
from streamd.train.source import ActivationSource, Chunk, SourceKey

log = logging.getLogger(__name__)

FILL_NOTE_S = 10.0  # how often on_filling hears the fill


class Intake:
    """``make_buffer(d_in)`` builds the buffer once the first chunk shows ``d_in``; ``on_filling(fill)`` hears, every
    few seconds, how full the buffer is until training starts. ``scale`` and ``eval_set`` come from a checkpoint."""

    def __init__(
        self,
        source: ActivationSource,
        tcfg: TrainerConfig,
        metrics: TrainerMetrics,
        make_buffer: Callable[[int], ShuffleBuffer],
        stop: threading.Event,
        *,
        on_filling: Callable[[float], None] | None = None,
        scale: float | None = None,
        eval_set: torch.Tensor | None = None,
    ) -> None:
        self.source, self.tcfg, self.metrics, self.stop = source, tcfg, metrics, stop
        self.make_buffer, self.on_filling = make_buffer, on_filling
        self.scale, self.eval_set = scale, eval_set
        self.scale_tokens = 0  # how many tokens the scale was estimated from here (0: given, or not yet)
        self.buffer: ShuffleBuffer | None = None
        self.keys: list[SourceKey] = []  # buffer slots store an index into this list
        self._key_ids: dict[SourceKey, int] = {}
        self._pending: Chunk | None = None  # what the full buffer could not take yet
        self._norm_sample: list[torch.Tensor] = []
        self._last_fill_note = 0.0
        self.waiting_since: float | None = None  # monotonic time the source went quiet, once training had begun
        self.on_waiting: Callable[[float], None] | None = None  # hears the seconds waited, at every empty read
        self.outliers = NormOutliers(tcfg.outlier_factor) if tcfg.outlier_factor is not None else None

    def fill(self, patience: float | None = None) -> bool:
        """Fill the buffer's free slots; returns False when the source ended or a stop was asked before it filled.
        With ``patience`` (data-parallel: a rank must not hold up the others' step), it also returns False once
        the source has had nothing for that many seconds."""
        deadline = None if patience is None else time.monotonic() + patience
        while self.buffer is None or not self.buffer.full:
            if self.stop.is_set():
                return False
            chunk = self._pending
            self._pending = None
            if chunk is None:
                wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
                chunk = self.source.get(timeout=wait)
                if chunk is None:
                    if self.source.exhausted or self.stop.is_set():
                        return False
                    if self.buffer is not None and self.buffer.served:  # a stream gone quiet: keep waiting, say so
                        self.waiting_since = self.waiting_since or time.monotonic()
                        if self.on_waiting:
                            self.on_waiting(time.monotonic() - self.waiting_since)
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    continue
                self.waiting_since = None
                chunk = self._drop_outliers(chunk)
            self.ensure_buffer(chunk.acts.shape[1])
            self._pending = self._take(chunk)
            self.metrics.buffer_fill_ratio.set(self.buffer.fill_ratio)
            if self.buffer.served == 0 and self.on_filling and time.monotonic() - self._last_fill_note > FILL_NOTE_S:
                self._last_fill_note = time.monotonic()
                self.on_filling(self.buffer.fill_ratio)
        if self.scale is None:
            self._fix_scale()
        return True

    def ensure_buffer(self, d_in: int) -> ShuffleBuffer:
        """The buffer, built on first need: the first chunk, or (data-parallel) the first step of a rank that has
        had no data yet."""
        if self.buffer is None:
            self.buffer = self.make_buffer(d_in)
        return self.buffer

    def _drop_outliers(self, chunk: Chunk) -> Chunk:
        """The chunk without its tokens above outlier_factor x the running median norm (same key and offset: the
        offsets bookkeeping sees a dropped token as trained), counted in streamd_outlier_tokens_total."""
        if self.outliers is None:
            return chunk
        ok = self.outliers.inliers(torch.linalg.vector_norm(chunk.acts, dim=1, dtype=torch.float32))
        if bool(ok.all()):
            return chunk
        self.metrics.outlier_tokens.labels(reason="norm").inc(int((~ok).sum()))
        return Chunk(chunk.acts[ok], chunk.key, chunk.offset, chunk.producer_id, chunk.seq)

    def _key_index(self, key: SourceKey) -> int:
        if key not in self._key_ids:
            self._key_ids[key] = len(self.keys)
            self.keys.append(key)
        return self._key_ids[key]

    def _take(self, chunk: Chunk) -> Chunk | None:
        """Route a chunk: held-out eval set first, then the norm estimate sample, then the buffer. Returns what is
        left over when the buffer is full."""
        acts = chunk.acts
        if self.eval_set is None or len(self.eval_set) < self.tcfg.eval_tokens:
            have = 0 if self.eval_set is None else len(self.eval_set)
            k = min(self.tcfg.eval_tokens - have, len(acts))
            part = acts[:k].to(torch.float16)
            self.eval_set = part if self.eval_set is None else torch.cat([self.eval_set, part])
            acts = acts[k:]
            if len(acts) == 0:
                return None
            chunk = Chunk(acts, chunk.key, chunk.offset, chunk.producer_id, chunk.seq)
        if self.scale is None:
            self._norm_sample.append(acts[: self.tcfg.norm_estimate_tokens].float())
            if sum(len(a) for a in self._norm_sample) >= min(self.tcfg.norm_estimate_tokens, self.tcfg.buffer_tokens):
                self._fix_scale()
        k = self.buffer.add(acts, self._key_index(chunk.key), chunk.offset)
        if k == len(acts):
            return None
        return Chunk(acts[k:], chunk.key, chunk.offset, chunk.producer_id, chunk.seq)

    def _fix_scale(self) -> None:
        """Constant scale with E||x * scale|| = sqrt(d_in) (Anthropic's normalisation), from the first tokens; the
        mean is over the tokens at most outlier_factor x the sample's median norm, so a few massive tokens (the
        intake's running median drops most before, this catches the first ones) cannot skew it."""
        sample = torch.cat(self._norm_sample)
        mean = robust_mean_norm(sample.norm(dim=-1), self.tcfg.outlier_factor)
        self.scale = math.sqrt(sample.shape[1]) / max(mean, 1e-12)
        self.scale_tokens = len(sample)
        self._norm_sample = []
        log.info("activation scale fixed at %.6g from %d tokens", self.scale, len(sample))

    def last_served(self) -> list[list]:
        """The buffer's last batch by origin: ``[topic or file, partition, offset, tokens]`` per message."""
        src, off = self.buffer.last_origins
        pairs, counts = torch.unique(torch.stack([src.long(), off]), dim=1, return_counts=True)
        return [[*self.keys[s], o, c] for (s, o), c in zip(pairs.T.tolist(), counts.tolist())]

    def resume_offsets(self) -> tuple[dict[SourceKey, int], dict[SourceKey, int]]:
        """(offsets to resume from, positions read so far). Positions are taken before the queue so that a record
        handed over in between is seen in one or the other, never in neither."""
        positions = self.source.positions()
        lows = dict(positions)
        pending = [self.source.queued_offsets()]
        if self.buffer is not None:
            pending.append({self.keys[i]: o for i, o in self.buffer.pending_offsets().items()})
        if self._pending is not None:
            pending.append({self._pending.key: self._pending.offset})
        for group in pending:
            for key, off in group.items():
                lows[key] = min(lows.get(key, off), off)
        return lows, positions
