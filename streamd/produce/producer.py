"""Producer: text source -> frozen model (stopped after the highest hooked layer) -> wire messages -> Kafka.

Memory is bounded by a semaphore over messages not yet acknowledged (queued, in flight or waiting to be retried): the
model waits when it is full, so a slow or absent broker slows the producer down instead of growing it. A failed send
is retried with backoff for as long as it takes; nothing is dropped.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import kafka.errors as kerr
import torch
from kafka.errors import KafkaError

from streamd import wire
from streamd.config import KafkaConfig, StreamdConfig
from streamd.stream.kafka import ensure_topic, knows_topic, make_producer
from streamd.stream.retention import Retention, retention_for
from streamd.metrics import ProducerMetrics, fetch_samples, publish_error_kind
from streamd.identity import site_id
from streamd.outliers import OUTLIER_REASONS, NormOutliers
from streamd.produce.capture import ActivationCapture
from streamd.produce.model import LoadedModel, load_frozen_model
from streamd.produce.packing import pack_documents
from streamd.produce.provenance import PROV_HEADER, CommitTracker, encode_provenance, spans
from streamd.torch_utils import TORCH_DTYPES, configure_threads, resolve_device
from streamd.produce.text import iter_documents, text_records
from streamd.stream.text_topic import Rebalanced, TextTopicReader

log = logging.getLogger(__name__)

LAG_STALL_SECONDS = 60
TOPIC_CHECK_SECONDS = 1.0
METADATA_WAIT_MS = 5000
"""How long a send waits for a topic's metadata before it fails and is retried (kafka-python's default, 60 s, would
stall the send loop that re-creates a lost topic)."""

# Errors that no retry can fix: the producer stops with the error instead of retrying for ever.
PERMANENT_ERRORS = (kerr.MessageSizeTooLargeError, kerr.RecordListTooLargeError, kerr.TopicAuthorizationFailedError,
                    kerr.ClusterAuthorizationFailedError, kerr.InvalidTopicError)

class Publisher:
    """Sends encoded messages with at most ``capacity`` unacknowledged, retrying failures with backoff."""

    def __init__(self, kafka: KafkaConfig, topics: list[str], metrics: ProducerMetrics, capacity: int,
                 max_request_size: int, partitions: int, stop: threading.Event,
                 retention: Retention | None = None) -> None:
        self.kafka, self.topics, self.metrics, self.capacity, self.stop = kafka, topics, metrics, capacity, stop
        self.retention = retention or retention_for(kafka)
        self.fatal: BaseException | None = None  # an error no retry can fix; the producer stops on it
        self.partitions, self.max_request_size = partitions, max_request_size
        self.producer = self._new_producer()
        self._topics_checked_at = 0.0
        self._slots = threading.BoundedSemaphore(capacity)
        self._outstanding = 0
        self._lock = threading.Lock()
        self._todo: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._recheck_topics = threading.Event()
        self._created: set[str] = set()  # topics the send loop created ahead of switch_topics
        self._thread = threading.Thread(target=self._send_loop, name="streamd-publish", daemon=True)
        self._thread.start()
        metrics.send_queue_capacity.labels(producer=metrics.producer_id).set(capacity)

    @property
    def depth(self) -> int:
        return self._outstanding

    def publish(self, topic: str, key: bytes, value: bytes, n_tokens: int, headers: list | None = None,
                on_ack=None) -> bool:
        """Blocks while ``capacity`` messages are unacknowledged (the backpressure on the model); False if a stop
        came meanwhile. ``on_ack()`` runs once the broker acknowledged the message."""
        while not self._slots.acquire(timeout=0.5):
            if self.stop.is_set():
                return False
        self._adjust(+1)
        self._todo.put((topic, key, value, n_tokens, time.monotonic(), 0, (headers, on_ack)))
        return True

    def _adjust(self, delta: int) -> None:
        with self._lock:
            self._outstanding += delta
            self.metrics.send_queue_depth.labels(producer=self.metrics.producer_id).set(self._outstanding)

    def _send_loop(self) -> None:
        while not (self._closing.is_set() and self._outstanding == 0):
            self._check_topics()
            try:
                item = self._todo.get(timeout=0.2)
            except queue.Empty:
                continue
            topic, key, value, n_tokens, t0, attempt, (headers, on_ack) = item
            # Always to the topic of now: a message that waited (backpressure, a retry) may have outlived its
            # generation, which the trainer may have released. So a record lands on a generation at most
            # kafka.delivery_timeout_ms after the producer left it (the retention's grace counts on that).
            current = self.retention.topic_for(self.retention.base_topic(topic))
            if current != topic:
                topic = current
                item = (topic, *item[1:])
            try:
                if topic not in self.topics and topic not in self._created:
                    ensure_topic(self.kafka, topic, self.partitions)  # before the model's loop reaches it
                    self._created.add(topic)
                if self._recheck_topics.is_set():
                    # A broker that lost its data (memory storage) lost the topic, and it acknowledges sends to a
                    # lost topic that nobody can read: re-create before sending anything after an error.
                    for t in {*self.topics, topic}:
                        ensure_topic(self.kafka, t, self.partitions)
                    self._recheck_topics.clear()
                fut = self.producer.send(topic, value=value, key=key, headers=headers)
            except Exception as e:  # the broker is away, metadata timeout...
                self._retry(item, e)
                continue
            fut.add_callback(lambda _meta, n=n_tokens, size=len(value), t0=t0, cb=on_ack: self._acked(n, size, t0, cb))
            fut.add_errback(lambda e, item=item: self._retry(item, e))

    def _new_producer(self):
        return make_producer(self.kafka, max_request_size=self.max_request_size, max_block_ms=METADATA_WAIT_MS)

    def _check_topics(self) -> None:
        """While messages wait: a topic that dropped out of the producer's metadata (a memory broker restarted and
        lost it) is created again with its partitions, at most once a second. No streamd client auto-creates a
        topic (see ``streamd.stream.kafka``), so kafka-python would hold those messages until it timed out."""
        if not self._outstanding or time.monotonic() - self._topics_checked_at < TOPIC_CHECK_SECONDS:
            return
        self._topics_checked_at = time.monotonic()
        try:
            for topic in self.topics:
                if not knows_topic(self.producer, topic):
                    ensure_topic(self.kafka, topic, self.partitions)
        except KafkaError as e:  # the broker is away: checked again in a second
            log.debug("checking topics failed: %s", e)

    def _acked(self, n_tokens: int, size: int, t0: float, on_ack=None) -> None:
        if on_ack is not None:
            on_ack()
        pid = self.metrics.producer_id
        self.metrics.tokens_published.labels(producer=pid).inc(n_tokens)
        self.metrics.messages_published.labels(producer=pid).inc()
        self.metrics.bytes_published.labels(producer=pid).inc(size)
        self.metrics.publish_latency.observe(time.monotonic() - t0)
        self._adjust(-1)
        self._slots.release()

    def _retry(self, item: tuple, err: BaseException) -> None:
        topic, key, value, n_tokens, t0, attempt, extra = item
        self.metrics.publish_errors.labels(producer=self.metrics.producer_id, kind=publish_error_kind(err)).inc()
        if isinstance(err, PERMANENT_ERRORS):
            log.error("publish to %s failed for good (%s: %s); stopping", topic, type(err).__name__, err)
            self.fatal = err
            self.stop.set()
            return
        self._recheck_topics.set()
        delay = min(0.2 * 2**attempt, 5.0)
        log.warning("publish to %s failed (%s: %s); retry %d in %.1fs", topic, type(err).__name__, err,
                    attempt + 1, delay)
        timer = threading.Timer(delay, self._todo.put, args=((topic, key, value, n_tokens, t0, attempt + 1, extra),))
        timer.daemon = True
        timer.start()

    def switch_topics(self, topics: list[str]) -> None:
        """Move to new topics (the retention strategy rotated them). Once the old ones are acknowledged, the Kafka
        producer is replaced: kafka-python refreshes metadata of every topic it ever wrote to, and Tansu re-creates
        a topic on a metadata request, which would bring back topics the trainer released."""
        had_topics = bool(self.topics)
        self.topics = topics
        if had_topics and self._drain():
            old, self.producer = self.producer, self._new_producer()
            old.close(timeout=5)

    def _drain(self, timeout: float | None = None) -> bool:
        """Wait for every message to be acknowledged, until ``timeout`` or a stop; returns whether all were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._outstanding and (deadline is None or time.monotonic() < deadline) and not self.fatal:
            if timeout is None and self.stop.is_set():
                break
            time.sleep(0.02)
        return self._outstanding == 0

    def close(self, timeout: float = 60.0) -> bool:
        """Wait until every message is acknowledged (or ``timeout``); returns whether all were."""
        done = self._drain(timeout)
        self._closing.set()
        self._thread.join(timeout=5)
        try:
            self.producer.flush(timeout=5)
        except KafkaError as e:
            log.warning("flush on close failed: %s", e)
        self.producer.close(timeout=5)
        return done


