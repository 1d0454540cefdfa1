"""Shuffle buffer: batches mix many messages, re-read offsets are exact, no token lingers past its age bound."""

import torch

from streamd.train.buffer import ShuffleBuffer


def _stream(buf: ShuffleBuffer, msg_tokens: int, start_msg: int) -> int:
    """Refill the buffer from a stream of messages whose rows all equal the message index."""
    m = start_msg
    while not buf.full:
        rows = torch.full((msg_tokens, buf.d_in), float(m))
        taken = buf.add(rows, source=0, offset=m)
        assert taken in (msg_tokens, buf.free_slots + taken)
        m += 1
    return m


def _max_share(batch: torch.Tensor) -> int:
    return int(torch.unique(batch[:, 0], return_counts=True)[1].max())


def test_no_message_dominates_a_batch():
    cap, bsz, msg = 4096, 256, 64
    expected_share = bsz * msg / cap  # 4 tokens of each message per batch on average
    buf = ShuffleBuffer(cap, 2, bsz, max_age=8 * cap, generator=torch.Generator().manual_seed(1))
    m = _stream(buf, msg, 0)
    worst = 0
    for _ in range(200):
        worst = max(worst, _max_share(buf.sample()))
        m = _stream(buf, msg, m)
    assert worst <= 4 * expected_share, worst
    # the same stream unshuffled: a batch of consecutive tokens is 64 tokens of each of 4 messages
    unshuffled = torch.arange(cap).div(msg, rounding_mode="floor")[:bsz, None].float()
    assert _max_share(unshuffled) == msg == 16 * expected_share


def test_token_age_is_bounded_and_offsets_are_exact():
    cap, bsz, msg = 512, 64, 16
    buf = ShuffleBuffer(cap, 2, bsz, max_age=2 * cap, generator=torch.Generator().manual_seed(2))
    m = _stream(buf, msg, 0)
    for _ in range(300):
        buf.sample()
        m = _stream(buf, msg, m)
        live = buf.data[:, 0]
        assert int(buf.ingested - buf.arrival.min()) <= 2 * cap + bsz
        # the lowest pending offset is exactly the oldest message with a token still in the buffer
        assert buf.pending_offsets() == {0: int(live.min())}


def test_sampling_requires_a_full_buffer_and_matching_width():
    buf = ShuffleBuffer(128, 4, 32, max_age=1024)
    buf.add(torch.zeros(10, 4), 0, 0)
    try:
        buf.sample()
        raise AssertionError("sampled a buffer that is not full")
    except RuntimeError as e:
        assert "full" in str(e)
    try:
        buf.add(torch.zeros(3, 5), 0, 1)
        raise AssertionError("accepted a wrong d_model")
    except ValueError as e:
        assert "d_model 5" in str(e)
