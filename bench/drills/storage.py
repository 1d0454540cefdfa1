"""Storage drills: SIGKILL a real ``streamd train`` at random moments (some mid-checkpoint), and a full disk at
checkpoint time and at history time.

    .venv/bin/python -m bench.drills sigkill full_disk

Loss is judged from the trainer's trace (``trainer.trace_file``, one line per step: which message's tokens it
trained). Work counts only once a checkpoint holds it: the run resumed from checkpoint C re-reads from C's offsets,
so what the killed run trained after C (or on messages at or above C's offsets) is dropped from the count. At every
checkpoint that a later run resumed from, and at the final one, the offsets must be exact: every partition named,
each at the first message not trained in full (``tests.streamd_testing.check_offsets_exact``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.drills.row import Row
from streamd import wire
from streamd.config import SAEConfig
from streamd.run.checkpoints import CheckpointError, CheckpointStore
from streamd.stream.broker import LocalBroker, free_port
from streamd.stream.kafka import ensure_topic, make_producer
from tests.streamd_testing import SITE_ID, check_offsets_exact, topic_messages, trainer_config, write_config

D_IN, MSG_TOKENS, BUFFER, BATCH = 16, 100, 2048, 128
SAES = [SAEConfig(name="t", architecture="topk", expansion_factor=64, k=8)]
QUEUE_TOKENS = max(4 * BATCH, 65536)  # the trainer's ingestion queue (trainer.open_source)


def _read_trace(path: Path, upto_tokens: int | None = None) -> Counter:
    """Tokens trained per (topic, partition, offset) up to a token count; a line torn by SIGKILL is skipped."""
    out: Counter = Counter()
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if upto_tokens is not None and rec["tokens"] > upto_tokens:
            break
        for topic, part, off, n in rec["served"]:
            out[(topic, part, off)] += n
    return out


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()
    except OSError:
        return ""


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _train(cfg_path: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "streamd", "train", "--config", str(cfg_path), "--metrics-port", str(port), *extra],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _latest(store: CheckpointStore) -> tuple[str | None, int, dict[int, int]]:
    """(id, tokens, offsets of the run's topic) of what ``latest`` names, as a resume would read it."""
    path = store.latest()
    if path is None:
        return None, 0, {}
    tokens = json.loads((path / "manifest.json").read_text())["tokens"]
    return path.name, tokens, next(iter(store.read_offsets(path).values()), {})


class _Pacer(threading.Thread):
    """Publishes random activations at a steady rate until stopped: a live stream the trainer keeps up with."""

    def __init__(self, kafka, tokens_per_s: float) -> None:
        super().__init__(daemon=True)
        self.kafka, self.rate, self.stop = kafka, tokens_per_s, threading.Event()
        self.sent_tokens = 0

    def run(self) -> None:
        prod = make_producer(self.kafka, max_request_size=2**20)
        rng, seq, t0 = np.random.default_rng(1), 0, time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate) - self.sent_tokens
            if due < MSG_TOKENS:
                time.sleep(0.01)
                continue
            rows = torch.from_numpy(rng.standard_normal((MSG_TOKENS, D_IN)).astype(np.float16))
            prod.send(self.kafka.topic, value=wire.encode(wire.ActivationMessage("drill", seq, SITE_ID, rows)),
                      key=f"drill-{seq % 7}".encode())
            seq += 1
            self.sent_tokens += MSG_TOKENS
        prod.flush(timeout=30)
        prod.close()


