"""The inspector's held-out text, kept apart from what the producers train on.

``inspect.source`` when set. Otherwise, where a feeder divides the text (``feed.holdout_fraction > 0``), the
feeder's held-out slice of ``feed.source``: the documents whose text hash puts them in the slice, which the feeder
never publishes (:func:`streamd.produce.feed.held_out`, the same ones every run). Else a shipped corpus the
producers do not read: ``pydoc`` (Python's language reference), or ``kjv`` when the producers read ``pydoc``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

from streamd.config import SourceConfig, StreamdConfig
from streamd.produce.feed import held_out
from streamd.produce.packing import Window, pack_documents
from streamd.produce.text import iter_source


def producers_source(cfg: StreamdConfig) -> SourceConfig:
    """The text the producers train on: the feeder's source when they read a text topic."""
    return cfg.feed.source if cfg.producer.source.kind == "kafka" else cfg.producer.source


def held_out_source(cfg: StreamdConfig) -> tuple[SourceConfig, float]:
    """The source of the held-out text and the feeder's held-out fraction to filter it by (0: none)."""
    if cfg.inspect.source is not None:
        return cfg.inspect.source, 0.0
    if cfg.feed.holdout_fraction > 0:
        return cfg.feed.source, cfg.feed.holdout_fraction
    theirs = producers_source(cfg)
    corpus = "kjv" if theirs.kind == "corpus" and theirs.corpus == "pydoc" else "pydoc"
    return SourceConfig(kind="corpus", corpus=corpus), 0.0


def held_out_texts(cfg: StreamdConfig) -> Iterator[str]:
    source, fraction = held_out_source(cfg)
    if source.kind == "kafka":
        raise ValueError("inspect.source cannot be a kafka text topic: it would take documents from the producers' "
                         "consumer group")
    docs = iter_source(source.model_copy(update={"loop": False}))
    return (d for d in docs if held_out(d, fraction)) if fraction > 0 else docs


def sample_windows(tokenizer, texts: Iterator[str], context_length: int, tokens: int,
                   skip_positions: int = 0) -> list[Window]:
    """The first ``ceil(tokens / context_length)`` windows of ``texts`` (fewer when the text runs out), packed as the
    producer packs them: the ``skip_positions`` its token policy never publishes are not kept (nor spliced, scored or
    shown: they carry the massive activations of the attention sink)."""
    windows = list(itertools.islice(pack_documents(tokenizer, texts, context_length, skip_positions),
                                    math.ceil(tokens / context_length)))
    if not windows:
        raise ValueError("the inspector's held-out text holds no tokens")
    return windows
