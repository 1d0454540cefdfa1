"""The trainer loop: ingest -> step every SAE -> maybe evaluate -> maybe record -> maybe checkpoint.

One trainer process is one run: one run directory (locked), one consumer group, any number of SAEs trained on the
same batches. The loop's parts: ``intake.Intake`` (source -> held-out eval set, norm scale, shuffle buffer; resume
offsets), ``checkpointer.Checkpointer`` (a durable checkpoint, then offsets committed, then the retention strategy
releases what is trained), ``Cadence`` (when to evaluate, record and checkpoint) and ``TraceFile`` (which tokens each
step trained). Offsets are committed only after a checkpoint is durable, and a checkpoint names per partition the
offset from which every untrained token can be read again, so a SIGKILL loses no token.

Data-parallel (RANK / WORLD_SIZE in the environment: ``streamd train --world-size N`` or torchrun), N processes are
one run: rank 0 holds the run directory, its lock, the server and the checkpoints; every rank reads its partitions
and the ranks step together (``_run_parallel``; the collectives are in ``distributed``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamd import __version__, wire
from streamd.config import CheckpointConfig, StreamdConfig, TrainerConfig
from streamd.identity import run_group_id
from streamd.metrics import EVAL_STATS, STEP_STATS, TrainerMetrics
from streamd.torch_utils import TORCH_DTYPES, configure_threads, resolve_device
from streamd.run.checkpoints import CheckpointStore
from streamd.sae.sparse import decoder_ops
from streamd.run.history import MetricsHistory, append_line
from streamd.run.lock import RunLock, RunLockedError
from streamd.run.server import StatusServer
from streamd.stream.retention import Retention, retention_for
from streamd.train.buffer import ShuffleBuffer
from streamd.train.checkpointer import Checkpointer, Resume, read_resume
from streamd.train.distributed import Collective, check_parallel, world_from_env
from streamd.train.file_source import FileActivationSource
from streamd.train.intake import Intake
from streamd.train.kafka_source import KafkaActivationSource
from streamd.train.learner import Learner, StepStats
from streamd.train.source import ActivationSource

__all__ = ["Progress", "RunLockedError", "Trainer", "expected_site_id", "resolve_device"]

log = logging.getLogger(__name__)

WAITING_NOTE_S = 2.0  # a stream quiet this long after training began is reported as waiting for data


def expected_site_id(cfg: StreamdConfig) -> int:
    """The site the trainer accepts: given as hex, or computed from the model's content hash and the site."""
    if cfg.trainer.site_id is not None:
        return int(cfg.trainer.site_id, 16)
    from streamd.identity import default_model_path, model_content_hash, site_id

    path = cfg.trainer.model_path or str(default_model_path())
    return site_id(model_content_hash(path), cfg.trainer.site.site, cfg.trainer.site.layer)


def open_source(cfg: StreamdConfig, metrics: TrainerMetrics, retention: Retention, resume: Resume,
                device: torch.device, path: Path | None = None,
                loop: bool = False, share: tuple[int, int] | None = None) -> tuple[ActivationSource, int | None]:
    """The run's source, placed where the checkpoint left it: a cached file, or the stream (data-parallel: this
    rank's ``share`` of its partitions). Returns it with the site id it accepts (None for a file)."""
    t = cfg.trainer
    if path is not None:
        path = Path(path)
        start = resume.start_offsets.get(FileActivationSource.key_for(path), 0)
        src = FileActivationSource(path, chunk_tokens=1024, loop=loop, start_row=start, pin_memory=device.type == "cuda")
        if t.d_in is not None and src.d_in != t.d_in:
            raise ValueError(f"{path} holds d_in {src.d_in}, trainer.d_in is {t.d_in}")
        if not loop and len(src.acts) < t.buffer_tokens + t.eval_tokens:
            raise ValueError(f"{path} holds {len(src.acts)} tokens, fewer than trainer.buffer_tokens + "
                             f"trainer.eval_tokens ({t.buffer_tokens + t.eval_tokens}): nothing would be trained "
                             "(use --loop, or a smaller buffer)")
        return src, None
    topic = t.site.topic or cfg.kafka.topic
    retention.prepare(topic)
    site = expected_site_id(cfg)
    d_in = t.d_in or (resume.state or {}).get("d_in")
    src = KafkaActivationSource(
        cfg.kafka, topic, t.group_id, metrics,
        expected_site_id=site, d_in=d_in, queue_tokens=max(4 * t.batch_size, 65536),
        start_offsets=resume.start_offsets, start_ids=resume.topic_ids, reread_below=resume.reread_below,
        pin_memory=device.type == "cuda",
        torch_threads=t.torch_threads, retention=retention, share=share,
    )
    return src, site


