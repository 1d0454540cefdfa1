"""Every Prometheus metric streamd exports, defined once with its help text.

Each class owns a fresh ``CollectorRegistry`` so tests (and a process running several roles) can hold several without
name clashes. Every labelled metric is initialised for every known label value at construction, so a series exists
(at 0) before its first event: alerts built on ``increase()`` or absence then work from the first scrape.
This module holds no logic beyond small setters; the trainer and producer decide what to record.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from streamd.sae import loss_term_label

NAMESPACE = "streamd"
# The common ``term`` labels, present from the start; each architecture declares which label each of its loss terms
# reports under (``loss_terms`` in its file, see streamd.sae): one of these, or a label of its own.
LOSS_TERMS = ("total", "mse", "sparsity", "auxk")
# log10(feature density) buckets [e, e + 0.5) with lower edges e = -8.0 .. -0.5; densities below 1e-8 count in the
# first, and the last is closed at 0.0 (density 1: fires on every token). Plus latents that never fired in the window.
# Labels are the lower edges ("-3.5") and "never". The learner fills them; the metrics, report and dashboard show them.
DENSITY_STEP = 0.5
DENSITY_EDGES = tuple(-8.0 + DENSITY_STEP * i for i in range(16))
DENSITY_NEVER = "never"
DENSITY_BUCKETS = tuple(f"{e:.1f}" for e in DENSITY_EDGES) + (DENSITY_NEVER,)
PUBLISH_ERROR_KINDS = ("timeout", "too_large", "broker", "other")
# Why a source document was skipped or flagged (the ``reason`` of the text-error counters).
TEXT_ERROR_REASONS = ("not_utf8", "empty", "missing_column", "out_of_vocabulary")


@dataclass(frozen=True)
class Stat:
    """One per-SAE statistic. Its ``key`` names the gauge (``streamd_<key>{sae}``), the history field and the
    ``StepStats`` entry; ``label`` / ``fmt`` place it in the progress line and ``streamd status``; ``plot`` gives it
    a curve in ``streamd report``. Renaming or adding a statistic is one edit here (plus the dashboard and rules
    files, which tests check against live metrics)."""

    key: str
    help: str
    label: str = ""  # column heading in the progress line and the status table ("" = not shown)
    fmt: str = ".4g"  # format spec in the progress line
    progress: bool = True  # with a label: also in the progress line (else the status table only)
    plot: str = ""  # y-axis label of its ``streamd report`` curve ("" = no curve)
    log_y: bool = False


# What every training step reports for each SAE (loss terms come beside them as ``loss_<term>``).
STEP_STATS = (
    Stat("step", "Optimizer steps taken.", "step", progress=False),
    Stat("l0", "Mean number of active latents per token (over trainer.stats_window_tokens recent tokens).", "L0",
         ".1f", plot="L0 (active latents per token)"),
    Stat("fvu", "Fraction of variance unexplained by the reconstruction (over trainer.stats_window_tokens recent "
         "tokens).", "FVU", ".3f", plot="fraction of variance unexplained", log_y=True),
    Stat("fvu_batch", "FVU of the last batch alone (noisy: a few massive-activation tokens decide it)."),
    Stat("mse", "Squared reconstruction error per token (over trainer.stats_window_tokens recent tokens)."),
    Stat("dead_fraction", "Fraction of latents that did not fire in the dead window.", "dead", ".1%",
         plot="dead latent fraction"),
    Stat("dense_fraction", "Fraction of latents firing above the dense threshold."),
    Stat("lr", "Current learning rate."),
    Stat("sparsity_coefficient", "Current sparsity penalty weight (after warm-up)."),
)
# What each evaluation on the held-out activations reports.
EVAL_STATS = (
    Stat("eval_fvu", "FVU on the held-out activations at the last evaluation.", "held-out FVU", ".3f"),
    Stat("eval_l0", "L0 on the held-out activations at the last evaluation."),
)
STEP_GAUGES = tuple(s.key for s in STEP_STATS)
"""Keys ``TrainerMetrics.observe_step`` accepts besides ``loss_<term>``."""


# Sample name (``_total``, ``_bucket`` ... included) -> [(labels, value)], in exposition order.
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by sample name."""
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return dict(out)


def fetch_samples(url: str, timeout: float = 5.0) -> Samples:
    """:func:`parse_samples` of ``URL/metrics`` (``/metrics`` appended unless ``url`` ends with it); raises OSError
    when the endpoint cannot be read."""
    target = url.rstrip("/")
    if not target.endswith("/metrics"):
        target += "/metrics"
    with urllib.request.urlopen(target, timeout=timeout) as resp:
        return parse_samples(resp.read().decode("utf-8"))