def split_rows(n: int, d_model: int, dtype: torch.dtype, producer_id: str, token_ids: bool, max_bytes: int) -> int:
    """Most token rows per message that keep it under ``max_bytes``."""
    per_row = wire.message_size(1, d_model, dtype, producer_id, token_ids) - wire.message_size(
        0, d_model, dtype, producer_id, False)
    rows = max(1, (max_bytes - wire.message_size(0, d_model, dtype, producer_id, False) - 8) // per_row)
    return min(rows, n)


def _batches(windows: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(windows, size)):
        yield batch


class ActivationProducer:
    def __init__(self, cfg: StreamdConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg, self.pcfg = cfg, cfg.producer
        configure_threads(self.pcfg.torch_threads)
        self.device = resolve_device(self.pcfg.device)
        self.loaded = loaded or load_frozen_model(self.pcfg.model_path, self.pcfg.dtype, self.device)
        self.metrics = ProducerMetrics(self.pcfg.producer_id)
        self.wire_dtype = TORCH_DTYPES[self.pcfg.wire_dtype]
        self.topics = {(s.site, s.layer): s.topic or cfg.kafka.topic for s in self.pcfg.sites}
        self.retention = retention_for(cfg.kafka)
        self.site_ids = {
            (s.site, s.layer): site_id(self.loaded.model_hash, s.site, s.layer) for s in self.pcfg.sites
        }
        self.stop_event = threading.Event()
        self.seq = 0
        self.tokens = 0
        self._dropped_logged: set[str] = set()
        # the token policy (producer.skip_positions, producer.outlier_factor): a running median norm per site
        self.site_labels = {(s.site, s.layer): f"{s.site}.{s.layer}" for s in self.pcfg.sites}
        self.outliers = {k: NormOutliers(self.pcfg.outlier_factor) for k in self.site_labels} \
            if self.pcfg.outlier_factor is not None else {}
        for label in self.site_labels.values():
            for reason in OUTLIER_REASONS:
                self.metrics.outlier_tokens.labels(producer=self.pcfg.producer_id, site=label, reason=reason)

    def _documents(self, reader: TextTopicReader | None) -> Iterator:
        """Documents for the packer; each one's provenance goes to ``self._metas`` (and the commit tracker) under
        its global ordinal, in the order the packer enumerates them."""
        p, m = self.pcfg, self.metrics
        docs = m.documents.labels(producer=p.producer_id)
        errors = lambda reason: m.text_errors.labels(producer=p.producer_id, reason=reason).inc()  # noqa: E731
        if reader is not None:
            source = text_records(reader.records(), on_error=errors)
        else:
            source = iter_documents(p.source, shard=(p.shard.index, p.shard.count),
                                    vocab_size=len(self.loaded.tokenizer), on_error=errors)
        for doc, meta in source:
            docs.inc()
            self._metas[self._next_ord] = meta
            self.tracker.add(self._next_ord, meta)
            self._next_ord += 1
            yield doc
        self._source_done = True

    def _text_reader(self, pub: Publisher) -> TextTopicReader | None:
        src = self.pcfg.source
        if src.kind != "kafka":
            return None
        m, pid = self.metrics, self.pcfg.producer_id
        counted = [0]

        def committable() -> dict[int, int]:
            offsets = self.tracker.committable()
            m.text_committed.labels(producer=pid).inc(self.tracker.done - counted[0])
            counted[0] = self.tracker.done
            m.text_partitions.labels(producer=pid).set(len(reader.consumer.assignment()))
            return offsets

        def revoked() -> None:
            self.tracker.reset()
            counted[0] = self.tracker.done
            m.text_rebalances.labels(producer=pid).inc()

        reader = TextTopicReader(self.cfg.kafka, src.topic, src.kafka_group, committable=committable,
                                 on_revoked=revoked, on_lost_log=m.text_lost_logs.labels(producer=pid).inc,
                                 idle_exit_seconds=src.idle_exit_seconds)
        return reader

    def run(self) -> int:
        """Publish until the source ends, max_tokens, or stop(); flushes before returning the tokens published."""
        p = self.pcfg
        pub = Publisher(self.cfg.kafka, [], self.metrics, p.queue_max_messages,
                        max_request_size=p.max_message_bytes + 4096, partitions=self.cfg.kafka.partitions,
                        stop=self.stop_event, retention=self.retention)
        self.tracker, self._metas, self._next_ord, self._source_done = CommitTracker(), {}, 0, False
        reader = None
        try:
            reader = self._text_reader(pub)
            with ActivationCapture(self.loaded.model, p.sites) as capture:
                while True:
                    base = self._next_ord  # the packer numbers its documents from 0: global = base + local
                    windows = pack_documents(self.loaded.tokenizer, self._documents(reader), p.context_length,
                                             p.skip_positions)
                    try:
                        self._run_windows(pub, capture, windows, base)
                    except Rebalanced:  # partial windows dropped uncommitted: the partitions' next owner re-reads
                        self._metas.clear()
                        continue
                    break
        finally:
            if not pub.close():
                log.error("stopped with %d messages unacknowledged", pub.depth)
            if self._source_done and pub.depth == 0:
                self.tracker.built(self._next_ord)  # trailing empty documents placed nowhere are done too
            if reader is not None:
                reader.close()  # commits what is acknowledged
        if pub.fatal is not None:
            raise RuntimeError(f"publishing failed and cannot succeed on retry: {pub.fatal}") from pub.fatal
        return self.tokens

    def _run_windows(self, pub: Publisher, capture: ActivationCapture, windows: Iterator, base: int) -> None:
        p = self.pcfg
        for batch in _batches(windows, p.batch_size):
            if self.stop_event.is_set() or not self._wait_for_trainer():
                break
            topics = self._current_topics(pub)
            for site, rows, ids, site_prov in self._site_rows(capture, batch, base):
                self._publish(pub, topics[site], self.site_ids[site], rows, ids, site_prov)
            self.tracker.built(base + batch[-1].complete_through)
            for o in [o for o in self._metas if o <= base + batch[-1].complete_through]:
                del self._metas[o]  # placed in messages already: their provenance travels there
            self.tokens += sum(int(w.keep_mask.sum()) for w in batch)
            if p.max_tokens is not None and self.tokens >= p.max_tokens:
                break

    def _site_rows(self, capture: ActivationCapture, batch: list, base: int) -> Iterator[tuple]:
        """One batch of windows -> per site ``(site, rows, token_ids, provenance)`` exactly as published: one forward,
        BOS / padding / carried positions masked out, at the wire dtype, non-finite tokens and the token policy's
        outliers dropped."""
        host_ids = torch.stack([w.input_ids for w in batch])
        keep = torch.stack([w.keep_mask for w in batch])
        keep_dev = keep.to(self.device, non_blocking=True)
        t0 = time.monotonic()
        with torch.inference_mode():
            acts = capture.capture(host_ids.to(self.device, non_blocking=True))
        self.metrics.forward_seconds.observe(time.monotonic() - t0)
        flat_ids = host_ids[keep]
        prov = (torch.stack([w.doc_ord for w in batch])[keep] + base, torch.stack([w.doc_pos for w in batch])[keep])
        skipped = sum(w.carried for w in batch)
        for site, a in acts.items():
            # select and convert where the model runs: only published tokens, at the wire dtype, cross
            rows = a.detach()[keep_dev].to(self.wire_dtype).cpu()
            rows, ids, site_prov = self._finite_rows(rows, flat_ids, prov)  # before the policy: overflow named
            yield (site, *self._policy(site, rows, ids, site_prov, skipped))

    def activation_rows(self, documents: Iterable[str]) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
        """Per batch of windows, each site's rows this producer would publish for ``documents``, without Kafka:
        the same packing, capture and token policy (to cache activations to a file, e.g. bench/bench_quality.py)."""
        p = self.pcfg
        windows = pack_documents(self.loaded.tokenizer, documents, p.context_length, p.skip_positions)
        with ActivationCapture(self.loaded.model, p.sites) as capture:
            for batch in _batches(windows, p.batch_size):
                yield {site: rows for site, rows, _, _ in self._site_rows(capture, batch, 0)}

    def _current_topics(self, pub: Publisher) -> dict[tuple[str, int], str]:
        """Each site's topic now (as the retention strategy names it), created on first use."""
        now = time.time()
        topics = {k: self.retention.topic_for(base, now) for k, base in self.topics.items()}
        if set(topics.values()) != set(pub.topics):
            for t in set(topics.values()) - set(pub.topics):
                ensure_topic(self.cfg.kafka, t, self.cfg.kafka.partitions)
            pub.switch_topics(sorted(set(topics.values())))
        return topics

    def _trainer_seq(self) -> int | None:
        """The highest seq of ours the trainer has consumed (from its /metrics), or None if it can't be read."""
        try:
            samples = fetch_samples(self.pcfg.lag_url, timeout=5)
        except OSError as e:
            log.warning("cannot read the trainer's progress at %s: %s", self.pcfg.lag_url, e)
            return None
        for labels, value in samples.get("streamd_producer_last_seq", []):
            if labels.get("producer") == self.pcfg.producer_id:
                return int(value)
        return -1  # the trainer has not seen us yet

    def _wait_for_trainer(self) -> bool:
        """Backpressure on a trainer that lags: wait while more than max_lag_messages of ours are unconsumed, so
        neither the broker nor its disk fills up. Returns False if a stop came while waiting."""
        p = self.pcfg
        if not (p.lag_url and p.max_lag_messages):
            return True
        last_seen, since = None, time.monotonic()
        while not self.stop_event.is_set():
            seen = self._trainer_seq()
            if seen is not None:
                lag = self.seq - 1 - seen
                self.metrics.stream_lag_messages.labels(producer=p.producer_id).set(lag)
                if lag <= p.max_lag_messages:
                    return True
            if seen != last_seen:
                last_seen, since = seen, time.monotonic()
            elif time.monotonic() - since > LAG_STALL_SECONDS:
                # an unreachable trainer, or messages a restarted broker lost: waiting could never end
                log.warning("trainer progress stalled at seq %s for %d s; publishing anyway", seen, LAG_STALL_SECONDS)
                return True
            self.stop_event.wait(1.0)
        return False

    def _policy(self, site: tuple[str, int], rows: torch.Tensor, token_ids: torch.Tensor,
                prov: tuple[torch.Tensor, torch.Tensor], skipped: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The token policy on one site's finite rows: count the positions packing skipped, drop tokens whose norm is
        above outlier_factor x the site's running median."""
        outlier = self.metrics.outlier_tokens
        pid, label = self.pcfg.producer_id, self.site_labels[site]
        if skipped:
            outlier.labels(producer=pid, site=label, reason="position").inc(skipped)
        rule = self.outliers.get(site)
        if rule is None or not len(rows):
            return rows, token_ids, prov
        ok = rule.inliers(torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32))
        if bool(ok.all()):
            return rows, token_ids, prov
        outlier.labels(producer=pid, site=label, reason="norm").inc(int((~ok).sum()))
        return rows[ok], token_ids[ok], (prov[0][ok], prov[1][ok])

    def _finite_rows(self, rows: torch.Tensor, token_ids: torch.Tensor,
                     prov: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Drop the tokens a trainer would reject (it rejects a whole message holding one non-finite value): values
        beyond the wire dtype's range (float16 tops out at 65504, and some models' activations go past it), or
        NaN / inf from the model. Counted in ``streamd_tokens_dropped_total{reason}``, logged once per reason.
        Tokens, not messages, are dropped: the rest of a message is good data."""
        ok = torch.isfinite(rows).all(dim=1)
        if bool(ok.all()):
            return rows, token_ids, prov
        bad = rows[~ok]
        reason = "overflow" if rows.dtype == torch.float16 and not bool(bad.isnan().any()) else "non_finite"
        n = int(len(bad))
        self.metrics.tokens_dropped.labels(producer=self.pcfg.producer_id, reason=reason).inc(n)
        if reason not in self._dropped_logged:
            self._dropped_logged.add(reason)
            if reason == "overflow":
                log.error("%d token(s) hold activations beyond float16's range (|x| > 65504) and are dropped, not "
                          "published (streamd_tokens_dropped_total{reason=\"overflow\"}; logged once). This model "
                          "needs a wider wire dtype: set producer.wire_dtype: bfloat16 (float32's range, same size "
                          "on the wire)", n)
            else:
                log.error("%d token(s) hold NaN / inf activations from the model and are dropped, not published "
                          "(streamd_tokens_dropped_total{reason=\"non_finite\"}; logged once)", n)
        return rows[ok], token_ids[ok], (prov[0][ok], prov[1][ok])

    def _publish(self, pub: Publisher, topic: str, sid: int, rows: torch.Tensor,
                 token_ids: torch.Tensor, prov: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keyed by producer id and seq, so one producer's messages spread over every partition (data-parallel
        ranks each read a share of the partitions; the trainer assumes no order across them: offsets are per
        partition and a producer's seq is only a progress metric, its highest seen)."""
        p = self.pcfg
        ords, poss = prov
        if not len(rows):
            return
        step = split_rows(len(rows), rows.shape[1], rows.dtype, p.producer_id, p.include_token_ids,
                          p.max_message_bytes)
        for lo in range(0, len(rows), step):
            msg = wire.ActivationMessage(
                producer_id=p.producer_id, seq=self.seq, site_id=sid, acts=rows[lo : lo + step],
                token_ids=token_ids[lo : lo + step] if p.include_token_ids else None,
            )
            span_list = spans(ords[lo : lo + step], poss[lo : lo + step], self._metas)
            in_msg = set(ords[lo : lo + step].tolist())
            self.tracker.sent(in_msg)
            key = f"{p.producer_id}-{self.seq}".encode()
            if not pub.publish(topic, key, wire.encode(msg), len(msg.acts),
                               headers=[(PROV_HEADER, encode_provenance(span_list))],
                               on_ack=lambda o=in_msg: self.tracker.acked(o)):
                return
            self.seq += 1

    def stop(self) -> None:
        self.stop_event.set()
