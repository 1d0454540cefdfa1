"""The text stream's costs (issue 9): how fast the feeder fills a text topic, and what reading the text from that
topic costs a producer against reading the same corpus directly.

(a) feeder: ``Feeder.run`` of N documents of corpus kjv (looping over its 4,635, each epoch shuffled; no throttle:
    ``feed.max_lag`` null) into a fresh text topic of 16 partitions on a local Tansu broker, timed around ``run()``
    (lock, topic and final flush included; a feeder first watches its lock topic for ``lock_ttl_seconds``, 1 s
    here) and "steady", from the first acknowledged document to the last: documents and UTF-8 bytes acknowledged
    by the broker per second.
(b) producer: ``ActivationProducer.run`` on corpus kjv directly vs on a text topic the feeder filled beforehand
    with the same corpus (shuffled; ``source.kind: kafka``, a fresh consumer group per run), the same
    ``max_tokens``, both publishing to the same broker. "tok/s" is timed around ``run()``; "steady tok/s" from the
    first published token to the last (without the model warm-up and, for the topic, the consumer group join).
    Runs alternate; the median of R.
    The model is the tests' tiny random Llama (d_model 64, 2 layers): its forward is nearly free, so the text
    topic's share of the producer's time is the largest it can be; with a real model it shrinks with the forward.

Run from the repository root: ``.venv/bin/python bench/bench_feed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.models

from _common import Phase, load_average, machine_line, quiet, table  # noqa: E402
from streamd.config import FeedConfig, ProducerConfig, SiteSpec, SourceConfig, StreamdConfig  # noqa: E402
from streamd.produce.feed import Feeder  # noqa: E402
from streamd.produce.model import load_frozen_model  # noqa: E402
from streamd.produce.producer import ActivationProducer  # noqa: E402
from streamd.stream.broker import LocalBroker  # noqa: E402

THREADS, CONTEXT, BATCH = 1, 128, 8
SITE = SiteSpec(site="resid_post", layer=1)
TOPICS = ("assignment", "for", "if", "while", "with", "try", "function", "class", "import", "lambda")


class FirstProgress:
    """Notes when ``value()`` first goes above 0 (polled every 5 ms on a thread), for rates without start-up."""

    def __init__(self, value) -> None:
        self.value, self.at, self.first = value, None, 0.0
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._done.is_set() and self.at is None:
            if (v := self.value()) > 0:
                self.at, self.first = time.perf_counter(), v
            time.sleep(0.005)

    def rate(self, start: float) -> float:
        """Progress per second from the first to now (from ``start`` if there was none before the end)."""
        self._done.set()
        now, total = time.perf_counter(), self.value()
        at, first = (self.at, self.first) if self.at is not None else (start, 0.0)
        return (total - first) / max(now - at, 1e-9)


def feed(broker: LocalBroker, topic: str, n_docs: int) -> tuple[Phase, int, float, float, float]:
    """(phase, documents fed, bytes fed, steady docs/s, steady MB/s) of one feeder run of ``n_docs`` KJV documents
    (looping over the corpus, each epoch shuffled); steady: from the first acknowledged document to the last."""
    cfg = StreamdConfig(kafka=broker.config(), feed=FeedConfig(
        source=SourceConfig(kind="corpus", corpus="kjv", loop=True), topic=topic, partitions=16, max_lag=None,
        max_documents=n_docs, metrics_port=0, lock_ttl_seconds=1.0))
    feeder = Feeder(cfg)
    docs = FirstProgress(lambda: feeder.metrics.documents_fed.labels(topic=topic)._value.get())
    nbytes = FirstProgress(lambda: feeder.metrics.bytes_fed.labels(topic=topic)._value.get())
    phase = Phase().start()
    start = time.perf_counter()
    fed = feeder.run()
    phase.stop()
    return phase, fed, nbytes.value(), docs.rate(start), nbytes.rate(start) / 1e6


def produce(broker: LocalBroker, loaded, source: SourceConfig, name: str, max_tokens: int) -> tuple[float, float]:
    """(tok/s around run(), steady tok/s from the first published token to the last) of one producer run."""
    cfg = StreamdConfig(kafka=broker.config(topic=f"bench.acts.{name}", partitions=4), producer=ProducerConfig(
        sites=[SITE], context_length=CONTEXT, batch_size=BATCH, source=source, producer_id=name,
        torch_threads=THREADS, max_tokens=max_tokens, metrics_port=0, max_lag_messages=None))
    producer = ActivationProducer(cfg, loaded=loaded)
    published = producer.metrics.tokens_published.labels(producer=name)
    first = FirstProgress(published._value.get)
    t0 = time.perf_counter()
    tokens = producer.run()
    t1 = time.perf_counter()
    if published._value.get() != tokens:
        raise SystemExit(f"{name}: {tokens} tokens produced but {published._value.get()} acknowledged")
    return tokens / (t1 - t0), first.rate(t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer documents, tokens and runs")
    args = ap.parse_args()
    quiet()
    n_docs, max_tokens, runs = (10_000, 40_000, 2) if args.quick else (40_000, 150_000, 3)
    print(machine_line(THREADS))
    from tests.models import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="bench-feed-") as d, LocalBroker(log_dir=Path(d) / "broker") as broker:
        model = build_tiny_llama(Path(d) / "tiny-llama", vocab_size=512, topics=TOPICS, hidden_size=64,
                                 intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
        rows = []
        for i in range(runs):
            phase, fed, nbytes, docs_s, mb_s = feed(broker, f"bench.feed{i}", n_docs)
            rows.append([f"feeder run {i + 1}", fed, fed / phase.wall, nbytes / phase.wall / 1e6, docs_s, mb_s,
                         phase.util])
        print("\n(a) feeder: corpus kjv (looped, shuffled epochs) -> text topic (16 partitions)")
        print(table(["", "documents", "docs/s", "MB/s", "steady docs/s", "steady MB/s", "CPU util"], rows))

        loaded = load_frozen_model(model, "float32", "cpu")
        text_topic = "bench.text"
        feed(broker, text_topic, n_docs)  # the text every topic run below reads from the start (its own group)
        rates: dict[str, list[tuple[float, float]]] = {"direct": [], "text topic": []}
        for i in range(runs):
            rates["direct"].append(produce(broker, loaded, SourceConfig(kind="corpus", corpus="kjv"),
                                           f"direct-{i}", max_tokens))
            rates["text topic"].append(produce(
                broker, loaded, SourceConfig(kind="kafka", topic=text_topic, group_id=f"bench-text-{i}"),
                f"topic-{i}", max_tokens))
        direct = statistics.median(s for _, s in rates["direct"])
        rows = []
        for name, rs in rates.items():
            total, steady = statistics.median(t for t, _ in rs), statistics.median(s for _, s in rs)
            rows.append([name, max_tokens, total, steady, f"{(steady / direct - 1) * 100:+.1f}%"])
        print(f"\n(b) producer, tiny Llama, {max_tokens:,} tokens per run, median of {runs}")
        print(table(["source", "tokens", "tok/s", "steady tok/s", "steady vs direct"], rows))
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