DROP_REASONS = ("overflow", "non_finite")
"""Why a producer drops tokens before publishing (``streamd_tokens_dropped_total{reason}``)."""


def publish_error_kind(err: BaseException) -> str:
    """The ``kind`` label of a failed publish, one of ``PUBLISH_ERROR_KINDS`` (bounded, unlike exception names)."""
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"KafkaTimeoutError", "TimeoutError", "RequestTimedOutError"}:
        return "timeout"
    if names & {"MessageSizeTooLargeError", "RecordListTooLargeError"}:
        return "too_large"
    if "KafkaError" in names:
        return "broker"
    return "other"


def _package_version() -> str:
    try:
        return version("streamd")
    except PackageNotFoundError:
        return "unknown"


def _registry() -> CollectorRegistry:
    """A fresh registry with the process / platform / GC collectors a default registry would carry."""
    reg = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


class TrainerMetrics:
    """Metrics of one trainer process: ingestion, the shuffle buffer, every SAE of the run, checkpoints."""

    def __init__(self, sae_names: list[str], reasons: list[str], version: str | None = None) -> None:
        self.registry = reg = _registry()
        self.sae_names = list(sae_names)
        ns = NAMESPACE

        def per_sae(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["sae"], namespace=ns, registry=reg)

        self.tokens_trained = Counter("tokens_trained", "Tokens each SAE has trained on.", ["sae"], namespace=ns,
                                      registry=reg)
        self.tokens_per_second = Gauge("tokens_per_second", "Training throughput over the last interval (tokens/s).",
                                       namespace=ns, registry=reg)
        # one gauge per statistic of the schema, also reachable as an attribute (``self.fvu``, ``self.eval_l0``)
        self.per_sae = {stat.key: per_sae(stat.key, stat.help) for stat in (*STEP_STATS, *EVAL_STATS)}
        for key, gauge in self.per_sae.items():
            setattr(self, key, gauge)
        self.loss = Gauge("loss", "Loss by term (total, mse, sparsity, auxk), averaged over trainer.stats_window_tokens "
                          "recent tokens.", ["sae", "term"], namespace=ns, registry=reg)
        self.feature_density = Gauge(
            "feature_density",
            "Snapshot: fraction of latents whose log10 firing density falls in bucket (lower edge) or never fired.",
            ["sae", "bucket"], namespace=ns, registry=reg)

        self.buffer_fill_ratio = Gauge("buffer_fill_ratio", "Shuffle buffer fill, 0..1.", namespace=ns, registry=reg)
        self.buffer_tokens = Gauge("buffer_tokens", "Tokens held in the shuffle buffer.", namespace=ns, registry=reg)
        self.producer_last_seq = Gauge("producer_last_seq", "Highest sequence number consumed from each producer "
                                       "(producers compare it with their own to wait for a trainer that lags).",
                                       ["producer"], namespace=ns, registry=reg)
        self.tokens_consumed = Counter("tokens_consumed", "Tokens consumed from Kafka, by the producer that sent them.",
                                       ["producer"], namespace=ns, registry=reg)
        self.consumer_lag = Gauge("consumer_lag", "Messages between the committed/fetch position and the end offset.",
                                  ["topic", "partition"], namespace=ns, registry=reg)
        self.messages_consumed = Counter("messages_consumed", "Messages accepted from Kafka.", namespace=ns,
                                         registry=reg)
        self.bytes_consumed = Counter("bytes_consumed", "Message bytes accepted from Kafka.", namespace=ns,
                                      registry=reg)
        self.messages_rejected = Counter("messages_rejected", "Messages dropped by validation, by reason.", ["reason"],
                                         namespace=ns, registry=reg)
        self.duplicates_reread = Counter("duplicates_reread", "Messages read again after a resume (at-least-once).",
                                         namespace=ns, registry=reg)
        self.offset_resets = Counter("offset_resets", "Times the consumer position was reset (out of range, lost).",
                                     namespace=ns, registry=reg)

        self.lost_logs = Counter("lost_logs", "Partitions whose log the broker lost (the topic was created again "
                                 "under its name, or its committed offsets are gone): read again from the start.",
                                 namespace=ns, registry=reg)
        self.generations_retired = Counter("generations_retired", "Generation topics deleted after being trained "
                                           "and checkpointed in full.", namespace=ns, registry=reg)
        self.generations_recreated = Counter(
            "generations_recreated", "Retired generation topics that came back (a late record re-created them); "
            "read again from the start.", namespace=ns, registry=reg)
        self.late_messages = Counter("late_messages", "Messages read from re-created generation topics.",
                                     namespace=ns, registry=reg)
        self.consumer_group = Gauge("consumer_group", "Always 1; the group label is this run's consumer group.",
                                    ["group"], namespace=ns, registry=reg)
        self.world_size = Gauge("world_size", "Data-parallel ranks of this run (served by rank 0; ingestion metrics "
                                "are its partitions only).", namespace=ns, registry=reg)
        self.world_size.set(1)
        self.outlier_tokens = Counter(
            "outlier_tokens", "Tokens dropped before the held-out set and the shuffle buffer, by reason: norm (above "
            "trainer.outlier_factor x the running median norm). Counted as trained for resume.", ["reason"],
            namespace=ns, registry=reg)
        self.outlier_tokens.labels(reason="norm")
        self.checkpoints = Counter("checkpoints", "Checkpoints written successfully.", namespace=ns, registry=reg)
        self.checkpoint_failures = Counter("checkpoint_failures", "Checkpoint writes that failed.", namespace=ns,
                                           registry=reg)
        self.checkpoint_retry_seconds = Gauge(
            "checkpoint_retry_seconds", "After failed checkpoints, how long the trainer waits before the next attempt "
            "(doubling per failure in a row; 0: the last one succeeded).", namespace=ns, registry=reg)
        self.resume_fallbacks = Counter(
            "resume_fallbacks", "Resumes that found the latest checkpoint corrupt (or unnamed) and used the newest "
            "good older one.", namespace=ns, registry=reg)
        self.history_write_failures = Counter(
            "history_write_failures", "Writes of the metrics history or the trace that failed (a full disk, ...) and "
            "were skipped; training goes on.", ["file"], namespace=ns, registry=reg)
        for f in ("history", "trace"):
            self.history_write_failures.labels(file=f)
        self.checkpoint_last_success = Gauge("checkpoint_last_success_timestamp_seconds",
                                             "Unix time of the last successful checkpoint (0: none yet).",
                                             namespace=ns, registry=reg)
        self.checkpoint_duration = Gauge("checkpoint_duration_seconds", "Duration of the last checkpoint write.",
                                         namespace=ns, registry=reg)
        self.training_ready = Gauge("training_ready", "1 once the buffer is full enough and training steps run.",
                                    namespace=ns, registry=reg)
        self.build_info = Gauge("build_info", "Always 1; the version label says which streamd runs.", ["version"],
                                namespace=ns, registry=reg)
        self.build_info.labels(version=version or _package_version()).set(1)

        for sae in self.sae_names:
            self.tokens_trained.labels(sae=sae)
            for g in self.per_sae.values():
                g.labels(sae=sae)
            for term in LOSS_TERMS:
                self.loss.labels(sae=sae, term=term)
            for bucket in DENSITY_BUCKETS:
                self.feature_density.labels(sae=sae, bucket=bucket)
        for reason in reasons:
            self.messages_rejected.labels(reason=reason)

    def observe_step(self, sae: str, stats: Mapping[str, float]) -> None:
        """Set the per-SAE gauges from one step's (or evaluation's) stats: keys of ``STEP_STATS`` / ``EVAL_STATS``
        and ``loss_<term>``.

        An unknown key raises: a renamed stat must not silently stop updating its dashboard panel.
        """
        for key, value in stats.items():
            term = loss_term_label(key[5:]) if key.startswith("loss_") else None
            if term is not None:
                self.loss.labels(sae=sae, term=term).set(value)
            elif key in self.per_sae:
                self.per_sae[key].labels(sae=sae).set(value)
            else:
                raise KeyError(f"unknown step stat {key!r}; expected one of {STEP_GAUGES} or loss_<{LOSS_TERMS}>")

    def set_density(self, sae: str, histogram: Mapping[str, float]) -> None:
        """Replace the feature-density snapshot of ``sae``: fraction of latents per ``DENSITY_BUCKETS`` label.

        Buckets missing from ``histogram`` read 0; an unknown bucket raises (it would never reach the dashboard).
        """
        unknown = set(histogram) - set(DENSITY_BUCKETS)
        if unknown:
            raise KeyError(f"unknown density buckets {sorted(unknown)}; expected labels from {DENSITY_BUCKETS}")
        for bucket in DENSITY_BUCKETS:
            self.feature_density.labels(sae=sae, bucket=bucket).set(histogram.get(bucket, 0.0))


