"""Data-parallel training: the collectives that make N trainer processes train one set of SAEs.

Every rank reads its own share of the topic's partitions, keeps its own shuffle buffer and draws ``batch_size``
tokens per step (``batch_size`` is per rank: a step trains up to ``world_size x batch_size`` tokens). All ranks step
together. Per step there are two exchanges:

- ``exchange`` (gloo, host values, every rank's row gathered): how many tokens each rank brings (0 from a rank whose
  buffer is not full: a zero-weight step, so no rank waits for another's data and no collective is left unmatched),
  stop and checkpoint requests, ``d_in`` and the norm sample that fixes the activation scale;
- ``reduce_step`` (the training backend: gloo on CPU, NCCL on CUDA; device tensors, no host sync): per SAE one float32
  buffer of the parameter gradients weighted by the rank's tokens plus the latents' fire counts, and one float64
  buffer of the step's statistics row and the SAE's own buffers (BatchTopK's threshold) weighted the same way. The sum
  divided by the global token count is the gradient of the mean loss over the union of the ranks' batches.

Ranks therefore agree on everything: the weights (the same reduced values on every rank, then identical updates),
the scale (token-weighted mean of the ranks' mean norms), ``b_dec``'s initialisation (token-weighted mean of the ranks'
geometric medians), BatchTopK's threshold, dead-latent counters, the statistics windows and the token counts that
drive schedules and the checkpoint cadence. Rank 0 holds the run directory; ``broadcast`` hands its resume state to
the others, and ``gather_offsets`` collects every rank's resume offsets at the checkpoint barrier (per partition the
lowest). A rank that dies makes the others' next collective fail, within ``trainer.collective_timeout_seconds``
at the latest, with a ``CollectiveError``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping

import torch
import torch.distributed as tdist
from torch import Tensor

from streamd.config import ConfigError, StreamdConfig
from streamd.train.source import SourceKey


def check_parallel(cfg: StreamdConfig, world_size: int, activation_file: object = None) -> None:
    """Refuse, before any rank starts, what data-parallel training cannot do."""
    if world_size <= 1:
        return
    if activation_file is not None:
        raise ConfigError(f"--source {activation_file}: a cached file is trained by one process (every rank would "
                          "read all of it); drop --world-size, or publish it with `streamd replay` and train from "
                          "Kafka")
    if cfg.kafka.generation_seconds:
        raise ConfigError(f"world size {world_size} with kafka.generation_seconds = {cfg.kafka.generation_seconds:g} "
                          "(topic generations, the default of `streamd up`): generations are followed and deleted by "
                          "one reader, so data-parallel training needs the broker's own retention; unset "
                          "kafka.generation_seconds (a Kafka cluster), or train with one rank")


class CollectiveError(RuntimeError):
    """A collective with the other ranks failed: one died, or none answered within the timeout."""


RENDEZVOUS_ENV = "STREAMD_RENDEZVOUS_FILE"  # set by ``streamd train --world-size``: a file store, no TCP server
MIXED_LOGS = "mixed"  # a checkpoint's topic id when ranks had read different logs of the topic: matches none


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and ``streamd train --world-size`` set them; (0, 1, 0) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def partition_share(partition: int, rank: int, world_size: int) -> bool:
    """Whether ``partition`` is read by ``rank``: partitions are dealt out round-robin, so every partition has exactly
    one reader whatever the world size (a resume with another world size re-deals them; offsets are per partition)."""
    return partition % world_size == rank


class Collective:
    """The process group of a data-parallel run: RANK and WORLD_SIZE from the environment, the rendezvous through
    the file ``$STREAMD_RENDEZVOUS_FILE`` (local ranks: torch's TCP store would listen on every interface) or
    torchrun's MASTER_ADDR / MASTER_PORT (``env://``)."""

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        self.rank, self.world_size, _ = world_from_env()
        self.timeout_s = timeout_s
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        rendezvous = os.environ.get(RENDEZVOUS_ENV)
        with self._failing("joining the process group"):
            tdist.init_process_group(backend, init_method=f"file://{rendezvous}" if rendezvous else "env://",
                                     rank=self.rank, world_size=self.world_size,
                                     timeout=datetime.timedelta(seconds=timeout_s))
            # host-side control values travel on gloo even when the gradients go over NCCL: no device sync for them
            self._control = tdist.new_group(backend="gloo") if backend == "nccl" else tdist.group.WORLD
        self.device = device
        self.bytes_reduced = 0  # by the last reduce_step (bench/bench_distributed.py)

    def _failing(self, what: str):
        return _Failing(f"rank {self.rank} of {self.world_size}: {what} with the other ranks failed (a rank died, or "
                        f"none answered within trainer.collective_timeout_seconds = {self.timeout_s:g}s); the last "
                        "good checkpoint is the latest one on disk")

    def close(self) -> None:
        """After a barrier: a rank that tore its group down while another still held connections to it could abort
        in gloo's teardown ("terminate called without an active exception", seen on a loaded 2-core host)."""
        if tdist.is_initialized():
            with self._failing("the closing barrier"):
                tdist.barrier(group=self._control)
            tdist.destroy_process_group()

    # --- control plane (host values, gloo) -----------------------------------------------------------------------

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (the resume state, the group id)."""
        box = [obj]
        with self._failing("the broadcast from rank 0"):
            tdist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def exchange(self, row: list[float]) -> Tensor:
        """Every rank's ``row``: a float64 [world_size, len(row)] tensor on the host."""
        mine = torch.tensor(row, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self._failing("the step exchange"):
            tdist.all_gather(rows, mine, group=self._control)
        return torch.stack(rows)

    def gather_offsets(self, offsets: Mapping[SourceKey, int], positions: Mapping[SourceKey, int],
                       ids: Mapping[str, str]
                       ) -> tuple[dict[SourceKey, int], dict[SourceKey, int], dict[str, str]] | None:
        """At the checkpoint barrier: on rank 0, per partition the lowest resume offset and the highest position
        over the ranks that hold it (every partition has one reader, so this is their union), and per topic the
        log (topic id) the ranks read; ranks that disagree (one noticed a lost log, another not yet) give
        ``MIXED_LOGS``, which matches no log, so a resume reads that topic from the start. None elsewhere."""
        box = [None] * self.world_size if self.rank == 0 else None
        with self._failing("gathering the checkpoint offsets"):
            tdist.gather_object((dict(offsets), dict(positions), dict(ids)), box, dst=0, group=self._control)
        if self.rank != 0:
            return None
        low: dict[SourceKey, int] = {}
        high: dict[SourceKey, int] = {}
        logs: dict[str, str] = {}
        for offs, pos, tids in box:
            for k, v in offs.items():
                low[k] = min(low.get(k, v), v)
            for k, v in pos.items():
                high[k] = max(high.get(k, v), v)
            for t, tid in tids.items():
                logs[t] = tid if logs.get(t, tid) == tid else MIXED_LOGS
        return low, high, logs

    # --- the step (device tensors, the training backend) ---------------------------------------------------------

    def weighted_mean_(self, t: Tensor, n: int, total: int) -> None:
        """``t`` becomes the token-weighted mean of the ranks' ``t`` (``n``: this rank's tokens, ``total``: all)."""
        buf = t.detach().double() * n if n else torch.zeros_like(t, dtype=torch.float64)
        with self._failing("the all-reduce"):
            tdist.all_reduce(buf)
        t.data.copy_(buf / total)

    def reduce_step(self, sae: torch.nn.Module, n: int, total: int, fires: Tensor,
                    row: Tensor) -> tuple[Tensor, Tensor]:
        """Between backward and clipping: every parameter's gradient becomes the token-weighted mean of the ranks'
        (a zero-weight rank adds nothing), float buffers (BatchTopK's threshold) the same mean, bool buffers their
        OR over the ranks with tokens; returns the global fire counts and statistics row."""
        # a parameter without a gradient has none on every rank (the same code on global masks): Adam skips it, as
        # in one process
        params = [p for p in sae.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        floats = [b for b in sae.buffers() if b.is_floating_point()]
        flags = [b for b in sae.buffers() if b.dtype == torch.bool]
        if n:
            flat = torch.cat([*(g.reshape(-1).float() * n for g in grads), fires.reshape(-1).float()])
            stats = torch.cat([row.double(), *(b.reshape(-1).double() * n for b in (*floats, *flags))])
        else:  # a zero-weight step: this rank's forward ran on a placeholder row
            flat = torch.zeros(sum(p.numel() for p in params) + fires.numel(), device=fires.device)
            stats = torch.zeros(row.numel() + sum(b.numel() for b in (*floats, *flags)), dtype=torch.float64,
                                device=row.device)
        with self._failing("the gradient all-reduce"):
            tdist.all_reduce(flat)
            tdist.all_reduce(stats)
        self.bytes_reduced = flat.numel() * flat.element_size() + stats.numel() * stats.element_size()
        at = 0
        for p, g in zip(params, grads):  # into the gradient's own tensor: it keeps the parameter's memory layout,
            p.grad = g.copy_(flat[at : at + p.numel()].view_as(p)).div_(total)  # which fused Adam relies on
            at += p.numel()
        fires = flat[at:]
        at = row.numel()
        for b in floats:
            b.copy_(stats[at : at + b.numel()].view_as(b) / total)
            at += b.numel()
        for b in flags:
            b.copy_(stats[at : at + b.numel()].view_as(b) > 0)
            at += b.numel()
        return fires, stats[: row.numel()]


class _Failing:
    """Turns a failed collective into a CollectiveError saying what happened."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, Exception) and not isinstance(exc, CollectiveError):
            raise CollectiveError(f"{self.message}: {exc}") from exc
        return False
