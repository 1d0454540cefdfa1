"""Publish a cached activation file into Kafka in the wire format, as a producer would."""

from __future__ import annotations

import collections
from pathlib import Path

import torch

from streamd import wire
from streamd.config import KafkaConfig
from streamd.train.file_source import load_activation_file
from streamd.stream.kafka import ensure_topic, make_producer
from streamd.produce.producer import split_rows

IN_FLIGHT = 64


def replay(kafka: KafkaConfig, path: Path, *, topic: str, site_id: int, producer_id: str = "replay",
           max_message_bytes: int = 1_000_000, dtype: torch.dtype = torch.float16) -> int:
    """Send every row of ``path`` (``[n_tokens, d_in]``); returns the tokens published."""
    acts = load_activation_file(Path(path)).to(dtype)
    ensure_topic(kafka, topic, kafka.partitions)
    producer = make_producer(kafka, max_request_size=max_message_bytes + 4096)
    step = split_rows(len(acts), acts.shape[1], dtype, producer_id, False, max_message_bytes)
    window: collections.deque = collections.deque()
    try:
        for seq, lo in enumerate(range(0, len(acts), step)):
            msg = wire.ActivationMessage(producer_id, seq, site_id, acts[lo : lo + step])
            window.append(producer.send(topic, value=wire.encode(msg), key=producer_id.encode()))
            if len(window) >= IN_FLIGHT:  # bounded memory: kafka-python's send buffer is not
                window.popleft().get(timeout=60)
        while window:
            window.popleft().get(timeout=60)  # raises the broker's error for any message not stored
    finally:
        producer.close()
    return len(acts)
