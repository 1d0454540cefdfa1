"""Ingestion bookkeeping: a record blocked on a full queue is never counted as read (a checkpoint would skip it)."""

import threading
import time
from types import SimpleNamespace

import torch
from kafka import TopicPartition

from streamd import wire
from streamd.config import KafkaConfig
from streamd.train.kafka_source import KafkaActivationSource
from streamd.train.source import Chunk
from streamd.metrics import TrainerMetrics


def test_position_moves_only_once_a_record_is_queued():
    src = KafkaActivationSource(KafkaConfig(), "t", "g", TrainerMetrics(["a"], wire.REJECT_REASONS),
                                expected_site_id=None, d_in=None, queue_tokens=16)
    src.queue.put(Chunk(torch.zeros(16, 4), ("t", 1), 100, "p", 0), src._stop)  # the queue is full
    value = wire.encode(wire.ActivationMessage("p", 1, 7, torch.ones(8, 4, dtype=torch.float16)))
    blocked = threading.Thread(target=src._handle, args=(TopicPartition("t", 0), SimpleNamespace(offset=5, value=value)))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive(), "the put should wait for room"
    assert ("t", 0) not in src.positions()  # a checkpoint now resumes partition 0 at or before offset 5
    assert src.get(timeout=1).offset == 100  # room: the blocked record goes in, and only then counts as read
    blocked.join(timeout=5)
    assert src.positions() == {("t", 0): 6} and src.queued_offsets() == {("t", 0): 5}


def test_a_stop_while_blocked_leaves_the_record_unread():
    src = KafkaActivationSource(KafkaConfig(), "t", "g", TrainerMetrics(["a"], wire.REJECT_REASONS),
                                expected_site_id=None, d_in=None, queue_tokens=16)
    src.queue.put(Chunk(torch.zeros(16, 4), ("t", 1), 100, "p", 0), src._stop)
    value = wire.encode(wire.ActivationMessage("p", 1, 7, torch.ones(8, 4, dtype=torch.float16)))
    result = []
    t = threading.Thread(target=lambda: result.append(
        src._handle(TopicPartition("t", 0), SimpleNamespace(offset=5, value=value))))
    t.start()
    src._stop.set()
    t.join(timeout=5)
    assert result == [False] and ("t", 0) not in src.positions()
