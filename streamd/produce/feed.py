"""`streamd feed`: a text source -> the text topic that producers share (``producer.source.kind: kafka``).

One feeder per topic (``FeederLock``); producers consume it in one consumer group, so Kafka divides the documents
among them. The feeder:

- publishes each document as a UTF-8 record keyed by its document id (its index in the source's order) with headers
  ``streamd-doc`` and ``streamd-epoch``; empty documents are counted and skipped;
- waits while more than ``feed.max_lag`` documents are in the topic and not committed by the producers' group;
- holds back ``feed.holdout_fraction`` of the documents, chosen by a hash of the text (the same ones every epoch and
  every run), appended to ``feed.holdout_path`` in epoch 0;
- writes its position (epoch, and the first document of the epoch's order not yet acknowledged by the broker) to
  ``feed.state_path`` every ``feed.commit_every_seconds``: a restarted feeder continues there, so it re-sends at most
  one interval's documents (and what was in flight) and skips none;
- with ``source.loop`` starts a new epoch at the end; with ``feed.shuffle`` every epoch of a finite source is a
  permutation by ``feed.seed + epoch``;
- survives a broker that loses its log (Tansu on memory storage restarted; ``TextLog`` tells the new log by its topic
  id): it re-creates the topic and feeds again from the first document, in its order, that the producers' group had
  not committed as of the last look at its commits (every ``CHECK_SECONDS``). A document a producer commits only
  once every activation message built from it is acknowledged, so nothing it had not finished is skipped; what it
  finished since that look is fed twice. Counted in ``text_lost_logs_total`` and ``text_documents_refed_total``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from kafka.errors import KafkaError

from streamd.config import StreamdConfig
from streamd.metrics import FeederMetrics
from streamd.produce.text import SourceError, source_maker
from streamd.stream.kafka import knows_topic, make_producer
from streamd.stream.text_topic import DOC_HEADER, EPOCH_HEADER, FeederLock, TextLog

log = logging.getLogger(__name__)

CHECK_SECONDS = 0.5
"""How often the feeder looks at its log (lost?) and at the producers' commits (what it re-feeds after a loss is
what they committed since), and at their lag (also after every ``feed.max_lag`` documents)."""
STALL_WARN_SECONDS = 60.0  # throttled this long with no commit from the producers: say why it may be


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out slice: a hash of its text, so the same documents every time."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def read_state(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {"epoch": 0, "next": 0}
    try:
        state = json.loads(path.read_text())
        return {"epoch": int(state["epoch"]), "next": int(state["next"])}
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"feed.state_path {path} is not a feeder state file ({e})") from None


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Feeder:
    def __init__(self, cfg: StreamdConfig) -> None:
        self.cfg, self.fcfg = cfg, cfg.feed
        if self.fcfg.source.kind == "kafka":
            raise SourceError("feed.source.kind=kafka: the feeder reads a text source into the text topic, not a "
                              "topic")
        if self.fcfg.source.input_ids_field:
            raise SourceError("feed.source.input_ids_field: the feeder publishes text; give pretokenized datasets "
                              "to the producers directly (producer.source)")
        self.topic = self.fcfg.topic
        self.group = self.fcfg.group_id or f"streamd-source.{self.topic}"
        self.metrics = FeederMetrics(self.topic, self.group)
        self.stop_event = threading.Event()
        self.fed, self.epoch = 0, 0
        self._lock = threading.Lock()
        self._acked: set[int] = set()
        self._done = 0  # first position of the epoch's order not yet acknowledged (or skipped)
        self._ends: dict[int, int] = {}
        # per partition (offset, epoch, position) of every acknowledged document the producers' group had not
        # committed at the last look (``_committed``): where to feed again from if the broker loses the log
        self._unfinished: dict[int, deque[tuple[int, int, int]]] = {}
        self._committed: dict[int, int] = {}
        self._furthest = (0, -1)  # (epoch, position) the furthest fed: held-out text is written once
        self._failed: BaseException | None = None
        self._away = False

    def _order(self, make, epoch: int) -> Iterator[tuple[int, object]]:
        """(document id, document) in this epoch's order."""
        src = self.fcfg.source
        if src.loop and self.fcfg.shuffle and src.kind != "stdin" and not (src.kind == "hf" and src.streaming):
            docs = list(make())
            if not docs:
                raise SourceError("feed.source yields no documents; cannot loop over it")
            order = list(range(len(docs)))
            random.Random(self.fcfg.seed + epoch).shuffle(order)
            return ((i, docs[i]) for i in order)
        return enumerate(make())

    def _ack(self, position: int, meta=None, size: int = 0, epoch: int = 0) -> None:
        with self._lock:
            self._acked.add(position)
            while self._done in self._acked:
                self._acked.discard(self._done)
                self._done += 1
            if meta is not None:
                self._ends[meta.partition] = max(self._ends.get(meta.partition, 0), meta.offset + 1)
                self._unfinished.setdefault(meta.partition, deque()).append((meta.offset, epoch, position))
                self.fed += 1
                self.metrics.documents_fed.labels(topic=self.topic).inc()
                self.metrics.bytes_fed.labels(topic=self.topic).inc(size)

    def _check(self, producer, text_log: TextLog) -> tuple[int, int] | None:
        """The log and the producers' commits, then (``feed.max_lag``) wait while they are too far behind. Returns
        (epoch, position) to feed again from when the broker lost the log. A broker that is away is waited for."""
        gauge = self.metrics.throttled.labels(topic=self.topic)
        stalled_since, seen = time.monotonic(), None
        while not self.stop_event.is_set():
            try:
                if text_log.renewed(producer):
                    return self._rewind()
                self._saw_commits(text_log.committed())
                if self.fcfg.max_lag is None:
                    return None
                with self._lock:
                    ends, committed = dict(self._ends), dict(self._committed)
                lag = text_log.lag(ends, committed)
            except KafkaError as e:
                if not self._away:
                    log.warning("the broker does not answer for text topic %s (%s: %s); waiting for it", self.topic,
                                type(e).__name__, e)
                self._away = True
                self.stop_event.wait(1.0)
                continue
            if self._away:
                log.info("the broker answers again for text topic %s", self.topic)
                self._away = False
            self.metrics.lag.labels(topic=self.topic, group=self.group).set(lag)
            if lag <= self.fcfg.max_lag:
                gauge.set(0)
                return None
            gauge.set(1)
            if committed != seen:
                stalled_since, seen = time.monotonic(), committed
            elif time.monotonic() - stalled_since > STALL_WARN_SECONDS:
                # still waiting: the producers may be down, or idle holding documents they cannot build yet
                log.warning("%d documents of text topic %s are not committed by group %s and none was for %d s; "
                            "waiting (feed.max_lag %d). Are the producers running? Each holds up to 64 documents "
                            "ahead for its tokenizer plus a partial batch of windows until more text comes: "
                            "feed.max_lag must be above that times the producers", lag, self.topic, self.group,
                            STALL_WARN_SECONDS, self.fcfg.max_lag)
                stalled_since = time.monotonic()
            self.stop_event.wait(CHECK_SECONDS)
        return None

    def _saw_commits(self, committed: dict[int, int]) -> None:
        """The group's commits as read now; they only go forward (a broker that lost them answers with none until
        the lost log is noticed), and what they cover is finished."""
        with self._lock:
            for part, off in committed.items():
                self._committed[part] = max(self._committed.get(part, 0), off)
            for part, queue in self._unfinished.items():
                upto = self._committed.get(part, 0)
                while queue and queue[0][0] < upto:
                    queue.popleft()

    def _rewind(self) -> tuple[int, int]:
        """The broker lost the log: forget it, and return the first (epoch, position) not finished by the
        producers (or not yet acknowledged)."""
        with self._lock:
            unfinished = [(e, p) for queue in self._unfinished.values() for _, e, p in queue]
            at = min([*unfinished, (self.epoch, self._done)])
            self._unfinished, self._committed, self._ends = {}, {}, {}
        self.metrics.lost_logs.labels(topic=self.topic).inc()
        self.metrics.documents_refed.labels(topic=self.topic).inc(len(unfinished))
        log.warning("text topic %s was created again (the broker lost its log): re-feeding from epoch %d document %d "
                    "of its order, %d acknowledged document(s) the producers had not committed at their last commit "
                    "seen (at most %.0f s before; what they finished since is fed twice); what they had committed "
                    "went into the activation stream", self.topic, at[0], at[1], len(unfinished), CHECK_SECONDS)
        return at

    def run(self) -> int:
        """Feed until the source ends (without loop), feed.max_documents, or stop(); returns documents fed."""
        f, kafka = self.fcfg, self.cfg.kafka
        errors = lambda reason: self.metrics.errors.labels(topic=self.topic, reason=reason).inc()  # noqa: E731
        make, what = source_maker(f.source, on_error=errors)  # a source that cannot work stops here
        lock = FeederLock(kafka, self.topic, f.lock_ttl_seconds)
        lock.acquire()
        try:
            text_log = TextLog(kafka, self.topic, f.partitions, self.group)
            state = read_state(f.state_path)
            epoch, start = state["epoch"], state["next"]
            if start:
                log.info("resuming %s at epoch %d, document %d of its order", what, epoch, start)
            producer = make_producer(kafka, max_request_size=kafka_max(self.cfg), linger_ms=20)
            try:
                text_log.renewed(producer)  # creates the topic unless it exists, and learns its id
                self._feed(producer, text_log, make, epoch, start)
            finally:
                producer.flush(timeout=60)
                producer.close(timeout=10)
                self._save()
        finally:
            lock.release()
        if self._failed is not None:
            raise RuntimeError(f"feeding {self.topic} failed: {self._failed}") from self._failed
        return self.fed

    def _feed(self, producer, text_log: TextLog, make, epoch: int, start: int) -> None:
        f = self.fcfg
        holdout = open(f.holdout_path, "a", encoding="utf-8") if f.holdout_path and f.holdout_fraction else None
        last_save = last_check = time.monotonic()
        sent = checked_at = 0
        try:
            while not self.stop_event.is_set():
                self.epoch = epoch
                self.metrics.epoch.labels(topic=self.topic).set(epoch)
                with self._lock:
                    self._done, self._acked = start, set()
                rewind = None
                for position, (doc_id, doc) in enumerate(self._order(make, epoch)):
                    if position < start:
                        continue
                    if self.stop_event.is_set() or self._failed is not None:
                        return
                    if f.max_documents is not None and sent >= f.max_documents:
                        return
                    now = time.monotonic()
                    if (now - last_check >= CHECK_SECONDS or sent - checked_at >= (f.max_lag or float("inf"))
                            or not knows_topic(producer, self.topic)):
                        rewind = self._check(producer, text_log)
                        last_check, checked_at = time.monotonic(), sent
                        if rewind is not None:
                            break
                    if now - last_save >= f.commit_every_seconds:
                        self._save()
                        last_save = now
                    if not isinstance(doc, str) or not doc.strip():
                        self.metrics.errors.labels(topic=self.topic, reason="empty").inc()
                        self._ack(position)
                        continue
                    fresh = (epoch, position) > self._furthest  # not fed before a lost log made it go back
                    self._furthest = max(self._furthest, (epoch, position))
                    if held_out(doc, f.holdout_fraction):
                        if fresh:
                            self.metrics.held_out.labels(topic=self.topic).inc()
                        if holdout is not None and epoch == 0 and fresh:
                            holdout.write(json.dumps({"doc": doc_id, "text": doc}) + "\n")
                        self._ack(position)
                        continue
                    value = doc.encode("utf-8", "replace")
                    fut = producer.send(self.topic, value=value, key=str(doc_id).encode(),
                                        headers=[(DOC_HEADER, str(doc_id).encode()),
                                                 (EPOCH_HEADER, str(epoch).encode())])
                    fut.add_callback(lambda meta, pos=position, n=len(value), e=epoch: self._ack(pos, meta, n, e))
                    fut.add_errback(self._error)
                    sent += 1
                if rewind is not None:
                    epoch, start = rewind
                    self._save(epoch=epoch, next_=start)
                    continue
                producer.flush(timeout=120)
                if not f.source.loop:
                    return
                epoch, start = epoch + 1, 0
                self._save(epoch=epoch, next_=0)
        finally:
            if holdout is not None:
                holdout.close()

    def _error(self, err: BaseException) -> None:
        log.error("a document could not be published (%s); stopping (the state keeps it unfed)", err)
        self._failed = err
        self.stop_event.set()

    def _save(self, epoch: int | None = None, next_: int | None = None) -> None:
        if self.fcfg.state_path is None:
            return
        with self._lock:
            state = {"epoch": self.epoch if epoch is None else epoch, "next": self._done if next_ is None else next_,
                     "topic": self.topic, "fed": self.fed}
        write_state(self.fcfg.state_path, state)

    def stop(self) -> None:
        self.stop_event.set()


def kafka_max(cfg: StreamdConfig) -> int:
    """Largest record the feeder sends (one document; longer ones are refused by the broker, not split)."""
    return cfg.producer.max_message_bytes + 4096