@dataclass
class Progress:
    tokens: int
    tokens_per_second: float
    buffer_fill: float
    saes: dict[str, dict[str, float]] = field(default_factory=dict)  # per SAE: ``StepStats.read()``
    waiting_s: float | None = None  # trained before, now waiting this long for the stream to send more

    def line(self) -> str:
        if self.waiting_s is not None:
            return (f"tokens {self.tokens:,} | waiting for data ({self.waiting_s:.0f}s without activations) | "
                    f"buffer {self.buffer_fill:.0%}")
        if not self.saes:
            return f"filling the shuffle buffer: {self.buffer_fill:.0%} (training starts when it is full)"
        parts = [f"tokens {self.tokens:,}", f"{self.tokens_per_second:,.0f} tok/s", f"buffer {self.buffer_fill:.0%}"]
        shown = [s for s in (*STEP_STATS, *EVAL_STATS) if s.label and s.progress]
        for name, vals in self.saes.items():
            parts.append(f"[{name}] " + " ".join(f"{s.label} {vals[s.key]:{s.fmt}}" for s in shown if s.key in vals))
        return " | ".join(parts)


class Cadence:
    """When to evaluate, record progress and checkpoint, by tokens trained and wall-clock time since the last."""

    def __init__(self, tcfg: TrainerConfig, ck: CheckpointConfig, progress_every_s: float, tokens: int) -> None:
        now = time.monotonic()
        self.eval_every_tokens, self.progress_every_s = tcfg.eval_every_tokens, progress_every_s
        self.ck_every_tokens, self.ck_every_seconds = ck.every_tokens, ck.every_seconds
        self.eval_tokens = self.record_tokens = self.ck_tokens = tokens
        self.record_time = self.ck_time = now

    def evaluate_due(self, tokens: int) -> bool:
        return tokens - self.eval_tokens >= self.eval_every_tokens

    def evaluated(self, tokens: int) -> None:
        self.eval_tokens = tokens

    def record_due(self, now: float) -> bool:
        return now - self.record_time >= self.progress_every_s

    def recorded(self, tokens: int, now: float) -> float:
        """Mark a record done; returns the token rate since the last one."""
        rate = (tokens - self.record_tokens) / max(now - self.record_time, 1e-9)
        self.record_tokens, self.record_time = tokens, now
        return rate

    def checkpoint_due(self, tokens: int, now: float) -> bool:
        return bool(self.ck_every_tokens and tokens - self.ck_tokens >= self.ck_every_tokens) or bool(
            self.ck_every_seconds and now - self.ck_time >= self.ck_every_seconds)

    def checkpointed(self, tokens: int) -> None:
        self.ck_tokens, self.ck_time = tokens, time.monotonic()

    def unsaved(self, tokens: int) -> bool:
        return tokens != self.ck_tokens


