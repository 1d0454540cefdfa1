"""`streamd up`: the embedded default on one machine — local broker, one producer process, the trainer in-process,
and an inspector process serving the feature browser (``--no-inspector``: none).

The producer runs in its own process (its own torch threads and GIL); the trainer runs here so Ctrl-C stops it first
and it leaves a final checkpoint, then the producer is stopped (it flushes) and the broker last. The producer gets
the config as a 0600 file without secrets (removed at exit) and the secrets in its environment, and it dies with
`up` (SIGTERM from the kernel, even when `up` is SIGKILLed), as the broker does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import yaml

from streamd.stream.broker import LocalBroker, die_with_parent
from streamd.config import StreamdConfig
from streamd.train.trainer import Trainer

log = logging.getLogger(__name__)


ENV_PREFIX = "STREAMD_"


@contextlib.contextmanager
def producer_config(cfg: StreamdConfig, run_dir: Path, name: str = "up-config") -> Iterator[tuple[Path, dict[str, str]]]:
    """The effective config for the producer process: a file without secrets (mode 0600 whatever an older file had,
    removed on exit) and the secrets as ``STREAMD_SECTION__FIELD`` environment variables for the child only."""
    secrets: dict[str, str] = {}
    plain = _plain(cfg.model_dump(mode="python"), (), secrets)
    path = run_dir / f"{name}.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(plain, sort_keys=False))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    try:
        yield path, secrets
    finally:
        path.unlink(missing_ok=True)


def _plain(obj, where: tuple[str, ...], secrets: dict[str, str]):
    """``obj`` as plain YAML values; secret values go to ``secrets`` (by environment variable name) instead."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if hasattr(v, "get_secret_value"):
                secrets[ENV_PREFIX + "__".join((*where, k)).upper()] = v.get_secret_value()
            else:
                out[k] = _plain(v, (*where, k), secrets)
        return out
    if isinstance(obj, list):
        return [_plain(v, where, secrets) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "get_secret_value"):  # a secret inside a list: no variable to carry it
        raise ValueError(f"cannot pass a secret at {'.'.join(where)} to the producer")
    return obj


def spawn_producer(cmd: list[str], log_file: IO[bytes], env: dict[str, str]) -> subprocess.Popen:
    """Start a child process (a producer, the inspector), tied to this one: it gets SIGTERM when `up` dies, even by SIGKILL or the OOM
    killer, instead of retrying for ever against a broker that went with `up`."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, **env},
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)


def _spawn_inspector(cfg: StreamdConfig, stack: contextlib.ExitStack) -> subprocess.Popen:
    """`streamd inspect RUN_DIR` in its own process: it follows the run's checkpoints on disk (no pull), on the
    held-out text of :mod:`streamd.inspect.sample` (a corpus the producer does not read)."""
    run_dir = cfg.trainer.run_dir
    icfg = cfg.model_copy(deep=True)
    if "out_dir" not in cfg.inspect.model_fields_set:
        icfg.inspect.out_dir = run_dir / "inspect"
    config_path, secret_env = stack.enter_context(producer_config(icfg, run_dir, "up-inspector"))
    log_file = stack.enter_context(open(run_dir / "inspector.log", "ab"))
    return spawn_producer([sys.executable, "-m", "streamd", "inspect", str(run_dir), "--config", str(config_path)],
                          log_file, secret_env)


def run_up(cfg: StreamdConfig) -> int:
    run_dir = cfg.trainer.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with LocalBroker(log_dir=run_dir) as broker:
        cfg.kafka.bootstrap_servers = [broker.bootstrap]
        trainer = Trainer(cfg, on_progress=lambda p: print(p.line(), flush=True))
        cfg.producer.lag_url = cfg.producer.lag_url or trainer.server.url
        stack = contextlib.ExitStack()
        feeder = None
        try:
            producers = []
            n = max(1, cfg.producer_count)
            if n > 1:  # a feeder thread fills a text topic; the producers divide it (one consumer group)
                from streamd.produce.feed import Feeder

                cfg.feed.source = cfg.producer.source.model_copy()
                cfg.feed.topic = f"{cfg.kafka.topic}.text"
                cfg.feed.state_path = cfg.feed.state_path or run_dir / "feed.state"
                cfg.feed.metrics_port = 0
                feeder = Feeder(cfg)
                threading.Thread(target=feeder.run, name="streamd-feeder", daemon=True).start()
            for i in range(n):
                pcfg = cfg.model_copy(deep=True)
                if n > 1:
                    pcfg.producer.source = pcfg.producer.source.model_validate(
                        {"kind": "kafka", "topic": cfg.feed.topic})
                    pcfg.producer.producer_id = f"{cfg.producer.producer_id}-{i}"
                    pcfg.producer.metrics_port = cfg.producer.metrics_port + i if cfg.producer.metrics_port else 0
                name = "producer" if n == 1 else f"producer-{i}"
                config_path, secret_env = stack.enter_context(producer_config(pcfg, run_dir, f"up-{name}"))
                producer_log = stack.enter_context(open(run_dir / f"{name}.log", "ab"))
                producers.append(spawn_producer(
                    [sys.executable, "-m", "streamd", "produce", "--config", str(config_path)], producer_log,
                    secret_env))
            inspector = _spawn_inspector(cfg, stack) if cfg.up_inspector else None
        except BaseException:
            for p in producers:
                p.kill()
            stack.close()
            raise
        print(f"broker      {broker.bootstrap} (Tansu, memory storage)", flush=True)
        for i, p in enumerate(producers):
            name = "producer" if len(producers) == 1 else f"producer-{i}"
            print(f"producer    pid {p.pid}, log {run_dir / (name + '.log')}", flush=True)
        if feeder is not None:
            print(f"feeder      text topic {cfg.feed.topic} ({cfg.feed.partitions} partitions)", flush=True)
        print(f"metrics     {trainer.server.url}/metrics", flush=True)
        print(f"checkpoints {run_dir / 'checkpoints'}  (pull: streamd pull {trainer.server.url} --out DIR)",
              flush=True)
        if inspector is not None:
            i = cfg.inspect
            print(f"inspector   pid {inspector.pid}, log {run_dir / 'inspector.log'}; feature browser "
                  f"{'https' if i.tls_certfile else 'http'}://{i.host}:{i.port}/ (after the first checkpoint)",
                  flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: trainer.stop())

        def watch_producer(producer: subprocess.Popen) -> None:
            if producer.wait() != 0 and not trainer.stop_event.is_set():
                log.error("a producer exited with %d (see its log in %s); stopping", producer.returncode, run_dir)
                trainer.stop()

        for p in producers:
            threading.Thread(target=watch_producer, args=(p,), name="streamd-watch-producer", daemon=True).start()
        try:
            tokens = trainer.run()
        finally:
            if feeder is not None:
                feeder.stop()
            children = producers + ([inspector] if inspector is not None else [])
            for p in children:
                p.send_signal(signal.SIGTERM)
            for p in children:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            stack.close()  # the logs, and the config files removed
        print(f"stopped after {tokens:,} tokens; latest checkpoint: {trainer.store.latest()}", flush=True)
    return 0
