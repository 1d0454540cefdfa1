"""``streamd train --world-size N``: N local ranks of one data-parallel run, the way torchrun would start them.

Each rank is ``python -m streamd train`` with the same arguments and RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
(127.0.0.1) / MASTER_PORT (a free port) in its environment; ``streamd.train.distributed`` does the rest. SIGINT and
SIGTERM are passed on to every rank (they agree to stop at the next step and write a final checkpoint). When a rank
fails, the others stop on their own within ``trainer.collective_timeout_seconds``; one still running after that
and a grace is killed. Returns the first failing rank's exit status (0 when all succeeded).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)

GRACE_S = 30.0  # beyond the collective timeout, for a final checkpoint and the consumer's close


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, argv: list[str], collective_timeout_s: float) -> int:
    """Run ``streamd <argv>`` as ``world_size`` ranks; ``argv`` must not hold ``--world-size`` itself."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "streamd", *argv], env=env))
    log.info("started %d ranks (pids %s), rendezvous on 127.0.0.1:%d", world_size, [p.pid for p in procs], port)

    def forward(sig, _frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at, status = None, 0
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0) and failed_at is None:
                    failed_at, status = time.monotonic(), p.returncode
                    log.error("rank %d exited with status %d; the other ranks stop within the collective timeout "
                              "(%gs)", rank, p.returncode, collective_timeout_s)
            if failed_at is not None and time.monotonic() - failed_at > collective_timeout_s + GRACE_S:
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        log.error("rank %d still running %gs after a rank failed: killing it", rank,
                                  collective_timeout_s + GRACE_S)
                        p.kill()
            time.sleep(0.2)
        if failed_at is None:
            status = next((p.returncode for p in procs if p.returncode), 0)
        return status if status >= 0 else 128 - status  # killed by a signal: the shell's convention
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
