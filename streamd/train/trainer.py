"""The trainer loop: ingest -> shuffle buffer -> step every SAE -> metrics / history -> checkpoint cadence.

One trainer process is one run: one run directory (locked), one consumer group, any number of SAEs trained on the same
batches. Offsets are committed to Kafka only after a checkpoint is durable, and a checkpoint names per partition the
offset from which every untrained token can be read again, so a SIGKILL loses no token.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kafka.errors import KafkaError

from streamd import __version__, wire
from streamd.train.buffer import ShuffleBuffer
from streamd.run.checkpoints import CheckpointError, CheckpointStore, SAEExport
from streamd.config import StreamdConfig
from streamd.run.history import MetricsHistory
from streamd.train.kafka_source import ActivationSource, Chunk, FileActivationSource, KafkaActivationSource, SourceKey
from streamd.stream.kafka import end_offsets, ensure_topic, generation_of, parse_generation
from streamd.train.learner import Learner
from streamd.metrics import TrainerMetrics
from streamd.torch_utils import TORCH_DTYPES, configure_threads
from streamd.run.server import StatusServer

log = logging.getLogger(__name__)

class RunLockedError(RuntimeError):
    pass


class RunLock:
    """An advisory lock on RUN/LOCK: a second trainer on the same run directory fails fast instead of corrupting it."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "LOCK"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise RunLockedError(f"run directory {run_dir} is in use by another trainer (pid {holder or '?'})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def expected_site_id(cfg: StreamdConfig) -> int:
    """The site the trainer accepts: given as hex, or computed from the model's content hash and the site."""
    if cfg.trainer.site_id is not None:
        return int(cfg.trainer.site_id, 16)
    from streamd.identity import default_model_path, model_content_hash, site_id

    path = cfg.trainer.model_path or str(default_model_path())
    return site_id(model_content_hash(path), cfg.trainer.site.site, cfg.trainer.site.layer)


@dataclass
class Progress:
    tokens: int
    tokens_per_second: float
    buffer_fill: float
    saes: dict[str, dict[str, float]] = field(default_factory=dict)

    def line(self) -> str:
        if not self.saes:
            return f"filling the shuffle buffer: {self.buffer_fill:.0%} (training starts when it is full)"
        parts = [f"tokens {self.tokens:,}", f"{self.tokens_per_second:,.0f} tok/s", f"buffer {self.buffer_fill:.0%}"]
        for name, s in self.saes.items():
            parts.append(f"[{name}] L0 {s['l0']:.1f} FVU {s['fvu']:.3f} dead {s['dead_fraction']:.1%}")
        return " | ".join(parts)


