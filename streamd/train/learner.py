"""One SAE's training step: optimiser, token-based schedules, and feature statistics.

Everything is counted in tokens, not steps, so schedules and dead-latent windows mean the same thing whatever the
batch size. The learner knows nothing about Kafka: it is handed normalised batches ``x [B, d_in]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from streamd.config import SAEConfig, TrainerConfig
from streamd.metrics import DENSITY_BUCKETS, DENSITY_EDGES, DENSITY_STEP
from streamd.sae import build_sae
from streamd.sae.quality import fvu, fvu_l0
from streamd.sae.sparse import decoder_ops
from streamd.train.window import StatWindow, step_row, window_values

if TYPE_CHECKING:
    from streamd.train.distributed import Collective


def schedule(tokens: int, tcfg: TrainerConfig) -> tuple[float, float]:
    """(lr multiplier, sparsity scale) after ``tokens`` tokens.

    Both ramp linearly over ``warmup_tokens``; the lr then stays constant, or with ``max_tokens`` set decays linearly
    to 0 over the last ``decay_fraction`` of the run.
    """
    warm = 1.0 if tcfg.warmup_tokens == 0 else min(1.0, tokens / tcfg.warmup_tokens)
    lr_mult = warm
    if tcfg.max_tokens is not None and tcfg.decay_fraction > 0:
        decay_tokens = tcfg.decay_fraction * tcfg.max_tokens
        lr_mult *= min(1.0, max(0.0, (tcfg.max_tokens - tokens) / decay_tokens))
    return lr_mult, warm


class StepStats:
    """One step's statistics under the names of ``metrics.STEP_STATS`` (plus ``loss_<term>``).

    The device-side values stay one tensor until :meth:`read`, so a CUDA step does not wait for the host: the
    trainer reads them at its progress cadence, in one transfer. Attribute access (``stats.fvu``) reads too.
    """

    def __init__(self, device_values: Tensor, device_keys: tuple[str, ...], host: dict[str, float]) -> None:
        self._values, self._keys, self._host = device_values, device_keys, host
        self._read: dict[str, float] | None = None

    @property
    def tokens(self) -> int:
        return int(self._host["tokens"])

    @property
    def sparsity_scale(self) -> float:
        return self._host["sparsity_coefficient"]

    def read(self) -> dict[str, float]:
        """Every statistic as a float (one device-to-host copy, done once)."""
        if self._read is None:
            vals = dict(zip(self._keys, self._values.tolist()))
            self._read = {**vals, **{k: v for k, v in self._host.items() if k != "tokens"}}
        return self._read

    def __getattr__(self, key: str) -> float:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self.read()[key]
        except KeyError:
            raise AttributeError(f"no step statistic {key!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepStats) and (self.read(), self.tokens) == (other.read(), other.tokens)

    __hash__ = None  # mutable cache: not hashable


class Learner:
    """One SAE + Adam + schedules + feature statistics. ``step`` is one optimiser update on one batch; with a
    ``collective`` (data-parallel), one update of the batches of every rank together (see ``train.distributed``)."""

    def __init__(self, cfg: SAEConfig, d_in: int, trainer_cfg: TrainerConfig, device: torch.device | str = "cpu",
                 collective: Collective | None = None):
        self.cfg, self.tcfg = cfg, trainer_cfg
        self.device = torch.device(device)
        self.collective = collective
        self.sae = build_sae(cfg, d_in).to(self.device)
        self.base_lr = cfg.learning_rate(d_in)  # lr, else the architecture's default_lr
        # fused: one kernel per parameter instead of a dozen elementwise passes (2.5x faster on the CPU, 0.15 of a
        # sparse step before); torch has it for CPU and CUDA
        self.fused_adam = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=(0.9, 0.999),
                                    fused=self.fused_adam or None)
        self.autocast = trainer_cfg.autocast_bf16 and self.device.type == "cuda"
        self.sparse = trainer_cfg.sparse_step and self.sae.sparse_step  # TopK family: the sparse step
        if self.sparse:
            self.sae.compile_select = trainer_cfg.compile
            self.sae.sparse_ops = decoder_ops(trainer_cfg.triton_decoder, self.device)
        self.window = StatWindow(trainer_cfg.stats_window_tokens, trainer_cfg.batch_size, self.device)
        self.tokens_seen = 0
        self.steps = 0
        self.b_dec_initialized = not self.sae.init_b_dec_from_data
        d_sae = self.sae.d_sae
        # tokens since each latent last fired (reset at the end of a batch in which it fired)
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        # density window: counts accumulate until density_window_tokens, then become the "last" window
        self.window_fires = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.window_tokens = 0
        self.last_fires = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.last_tokens = 0

    # --- feature statistics -------------------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        return self.since_fired > self.tcfg.dead_window_tokens

    def density(self) -> Tensor:
        """Per-latent firing frequency over the last complete window (the current partial one before the first)."""
        fires, tokens = (self.last_fires, self.last_tokens) if self.last_tokens else (self.window_fires, self.window_tokens)
        return fires.double() / max(tokens, 1)

    def dense_mask(self) -> Tensor:
        return self.density() > self.tcfg.dense_threshold

    def density_histogram(self) -> dict[str, float]:
        """Fraction of latents per ``metrics.DENSITY_BUCKETS`` label (log10-density lower edge, e.g. "-3.5"; "never")."""
        d = self.density()
        n = d.numel()
        fired = d > 0
        logd = d[fired].log10().clamp(DENSITY_EDGES[0], -1e-9)  # density 1.0 goes in the top bucket
        idx = ((logd - DENSITY_EDGES[0]) / DENSITY_STEP).floor().long()
        counts = torch.bincount(idx, minlength=len(DENSITY_EDGES)).tolist() + [int((~fired).sum())]
        return {label: c / n for label, c in zip(DENSITY_BUCKETS, counts)}

    @torch.no_grad()
    def _record_fires(self, fires: Tensor, b: int) -> None:
        """``fires`` [d_sae]: tokens of this batch (of ``b``) each latent fired on."""
        fires = fires.to(torch.int64)
        self.since_fired += b
        self.since_fired.masked_fill_(fires > 0, 0)  # no boolean indexing: it would sync a CUDA step
        self.window_fires += fires
        self.window_tokens += b
        if self.window_tokens >= self.tcfg.density_window_tokens:
            self.last_fires, self.last_tokens = self.window_fires, self.window_tokens
            self.window_fires, self.window_tokens = torch.zeros_like(self.last_fires), 0

    # --- training ------------------------------------------------------------------------------------------------

    def step(self, x: Tensor, total: int | None = None) -> StepStats:
        """One update on ``x``; data-parallel, ``total`` is the step's tokens over every rank and ``x`` may be empty
        (a zero-weight step: the forward runs on a placeholder row whose contributions are dropped)."""
        n = x.shape[0]
        total = n if total is None else total
        x = x.to(self.device, torch.float32, non_blocking=True)
        if n == 0:
            x = torch.zeros(1, x.shape[1], device=self.device)
        if not self.b_dec_initialized:
            if n:
                self.sae.init_b_dec(x)
            if self.collective is not None:
                self.collective.weighted_mean_(self.sae.b_dec, n, total)
            self.b_dec_initialized = True
        lr_mult, sparsity_scale = schedule(self.tokens_seen + total, self.tcfg)
        lr = self.base_lr * lr_mult
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_fn = self.sae.sparse_loss if self.sparse else self.sae.loss
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = loss_fn(x, sparsity_scale, self.dead_mask())
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        with torch.no_grad():
            terms = list(out.terms)
            losses = [out.loss.detach()] + [out.terms[k].detach() for k in terms]
            x_hat = out.x_hat.detach()
            row, fires = step_row(x, x_hat, out.l0.detach(), losses), out.fires
        if self.collective is not None:
            fires, row = self.collective.reduce_step(self.sae, n, total, fires, row)
        self.sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sae.after_optimizer_step()
        self.tokens_seen += total
        self.steps += 1
        with torch.no_grad():
            self._record_fires(fires, total)
            windowed = window_values(self.window.add(row), len(losses))
            batch_fvu = fvu(x, x_hat) if self.collective is None else window_values(row, len(losses))[0]
            values = torch.cat([windowed.float(), torch.stack(
                [batch_fvu.float(), self.dead_mask().float().mean(), self.dense_mask().float().mean()])])
        keys = ("fvu", "mse", "l0", "loss_total", *(f"loss_{k}" for k in terms), "fvu_batch", "dead_fraction",
                "dense_fraction")
        host = {"lr": lr, "sparsity_coefficient": sparsity_scale, "step": self.steps, "tokens": self.tokens_seen}
        return StepStats(values, keys, host)

    def held_out_metrics(self, x: Tensor) -> dict[str, float]:
        """fvu / l0 / mse of the inference SAE (for batchtopk: the learned threshold, not the batch top-k) on
        held-out tokens (see :func:`streamd.sae.quality.fvu_l0`)."""
        return fvu_l0(self.sae, x, self.tcfg.batch_size)

    # --- resume --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "b_dec_initialized": self.b_dec_initialized,
            "since_fired": self.since_fired,
            "window_fires": self.window_fires,
            "window_tokens": self.window_tokens,
            "last_fires": self.last_fires,
            "last_tokens": self.last_tokens,
            "stats_window": self.window.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # a state saved by another build carries its own choice
            group["fused"], group["foreach"] = self.fused_adam or None, None
        self.tokens_seen, self.steps = int(state["tokens_seen"]), int(state["steps"])
        self.b_dec_initialized = bool(state["b_dec_initialized"])
        for name in ("since_fired", "window_fires", "last_fires"):
            setattr(self, name, state[name].to(self.device, torch.int64).clone())
        self.window_tokens, self.last_tokens = int(state["window_tokens"]), int(state["last_tokens"])
        if "stats_window" in state:  # states of streamd 0.1 have none: the window starts empty
            self.window.load_state_dict(state["stats_window"])