class TraceFile:
    """With ``trainer.trace_file``: one JSON line per step, the trainer's token count and, per message, how many of
    its tokens were trained (``served``: [topic or file, partition, offset, tokens]); data-parallel also the sha256
    of the SAEs' weights after the step (``params``: every rank's must agree). A line is written whole or not at
    all (``history.append_line``)."""

    def __init__(self, path: Path | None, rank: int = 0) -> None:
        if path is not None and rank:  # data-parallel: one file per rank, rank 0's under the configured name
            path = Path(path).with_name(f"{Path(path).stem}.rank{rank}{Path(path).suffix}")
        self.path = path

    def write(self, tokens: int, served: Callable[[], list], extra: Callable[[], dict] | None = None) -> None:
        if self.path:
            line = {"tokens": tokens, "served": served(), **(extra() if extra else {})}
            append_line(Path(self.path), (json.dumps(line) + "\n").encode())


class SkippedWrites:
    """Writes besides checkpoints (metrics history, trace) that fail are counted, logged once per interval and
    skipped: a full disk must not stop training (checkpoints have their own handling)."""

    def __init__(self, metrics: TrainerMetrics, log_every_s: float = 60.0) -> None:
        self.metrics, self.log_every_s = metrics, log_every_s
        self._since_log: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def attempt(self, what: str, write: Callable[[], None]) -> bool:
        try:
            write()
            return True
        except OSError as e:
            self.metrics.history_write_failures.labels(file=what).inc()
            self._since_log[what] = self._since_log.get(what, 0) + 1
            now = time.monotonic()
            if now - self._logged_at.get(what, -1e18) >= self.log_every_s:
                log.error("writing the %s failed (%d writes skipped since the last message), training goes on: %s",
                          what, self._since_log[what], e)
                self._logged_at[what], self._since_log[what] = now, 0
            return False


