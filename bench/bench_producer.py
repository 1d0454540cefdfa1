"""Producer throughput of the default model (SmolLM2-135M) at the default site (resid_post, layer 15 of 30).

For fp32 and bf16, on the same KJV windows (context 128, batch 8):

(a) the bare full model: ``model(input_ids)`` with logits, no hooks;
(b) the forward stopped after layer 15 by ``ActivationCapture`` (no token selection, no publish);
(c) the whole producer: ``ActivationProducer.run`` on corpus kjv with ``max_tokens`` covering the same windows:
    tokenise + capture + select tokens + fp16 convert + ``wire.encode`` + publish to a local Tansu broker (acked).

Tokens are the ones the producer publishes (BOS and padding masked out), for every row, so rows compare directly.
(c) is timed around ``run()`` as a whole (topic check, client start and the final flush included); its "forward"
column is the producer's own ``forward_seconds`` metric, the rest is tokenising, selecting, converting, encoding and
publishing. The first load of the default model converts the GGUF (~25 s, cached in ~/.cache/streamd after).

torch threads 2 (``producer.torch_threads=2``; torch's default on a 2-core host). Run:
``.venv/bin/python bench/bench_producer.py [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from _common import Phase, load_average, machine_line, quiet, table
from streamd.stream.broker import LocalBroker
from streamd.config import ProducerConfig, SiteSpec, SourceConfig, StreamdConfig
from streamd.produce.capture import ActivationCapture
from streamd.produce.model import load_frozen_model
from streamd.produce.packing import pack_documents
from streamd.torch_utils import configure_threads
from streamd.produce.producer import ActivationProducer
from streamd.produce.text import kjv

THREADS, CONTEXT, BATCH = 2, 128, 8
SITE = SiteSpec(site="resid_post", layer=15)


def batches(tokenizer, n: int) -> list[tuple[torch.Tensor, int]]:
    """The first ``n`` batches the producer builds from KJV: (input_ids [B, T], tokens it would publish)."""
    windows = pack_documents(tokenizer, kjv(), CONTEXT)
    out = []
    for _ in range(n):
        ws = list(itertools.islice(windows, BATCH))
        out.append((torch.stack([w.input_ids for w in ws]), int(sum(w.keep_mask.sum() for w in ws))))
    return out


def timed(fn, data: list[tuple[torch.Tensor, int]], warm: int) -> tuple[Phase, int]:
    """Call ``fn(ids)`` on ``warm`` batches untimed, then on the rest; returns (phase, tokens timed)."""
    with torch.inference_mode():
        for ids, _ in data[:warm]:
            fn(ids)
        phase = Phase().start()
        for ids, _ in data[warm:]:
            fn(ids)
    return phase.stop(), sum(n for _, n in data[warm:])


def full_producer(loaded, dtype: str, max_tokens: int, broker: LocalBroker) -> tuple[Phase, int, float]:
    """(phase, tokens published, forward seconds) of one ActivationProducer run."""
    cfg = StreamdConfig(
        kafka=broker.config(topic=f"bench.{dtype}", partitions=1),
        producer=ProducerConfig(dtype=dtype, sites=[SITE], context_length=CONTEXT, batch_size=BATCH,
                                source=SourceConfig(kind="corpus", corpus="kjv"), producer_id=f"bench-{dtype}",
                                torch_threads=THREADS, max_tokens=max_tokens, metrics_port=0),
    )
    producer = ActivationProducer(cfg, loaded=loaded)
    phase = Phase().start()
    tokens = producer.run()
    phase.stop()
    reg = producer.metrics.registry
    published = reg.get_sample_value("streamd_tokens_published_total", {"producer": f"bench-{dtype}"})
    if published != tokens:
        raise SystemExit(f"{dtype}: {tokens} tokens produced but {published} acknowledged")
    return phase, tokens, reg.get_sample_value("streamd_forward_seconds_sum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run for a smoke check (< 2 min)")
    args = ap.parse_args()
    quiet()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr
    configure_threads(THREADS)
    # batches timed per row (after 1 untimed warm-up batch): (a) full model, (b) early stop, (c) producer
    n_full, n_early, n_prod = (1, 3, 3) if args.quick else (8, 24, 24)
    print(f"bench_producer: SmolLM2-135M (shipped GGUF), {SITE.hook_name}, context {CONTEXT}, batch {BATCH}; "
          f"{'quick' if args.quick else 'default'} run")
    print(machine_line(THREADS))
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-producer-") as tmp, LocalBroker(log_dir=Path(tmp)) as broker:
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            loaded = load_frozen_model(None, dtype)
            notes.append(f"{dtype}: model loaded in {time.perf_counter() - t0:.1f} s")
            data = batches(loaded.tokenizer, 1 + max(n_full, n_early, n_prod))
            full, n_a = timed(lambda ids: loaded.model(input_ids=ids, use_cache=False), data[: 1 + n_full], 1)
            with ActivationCapture(loaded.model, [SITE]) as capture:
                early, n_b = timed(capture, data[: 1 + n_early], 1)
            prod_tokens = sum(n for _, n in data[1 : 1 + n_prod])
            # the producer starts at the first window: it re-runs the warm-up batch, then the timed ones
            prod, n_c, fwd = full_producer(loaded, dtype, data[0][1] + prod_tokens, broker)
            rate_b = n_b / early.wall
            rows += [
                [f"{dtype} (a) full model, logits", n_full, n_a, full.wall, "", n_a / full.wall, full.util, ""],
                [f"{dtype} (b) stop after layer 15", n_early, n_b, early.wall, "", rate_b, early.util, "1.00"],
                [f"{dtype} (c) producer -> Kafka", n_prod + 1, n_c, prod.wall, fwd, n_c / prod.wall, prod.util,
                 f"{rate_b / (n_c / prod.wall):.2f}"],
            ]
            notes.append(f"{dtype}: early stop is {rate_b / (n_a / full.wall):.2f}x the full model; the producer "
                         f"path costs {100 * (rate_b * prod.wall / n_c - 1):+.0f}% time per token over (b), "
                         f"{100 * (prod.wall - fwd) / prod.wall:.0f}% of its wall time outside the forward")
            del loaded
    print()
    print(table(["path", "batches", "tokens", "seconds", "forward s", "tokens/s", "CPU util", "time vs (b)"], rows))
    for n in notes:
        print(n)
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
