"""The sparse TopK-family training step: one dense encoder matmul, everything after it on the selected latents.

A TopK (or BatchTopK) SAE keeps ``k`` of ``d_sae`` latents per token, yet a dense autograd step multiplies by all of
them four more times (the decoder forward, and the decoder, latent and encoder gradients). Here the selection is a
CSR matrix of codes ``[B, d_sae]`` (``k`` entries per row for TopK, a varying number for BatchTopK) and:

- decoder forward: ``codes @ W_dec`` (a gather-sum of ``N = B*k`` decoder rows);
- latent gradient: the dot products of the output gradient with the selected rows only (``sampled_addmm``);
- ``W_dec`` gradient: ``codesᵀ @ g_xhat``; ``W_enc`` gradient: ``g_preᵀ @ (x - b_dec)``, both sparse-dense products
  that touch only the active latents' rows and columns;
- ``b_enc``: the latent gradients summed per latent; ``b_dec``: the decoder's share (the output gradient summed
  over the batch) minus ``W_enc @ g_b_enc``, because the encoder subtracts ``b_dec``: no per-token input gradient.

AuxK (Gao et al.) runs the same way on the ``aux_k`` largest pre-activations of dead latents, without ReLU, against
the main model's residual. The whole loss is one ``autograd.Function`` with a hand-written backward, so the learner's
``loss.backward()``, gradient projection, clipping and Adam are the same for the dense and the sparse step, and a
test checks that both give the same gradients.

The three decoder products (decode, latent dots, transposed scatter) are :class:`TorchOps` (torch's CSR kernels) or,
on CUDA, the Triton kernels of :mod:`streamd.sae.triton_decoder` (``trainer.triton_decoder``). The dense front
before them, :func:`select`, can run through ``torch.compile`` (``trainer.compile``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from streamd.torch_utils import CompiledOrEager, QuietOnce


def topk_codes(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(crow [B+1], col [B*k], raw value [B*k]) of each token's ``k`` largest pre-activations (before ReLU)."""
    b = pre.shape[0]
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    crow = torch.arange(0, b * k + 1, k, device=pre.device)
    return crow, idx.flatten(), vals.flatten()


def batch_topk_codes(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k * B`` largest ReLU'd activations of the whole batch, as CSR rows (a token keeps a varying number)."""
    b, f = pre.shape
    flat = pre.relu().flatten()
    vals, idx = flat.topk(min(k * b, flat.numel()), sorted=False)
    idx, order = idx.sort()  # row-major: sorting the flat index groups the entries by token
    rows = idx.div(f, rounding_mode="floor")
    crow = torch.zeros(b + 1, dtype=torch.int64, device=pre.device)
    crow[1:] = torch.bincount(rows, minlength=b).cumsum(0)
    return crow, idx - rows * f, vals[order]


_sparse_csr = QuietOnce(torch.sparse_csr_tensor, "Sparse CSR tensor support is in beta state")  # CSR mm is stable


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
    return _sparse_csr(crow, col, val, shape, check_invariants=False)


def _transposed(crow: Tensor, col: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """The CSR pattern of the transpose ``[n_cols, B]`` and the permutation that carries values over to it.

    Sorted once per pattern, shared by the ``W_dec`` and ``W_enc`` gradients (torch would sort again for each
    product with a transposed CSR)."""
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=col.device), counts)
    col_sorted, perm = col.sort()
    t_crow = torch.zeros(n_cols + 1, dtype=torch.int64, device=col.device)
    t_crow[1:] = torch.bincount(col_sorted, minlength=n_cols).cumsum(0)
    return t_crow, rows[perm], perm


def _sampled_dots(crow: Tensor, col: Tensor, g: Tensor, w_dec: Tensor) -> Tensor:
    """For every stored (token b, latent j): ``g[b] · w_dec[j]``, without forming ``g @ w_decᵀ``."""
    mask = _csr(crow, col, torch.zeros(col.shape[0], dtype=g.dtype, device=g.device), (g.shape[0], w_dec.shape[0]))
    return torch.sparse.sampled_addmm(mask, g, w_dec.T, beta=0.0).values()


class TorchOps:
    """The decoder products on CSR codes with torch's sparse kernels, on any device (the Triton ones:
    :mod:`streamd.sae.triton_decoder`, with the same signatures)."""

    @staticmethod
    def decode(crow: Tensor, col: Tensor, val: Tensor, w_dec: Tensor) -> Tensor:
        """``codes @ W_dec``: a gather-sum of each token's selected rows."""
        return torch.sparse.mm(_csr(crow, col, val, (crow.shape[0] - 1, w_dec.shape[0])), w_dec)

    dots = staticmethod(_sampled_dots)

    @staticmethod
    def scatter(crow: Tensor, col: Tensor, pairs: list[tuple[Tensor, Tensor]], n_latents: int) -> list[Tensor]:
        """``codesᵀ @ rows`` for each ``(values, rows)`` pair on the same pattern, sorted once."""
        t_crow, t_col, perm = _transposed(crow, col, n_latents)
        return [torch.sparse.mm(_csr(t_crow, t_col, v[perm], (n_latents, rows.shape[0])), rows) for v, rows in pairs]