def sigkill(kills: int = 20, seed: int = 13) -> Row:
    """SIGKILL ``streamd train`` 20 times (a third of them the moment a checkpoint's temp dir appears), restarting
    each time; then a last run until the stream is drained and SIGTERM. Nothing below any resumed-from or the final
    checkpoint's offsets may be left untrained, no checkpoint may be corrupt, re-reads stay within the bound."""
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="drill-sigkill-"))
    faults = survived = mid_checkpoint = orphans = 0
    notes: list[str] = []
    try:
        with LocalBroker(log_dir=tmp / "broker") as broker:
            kafka = broker.config(topic="drill-sigkill", partitions=4, session_timeout_ms=6000)
            ensure_topic(kafka, kafka.topic, kafka.partitions)
            run = tmp / "run"
            store = CheckpointStore(run, writer=False)
            pacer = _Pacer(kafka, tokens_per_s=6000)
            pacer.start()
            state: Counter = Counter()  # trained tokens per message that the latest checkpoint holds
            resumed_from: tuple[str | None, int, dict[int, int]] = (None, 0, {})
            rereads, resumes, verified, corrupt = 0.0, 0, set(), []
            checks: list[tuple[int, dict[int, int], Counter]] = []
            for i in range(kills + 1):
                final = i == kills
                if final:
                    pacer.stop.set()
                    pacer.join()
                trace = tmp / f"trace{i}.jsonl"
                cfg = trainer_config(kafka, run, d_in=D_IN, every_tokens=2048, buffer_tokens=BUFFER,
                                     batch_size=BATCH, saes=SAES, trace_file=trace)
                cfg.checkpoints.keep_last = 3
                port = free_port()
                proc = _train(write_config(cfg, tmp / f"c{i}.yaml"), port, tmp / "train.log")
                resumes += resumed_from[0] is not None
                deadline = time.monotonic() + 90
                if not final:
                    faults += 1
                    mode = "checkpoint" if i % 3 == 2 else "random"
                    while not (trace.exists() and trace.stat().st_size):  # training has begun
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"run {i} did not start training; see {tmp / 'train.log'}")
                        time.sleep(0.05)
                    metrics = ""
                    if mode == "random":
                        time.sleep(rng.uniform(0.0, 2.5))
                        metrics = _get(f"http://127.0.0.1:{port}/metrics")
                    else:
                        time.sleep(rng.uniform(0.0, 1.0))
                        metrics = _get(f"http://127.0.0.1:{port}/metrics")
                        ckdir = run / "checkpoints"
                        while not any(e.name.startswith(".tmp-") and e.name[5:6].isdigit() for e in os.scandir(ckdir)):
                            if time.monotonic() > deadline:
                                break
                        time.sleep(rng.uniform(0.0, 0.004))
                    rereads += _metric(metrics, "streamd_duplicates_reread_total")
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    debris = [p.name for p in (run / "checkpoints").glob(".tmp-*")]
                    mid_checkpoint += bool(debris)
                else:
                    while "waiting for data" not in _get(f"http://127.0.0.1:{port}/readyz"):
                        if proc.poll() is not None or time.monotonic() > deadline + 120:
                            raise RuntimeError(f"the last run did not drain the stream; see {tmp / 'train.log'}")
                        time.sleep(0.5)
                    rereads += _metric(_get(f"http://127.0.0.1:{port}/metrics"), "streamd_duplicates_reread_total")
                    proc.send_signal(signal.SIGTERM)
                    if proc.wait(timeout=120) != 0:
                        raise RuntimeError(f"the last run exited {proc.returncode}; see {tmp / 'train.log'}")
                # every checkpoint on disk verifies (a kill mid-write must leave none half-written)
                for ckid in store.ids():
                    if ckid not in verified:
                        verified.add(ckid)
                        try:
                            CheckpointStore.verify(store.dir / ckid)
                        except CheckpointError as e:
                            corrupt.append(str(e))
                latest = _latest(store)
                orphans += bool(latest[0]) and any(int(c) > int(latest[0]) for c in store.ids())
                trained = _read_trace(trace)
                again = [k for k in trained if k[2] < resumed_from[2].get(k[1], 0)]
                if again:
                    notes.append(f"run {i} re-trained checkpointed messages {again[:3]}")
                if latest[0] != resumed_from[0]:  # this run wrote the checkpoint the next one resumes from
                    kept = Counter({k: v for k, v in state.items() if k[2] < resumed_from[2].get(k[1], 0)})
                    kept.update(_read_trace(trace, upto_tokens=latest[1]))
                    state, resumed_from = kept, latest
                    checks.append((i, latest[2], state))  # judged at the end, once the stream stopped
                if not final and not again and len(corrupt) == 0:
                    survived += 1
            messages = topic_messages(kafka)
            below = 0
            for run_no, offsets, counted in checks:
                try:
                    below = check_offsets_exact(messages, offsets, counted, kafka.topic)
                except AssertionError as e:
                    notes.append(f"checkpoint of run {run_no}: {e}")
            lost = 0
            for k, (_, _, n) in messages.items():  # tokens below the final offsets that the count misses
                if k[2] < resumed_from[2].get(k[1], 0):
                    lost += max(0, n - state[k])
            total_msgs = len(messages)
            bound = resumes * ((8 * BUFFER + 4 * BATCH + QUEUE_TOKENS) / MSG_TOKENS + kafka.partitions)
            if rereads > bound:
                notes.append(f"re-reads {rereads:.0f} above the bound {bound:.0f}")
                lost = lost or -1
            if corrupt:
                notes.append(f"{len(corrupt)} corrupt checkpoints: {corrupt[:2]}")
                lost = lost or -1
            if notes and not lost:
                lost = -1
            note = (f"{mid_checkpoint} kills left a checkpoint temp dir, {orphans} a renamed checkpoint `latest` did "
                    f"not name yet; {len(verified)} checkpoints verified, {len(corrupt)} corrupt; {below:,}/"
                    f"{total_msgs:,} messages ({pacer.sent_tokens:,} tokens) below the final offsets, all trained; "
                    f"re-reads {rereads:.0f} over {resumes} resumes (bound {bound:.0f}: per resume (8 buffers + "
                    f"4 batches + queue) / {MSG_TOKENS}-token messages + partitions)")
            if notes:
                note += "; " + " | ".join(notes)
            return Row(tried=kills + 1, faults=faults, survived=survived, inputs=total_msgs, lost=lost, note=note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fill(path: Path, leave: int = 0) -> int:
    """Write ``path`` until the filesystem is full, then cut ``leave`` bytes off again; returns its size."""
    with open(path, "ab", buffering=0) as f:
        block = b"\0" * (64 << 10)
        while True:
            try:
                f.write(block)
            except OSError:
                break
        for size in (4096, 512, 1):
            while True:
                try:
                    f.write(block[:size])
                except OSError:
                    break
        size = f.tell()
        if leave:
            f.truncate(max(0, size - leave))
    return path.stat().st_size


def full_disk(tokens: int = 2_000_000) -> Row:
    """``streamd train --source`` with the run directory on a small tmpfs (checkpoints and metrics history; the
    trace lies elsewhere, to judge). Phase 1: the disk is full but for half a checkpoint (a checkpoint fits only once
    older ones are freed); phase 2: it is filled completely (checkpoints and history writes fail); phase 3: space
    again. The trainer must train every token once, exit 0, and leave intact checkpoints."""
    tmp = Path(tempfile.mkdtemp(prefix="drill-full-disk-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            return Row(0, 0, 0, 0, 0, note=f"skipped: cannot mount a tmpfs ({out.stderr.strip() or out.returncode})")
        try:
            return _full_disk(tmp, mnt, tokens)
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _full_disk(tmp: Path, mnt: Path, tokens: int) -> Row:
    acts = tmp / "acts.npy"
    np.save(acts, np.random.default_rng(2).standard_normal((tokens, D_IN)).astype(np.float32))
    run, trace, filler = mnt / "run", tmp / "trace.jsonl", mnt / "filler"
    from streamd.config import KafkaConfig

    cfg = trainer_config(KafkaConfig(), run, d_in=D_IN, every_tokens=4096, buffer_tokens=BUFFER, batch_size=BATCH,
                         saes=SAES, trace_file=trace)
    cfg.checkpoints.keep_last = 3
    port = free_port()
    log = tmp / "train.log"
    proc = _train(write_config(cfg, tmp / "c.yaml"), port, log, "--source", str(acts))
    url = f"http://127.0.0.1:{port}/metrics"
    phases: dict[str, dict[str, float]] = {}

    def trained() -> int:
        lines = trace.read_text().splitlines() if trace.exists() else []
        return json.loads(lines[-2])["tokens"] if len(lines) > 1 else 0

    def wait_tokens(n: int) -> None:
        while trained() < n:
            if proc.poll() is not None:
                raise RuntimeError(f"the trainer exited {proc.returncode} early; see {log}")
            time.sleep(0.05)

    def snapshot() -> dict[str, float]:
        text = _get(url)
        return {"ck_fail": _metric(text, "streamd_checkpoint_failures_total"),
                "ck_ok": _metric(text, "streamd_checkpoints_total"),
                "hist_fail": _metric(text, "streamd_history_write_failures_total", '{file="history"}')}

    wait_tokens(tokens // 10)
    ck_size = max((sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                   for p in (run / "checkpoints").iterdir() if p.is_dir()), default=1 << 20)
    # history is written every 5 s, about 1.5 kB a line: 25 s outgrow the slack of its last tmpfs page
    for name, leave, seconds in (("nearly full", ck_size // 2, 6), ("full", 0, 25)):
        before = snapshot()
        filler.unlink(missing_ok=True)
        _fill(filler, leave=leave)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if proc.poll() is not None:
                raise RuntimeError(f"the trainer exited {proc.returncode} on a {name} disk; see {log}")
            time.sleep(0.05)
            if not leave:
                _fill(filler)  # whatever the trainer frees is taken again, as by another writer on the disk
        phases[name] = {k: v - before[k] for k, v in snapshot().items()}
    filler.unlink()  # phase 3: space again
    rc = proc.wait(timeout=600)
    text = log.read_text(errors="replace")

    store = CheckpointStore(run, writer=False)
    corrupt = 0
    for ckid in store.ids():
        try:
            CheckpointStore.verify(store.dir / ckid)
        except CheckpointError:
            corrupt += 1
    counts = _read_trace(trace)
    chunk = 1024  # FileActivationSource chunks in the trainer
    want = {("file:acts.npy", 0, lo): min(chunk, tokens - lo) for lo in range(0, tokens, chunk)}
    lost = sum(max(0, n - counts[k]) for k, n in want.items())
    extra = sum(max(0, c - want.get(k, 0)) for k, c in counts.items())
    latest = store.latest()
    final_off = store.read_offsets(latest) if latest else {}
    faults = 2
    full_ok = phases["full"]["ck_fail"] >= 1 and phases["full"]["hist_fail"] >= 1
    nearly_ok = phases["nearly full"]["ck_ok"] >= 1
    survived = int(full_ok and rc == 0) + int(nearly_ok and rc == 0)
    if rc != 0 or corrupt or final_off != {"file:acts.npy": {0: tokens}}:
        lost = lost or -1
    note = (f"exit {rc}; full: {phases['full']['ck_fail']:.0f} checkpoint and {phases['full']['hist_fail']:.0f} "
            f"history writes failed ({text.count('next attempt in')} checkpoint failures logged, back-off "
            f"{cfg.checkpoints.retry_seconds:.0f} s doubling), training went on; nearly full: {phases['nearly full']['ck_ok']:.0f} "
            f"checkpoints written after freeing older ones ({text.count('freed older checkpoints')} retries logged); "
            f"{len(store.ids())} checkpoints verified, {corrupt} corrupt; {tokens - lost:,}/{tokens:,} tokens "
            f"trained ({extra} twice); final offsets {final_off}")
    return Row(tried=1, faults=faults, survived=survived, inputs=tokens, lost=lost, note=note)


DRILLS = {"sigkill": sigkill, "full_disk": full_disk}