class ProducerMetrics:
    """Metrics of one producer process: model forward, publishing, the bounded send queue."""

    def __init__(self, producer_id: str) -> None:
        self.registry = reg = _registry()
        self.producer_id = producer_id
        ns = NAMESPACE
        lab = ["producer"]
        self.tokens_published = Counter("tokens_published", "Activation tokens published to Kafka.", lab,
                                        namespace=ns, registry=reg)
        self.messages_published = Counter("messages_published", "Messages acknowledged by the broker.", lab,
                                          namespace=ns, registry=reg)
        self.bytes_published = Counter("bytes_published", "Message bytes acknowledged by the broker.", lab,
                                       namespace=ns, registry=reg)
        self.forward_seconds = Histogram(
            "forward_seconds", "Duration of one model forward pass over a batch.", namespace=ns, registry=reg,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.publish_latency = Histogram(
            "publish_latency_seconds", "Time from send() to broker acknowledgement.", namespace=ns, registry=reg,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.send_queue_depth = Gauge("send_queue_depth", "Messages waiting in the bounded send queue.", lab,
                                      namespace=ns, registry=reg)
        self.send_queue_capacity = Gauge("send_queue_capacity", "Capacity of the bounded send queue.", lab,
                                         namespace=ns, registry=reg)
        self.publish_errors = Counter("publish_errors", "Failed publishes, by kind.", ["producer", "kind"],
                                      namespace=ns, registry=reg)
        self.stream_lag_messages = Gauge("stream_lag_messages", "Messages published but not yet consumed by the "
                                         "trainer (when producer.lag_url is set).", lab, namespace=ns, registry=reg)
        self.documents = Counter("documents", "Source documents read.", lab, namespace=ns, registry=reg)
        self.tokens_dropped = Counter(
            "tokens_dropped", "Tokens not published, by reason: overflow (a value beyond the wire dtype's range, "
            "e.g. above 65504 in float16) or non_finite (NaN / inf from the model).", ["producer", "reason"],
            namespace=ns, registry=reg)

        self.outlier_tokens = Counter(
            "outlier_tokens", "Tokens not published by the token policy, by site and reason: position (a skipped "
            "window position, producer.skip_positions; a continuing window repeats the token there as context, it is "
            "published elsewhere) or norm (above producer.outlier_factor x the site's running median norm).",
            ["producer", "site", "reason"], namespace=ns, registry=reg)
        self.text_committed = Counter(
            "text_documents_committed", "Text topic records committed by this producer (every activation message "
            "built from them acknowledged).", lab, namespace=ns, registry=reg)
        self.text_partitions = Gauge("text_partitions_assigned", "Text topic partitions this producer reads.", lab,
                                     namespace=ns, registry=reg)
        self.text_rebalances = Counter("text_rebalances", "Text topic partition revocations (partial windows "
                                       "dropped uncommitted).", lab, namespace=ns, registry=reg)
        self.text_lost_logs = Counter("text_reader_lost_logs", "Times the text topic was created again under this "
                                      "producer (the broker lost its log): it joins the group again and reads the "
                                      "new log from its start.", lab, namespace=ns, registry=reg)
        self.text_errors = Counter("text_errors", "Source documents skipped or flagged, by reason: not_utf8, empty, "
                                   "missing_column, out_of_vocabulary.", ["producer", "reason"], namespace=ns,
                                   registry=reg)

        for m in (self.tokens_published, self.messages_published, self.bytes_published, self.send_queue_depth,
                  self.send_queue_capacity, self.documents, self.stream_lag_messages, self.text_committed,
                  self.text_partitions, self.text_rebalances, self.text_lost_logs):
            m.labels(producer=producer_id)
        for reason in TEXT_ERROR_REASONS:
            self.text_errors.labels(producer=producer_id, reason=reason)
        for kind in PUBLISH_ERROR_KINDS:
            self.publish_errors.labels(producer=producer_id, kind=kind)
        for reason in DROP_REASONS:
            self.tokens_dropped.labels(producer=producer_id, reason=reason)


class FeederMetrics:
    """Metrics of `streamd feed`: documents into the text topic, the producers' lag behind it, the epoch."""

    def __init__(self, topic: str, group: str) -> None:
        self.registry = reg = _registry()
        ns = NAMESPACE
        lab = ["topic"]
        self.documents_fed = Counter("text_documents_fed", "Documents published to the text topic and acknowledged.",
                                     lab, namespace=ns, registry=reg)
        self.bytes_fed = Counter("text_bytes_fed", "UTF-8 bytes of the documents fed.", lab, namespace=ns,
                                 registry=reg)
        self.held_out = Counter("text_documents_held_out", "Documents held back for evaluation (hash of the text).",
                                lab, namespace=ns, registry=reg)
        self.errors = Counter("text_feed_errors", "Source documents skipped by the feeder, by reason.",
                              ["topic", "reason"], namespace=ns, registry=reg)
        self.lag = Gauge("text_lag_documents", "Documents in the text topic not yet committed by the producers' "
                         "consumer group.", ["topic", "group"], namespace=ns, registry=reg)
        self.epoch = Gauge("feeder_epoch", "The feeder's epoch over its source (loop: true).", lab, namespace=ns,
                           registry=reg)
        self.throttled = Gauge("feeder_throttled", "1 while the feeder waits for the producers (feed.max_lag).",
                               lab, namespace=ns, registry=reg)
        self.lost_logs = Counter("text_lost_logs", "Times the broker lost the text topic's log (it was created again, "
                                 "a memory broker restarted); the feeder feeds again from what the producers had "
                                 "not committed.", lab, namespace=ns, registry=reg)
        self.documents_refed = Counter("text_documents_refed", "Acknowledged documents fed again after a lost log "
                                       "(the producers had not committed them).", lab, namespace=ns, registry=reg)
        for m in (self.documents_fed, self.bytes_fed, self.held_out, self.epoch, self.throttled, self.lost_logs,
                  self.documents_refed):
            m.labels(topic=topic)
        self.lag.labels(topic=topic, group=group)
        for reason in TEXT_ERROR_REASONS:
            self.errors.labels(topic=topic, reason=reason)


# What each inspection reports per SAE (``streamd_inspect_<key>{sae}``), from the inspector's dashboard metrics.
INSPECT_STATS = (
    Stat("ce_loss_score", "CE loss recovered with the SAE spliced in, on the inspector's held-out text (SAELens "
         "ce_loss_score: 1 = nothing lost, 0 = as bad as zeroing the site)."),
    Stat("kl", "KL(clean || spliced) per token on the held-out text."),
    Stat("fvu", "Fraction of variance unexplained on the held-out text's activations."),
    Stat("l0", "Mean active latents per held-out token."),
)


class InspectorMetrics:
    """Metrics of `streamd inspect`: downstream quality per SAE, which checkpoint the dashboards show and how old it
    is, dashboards built, time per inspection, failed polls."""

    def __init__(self) -> None:
        self.registry = reg = _registry()
        ns = NAMESPACE
        self.per_sae = {s.key: Gauge(f"inspect_{s.key}", s.help, ["sae"], namespace=ns, registry=reg)
                        for s in INSPECT_STATS}
        self.checkpoint_id = Gauge("inspect_checkpoint_id", "Id (a number) of the checkpoint the dashboards show.",
                                   namespace=ns, registry=reg)
        self.checkpoint_age = Gauge("inspect_checkpoint_age_seconds", "Seconds since the checkpoint the dashboards "
                                    "show was written (grows while the trainer is away).", namespace=ns, registry=reg)
        self.dashboards_built = Counter("inspect_dashboards_built", "Latent dashboards built.", namespace=ns,
                                        registry=reg)
        self.inspection_seconds = Gauge("inspect_inspection_seconds", "Seconds the last inspection took (pull, every "
                                        "SAE's metrics and dashboards).", namespace=ns, registry=reg)
        self.inspections = Counter("inspect_inspections", "Checkpoints inspected.", namespace=ns, registry=reg)
        self.failures = Counter("inspect_failures", "Polls or inspections that failed (trainer unreachable, a "
                                "checkpoint that does not fit the model).", namespace=ns, registry=reg)
        self._written_at: float | None = None
        self.checkpoint_age.set_function(
            lambda: float("nan") if self._written_at is None else time.time() - self._written_at)

    def observe(self, checkpoint: str, metrics_by_sae: Mapping[str, Mapping[str, float]], dashboards: int,
                seconds: float, written_at: float) -> None:
        for sae, m in metrics_by_sae.items():
            for key, gauge in self.per_sae.items():
                gauge.labels(sae=sae).set(m[key])
        self.checkpoint_id.set(float(checkpoint) if checkpoint.isdigit() else float("nan"))
        self._written_at = written_at
        self.dashboards_built.inc(dashboards)
        self.inspection_seconds.set(seconds)
        self.inspections.inc()
