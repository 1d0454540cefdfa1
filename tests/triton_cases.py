"""The Triton decoder's cases (``streamd.sae.triton_decoder``), run by ``test_triton_decoder.py``: in Triton's
interpreter on the CPU (a subprocess with ``TRITON_INTERPRET=1``, which must be set before triton is imported) and,
on a CUDA host, compiled on the GPU. Not collected by itself: without the interpreter, kernels need a GPU."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from streamd.sae import triton_decoder
from streamd.sae.sparse import TorchOps, batch_topk_codes, topk_codes
from tests.test_sparse_step import AUX_K, D_SAE, dead, inputs, perturbed

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
D = 200  # two blocks of BLOCK_D, the second partial


def codes(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR codes of 40 tokens: TopK's k per row, or BatchTopK's varying count, one row empty."""
    pre = torch.randn(40, D_SAE, generator=torch.Generator().manual_seed(5))
    pre[3] -= 100.0  # BatchTopK keeps nothing of this token
    crow, col, val = topk_codes(pre, 6) if kind == "topk" else batch_topk_codes(pre, 6)
    if kind == "batchtopk":
        counts = (crow[1:] - crow[:-1]).tolist()
        assert counts[3] == 0 and len(set(counts)) > 2
    return crow.to(DEVICE), col.to(DEVICE), val.relu().to(DEVICE)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_kernels_equal_torch_sparse_products(kind):
    crow, col, val = codes(kind)
    w_dec, g, xc = rand(D_SAE, D, seed=1), rand(40, D, seed=2), rand(40, D, seed=3)
    torch.testing.assert_close(triton_decoder.decode(crow, col, val, w_dec), TorchOps.decode(crow, col, val, w_dec))
    g_lat = triton_decoder.dots(crow, col, g, w_dec)
    torch.testing.assert_close(g_lat, TorchOps.dots(crow, col, g, w_dec))
    pairs = [(val, g), (g_lat, xc)]  # the W_dec and the W_enc gradient
    for got, want in zip(triton_decoder.scatter(crow, col, pairs, D_SAE), TorchOps.scatter(crow, col, pairs, D_SAE)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_step_on_the_kernels_equals_the_dense_path(arch):
    dense = perturbed(arch).to(DEVICE)
    fast = copy.deepcopy(dense)
    fast.sparse_ops = triton_decoder
    x, mask = inputs(32, 1).to(DEVICE), dead(AUX_K // 2, 2).to(DEVICE)  # AuxK on, fewer dead than aux_k
    ref, out = dense.loss(x, 1.0, mask), fast.sparse_loss(x, 1.0, mask)
    for name in ("mse", "auxk"):
        torch.testing.assert_close(out.terms[name], ref.terms[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    for (name, p_dense), p_fast in zip(dense.named_parameters(), fast.parameters()):
        assert p_fast.grad.stride() == p_dense.stride(), name  # fused Adam reads a gradient in its param's layout
        torch.testing.assert_close(p_fast.grad, p_dense.grad, rtol=1e-4, atol=1e-5, msg=name)
