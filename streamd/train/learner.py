"""One SAE's training step: optimiser, token-based schedules, and feature statistics.

Everything is counted in tokens, not steps, so schedules and dead-latent windows mean the same thing whatever the
batch size. The learner knows nothing about Kafka: it is handed normalised batches ``x [B, d_in]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamd.config import SAEConfig, TrainerConfig
from streamd.sae import build_sae

# log10 feature-density histogram: buckets [e, e + 0.5) for e in -8.0 .. -0.5 (values outside are clamped in), plus
# latents that never fired in the window
HIST_EDGES = [-8.0 + 0.5 * i for i in range(16)]
HIST_NEVER = "never"


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


@dataclass
class StepStats:
    loss: float
    terms: dict[str, float]
    l0: float
    mse: float
    fvu: float
    lr: float
    sparsity_scale: float
    dead_fraction: float
    dense_fraction: float
    tokens: int


def _fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: squared error over squared deviation from the batch mean."""
    return (x_hat - x).float().pow(2).sum() / (x - x.mean(0)).float().pow(2).sum().clamp_min(1e-12)


class Learner:
    """One SAE + Adam + schedules + feature statistics. ``step`` is one optimiser update on one batch."""

    def __init__(self, cfg: SAEConfig, d_in: int, trainer_cfg: TrainerConfig, device: torch.device | str = "cpu"):
        self.cfg, self.tcfg = cfg, trainer_cfg
        self.device = torch.device(device)
        self.sae = build_sae(cfg, d_in).to(self.device)
        self.base_lr = cfg.learning_rate(d_in)  # lr, else the architecture's default_lr
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=(0.9, 0.999))
        self.autocast = trainer_cfg.autocast_bf16 and self.device.type == "cuda"
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
        """Fraction of latents per log10-density bucket (labels: lower edge, e.g. "-3.5"; and "never")."""
        d = self.density()
        n = d.numel()
        fired = d > 0
        out = {HIST_NEVER: float((~fired).sum()) / n}
        logd = d[fired].log10().clamp(HIST_EDGES[0], -1e-9)
        idx = ((logd - HIST_EDGES[0]) / 0.5).floor().long()
        counts = torch.bincount(idx, minlength=len(HIST_EDGES)).tolist()
        out.update({f"{e:.1f}": c / n for e, c in zip(HIST_EDGES, counts)})
        return out

    @torch.no_grad()
    def _record_fires(self, feats: Tensor) -> None:
        b = feats.shape[0]
        fires = (feats > 0).sum(0)
        self.since_fired += b
        self.since_fired[fires > 0] = 0
        self.window_fires += fires
        self.window_tokens += b
        if self.window_tokens >= self.tcfg.density_window_tokens:
            self.last_fires, self.last_tokens = self.window_fires, self.window_tokens
            self.window_fires, self.window_tokens = torch.zeros_like(self.last_fires), 0

    # --- training ------------------------------------------------------------------------------------------------

    def step(self, x: Tensor) -> StepStats:
        x = x.to(self.device, torch.float32, non_blocking=True)
        if not self.b_dec_initialized:
            self.sae.init_b_dec(x)
            self.b_dec_initialized = True
        lr_mult, sparsity_scale = schedule(self.tokens_seen + x.shape[0], self.tcfg)
        lr = self.base_lr * lr_mult
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.sae.loss(x, sparsity_scale, self.dead_mask())
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sae.after_optimizer_step()
        self.tokens_seen += x.shape[0]
        self.steps += 1
        with torch.no_grad():
            feats = out.feats.detach()
            self._record_fires(feats)
            names = list(out.terms)
            # one device->host transfer for every scalar of the step
            vals = torch.stack(
                [out.loss.detach().float(), (feats > 0).sum(-1).float().mean(), _fvu(x, out.x_hat.detach()),
                 self.dead_mask().float().mean(), self.dense_mask().float().mean()]
                + [out.terms[k].detach().float() for k in names]
            ).tolist()
        terms = dict(zip(names, vals[5:]))
        return StepStats(
            loss=vals[0], terms=terms, l0=vals[1], mse=terms["mse"], fvu=vals[2], lr=lr,
            sparsity_scale=sparsity_scale, dead_fraction=vals[3], dense_fraction=vals[4], tokens=self.tokens_seen,
        )

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> dict[str, float]:
        """Inference-mode metrics (for batchtopk: the learned threshold, not the batch top-k) on held-out tokens."""
        err = dev = l0 = 0.0
        mean = x.float().mean(0).to(self.device)
        for chunk in x.split(self.tcfg.batch_size):
            c = chunk.to(self.device, torch.float32)
            f = self.sae.encode(c)
            err += float((self.sae.decode(f) - c).pow(2).sum())
            dev += float((c - mean).pow(2).sum())
            l0 += float((f > 0).sum())
        n = x.shape[0]
        return {"fvu": err / max(dev, 1e-12), "l0": l0 / n, "mse": err / n}

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
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.tokens_seen, self.steps = int(state["tokens_seen"]), int(state["steps"])
        self.b_dec_initialized = bool(state["b_dec_initialized"])
        for name in ("since_fired", "window_fires", "last_fires"):
            setattr(self, name, state[name].to(self.device, torch.int64).clone())
        self.window_tokens, self.last_tokens = int(state["window_tokens"]), int(state["last_tokens"])
