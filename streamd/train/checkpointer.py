"""Checkpoint assembly: what a checkpoint holds, and the order that makes it safe.

``write`` builds the SAE exports, the trainer state and the manifest, writes them durably through
``run.checkpoints.CheckpointStore``, and only then commits the resume offsets through the source and lets the
retention strategy release what is fully trained. A checkpoint names per partition the offset from which every
untrained token can be read again, so a SIGKILL loses no token. ``read_resume`` reads the same state back.

``trainer_state.pt`` keys: ``tokens, scale, eval_set, d_in, buffer_rng, positions, learners``. The manifest's
``topic_ids`` name the log (topic id) each topic's offsets are in: a broker that lost its log between the last check
and the checkpoint (or while the trainer was down) has another one, and a resume reads it from the start instead of
seeking the old log's offsets in it. Checkpoints without them (streamd before 0.3) resume unchecked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from streamd import __version__
from streamd.config import StreamdConfig
from streamd.metrics import TrainerMetrics
from streamd.run.checkpoints import CheckpointError, CheckpointStore, SAEExport
from streamd.stream.retention import Retention
from streamd.torch_utils import to_cpu
from streamd.train.learner import Learner
from streamd.train.source import SourceKey

if TYPE_CHECKING:
    from streamd.train.intake import Intake

log = logging.getLogger(__name__)


@dataclass
class Resume:
    """Where the latest checkpoint left the run (all empty for a new run)."""

    tokens: int = 0
    state: dict | None = None  # trainer_state.pt
    start_offsets: dict[SourceKey, int] = field(default_factory=dict)  # resume here
    reread_below: dict[SourceKey, int] = field(default_factory=dict)  # what was read before: a re-read below it
    topic_ids: dict[str, str] = field(default_factory=dict)  # the log each topic's start offsets are in


def read_resume(store: CheckpointStore, metrics: TrainerMetrics | None = None) -> Resume:
    """The state of the newest good checkpoint: ``latest``, verified against its manifest's hashes; if it is corrupt
    (or ``latest`` is missing), the newest older one that verifies, with a loud log line and
    ``streamd_resume_fallbacks_total``. Raises CheckpointError naming every fault when checkpoints exist but none is
    good: starting afresh would re-read the stream from the group's committed offsets and lose the trained state."""
    pointed = store.latest_id()
    ids = store.ids()
    if pointed is not None and pointed in ids:
        candidates = [pointed] + [i for i in reversed(ids) if int(i) < int(pointed)]
    else:
        candidates = list(reversed(ids))
        if candidates:
            log.error("checkpoints/latest %s; looking for the newest good checkpoint among %d on disk",
                      f"names {pointed}, which does not exist" if pointed else "is missing", len(candidates))
    faults: list[str] = []
    for ckid in candidates:
        path = store.dir / ckid
        try:
            manifest = store.verify(path)
            state = store.read_trainer_state(path)
            offsets = store.read_offsets(path)
        except CheckpointError as e:
            log.error("checkpoint %s cannot be resumed from: %s", ckid, e)
            faults.append(f"{ckid}: {e}")
            continue
        if ckid != pointed:
            log.error("RESUMING FROM AN OLDER CHECKPOINT %s at %d tokens (latest: %s); what was trained after it is "
                      "trained again", ckid, state["tokens"], pointed or "none")
            if metrics is not None:
                metrics.resume_fallbacks.inc()
        else:
            log.info("resuming from checkpoint %s at %d tokens", ckid, state["tokens"])
        start = {(topic, int(part)): off for topic, parts in offsets.items() for part, off in parts.items()}
        return Resume(state["tokens"], state, start, {tuple(k): v for k, v in state["positions"]},
                      dict(manifest.get("topic_ids") or {}))
    if faults:
        raise CheckpointError(f"no checkpoint in {store.dir} can be resumed from:\n  " + "\n  ".join(faults))
    return Resume()


Offsets = dict[SourceKey, int]
TopicIds = dict[str, str]
# (resume offsets, positions, topic ids) -> merged on rank 0
Gather = Callable[[Offsets, Offsets, TopicIds], tuple[Offsets, Offsets, TopicIds] | None]