def decoder_ops(setting: str, device: torch.device) -> Any:
    """``trainer.triton_decoder`` on ``device``: the Triton kernels (``auto``: on CUDA where triton imports; ``on``:
    required, else a ValueError naming what is missing) or :class:`TorchOps`."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return TorchOps
    if device.type != "cuda":
        raise ValueError(f"trainer.triton_decoder: on needs a CUDA device (trainer.device is {device}); use auto "
                         "or off")
    try:
        from streamd.sae import triton_decoder
    except ImportError as e:
        if setting == "on":
            raise ValueError(f"trainer.triton_decoder: on, but triton does not import ({e}); install triton or "
                             "use auto or off") from None
        return TorchOps
    return triton_decoder


def select(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
           batch_topk: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x - b_dec, pre-activations, CSR codes): the dense front of the step, and the part ``torch.compile`` can take
    (creating the sparse tensor after it breaks a compiled graph)."""
    xc = x - b_dec
    pre = torch.addmm(b_enc, xc, w_enc)  # as base.pre_activations: the dense path's selection, bit for bit
    return xc, pre, *(batch_topk_codes if batch_topk else topk_codes)(pre, min(k, w_enc.shape[1]))


compiled_select = CompiledOrEager(select, "the sparse step's encoder and selection")  # trainer.compile


class SparseTopKLoss(torch.autograd.Function):
    """Loss of a TopK / BatchTopK SAE on ``x`` with AuxK; returns ``(loss, mse, auxk, x_hat, fires, l0, kept)``.

    ``fires`` [d_sae] counts the tokens each latent fired on, ``l0`` is the mean active latents per token and
    ``kept`` the ReLU'd selected values (BatchTopK's threshold estimate reads it); only ``loss``, ``mse`` and
    ``auxk`` carry gradients. ``dead_mask`` is None or a bool [d_sae]; ``aux_scale`` is a 0-d tensor (AuxK's
    down-weighting when fewer than ``aux_k`` latents are dead), so no value has to come back to the host.
    ``compile_select``: :func:`select` runs compiled (``trainer.compile``); ``ops``: the decoder products,
    :class:`TorchOps` or the Triton kernels (:func:`decoder_ops`).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor,
                dead_mask: Tensor | None, k: int, batch_topk: bool, aux_k: int, aux_coefficient: float,
                aux_scale: Tensor, compile_select: bool = False, ops: Any = TorchOps) -> tuple[Tensor, ...]:
        b, f = x.shape[0], w_dec.shape[0]
        xc, pre, crow, col, raw = (compiled_select if compile_select else select)(x, w_enc, b_enc, b_dec, k,
                                                                                  batch_topk)
        val = raw.relu()
        x_hat = ops.decode(crow, col, val, w_dec) + b_dec
        err = x_hat - x
        mse = err.pow(2).sum() / b
        live = val > 0
        fires = torch.bincount(col, weights=live.to(x.dtype), minlength=f)
        l0 = live.sum().to(x.dtype) / b
        aux = None
        auxk = x.new_zeros(())
        if dead_mask is not None and dead_mask.device.type == "cpu":
            aux_k = min(aux_k, int(dead_mask.sum()))  # free on the CPU; on a GPU it would wait for the step
        if dead_mask is not None and aux_k > 0:
            a_vals, a_idx = pre.masked_fill(~dead_mask, float("-inf")).topk(min(aux_k, f), dim=-1, sorted=False)
            valid = torch.isfinite(a_vals)  # fewer dead latents than aux_k: the rest are padding
            a_vals = torch.where(valid, a_vals, 0.0)
            a_crow = torch.arange(0, a_idx.numel() + 1, a_idx.shape[1], device=x.device)
            a_col, a_val = a_idx.flatten(), a_vals.flatten()
            aux_err = ops.decode(a_crow, a_col, a_val, w_dec) + err  # residual = -err
            auxk = aux_scale * aux_err.pow(2).sum() / b
            aux = (a_crow, a_col, a_val, valid.flatten(), aux_err)
        ctx.aux_coefficient, ctx.ops = aux_coefficient, ops
        ctx.aux = aux
        ctx.codes = (crow, col, val, raw > 0)
        ctx.save_for_backward(xc, w_enc, w_dec, err, aux_scale)
        ctx.mark_non_differentiable(x_hat, fires, l0, val)
        return mse + aux_coefficient * auxk, mse, auxk, x_hat, fires, l0, val

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor, g_mse: Tensor, g_auxk: Tensor, *_unused: Tensor) -> tuple:
        xc, w_enc, w_dec, err, aux_scale = ctx.saved_tensors
        crow, col, val, passes = ctx.codes
        b, f = xc.shape[0], w_dec.shape[0]
        g_rec = 2.0 * (g_loss + g_mse) / b * err  # d loss / d x_hat
        # (pattern, values for the W_dec gradient, gradient at the output, latent gradient)
        ops = ctx.ops
        parts = [(crow, col, val, g_rec, ops.dots(crow, col, g_rec, w_dec) * passes)]  # through the ReLU
        if ctx.aux is not None:
            a_crow, a_col, a_val, valid, aux_err = ctx.aux
            g_aux = 2.0 * (g_loss * ctx.aux_coefficient + g_auxk) * aux_scale / b * aux_err
            parts.append((a_crow, a_col, a_val, g_aux, ops.dots(a_crow, a_col, g_aux, w_dec) * valid))  # no ReLU
        g_w_dec = g_w_enc_t = g_b_enc = 0
        for cr, co, v, g_out, g_lat in parts:
            g_dec, g_enc_t = ops.scatter(cr, co, [(v, g_out), (g_lat, xc)], f)
            g_w_dec, g_w_enc_t = g_w_dec + g_dec, g_w_enc_t + g_enc_t
            g_b_enc = g_b_enc + torch.bincount(co, weights=g_lat, minlength=f)
        g_b_dec = g_rec.sum(0) - w_enc @ g_b_enc
        return None, g_w_enc_t.T, g_b_enc, g_w_dec, g_b_dec, None, None, None, None, None, None, None, None
