"""The metric definitions: every labelled series exists before its first event, setters reach the right series, and
each metrics object is independent (its own registry)."""

from __future__ import annotations

import kafka.errors
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamd.metrics import (
    DENSITY_BUCKETS,
    LOSS_TERMS,
    PUBLISH_ERROR_KINDS,
    STEP_GAUGES,
    ProducerMetrics,
    TrainerMetrics,
    parse_samples,
    publish_error_kind,
)
from streamd.wire import REJECT_REASONS

SAES = ["topk-k32", "relu-l1"]


def scrape(registry) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted label items: value}, parsed from the text exposition Prometheus would read."""
    samples = parse_samples(generate_latest(registry).decode())
    return {name: {tuple(sorted(labels.items())): v for labels, v in series} for name, series in samples.items()}


def families(registry):
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_trainer_series_exist_before_any_event():
    m = scrape(TrainerMetrics(SAES, REJECT_REASONS, version="9.9").registry)
    for sae in SAES:
        assert m["streamd_tokens_trained_total"][(("sae", sae),)] == 0
        for g in (*STEP_GAUGES, "eval_fvu", "eval_l0"):
            assert (("sae", sae),) in m[f"streamd_{g}"], g
        assert {dict(k)["term"] for k in m["streamd_loss"] if dict(k)["sae"] == sae} == set(LOSS_TERMS)
        assert {dict(k)["bucket"] for k in m["streamd_feature_density"] if dict(k)["sae"] == sae} == set(DENSITY_BUCKETS)
    assert {dict(k)["reason"] for k in m["streamd_messages_rejected_total"]} == set(REJECT_REASONS)
    assert m["streamd_build_info"] == {(("version", "9.9"),): 1.0}
    for name in ("streamd_tokens_per_second", "streamd_buffer_fill_ratio", "streamd_buffer_tokens",
                 "streamd_messages_consumed_total", "streamd_bytes_consumed_total", "streamd_duplicates_reread_total",
                 "streamd_offset_resets_total", "streamd_checkpoints_total", "streamd_checkpoint_failures_total",
                 "streamd_checkpoint_last_success_timestamp_seconds", "streamd_checkpoint_duration_seconds",
                 "streamd_training_ready", "process_start_time_seconds"):
        assert name in m, name
    # Per-producer and per-partition series appear with their first producer / partition, not before.
    assert "streamd_tokens_consumed_total" not in m and "streamd_consumer_lag" not in m


def test_producer_series_exist_before_any_event():
    m = scrape(ProducerMetrics("host-1").registry)
    for name in ("tokens_published_total", "messages_published_total", "bytes_published_total", "send_queue_depth",
                 "send_queue_capacity", "documents_total"):
        assert m[f"streamd_{name}"] == {(("producer", "host-1"),): 0.0}, name
    assert {dict(k)["kind"] for k in m["streamd_publish_errors_total"]} == set(PUBLISH_ERROR_KINDS)
    for h in ("streamd_forward_seconds", "streamd_publish_latency_seconds"):
        assert m[f"{h}_count"] == {(): 0.0} and len(m[f"{h}_bucket"]) > 5


def test_every_metric_has_help_text():
    for reg in (TrainerMetrics(SAES, REJECT_REASONS).registry, ProducerMetrics("p").registry):
        for name, fam in families(reg).items():
            if name.startswith("streamd_"):
                assert len(fam.documentation) > 10, name


def test_observe_step_sets_gauges_and_maps_penalty_terms():
    t = TrainerMetrics(SAES, REJECT_REASONS)
    t.observe_step("relu-l1", {"l0": 31.5, "fvu": 0.12, "step": 7, "loss_total": 2.5, "loss_mse": 2.0, "loss_l1": 0.5})
    t.observe_step("topk-k32", {"loss_auxk": 0.25, "loss_l0_penalty": 0.75})
    m = scrape(t.registry)
    assert m["streamd_l0"][(("sae", "relu-l1"),)] == 31.5
    assert m["streamd_l0"][(("sae", "topk-k32"),)] == 0
    assert m["streamd_step"][(("sae", "relu-l1"),)] == 7
    loss = {(dict(k)["sae"], dict(k)["term"]): v for k, v in m["streamd_loss"].items()}
    assert loss[("relu-l1", "total")] == 2.5 and loss[("relu-l1", "sparsity")] == 0.5
    assert loss[("topk-k32", "auxk")] == 0.25 and loss[("topk-k32", "sparsity")] == 0.75
    with pytest.raises(KeyError, match="l0_typo"):
        t.observe_step("relu-l1", {"l0_typo": 1.0})
    with pytest.raises(KeyError, match="loss_bogus"):
        t.observe_step("relu-l1", {"loss_bogus": 1.0})


def test_set_density_replaces_snapshot_and_rejects_unknown_buckets():
    t = TrainerMetrics(["s"], [])
    t.set_density("s", {"-3.0": 0.5, "never": 0.5})
    t.set_density("s", {"-2.5": 0.75, "never": 0.25})
    got = {dict(k)["bucket"]: v for k, v in scrape(t.registry)["streamd_feature_density"].items()}
    assert got["-2.5"] == 0.75 and got["never"] == 0.25 and got["-3.0"] == 0.0
    assert sum(got.values()) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="-9.0"):
        t.set_density("s", {"-9.0": 1.0})


def test_registries_are_independent():
    a, b = TrainerMetrics(["s"], ["decode"]), TrainerMetrics(["s"], ["decode"])
    a.tokens_trained.labels(sae="s").inc(100)
    a.tokens_consumed.labels(producer="p1").inc(100)
    assert scrape(a.registry)["streamd_tokens_trained_total"][(("sae", "s"),)] == 100
    assert scrape(b.registry)["streamd_tokens_trained_total"][(("sae", "s"),)] == 0
    assert "streamd_tokens_consumed_total" not in scrape(b.registry)
    ProducerMetrics("p1"), ProducerMetrics("p1")  # constructing twice must not clash either


@pytest.mark.parametrize(
    "err, kind",
    [
        (kafka.errors.KafkaTimeoutError(), "timeout"),
        (kafka.errors.RequestTimedOutError(), "timeout"),
        (TimeoutError(), "timeout"),
        (kafka.errors.MessageSizeTooLargeError(), "too_large"),
        (kafka.errors.UnknownProducerIdError(), "broker"),
        (OSError("connection reset"), "other"),
    ],
)
def test_publish_error_kind_is_bounded(err, kind):
    assert publish_error_kind(err) == kind and kind in PUBLISH_ERROR_KINDS


def test_parse_and_fetch_samples():
    """The one exposition parser (status, the producer's lag check and the soak bench all read /metrics with it)."""
    from streamd.metrics import fetch_samples
    from streamd.run.server import StatusServer

    t = TrainerMetrics(SAES, REJECT_REASONS, version="9.9")
    t.producer_last_seq.labels(producer="p1").set(41)
    t.tokens_trained.labels(sae=SAES[0]).inc(5)
    parsed = parse_samples(generate_latest(t.registry).decode())
    assert ({"producer": "p1"}, 41.0) in parsed["streamd_producer_last_seq"]
    assert dict((lab["sae"], v) for lab, v in parsed["streamd_tokens_trained_total"]) == {SAES[0]: 5.0, SAES[1]: 0.0}
    with StatusServer("127.0.0.1", 0, t.registry) as s:
        for url in (s.url, s.url + "/", s.url + "/metrics"):
            assert fetch_samples(url)["streamd_producer_last_seq"] == parsed["streamd_producer_last_seq"]
        port = s.port
    with pytest.raises(OSError):
        fetch_samples(f"http://127.0.0.1:{port}", timeout=2)
