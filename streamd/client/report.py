"""Look at a run: PNG plots from its metrics history (``streamd report``) and a terminal summary of a live trainer
(``streamd status``), for hosts without Grafana."""

from __future__ import annotations

import math
import time
from pathlib import Path

from streamd.run.history import read_history
from streamd.metrics import DENSITY_BUCKETS, STEP_STATS, fetch_samples

def _curves() -> list[tuple[str, str | None, str, bool]]:
    """(file stem, per-SAE key or None for a run-level key, y label, log y axis): the schema's plotted stats."""
    return [(s.key, s.key, s.plot, s.log_y) for s in STEP_STATS if s.plot] + [
        ("tokens_per_second", None, "tokens / s", False)]


def write_report(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write one PNG per curve (vs tokens trained, one line per SAE) and the latest feature-density histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_history(Path(run_dir))
    if not records:
        raise FileNotFoundError(f"no metrics history in {run_dir} (expected {Path(run_dir) / 'metrics.jsonl'})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sae_names = sorted({name for r in records for name in r.get("saes", {})})
    written = []
    for stem, key, ylabel, logy in _curves():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if key is None:
            pts = [(r["tokens"], r[stem]) for r in records if r.get(stem) is not None]
            if pts:
                ax.plot(*zip(*pts), label="trainer")
        else:
            for name in sae_names:
                pts = [(r["tokens"], r["saes"][name][key]) for r in records
                       if r.get("saes", {}).get(name, {}).get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), label=name)
        if logy and ax.lines and all(y > 0 for line in ax.lines for y in line.get_ydata()):
            ax.set_yscale("log")
        _finish(ax, ylabel, f"{ylabel} vs tokens trained")
        written.append(_save(fig, out_dir / f"{stem}.png"))

    latest = {name: h for r in records for name, s in r.get("saes", {}).items()
              if (h := s.get("density_histogram"))}
    if latest:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(latest)
        for i, (name, hist) in enumerate(sorted(latest.items())):
            xs = [j + i * width for j in range(len(DENSITY_BUCKETS))]
            ax.bar(xs, [hist.get(b, 0.0) for b in DENSITY_BUCKETS], width=width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(DENSITY_BUCKETS))], DENSITY_BUCKETS, rotation=45)
        ax.set_xlabel("log10 firing density (bucket lower edge)")
        ax.set_ylabel("fraction of latents")
        ax.set_title("feature density (latest)")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        written.append(_save(fig, out_dir / "feature_density.png"))
    return written


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("tokens trained")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-" if v is None or v != v else str(v)
    return f"{int(v):,}" if v == int(v) else f"{v:.4g}"


def status(url: str, timeout: float = 5.0) -> str:
    """Fetch ``URL/metrics`` from a live trainer and summarise it for a terminal."""
    m = fetch_samples(url, timeout)

    def one(name: str) -> float | None:
        vals = m.get(name)
        return vals[0][1] if vals else None

    def by(name: str, label: str) -> dict[str, float]:
        return {lab[label]: v for lab, v in m.get(name, []) if label in lab}

    trained = by("streamd_tokens_trained_total", "sae")
    lines = [f"streamd trainer at {url}"]
    version = next(iter(by("streamd_build_info", "version")), "unknown")
    ready = one("streamd_training_ready")
    lines.append(f"  version {version}, training {'ready' if ready else 'not ready (filling buffer)'}")
    lines.append(f"  tokens trained   {_fmt(max(trained.values(), default=0))}"
                 f"   tokens/s {_fmt(one('streamd_tokens_per_second'))}")
    lines.append(f"  buffer fill      {_fmt((one('streamd_buffer_fill_ratio') or 0) * 100)}%"
                 f"   ({_fmt(one('streamd_buffer_tokens'))} tokens)")
    lag = sum(v for _, v in m.get("streamd_consumer_lag", []))
    consumed = by("streamd_tokens_consumed_total", "producer")
    lines.append(f"  consumer lag     {_fmt(lag)} messages   producers seen: {len(consumed)}")
    last = one("streamd_checkpoint_last_success_timestamp_seconds")
    age = f"{time.time() - last:.0f} s ago" if last else "never"
    failures = one("streamd_checkpoint_failures_total") or 0
    lines.append(f"  last checkpoint  {age}   failures {_fmt(failures)}")
    rejected = {k: v for k, v in by("streamd_messages_rejected_total", "reason").items() if v}
    lines.append("  rejected         " + (", ".join(f"{k}={_fmt(v)}" for k, v in sorted(rejected.items())) or "none"))
    columns = [st for st in STEP_STATS if st.label]
    per = {st.key: by(f"streamd_{st.key}", "sae") for st in columns}
    if trained:
        width = max(len(s) for s in trained)
        lines.append(f"  {'sae':<{width}}  {'tokens':>12}" + "".join(f" {st.label:>9}" for st in columns))
        for sae in sorted(trained):
            lines.append(f"  {sae:<{width}}  {_fmt(trained[sae]):>12}"
                         + "".join(f" {_fmt(per[st.key].get(sae)):>9}" for st in columns))
    return "\n".join(lines)
