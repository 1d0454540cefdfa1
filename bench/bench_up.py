"""`streamd up` end to end on the shipped model: tokens trained per second with 1 and 2 producers, and what the
inspector costs it.

Each row runs ``python -m streamd up`` (the shipped SmolLM2-135M, the KJV corpus, the default TopK SAE) as a
subprocess, reads its progress lines, and once training has begun measures tokens trained over ``--seconds`` of wall
time; then Ctrl-C. The shuffle buffer is 16,384 tokens instead of 65,536 so training starts within a minute. Rows:

- 1 producer, no inspector; 2 producers (each its own process over the feeder's text topic), no inspector;
- 1 producer with the inspector, which inspects every checkpoint here (``checkpoints.every_seconds`` 30,
  ``inspect.every_seconds`` 60: ten times ``up``'s default cadence, so the window holds inspections; its cost at the
  default 600 s is about a tenth of the difference, after the one-time baseline).

On two cores every process competes for the same CPU: the producer's forward pass bounds ``up``, a second producer
adds a second forward pass on the same cores, and the inspector's forward passes take from them too.

    .venv/bin/python bench/bench_up.py [--seconds 150] [--rows p1,p2,p1-inspect]
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_line, table  # noqa: E402

ROWS = {
    "p1": ("1 producer", ["--producers", "1", "--no-inspector"]),
    "p2": ("2 producers", ["--producers", "2", "--no-inspector"]),
    "p1-inspect": ("1 producer + inspector", ["--producers", "1", "--set", "checkpoints.every_seconds=30",
                                              "--set", "inspect.every_seconds=60", "--set", "inspect.port=0"]),
}
PROGRESS = re.compile(r"^tokens ([\d,]+) \| [\d,]+ tok/s")


def run_up(extra: list[str], seconds: float, run_dir: Path) -> tuple[float, int, str]:
    """(tokens trained per second over the window, tokens in it, the last progress line)."""
    cmd = [sys.executable, "-m", "streamd", "up", "--set", "trainer.buffer_tokens=16384",
           "--set", f"trainer.run_dir={run_dir}", "--set", "metrics.port=0", "--set", "producer.metrics_port=0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[tuple[float, int, str]] = []

    def read() -> None:
        for line in proc.stdout:
            if m := PROGRESS.match(line):
                seen.append((time.monotonic(), int(m.group(1).replace(",", "")), line.strip()))

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 600
        while not seen:  # training has begun
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamd up {' '.join(extra)} did not start training (exit {proc.poll()})")
            time.sleep(0.5)
        time.sleep(seconds)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    (t0, n0, _), (t1, n1, last) = seen[0], seen[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9), n1 - n0, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=150.0, help="measured window after training begins")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    args = ap.parse_args()
    print(machine_line(2))
    rows = []
    for key in args.rows.split(","):
        name, extra = ROWS[key]
        with tempfile.TemporaryDirectory(prefix="bench-up-") as d:
            rate, tokens, last = run_up(extra, args.seconds, Path(d) / "run")
        rows.append([name, tokens, rate, load_average()])
        print(f"{name}: {last}", flush=True)
    print(table(["streamd up", "tokens in window", "tokens trained/s", "load average after"], rows))


if __name__ == "__main__":
    main()
