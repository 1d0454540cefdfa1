"""The activation message: a small fixed header, the producer id, optional token ids, then a contiguous payload.

Layout, version 1 (all integers little-endian)::

    offset  size  field
    0       4     magic        b"SDA1"
    4       1     version      1
    5       1     dtype        0 = float32, 1 = float16, 2 = bfloat16
    6       1     flags        bit 0: token ids present
    7       1     id_len       length P of the producer id (1..255, UTF-8)
    8       4     n_tokens     uint32
    12      4     d_model      uint32
    16      8     site_id      uint64: hash of {model content hash, site, layer} (see streamd.identity.site_id)
    24      8     seq          uint64: per-producer sequence number, from 0
    32      P     producer id, then zero padding to a multiple of 8
    ...     4*n   token ids (int32) when flag bit 0, then zero padding to a multiple of 8
    ...     n*d*s payload, row-major [n_tokens, d_model] in `dtype`

The total length must equal exactly the header's implied size. Compatibility policy: the magic never changes; a
reader accepts every version it knows and rejects a newer one with ``UnsupportedVersion`` (counted and skipped, never
guessed at), so producers are upgraded after trainers. Any change to the layout bumps the version.

Decoding is zero-copy: the payload tensor is a view on the message bytes (``torch.frombuffer``; numpy has no bfloat16).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from streamd.torch_utils import QuietOnce

MAGIC = b"SDA1"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBIIQQ")
HEADER_SIZE = _HEADER.size  # 32
FLAG_TOKEN_IDS = 1

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}

# Kafka hands us immutable bytes and the views made of them are only read: the "not writable" warning is noise.
_frombuffer = QuietOnce(torch.frombuffer, "The given buffer is not writable")


class WireError(ValueError):
    """A message that cannot be trained on; ``reason`` is the metric label."""

    reason = "decode"


class BadMagic(WireError):
    reason = "magic"


class UnsupportedVersion(WireError):
    reason = "version"


class Truncated(WireError):
    reason = "truncated"


class SizeMismatch(WireError):
    reason = "size"


class BadDType(WireError):
    reason = "dtype"


class NonFinite(WireError):
    reason = "non_finite"


# Every reason a consumer counts a rejected message under: the wire's own, then the trainer's checks of identity.
REJECT_REASONS = ["decode", "magic", "version", "truncated", "size", "dtype", "non_finite", "site_id", "d_model"]


@dataclass(frozen=True)
class ActivationMessage:
    producer_id: str
    seq: int
    site_id: int
    acts: torch.Tensor  # [n_tokens, d_model], a view on the message bytes when decoded
    token_ids: torch.Tensor | None = None  # [n_tokens] int32

    @property
    def n_tokens(self) -> int:
        return self.acts.shape[0]

    @property
    def d_model(self) -> int:
        return self.acts.shape[1]


def _pad8(n: int) -> int:
    return -n % 8


def encode(msg: ActivationMessage) -> bytes:
    """Serialise one message. ``acts`` must already be in the wire dtype; it is copied once into the result."""
    acts = msg.acts
    if acts.dim() != 2:
        raise ValueError(f"acts must be [n_tokens, d_model], got shape {tuple(acts.shape)}")
    if acts.dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported wire dtype {acts.dtype}; use one of {list(DTYPE_CODES)}")
    pid = msg.producer_id.encode()
    if not 0 < len(pid) < 256:
        raise ValueError("producer id must be 1..255 bytes of UTF-8")
    n, d = acts.shape
    flags = 0
    parts = [b"", pid, b"\0" * _pad8(HEADER_SIZE + len(pid))]
    if msg.token_ids is not None:
        if msg.token_ids.shape != (n,):
            raise ValueError(f"token_ids must have shape ({n},), got {tuple(msg.token_ids.shape)}")
        ids = msg.token_ids.to(torch.int32).contiguous().numpy().tobytes()
        parts += [ids, b"\0" * _pad8(len(ids))]
        flags |= FLAG_TOKEN_IDS
    parts[0] = _HEADER.pack(MAGIC, VERSION, DTYPE_CODES[acts.dtype], flags, len(pid), n, d, msg.site_id, msg.seq)
    payload = acts.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return b"".join(parts) + payload


def message_size(n_tokens: int, d_model: int, dtype: torch.dtype, producer_id: str, token_ids: bool) -> int:
    """Bytes of an encoded message: lets the producer split windows to stay under the broker's message limit."""
    p = len(producer_id.encode())
    head = HEADER_SIZE + p + _pad8(HEADER_SIZE + p)
    ids = 4 * n_tokens + _pad8(4 * n_tokens) if token_ids else 0
    return head + ids + n_tokens * d_model * dtype.itemsize


def decode(data: bytes | bytearray | memoryview, *, check_finite: bool = True) -> ActivationMessage:
    """Parse and validate one message without copying the payload; raises a ``WireError`` subclass."""
    buf = memoryview(data).cast("B")
    if len(buf) < HEADER_SIZE:
        raise Truncated(f"message of {len(buf)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, code, flags, pid_len, n, d, site, seq = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise BadMagic(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedVersion(f"wire version {version} is not supported (this reader knows {VERSION})")
    if code not in CODE_DTYPES:
        raise BadDType(f"unknown dtype code {code}")
    if pid_len == 0 or n == 0 or d == 0:
        raise SizeMismatch(f"empty field: producer id length {pid_len}, n_tokens {n}, d_model {d}")
    dtype = CODE_DTYPES[code]
    pos = HEADER_SIZE + pid_len + _pad8(HEADER_SIZE + pid_len)
    ids_at = pos
    if flags & FLAG_TOKEN_IDS:
        pos += 4 * n + _pad8(4 * n)
    expected = pos + n * d * dtype.itemsize
    if len(buf) < expected:
        raise Truncated(f"message has {len(buf)} bytes, header implies {expected}")
    if len(buf) != expected:
        raise SizeMismatch(f"message has {len(buf)} bytes, header implies {expected}")
    try:
        producer_id = bytes(buf[HEADER_SIZE : HEADER_SIZE + pid_len]).decode()
    except UnicodeDecodeError as e:
        raise WireError(f"producer id is not UTF-8: {e}") from None
    acts = _frombuffer(buf, dtype=dtype, count=n * d, offset=pos).view(n, d)
    # One sum finds any NaN or inf (they carry through, and no finite payload can overflow the accumulator):
    # several times faster than isfinite().all(), half of the ingestion thread's time otherwise.
    acc = torch.float32 if dtype == torch.float16 else torch.float64
    if check_finite and not math.isfinite(float(acts.sum(dtype=acc))):
        raise NonFinite(f"message {producer_id}#{seq} holds non-finite activations")
    token_ids = _frombuffer(buf, dtype=torch.int32, count=n, offset=ids_at) if flags & FLAG_TOKEN_IDS else None
    return ActivationMessage(producer_id=producer_id, seq=seq, site_id=site, acts=acts, token_ids=token_ids)
