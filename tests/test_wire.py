"""Wire format: round trips for every dtype and shape, and typed rejection of garbage."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd import wire

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _msg(n=5, d=7, dtype=torch.float16, ids=True, pid="host-1", seq=3, site=2**63 + 5):
    g = torch.Generator().manual_seed(n * 31 + d)
    acts = torch.randn(n, d, generator=g).to(dtype)
    tok = torch.arange(n, dtype=torch.int32) * 7 if ids else None
    return wire.ActivationMessage(producer_id=pid, seq=seq, site_id=site, acts=acts, token_ids=tok)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 33),
    dtype=st.sampled_from(DTYPES),
    ids=st.booleans(),
    pid=st.text(min_size=1, max_size=60).filter(lambda s: 0 < len(s.encode()) < 256),
    seq=st.integers(0, 2**64 - 1),
    site=st.integers(0, 2**64 - 1),
)
def test_round_trip(n, d, dtype, ids, pid, seq, site):
    m = _msg(n, d, dtype, ids, pid, seq, site)
    data = wire.encode(m)
    assert len(data) == wire.message_size(n, d, dtype, pid, ids)
    out = wire.decode(data)
    assert (out.producer_id, out.seq, out.site_id) == (pid, seq, site)
    assert out.acts.dtype == dtype and out.acts.shape == (n, d)
    assert torch.equal(out.acts, m.acts)
    if ids:
        assert torch.equal(out.token_ids, m.token_ids)
    else:
        assert out.token_ids is None


def test_decode_is_zero_copy():
    data = bytearray(wire.encode(_msg(ids=False)))
    out = wire.decode(data)
    data[-2:] = b"\x00\x3c"  # float16 1.0 in the last element
    assert out.acts[-1, -1].item() == 1.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_typed_error(blob):
    try:
        wire.decode(blob)
    except wire.WireError as e:
        assert e.reason in wire.REJECT_REASONS
    # a blob that happens to be valid is fine; anything else (IndexError, struct.error...) fails the test


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000))
def test_truncated_or_corrupted_valid_message(cut, flip):
    data = bytearray(wire.encode(_msg(n=9, d=11)))
    with pytest.raises(wire.WireError):
        wire.decode(bytes(data[: cut % len(data)]))
    data[flip % 8] ^= 0xFF  # corrupt magic/version/dtype/flags/id_len
    with pytest.raises(wire.WireError):
        wire.decode(bytes(data))


@pytest.mark.parametrize(
    "mutate, err",
    [
        (lambda b: b"XXXX" + b[4:], wire.BadMagic),
        (lambda b: b[:4] + bytes([2]) + b[5:], wire.UnsupportedVersion),
        (lambda b: b[:5] + bytes([9]) + b[6:], wire.BadDType),
        (lambda b: b[:-1], wire.Truncated),
        (lambda b: b + b"\0\0", wire.SizeMismatch),
        (lambda b: b[:8] + struct.pack("<I", 0) + b[12:], wire.SizeMismatch),
    ],
)
def test_specific_errors(mutate, err):
    with pytest.raises(err):
        wire.decode(mutate(wire.encode(_msg())))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rejected(bad, dtype):
    m = _msg(dtype=dtype)
    m.acts[2, 3] = bad
    with pytest.raises(wire.NonFinite):
        wire.decode(wire.encode(m))
    assert wire.decode(wire.encode(m), check_finite=False).n_tokens == 5


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        wire.encode(wire.ActivationMessage("p", 0, 0, torch.zeros(3)))
    with pytest.raises(ValueError, match="dtype"):
        wire.encode(wire.ActivationMessage("p", 0, 0, torch.zeros(3, 2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="producer id"):
        wire.encode(wire.ActivationMessage("", 0, 0, torch.zeros(3, 2)))


def test_decode_is_quiet_without_a_process_wide_filter():
    """Importing the wire module adds no warnings filter; decoding read-only bytes still shows no "not writable"
    warning, even with warnings as errors (in a fresh process: torch warns once per process)."""
    import subprocess
    import sys

    script = """
import warnings
warnings.simplefilter("error")
import torch  # torch adds filters of its own on import
before = list(warnings.filters)
from streamd import wire
assert warnings.filters == before, "streamd.wire changed the process-wide warning filters"
msg = wire.encode(wire.ActivationMessage("p", 0, 1, torch.ones(3, 4), token_ids=torch.arange(3)))
for _ in range(2):
    assert wire.decode(bytes(msg)).acts.sum() == 12
assert warnings.filters == before
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
