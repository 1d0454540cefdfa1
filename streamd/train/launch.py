"""``streamd train --world-size N``: N local ranks of one data-parallel run, the way torchrun would start them.

Each rank is ``python -m streamd train`` with the same arguments and RANK / WORLD_SIZE / LOCAL_RANK in its
environment, meeting the others through a file store in a fresh temporary directory (torch's TCP store would listen
on every interface) and with gloo on the loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless set): nothing listens
beyond 127.0.0.1. ``streamd.train.distributed`` does the rest. SIGINT and
SIGTERM are passed on to every rank (they agree to stop at the next step and write a final checkpoint). When a rank
fails, the others stop on their own within ``trainer.collective_timeout_seconds``; one still running after that
and a grace is killed. Returns the first failing rank's exit status (0 when all succeeded).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamd.train.distributed import RENDEZVOUS_ENV

log = logging.getLogger(__name__)

GRACE_S = 30.0  # beyond the collective timeout, for a final checkpoint and the consumer's close


def rank_env(rank: int, world_size: int, rendezvous: Path) -> dict[str, str]:
    """The environment of local rank ``rank`` (this process's, plus what ``distributed.Collective`` reads)."""
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), RENDEZVOUS_ENV: str(rendezvous),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


def launch(world_size: int, argv: list[str], collective_timeout_s: float) -> int:
    """Run ``streamd <argv>`` as ``world_size`` ranks (``argv`` with its ``--world-size``: a rank sees RANK set)."""
    tmp = Path(tempfile.mkdtemp(prefix="streamd-ranks-"))
    try:
        return _supervise([subprocess.Popen([sys.executable, "-m", "streamd", *argv],
                                            env=rank_env(rank, world_size, tmp / "rendezvous"))
                           for rank in range(world_size)], collective_timeout_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _supervise(procs: list[subprocess.Popen], collective_timeout_s: float) -> int:
    log.info("started %d ranks (pids %s)", len(procs), [p.pid for p in procs])

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
