"""The optional Triton decoder (``trainer.triton_decoder``): its kernels and the sparse step on them equal torch's
sparse products and the dense path (``tests/triton_cases.py``, in Triton's interpreter here; on a CUDA host also on
the GPU), and the setting resolves at start with errors that name what is missing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamd.config import SAEConfig, TrainerConfig
from streamd.sae.sparse import TorchOps, decoder_ops
from streamd.train.learner import Learner

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install -e '.[dev]')")


@needs_triton
def test_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/triton_cases.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "4 passed" in run.stdout


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")
def test_kernels_on_the_gpu():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/triton_cases.py"],
                         cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@needs_triton
@pytest.mark.parametrize("values", ["fp32", "bf16"])  # bf16: the codes' values under trainer.autocast_bf16
def test_kernels_compile_for_a_gpu(values):
    """Without a GPU: every kernel through Triton's real compiler to an sm_90 cubin (ptxas ships in the wheel), what
    the interpreter does not exercise (types of the loop-carried values, masks, atomics)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from streamd.sae import triton_decoder

    kinds = {"crow": "*i64", "col": "*i64", "out": "*fp32"}
    for kernel in (triton_decoder._decode_kernel, triton_decoder._dots_kernel, triton_decoder._scatter_kernel):
        signature = {n: "constexpr" if n in ("D", "BLOCK") else kinds.get(n, f"*{values}") for n in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature, constexprs={"D": 576, "BLOCK": triton_decoder.BLOCK_D})
        assert compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"], kernel.__name__


def test_the_setting_resolves_per_device():
    cpu = torch.device("cpu")
    assert decoder_ops("auto", cpu) is TorchOps and decoder_ops("off", torch.device("cuda")) is TorchOps
    with pytest.raises(ValueError, match=r"triton_decoder: on needs a CUDA device \(trainer.device is cpu\)"):
        decoder_ops("on", cpu)
    t = TrainerConfig(batch_size=64, buffer_tokens=1024, device="cpu", triton_decoder="on")
    with pytest.raises(ValueError, match="triton_decoder: on needs a CUDA device"):
        Learner(SAEConfig(name="t", architecture="topk", d_sae=64, k=4), 16, t)
    with pytest.raises(ValueError, match="triton_decoder"):
        TrainerConfig(triton_decoder="yes")
