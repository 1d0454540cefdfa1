"""Checkpoint assembly: what a checkpoint holds, and the order that makes it safe.

``write`` builds the SAE exports, the trainer state and the manifest, writes them durably through
``run.checkpoints.CheckpointStore``, and only then commits the resume offsets through the source and lets the
retention strategy release what is fully trained. A checkpoint names per partition the offset from which every
untrained token can be read again, so a SIGKILL loses no token. ``read_resume`` reads the same state back.

``trainer_state.pt`` keys: ``tokens, scale, eval_set, d_in, buffer_rng, positions, learners``.
"""

from __future__ import annotations

import logging
import time
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


def read_resume(store: CheckpointStore) -> Resume:
    latest = store.latest()
    if latest is None:
        return Resume()
    state = store.read_trainer_state(latest)
    start = {(topic, int(part)): off for topic, parts in store.read_offsets(latest).items()
             for part, off in parts.items()}
    log.info("resuming from checkpoint %s at %d tokens", latest.name, state["tokens"])
    return Resume(state["tokens"], state, start, {tuple(k): v for k, v in state["positions"]})


class Checkpointer:
    def __init__(self, cfg: StreamdConfig, store: CheckpointStore, metrics: TrainerMetrics, retention: Retention,
                 site_id: int | None) -> None:
        self.cfg, self.store, self.metrics, self.retention, self.site_id = cfg, store, metrics, retention, site_id

    def write(self, tokens: int, intake: Intake, learners: dict[str, Learner]) -> Path | None:
        """Checkpoint now; None when there is nothing to save yet or the write failed (training goes on)."""
        if not learners:
            return None
        t0 = time.monotonic()
        offsets, positions = intake.resume_offsets()
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
            "scale": scale, "tokens": tokens,
        }
        try:
            path = self.store.write(tokens, exports, state, nested, manifest, tcfg.site.hook_name)
        except CheckpointError as e:
            log.error("checkpoint at %d tokens failed, training continues: %s", tokens, e)
            self.metrics.checkpoint_failures.inc()
            return None
        intake.source.commit(offsets)
        self.retention.release(offsets, positions)
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_last_success.set(time.time())
        self.metrics.checkpoint_duration.set(time.monotonic() - t0)
        log.info("checkpoint %s written in %.2fs", path.name, time.monotonic() - t0)
        return path