def _gauges(stats, learner: Learner) -> dict[str, float]:
    """One step's stats under the metric names (``loss_<term>`` for the loss terms)."""
    out = {"l0": stats.l0, "fvu": stats.fvu, "mse": stats.mse, "dead_fraction": stats.dead_fraction,
           "dense_fraction": stats.dense_fraction, "lr": stats.lr, "step": learner.steps,
           "sparsity_coefficient": stats.sparsity_scale, "loss_total": stats.loss}
    out.update({f"loss_{term}": v for term, v in stats.terms.items()})
    return out


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
        self.device = resolve_device(self.tcfg.device)
        self.dtype = TORCH_DTYPES[self.tcfg.buffer_dtype]
        self.on_progress, self.progress_every_s = on_progress, progress_every_s
        self.stop_event = threading.Event()
        self.lock = RunLock(self.tcfg.run_dir)
        try:
            self._open(cfg, activation_file, loop_file)
        except BaseException:  # a failed start must not keep the run locked
            self.lock.release()
            raise

    def _open(self, cfg: StreamdConfig, activation_file: Path | None, loop_file: bool) -> None:
        """Everything the run holds besides its lock: state to resume, source, metrics, server."""
        self.store = CheckpointStore(self.tcfg.run_dir, cfg.checkpoints.keep_last)
        self.metrics = TrainerMetrics([s.name for s in self.tcfg.saes], wire.REJECT_REASONS, version=__version__)
        self.history = MetricsHistory(self.tcfg.run_dir / "metrics.jsonl", self.tcfg.history_max_bytes)
        self.metrics.buffer_tokens.set(0)
        self.tokens = 0
        self.scale: float | None = None
        self.eval_set: torch.Tensor | None = None
        self.learners: dict[str, Learner] = {}
        self.buffer: ShuffleBuffer | None = None
        self.keys: list[SourceKey] = []  # buffer slots store an index into this list
        self._key_ids: dict[SourceKey, int] = {}
        self._pending: Chunk | None = None
        self._last_fill_note = 0.0
        self._norm_sample: list[torch.Tensor] = []
        self._resume_state: dict | None = None
        self._site_id: int | None = None
        start_offsets: dict[SourceKey, int] = {}
        reread_below: dict[SourceKey, int] = {}
        latest = self.store.latest()
        if latest is not None:
            self._resume_state = self.store.read_trainer_state(latest)
            for topic, parts in self.store.read_offsets(latest).items():
                for part, off in parts.items():
                    start_offsets[(topic, int(part))] = off
            reread_below = {tuple(k): v for k, v in self._resume_state["positions"]}
            self.tokens = self._resume_state["tokens"]
            log.info("resuming from checkpoint %s at %d tokens", latest.name, self.tokens)
        self.source = self._make_source(activation_file, loop_file, start_offsets, reread_below)
        self.server = StatusServer.from_config(cfg.metrics, self.metrics.registry, self.store, self.ready).start()
        # /healthz and /readyz answer from construction on, while the first activations are awaited

    # --- set-up -------------------------------------------------------------------------------------------------

    def _make_source(self, path, loop, start_offsets, reread_below) -> ActivationSource:
        t = self.tcfg
        if path is not None:
            start = next((o for (k, _), o in start_offsets.items() if k == f"file:{Path(path).name}"), 0)
            src = FileActivationSource(Path(path), chunk_tokens=1024, dtype=self.dtype, loop=loop, start_row=start)
            if t.d_in is not None and src.d_in != t.d_in:
                raise ValueError(f"{path} holds d_in {src.d_in}, trainer.d_in is {t.d_in}")
            if not loop and len(src.acts) < t.buffer_tokens + t.eval_tokens:
                raise ValueError(f"{path} holds {len(src.acts)} tokens, fewer than trainer.buffer_tokens + "
                                 f"trainer.eval_tokens ({t.buffer_tokens + t.eval_tokens}): nothing would be trained "
                                 "(use --loop, or a smaller buffer)")
            return src
        topic = t.site.topic or self.cfg.kafka.topic
        if not self.cfg.kafka.generation_seconds:
            ensure_topic(self.cfg.kafka, topic, self.cfg.kafka.partitions)
        self._site_id = expected_site_id(self.cfg)
        d_in = t.d_in or (self._resume_state or {}).get("d_in")
        return KafkaActivationSource(
            self.cfg.kafka, topic, t.group_id, self.metrics,
            expected_site_id=self._site_id, d_in=d_in, queue_tokens=max(4 * t.batch_size, 65536), dtype=self.dtype,
            start_offsets=start_offsets, reread_below=reread_below, pin_memory=self.device.type == "cuda",
            torch_threads=t.torch_threads,
        )

    def _init_models(self, d_in: int) -> None:
        """Build buffer and learners once d_in is known (from config, the resumed state or the first message)."""
        t = self.tcfg
        gen = torch.Generator().manual_seed(t.saes[0].seed + 1)
        self.buffer = ShuffleBuffer(
            t.buffer_tokens, d_in, t.batch_size, max_age=int(t.max_token_age_buffers * t.buffer_tokens),
            dtype=self.dtype, device=self.device, generator=gen,
        )
        self.learners = {s.name: Learner(s, d_in, t, self.device) for s in t.saes}
        state = self._resume_state
        if state is not None:
            self.scale = state["scale"]
            self.eval_set = state["eval_set"]
            gen.set_state(state["buffer_rng"])
            for name, learner in self.learners.items():
                learner.load_state_dict(state["learners"][name])
        self.metrics.buffer_tokens.set(t.buffer_tokens)

    def ready(self) -> tuple[bool, str]:
        if self.buffer is None:
            return False, "waiting for the first activations"
        if not self.buffer.full and self.buffer.served == 0:
            return False, f"filling the shuffle buffer ({self.buffer.fill_ratio:.0%})"
        return True, "training"

    # --- ingest -------------------------------------------------------------------------------------------------

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
        """Constant scale with E||x * scale|| = sqrt(d_in) (Anthropic's normalisation), from the first tokens."""
        sample = torch.cat(self._norm_sample)
        self.scale = math.sqrt(sample.shape[1]) / float(sample.norm(dim=-1).mean().clamp_min(1e-12))
        self._norm_sample = []
        log.info("activation scale fixed at %.6g from %d tokens", self.scale, len(sample))

    def _fill(self) -> bool:
        """Fill the buffer's free slots; returns False when the source ended or a stop was asked before it filled."""
        while self.buffer is None or not self.buffer.full:
            if self.stop_event.is_set():
                return False
            chunk = self._pending or self.source.get(timeout=0.5)
            self._pending = None
            if chunk is None:
                if self.source.exhausted or self.stop_event.is_set():
                    return False
                continue
            if self.buffer is None:
                self._init_models(chunk.acts.shape[1])
            self._pending = self._take(chunk)
            self.metrics.buffer_fill_ratio.set(self.buffer.fill_ratio)
            if self.buffer.served == 0 and self.on_progress and time.monotonic() - self._last_fill_note > 10:
                self._last_fill_note = time.monotonic()
                self.on_progress(Progress(self.tokens, 0.0, self.buffer.fill_ratio))
        if self.scale is None:
            self._fix_scale()
        return True

    # --- train --------------------------------------------------------------------------------------------------

    def _step(self) -> dict[str, dict[str, float]]:
        x = self.buffer.sample() * self.scale
        out = {}
        for name, learner in self.learners.items():
            stats = learner.step(x)
            self.metrics.observe_step(name, _gauges(stats, learner))
            self.metrics.tokens_trained.labels(sae=name).inc(len(x))
            out[name] = {"l0": stats.l0, "fvu": stats.fvu, "mse": stats.mse, "loss": stats.loss,
                         "dead_fraction": stats.dead_fraction, "dense_fraction": stats.dense_fraction, "lr": stats.lr}
        self.tokens += len(x)
        self.metrics.buffer_fill_ratio.set(self.buffer.fill_ratio)
        if self._trace is not None:
            self._write_trace()
        return out

    def _write_trace(self) -> None:
        """One line per step: the trainer's token count and, per message, how many of its tokens were trained."""
        src, off = self.buffer.last_origins
        pairs, counts = torch.unique(torch.stack([src.long(), off]), dim=1, return_counts=True)
        served = [[*self.keys[s], o, c] for (s, o), c in zip(pairs.T.tolist(), counts.tolist())]
        self._trace.write(json.dumps({"tokens": self.tokens, "served": served}) + "\n")
        self._trace.flush()

    def evaluate(self) -> dict[str, dict[str, float]]:
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        x = self.eval_set.to(self.device, torch.float32) * self.scale
        out = {name: learner.held_out_metrics(x) for name, learner in self.learners.items()}
        for name, r in out.items():
            self.metrics.eval_fvu.labels(sae=name).set(r["fvu"])
            self.metrics.eval_l0.labels(sae=name).set(r["l0"])
        return out

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

    def checkpoint(self) -> Path | None:
        if not self.learners:
            return None
        t0 = time.monotonic()
        offsets, positions = self.resume_offsets()
        nested: dict[str, dict[int, int]] = {}
        for (topic, part), off in offsets.items():
            nested.setdefault(topic, {})[part] = off
        state = {
            "tokens": self.tokens, "scale": self.scale, "eval_set": self.eval_set, "d_in": self.buffer.d_in,
            "buffer_rng": self.buffer._gen.get_state(), "positions": [(list(k), v) for k, v in positions.items()],
            "learners": {n: lr.state_dict() for n, lr in self.learners.items()},
        }
        exports = [
            SAEExport(name, lr.sae.saelens_cfg(), lr.sae.export_tensors(self.scale), lr.density().clamp_min(1e-10).log10())
            for name, lr in self.learners.items()
        ]
        manifest = {
            "streamd_version": __version__, "config": self.cfg.model_dump(mode="json"),
            "seeds": {s.name: s.seed for s in self.tcfg.saes},
            "site_id": f"{self._site_id:016x}" if self._site_id is not None else None,
            "scale": self.scale, "tokens": self.tokens,
        }
        try:
            path = self.store.write(self.tokens, exports, state, nested, manifest, self.tcfg.site.hook_name)
        except CheckpointError as e:
            log.error("checkpoint at %d tokens failed, training continues: %s", self.tokens, e)
            self.metrics.checkpoint_failures.inc()
            return None
        self.source.commit({k: v for k, v in offsets.items() if not k[0].startswith("file:")})
        if self.cfg.kafka.generation_seconds:
            try:
                self._retire_generations(offsets, positions)
            except KafkaError as e:  # the broker is away: the next checkpoint tries again
                log.warning("retiring generation topics failed: %s", e)
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_last_success.set(time.time())
        self.metrics.checkpoint_duration.set(time.monotonic() - t0)
        log.info("checkpoint %s written in %.2fs", path.name, time.monotonic() - t0)
        return path

    def _retire_generations(self, offsets: dict[SourceKey, int], positions: dict[SourceKey, int]) -> None:
        """Delete generation topics that producers have left (older than the previous generation) and whose every
        token is trained and in a durable checkpoint: read to the log end, nothing pending in queue or buffer.
        Tansu's end offsets can only be low, and a fetch returns whole batches, so a position at or past the
        reported end means the last batch was read."""
        kafka = self.cfg.kafka
        current = generation_of(kafka, time.time())
        old = sorted({t for t, _ in positions if (g := parse_generation(t)) is not None and g < current - 1})
        if not old:
            return
        ends = end_offsets(kafka, old)
        for topic in old:
            parts = [k for k in ends if k[0] == topic]
            if parts and all(positions.get(k, 0) >= ends[k] and offsets.get(k, 0) >= positions.get(k, 0) for k in parts):
                self.source.retire(topic)

    def run(self) -> int:
        """Train until max_tokens, the end of a file source, or stop(); always leaves a final checkpoint."""
        t, ck = self.tcfg, self.cfg.checkpoints
        self._trace = open(self.tcfg.trace_file, "a") if self.tcfg.trace_file else None
        self.source.start()
        last_ck_tokens, last_ck_time = self.tokens, time.monotonic()
        last_eval = self.tokens
        rate_t, rate_tok = time.monotonic(), self.tokens
        last_progress = time.monotonic()
        stats: dict[str, dict[str, float]] = {}
        try:
            while not self.stop_event.is_set() and (t.max_tokens is None or self.tokens < t.max_tokens):
                if not self._fill():
                    break
                self.metrics.training_ready.set(1)
                stats = self._step()
                now = time.monotonic()
                if self.tokens - last_eval >= t.eval_every_tokens:
                    last_eval = self.tokens
                    self.evaluate()
                if now - last_progress >= self.progress_every_s:
                    rate = (self.tokens - rate_tok) / (now - rate_t)
                    rate_t, rate_tok, last_progress = now, self.tokens, now
                    self.metrics.tokens_per_second.set(rate)
                    self._record(rate, stats)
                if (ck.every_tokens and self.tokens - last_ck_tokens >= ck.every_tokens) or (
                    ck.every_seconds and now - last_ck_time >= ck.every_seconds
                ):
                    self.checkpoint()
                    last_ck_tokens, last_ck_time = self.tokens, time.monotonic()
            if self.learners and self.tokens != last_ck_tokens:
                self.evaluate()
                self.checkpoint()
        finally:
            self.source.close()
            self.server.stop()
            self.lock.release()
            if self._trace is not None:
                self._trace.close()
        return self.tokens

    def _record(self, rate: float, stats: dict[str, dict[str, float]]) -> None:
        saes = {}
        for name, s in stats.items():
            saes[name] = dict(s, density_histogram=self.learners[name].density_histogram())
            self.metrics.set_density(name, saes[name]["density_histogram"])
        fill = self.buffer.fill_ratio if self.buffer else 0.0
        self.history.append({"time": time.time(), "tokens": self.tokens, "tokens_per_second": rate,
                             "buffer_fill": fill, "saes": saes})
        if self.on_progress:
            self.on_progress(Progress(self.tokens, rate, fill, stats))

    def stop(self) -> None:
        self.stop_event.set()