class Checkpointer:
    """Writes checkpoints; after a failure (a full disk) the next attempt waits ``checkpoints.retry_seconds``,
    doubling with each failure in a row up to ``retry_max_seconds``, so a disk that stays full costs one attempt
    and one log line per back-off, not one per checkpoint interval. The last good checkpoint is never touched.

    Data-parallel, ``gather`` collects every rank's resume offsets on rank 0 (``Collective.gather_offsets``):
    rank 0 writes the checkpoint and commits every partition's offset (any member of a group may commit any
    partition); the other ranks only hand their offsets over."""

    def __init__(self, cfg: StreamdConfig, store: CheckpointStore | None, metrics: TrainerMetrics,
                 retention: Retention, site_id: int | None, gather: Gather | None = None) -> None:
        self.cfg, self.store, self.metrics, self.retention, self.site_id = cfg, store, metrics, retention, site_id
        self.gather = gather
        self.clock = time.monotonic  # tests replace it
        self.failures = 0  # in a row
        self._retry_at = 0.0

    def owed(self) -> float:
        """Data-parallel, rank 0's word at the step exchange (only it knows how a write went): 1.0 when a write
        failed and its back-off is over (every rank checkpoints now, due or not), -1.0 while the back-off runs (no
        rank checkpoints, however due), 0.0 otherwise."""
        if not self.failures:
            return 0.0
        return 1.0 if self.clock() >= self._retry_at else -1.0

    def write(self, tokens: int, intake: Intake, learners: dict[str, Learner], *, final: bool = False) -> Path | None:
        """Checkpoint now; None when there is nothing to save yet, the write failed or a failure's back-off is not
        over (training goes on), or on a rank other than 0. ``final`` (the run ends): tried even during a back-off."""
        if not learners:
            return None
        t0 = time.monotonic()
        # the logs first, then the offsets: a lost log noticed in between pairs the old ids with the new log's
        # offsets (a resume then reads it from the start again: re-reads), never the new ids with the old offsets
        ids = intake.source.log_ids()
        offsets, positions = intake.resume_offsets()
        if self.gather is not None:  # every rank takes part, whatever rank 0 then decides: no unmatched collective
            merged = self.gather(offsets, positions, ids)
            if merged is None:
                return None
            offsets, positions, ids = merged
        if not final and self.clock() < self._retry_at:
            return None
        nested: dict[str, dict[int, int]] = {}
        for (topic, part), off in offsets.items():
            nested.setdefault(topic, {})[part] = off
        scale = intake.scale
        state = to_cpu({
            "tokens": tokens, "scale": scale, "eval_set": intake.eval_set, "d_in": intake.buffer.d_in,
            "buffer_rng": intake.buffer.rng_state, "positions": [(list(k), v) for k, v in positions.items()],
            "learners": {n: lr.state_dict() for n, lr in learners.items()},
        })
        exports = [
            SAEExport(name, lr.sae.saelens_cfg(), lr.sae.export_tensors(scale), lr.density().clamp_min(1e-10).log10())
            for name, lr in learners.items()
        ]
        tcfg = self.cfg.trainer
        manifest = {
            "streamd_version": __version__, "config": self.cfg.model_dump(mode="json"),
            "seeds": {s.name: s.seed for s in tcfg.saes},
            "site_id": f"{self.site_id:016x}" if self.site_id is not None else None,
            "scale": scale, "tokens": tokens, "topic_ids": ids,
        }
        try:
            path = self.store.write(tokens, exports, state, nested, manifest, tcfg.site.hook_name)
        except CheckpointError as e:
            ck = self.cfg.checkpoints
            self.failures += 1
            delay = min(ck.retry_seconds * 2 ** (self.failures - 1), ck.retry_max_seconds)
            self._retry_at = self.clock() + delay
            self.metrics.checkpoint_failures.inc()
            self.metrics.checkpoint_retry_seconds.set(delay)
            log.error("checkpoint at %d tokens failed (%d in a row), training continues; the last good checkpoint "
                      "stays; next attempt in %.0f s: %s", tokens, self.failures, delay, e)
            return None
        if self.failures:
            log.info("checkpoint written again after %d failed attempt(s)", self.failures)
        self.failures, self._retry_at = 0, 0.0
        self.metrics.checkpoint_retry_seconds.set(0)
        intake.source.commit(offsets)
        self.retention.release(offsets, positions)
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_last_success.set(time.time())
        self.metrics.checkpoint_duration.set(time.monotonic() - t0)
        log.info("checkpoint %s written in %.2fs", path.name, time.monotonic() - t0)
        return path
