"""The sparse step's decoder products as Triton kernels (``trainer.triton_decoder``, CUDA; the tests run them in
Triton's interpreter on the CPU).

The same three products as :class:`streamd.sae.sparse.TorchOps`, on the same CSR codes ``(crow, col, val)``. One
program per (token, block of ``d_in``) walks its token's entries, so TopK's fixed and BatchTopK's varying counts
need no padding, and nothing waits for the host:

- ``decode``: ``x_hat[b] = Σ val[n] · W[col[n]]``, a gather-sum kept in registers (torch's CSR product on CUDA
  goes through cuSPARSE's general SpMM);
- ``dots``: ``out[n] = g[b] · W[col[n]]``, the latent gradients (``sampled_addmm`` without its mask tensor);
- ``scatter``: ``out[col[n]] += coef[n] · rows[b]``, the ``W_dec`` and ``W_enc`` gradients, by atomic adds (no
  transposed pattern to sort first). Atomic adds make the order of a latent's sum vary between runs: equal to float
  tolerance, not bit for bit.

Importing this module imports triton; :func:`streamd.sae.sparse.decoder_ops` decides whether to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_D = 128  # d_in per program: 512 bytes of each decoder row (d_in itself is a compile-time constant too:
# a run has one, and the interpreter cannot loop to a runtime bound)


@triton.jit
def _decode_kernel(crow, col, val, w, out, D: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = d < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n = tl.load(crow + b)
    end = tl.load(crow + b + 1)
    while n < end:  # a while, not range(n, end): Triton's interpreter cannot loop over loaded bounds
        j = tl.load(col + n)
        acc += tl.load(val + n).to(tl.float32) * tl.load(w + j * D + d, mask=in_row, other=0.0).to(tl.float32)
        n += 1
    tl.store(out + b * D + d, acc, mask=in_row)


@triton.jit
def _dots_kernel(crow, col, g, w, out, D: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    n = tl.load(crow + b)
    end = tl.load(crow + b + 1)
    while n < end:
        j = tl.load(col + n)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for d0 in range(0, D, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            in_row = d < D
            acc += (tl.load(g + b * D + d, mask=in_row, other=0.0).to(tl.float32)
                    * tl.load(w + j * D + d, mask=in_row, other=0.0).to(tl.float32))
        tl.store(out + n, tl.sum(acc, axis=0))
        n += 1


@triton.jit
def _scatter_kernel(crow, col, coef, rows, out, D: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = d < D
    r = tl.load(rows + b * D + d, mask=in_row, other=0.0).to(tl.float32)
    n = tl.load(crow + b)
    end = tl.load(crow + b + 1)
    while n < end:
        j = tl.load(col + n)
        tl.atomic_add(out + j * D + d, tl.load(coef + n).to(tl.float32) * r, mask=in_row)
        n += 1


def _grid(b: int, d: int) -> tuple[int, int]:
    return b, triton.cdiv(d, BLOCK_D)


def decode(crow: Tensor, col: Tensor, val: Tensor, w_dec: Tensor) -> Tensor:
    """``[B, d_in]``: each token's selected decoder rows weighted by its values."""
    b, d = crow.shape[0] - 1, w_dec.shape[1]
    out = torch.empty(b, d, dtype=torch.promote_types(val.dtype, w_dec.dtype), device=w_dec.device)
    _decode_kernel[_grid(b, d)](crow, col, val, w_dec.contiguous(), out, d, BLOCK=BLOCK_D)
    return out


def dots(crow: Tensor, col: Tensor, g: Tensor, w_dec: Tensor) -> Tensor:
    """``[N]``: for every stored (token b, latent j), ``g[b] · w_dec[j]``."""
    out = torch.empty(col.shape[0], dtype=torch.promote_types(g.dtype, w_dec.dtype), device=g.device)
    _dots_kernel[(crow.shape[0] - 1,)](crow, col, g.contiguous(), w_dec.contiguous(), out, g.shape[1],
                                       BLOCK=BLOCK_D)
    return out


def scatter(crow: Tensor, col: Tensor, pairs: list[tuple[Tensor, Tensor]], n_latents: int) -> list[Tensor]:
    """For each ``(coef [N], rows [B, d])``: ``[n_latents, d]`` float32 with ``coef[n] · rows[b]`` added to row
    ``col[n]`` (the transposed codes times ``rows``)."""
    outs = []
    for coef, rows in pairs:
        b, d = rows.shape
        out = torch.zeros(n_latents, d, dtype=torch.float32, device=rows.device)
        _scatter_kernel[_grid(b, d)](crow, col, coef.contiguous(), rows.contiguous(), out, d, BLOCK=BLOCK_D)
        outs.append(out)
    return outs
