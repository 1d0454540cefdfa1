"""`streamd up`: the embedded default on one machine — local broker, one producer process, the trainer in-process.

The producer runs in its own process (its own torch threads and GIL); the trainer runs here so Ctrl-C stops it first
and it leaves a final checkpoint, then the producer is stopped (it flushes) and the broker last.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from streamd.stream.broker import LocalBroker
from streamd.config import StreamdConfig
from streamd.train.trainer import Trainer

log = logging.getLogger(__name__)


def _producer_config(cfg: StreamdConfig, run_dir: Path) -> Path:
    """The effective config as a file for the producer process (secrets included: it is written 0600)."""
    path = run_dir / "up-config.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(_plain(cfg.model_dump(mode="python")), sort_keys=False))
    return path


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "get_secret_value"):
        return obj.get_secret_value()
    return obj


def run_up(cfg: StreamdConfig) -> int:
    run_dir = cfg.trainer.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with LocalBroker(log_dir=run_dir) as broker:
        cfg.kafka.bootstrap_servers = [broker.bootstrap]
        trainer = Trainer(cfg, on_progress=lambda p: print(p.line(), flush=True))
        cfg.producer.lag_url = cfg.producer.lag_url or trainer.server.url
        producer_log = open(run_dir / "producer.log", "ab")
        producer = subprocess.Popen(
            [sys.executable, "-m", "streamd", "produce", "--config", str(_producer_config(cfg, run_dir))],
            stdout=producer_log, stderr=subprocess.STDOUT,
        )
        print(f"broker      {broker.bootstrap} (Tansu, memory storage)", flush=True)
        print(f"producer    pid {producer.pid}, log {run_dir / 'producer.log'}", flush=True)
        print(f"metrics     {trainer.server.url}/metrics", flush=True)
        print(f"checkpoints {run_dir / 'checkpoints'}  (pull: streamd pull {trainer.server.url} --out DIR)",
              flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: trainer.stop())

        def watch_producer() -> None:
            if producer.wait() != 0 and not trainer.stop_event.is_set():
                log.error("the producer exited with %d (see %s); stopping", producer.returncode,
                          run_dir / "producer.log")
                trainer.stop()

        threading.Thread(target=watch_producer, name="streamd-watch-producer", daemon=True).start()
        try:
            tokens = trainer.run()
        finally:
            producer.send_signal(signal.SIGTERM)
            try:
                producer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                producer.kill()
            producer_log.close()
        print(f"stopped after {tokens:,} tokens; latest checkpoint: {trainer.store.latest()}", flush=True)
    return 0