class Trainer:
    def __init__(
        self,
        cfg: StreamdConfig,
        *,
        activation_file: Path | None = None,
        loop_file: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        progress_every_s: float = 5.0,
    ) -> None:
        self.cfg, self.tcfg = cfg, cfg.trainer
        configure_threads(self.tcfg.torch_threads)
        self.rank, world_size, local_rank = world_from_env()
        check_parallel(cfg, world_size, activation_file)
        self.device = resolve_device(self.tcfg.device)
        decoder_ops(self.tcfg.triton_decoder, self.device)  # triton_decoder: on without CUDA or triton: stop now
        if world_size > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", local_rank)  # one GPU per rank
        self.dtype = TORCH_DTYPES[self.tcfg.buffer_dtype]
        self.on_progress = on_progress if self.rank == 0 else None
        self.progress_every_s = progress_every_s
        self.stop_event = threading.Event()
        # data-parallel: the ranks' process group; rank 0 holds the run directory, its lock and the HTTP server
        self.collective = Collective(self.device, self.tcfg.collective_timeout_seconds) if world_size > 1 else None
        self.lock = RunLock(self.tcfg.run_dir) if self.rank == 0 else None
        try:
            self._open(cfg, activation_file, loop_file)
        except BaseException:  # a failed start must not keep the run locked
            if self.lock:
                self.lock.release()
            raise

    def _open(self, cfg: StreamdConfig, activation_file: Path | None, loop_file: bool) -> None:
        """Everything the run holds besides its lock: state to resume, source, intake, metrics, server (the run
        directory's parts on rank 0 only)."""
        rank0 = self.rank == 0
        self.store = CheckpointStore(self.tcfg.run_dir, cfg.checkpoints.keep_last) if rank0 else None
        self.metrics = TrainerMetrics([s.name for s in self.tcfg.saes], wire.REJECT_REASONS, version=__version__)
        self.history = (MetricsHistory(self.tcfg.run_dir / "metrics.jsonl", self.tcfg.history_max_bytes)
                        if rank0 else None)
        self.metrics.buffer_tokens.set(0)
        self.metrics.world_size.set(self.collective.world_size if self.collective else 1)
        self.learners: dict[str, Learner] = {}
        self._last_stats: dict[str, StepStats] = {}  # the last step's, read at the progress cadence
        self._last_eval: dict[str, dict[str, float]] = {}  # the last evaluation's, beside them
        self.trace = TraceFile(self.tcfg.trace_file, self.rank)
        self.skipped = SkippedWrites(self.metrics)
        self.cadence: Cadence | None = None  # from run() on
        c = self.collective
        if rank0:
            resume = read_resume(self.store, self.metrics)
            self.tcfg.group_id = run_group_id(self.tcfg.run_dir, self.tcfg.group_id)  # recorded in the run directory
        if c is not None:
            resume, self.tcfg.group_id = c.broadcast((resume, self.tcfg.group_id) if rank0 else None)
        self.tokens = resume.tokens
        self._resume_state = resume.state
        retention = retention_for(cfg.kafka, self.tcfg.group_id)
        source, site = open_source(cfg, self.metrics, retention, resume, self.device, activation_file,
                                   loop_file, share=(self.rank, c.world_size) if c else None)
        state = resume.state or {}
        # the held-out set is rank 0's (the others would hold out tokens that are never evaluated)
        tcfg = self.tcfg if rank0 else self.tcfg.model_copy(update={"eval_tokens": 0})
        self.intake = Intake(source, tcfg, self.metrics, self._set_up, self.stop_event, on_filling=self._note_filling,
                             scale=state.get("scale"), eval_set=state.get("eval_set") if rank0 else None)
        self.intake.on_waiting = self._note_waiting
        self._waiting_noted = 0.0
        self._scale_agreed = self.scale is not None  # data-parallel: every rank trains with the same scale
        self.checkpointer = Checkpointer(cfg, self.store, self.metrics, retention, site,
                                         gather=c.gather_offsets if c else None)
        self.server = (StatusServer.from_config(cfg.metrics, self.metrics.registry, self.store, self.ready).start()
                       if rank0 else None)
        # /healthz and /readyz answer from construction on, while the first activations are awaited

    # --- what the intake holds ----------------------------------------------------------------------------------

    @property
    def source(self) -> ActivationSource:
        return self.intake.source

    @property
    def buffer(self) -> ShuffleBuffer | None:
        return self.intake.buffer

    @property
    def scale(self) -> float | None:
        return self.intake.scale

    @property
    def eval_set(self) -> torch.Tensor | None:
        return self.intake.eval_set

    # --- set-up -------------------------------------------------------------------------------------------------

    def _set_up(self, d_in: int) -> ShuffleBuffer:
        """Build buffer and learners once d_in is known (from config, the resumed state or the first message)."""
        t = self.tcfg
        buffer = ShuffleBuffer(
            t.buffer_tokens, d_in, t.batch_size, max_age=int(t.max_token_age_buffers * t.buffer_tokens),
            dtype=self.dtype, device=self.device,
            generator=torch.Generator(device=self.device).manual_seed(t.saes[0].seed + 1 + self.rank),
        )
        self.learners = {s.name: Learner(s, d_in, t, self.device, self.collective) for s in t.saes}
        state = self._resume_state
        if state is not None:
            if self.rank == 0:  # the checkpoint holds rank 0's sampling state
                buffer.rng_state = state["buffer_rng"]
            for name, learner in self.learners.items():
                learner.load_state_dict(state["learners"][name])
        self.metrics.buffer_tokens.set(t.buffer_tokens)
        return buffer

    def ready(self) -> tuple[bool, str]:
        if self.buffer is None:
            return False, "waiting for the first activations"
        if not self.buffer.full and self.buffer.served == 0:
            return False, f"filling the shuffle buffer ({self.buffer.fill_ratio:.0%})"
        since = self.intake.waiting_since
        if since is not None and time.monotonic() - since >= WAITING_NOTE_S:
            return True, (f"waiting for data: no activations for {time.monotonic() - since:.0f}s "
                          f"(trained {self.tokens:,} tokens; buffer {self.buffer.fill_ratio:.0%})")
        return True, "training"

    def _note_filling(self, fill: float) -> None:
        if self.on_progress:
            self.on_progress(Progress(self.tokens, 0.0, fill))

    def _note_waiting(self, waited: float) -> None:
        """The stream went quiet after training began: the progress line says so, at the progress cadence."""
        now = time.monotonic()
        if waited < WAITING_NOTE_S or now - self._waiting_noted < self.progress_every_s:
            return
        self._waiting_noted = now
        self.metrics.tokens_per_second.set(0)
        if self.on_progress:
            self.on_progress(Progress(self.tokens, 0.0, self.buffer.fill_ratio, waiting_s=waited))

    # --- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train until max_tokens, the end of a file source, or stop(); always leaves a final checkpoint."""
        t = self.tcfg
        self.source.start()
        self.cadence = Cadence(t, self.cfg.checkpoints, self.progress_every_s, self.tokens)
        try:
            if self.collective is None:
                while self._more():
                    if not self._ingest():
                        break
                    self._step(self.buffer.sample())
                    self._after_step()
                if self.source.exhausted and self.buffer is not None and self.scale is not None:
                    self._drain()
            else:
                self._run_parallel()
            if self._last_stats and self.cadence.record_tokens != self.tokens and self.rank == 0:
                self._record(self.cadence.recorded(self.tokens, time.monotonic()))  # the final state, if not yet
            if self.learners and self.cadence.unsaved(self.tokens):
                self.evaluate()
                self.checkpoint(final=True)
            if self.collective is not None:
                self.collective.close()
        finally:
            self.source.close()
            if self.server:
                self.server.stop()
            if self.lock:
                self.lock.release()
        return self.tokens

    def _run_parallel(self) -> None:
        """Data-parallel: every rank steps together. Each round the ranks exchange what they bring (a full buffer's
        batch, or nothing: a zero-weight step), stop and checkpoint requests; a round where nobody has a batch
        trains nothing. A rank waits at most 0.5 s for data while nobody trains, not at all while others do.
        A checkpoint that failed on rank 0 is owed: the ranks write it when rank 0's back-off is over, as the
        one-process loop keeps it due."""
        t, stepping = self.tcfg, False
        while t.max_tokens is None or self.tokens < t.max_tokens:
            ready = self.intake.fill(patience=0.0 if stepping else 0.5)
            buf, scale = self.buffer, self.scale
            own_norm = (math.sqrt(buf.d_in) / scale if scale and not self._scale_agreed else 0.0)
            weight = self.intake.scale_tokens if own_norm else 0
            due = stepping and self.cadence.checkpoint_due(self.tokens, time.monotonic())
            owed = self.checkpointer.owed() if self.rank == 0 else 0.0
            rows = self.collective.exchange([t.batch_size if ready else 0, float(self.stop_event.is_set()), float(due),
                                             buf.d_in if buf else (t.d_in or 0), own_norm * weight, weight, owed])
            if rows[:, 1].any():
                break
            if rows[0, 6] > 0 or (rows[:, 2].any() and rows[0, 6] == 0):
                self.checkpoint()
                self.cadence.checkpointed(self.tokens)
            total = int(rows[:, 0].sum())
            stepping = total > 0
            if not stepping:
                continue
            d_in = int(rows[:, 3].max())
            buf = self.intake.ensure_buffer(d_in)
            if not self._scale_agreed:  # the first step: the token-weighted mean of the ranks' mean norms
                self.intake.scale = math.sqrt(d_in) * float(rows[:, 5].sum()) / float(rows[:, 4].sum())
                self._scale_agreed = True
            self.metrics.training_ready.set(1)
            self._step(buf.sample() if ready else torch.empty(0, d_in, device=self.device), total)
            self._after_step(checkpoint=False)

    def _ingest(self) -> bool:
        """Fill the buffer; False when the source ended or a stop came first."""
        if not self.intake.fill():
            return False
        self.metrics.training_ready.set(1)
        return True

    def _more(self) -> bool:
        return not self.stop_event.is_set() and (self.tcfg.max_tokens is None or self.tokens < self.tcfg.max_tokens)

    def _after_step(self, checkpoint: bool = True) -> None:
        """``checkpoint``: False data-parallel, where the ranks agree on it at the next exchange."""
        now = time.monotonic()
        self._maybe_evaluate()
        if self.rank == 0:
            self._maybe_record(now)
        if checkpoint:
            self._maybe_checkpoint(now)

    def _drain(self) -> None:
        """A finite source ended: train every token still in the buffer once, then the final checkpoint follows."""
        while self._more() and (x := self.buffer.sample_rest()) is not None:
            self._step(x)
            self._after_step()

    def _step(self, x: torch.Tensor, total: int | None = None) -> None:
        """One step of every SAE on ``x``; data-parallel, ``total`` tokens over every rank (``x`` may be empty)."""
        x = x * self.scale
        total = len(x) if total is None else total
        for name, learner in self.learners.items():
            self._last_stats[name] = learner.step(x, total)  # device values: read at the progress cadence
            self.metrics.tokens_trained.labels(sae=name).inc(total)
        self.tokens += total
        self.metrics.buffer_fill_ratio.set(self.buffer.fill_ratio)
        served = self.intake.last_served if len(x) else list
        self.skipped.attempt("trace", lambda: self.trace.write(
            self.tokens, served, self._weights_digest if self.collective else None))

    def _weights_digest(self) -> dict:
        """The sha256 of every SAE's weights and buffers (data-parallel trace: the ranks must agree bit for bit)."""
        h = hashlib.sha256()
        for name, learner in self.learners.items():
            for key, v in learner.sae.state_dict().items():
                raw = v.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
                h.update(name.encode() + key.encode() + raw.numpy().tobytes())
        return {"params": h.hexdigest()}

    def evaluate(self) -> dict[str, dict[str, float]]:
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        x = self.eval_set.to(self.device, torch.float32) * self.scale
        out = {name: learner.held_out_metrics(x) for name, learner in self.learners.items()}
        for name, r in out.items():
            self._last_eval[name] = {"eval_fvu": r["fvu"], "eval_l0": r["l0"]}
            self.metrics.observe_step(name, self._last_eval[name])
        return out

    def _maybe_evaluate(self) -> None:
        if self.cadence.evaluate_due(self.tokens):
            self.cadence.evaluated(self.tokens)
            self.evaluate()

    def _maybe_record(self, now: float) -> None:
        if self.cadence.record_due(now):
            self._record(self.cadence.recorded(self.tokens, now))

    def _maybe_checkpoint(self, now: float) -> None:
        # one that failed (or waits out a failure's back-off) stays due: tried again once the back-off is over
        if self.cadence.checkpoint_due(self.tokens, now) and self.checkpoint() is not None:
            self.cadence.checkpointed(self.tokens)

    def checkpoint(self, final: bool = False) -> Path | None:
        return self.checkpointer.write(self.tokens, self.intake, self.learners, final=final)

    def _record(self, rate: float) -> None:
        """The progress cadence: read the last step's statistics once, then gauges, history and progress line."""
        self.metrics.tokens_per_second.set(rate)
        stats = {name: {**st.read(), **self._last_eval.get(name, {})} for name, st in self._last_stats.items()}
        saes = {}
        for name, vals in stats.items():
            self.metrics.observe_step(name, vals)
            hist = self.learners[name].density_histogram()
            self.metrics.set_density(name, hist)
            saes[name] = {**vals, "density_histogram": hist}
        fill = self.buffer.fill_ratio if self.buffer else 0.0
        record = {"time": time.time(), "tokens": self.tokens, "tokens_per_second": rate, "buffer_fill": fill,
                  "saes": saes}
        self.skipped.attempt("history", lambda: self.history.append(record))
        if self.on_progress:
            self.on_progress(Progress(self.tokens, rate, fill, stats))

    def stop(self) -> None:
        self.stop_event.set()
