"""Device settings are resolved once, at the edge, with errors that name the setting (checked on a CPU host: no
CUDA path has to run for these to fail when they are wrong)."""

from __future__ import annotations

import os

import pytest
import torch

from streamd.config import StreamdConfig
from streamd.produce.producer import ActivationProducer
from streamd.run.lock import RunLock
from streamd.torch_utils import resolve_device, resolve_dtype, to_cpu
from streamd.train.buffer import ShuffleBuffer
from streamd.train.trainer import Trainer
from tests.streamd_testing import trainer_config
from tests.test_pipeline import _corpus, _producer_cfg

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")


def test_auto_is_cuda_only_where_there_is_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        resolve_device("gpu0")


@needs_no_cuda
def test_cuda_on_a_host_without_it_fails_at_start_naming_the_value(kafka_cfg, tmp_path):
    with pytest.raises(ValueError, match="device 'cuda:1': this host has no usable CUDA"):
        resolve_device("cuda:1")
    cfg = trainer_config(kafka_cfg, tmp_path / "run", device="cuda")
    with pytest.raises(ValueError, match="device 'cuda'"):
        Trainer(cfg)  # before any thread or copy
    RunLock(tmp_path / "run").release()  # and the failed start released the run's lock


def test_triton_decoder_on_without_cuda_fails_at_start(kafka_cfg, tmp_path):
    cfg = trainer_config(kafka_cfg, tmp_path / "run", triton_decoder="on")
    with pytest.raises(ValueError, match=r"trainer.triton_decoder: on needs a CUDA device \(trainer.device is cpu\)"):
        Trainer(cfg)
    RunLock(tmp_path / "run").release()


def test_producer_device_auto_loads_the_model(kafka_cfg, tiny_llama_dir, tmp_path):
    cfg: StreamdConfig = _producer_cfg(kafka_cfg, tiny_llama_dir, _corpus(tmp_path / "c.txt"), "auto", device="auto")
    prod = ActivationProducer(cfg)
    assert prod.device == resolve_device("auto")
    assert next(prod.loaded.model.parameters()).device.type == prod.device.type


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_auto_dtype_is_bfloat16_only_on_a_cpu_that_computes_it(kafka_cfg, tiny_llama_dir, tmp_path):
    """``producer.dtype: auto`` (what ``streamd up`` runs) is bf16 only where the CPU has AVX512-BF16 or AMX, as the
    kernel reports them: elsewhere torch emulates bf16 matmuls, ~40x slower than float32 on an AVX2 EPYC."""
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("float16", "cpu") == torch.float16
    cfg = _producer_cfg(kafka_cfg, tiny_llama_dir, _corpus(tmp_path / "c.txt"), "auto", dtype="auto")
    assert next(ActivationProducer(cfg).loaded.model.parameters()).dtype == resolve_dtype("auto", "cpu")
    with pytest.raises(ValueError, match="wire_dtype"):
        StreamdConfig.model_validate({"producer": {"wire_dtype": "auto"}})


def test_buffer_keeps_its_state_and_generator_on_its_device():
    buf = ShuffleBuffer(64, 4, 16, max_age=640, generator=torch.Generator().manual_seed(3))
    for t in (buf.data, buf.source, buf.offset, buf.arrival, buf._free):
        assert t.device == buf.device
    assert buf._gen.device == buf.device and buf._gen.initial_seed() == 3
    buf.add(torch.ones(64, 4, dtype=torch.float16), source=0, offset=5)  # fp16 in, the buffer's dtype stored
    assert buf.data.dtype == torch.float32 and float(buf.sample().sum()) == 16 * 4
    buf.rng_state = torch.zeros(3, dtype=torch.uint8)  # a state saved on another kind of device: drawn afresh
    assert buf.full is False


def test_saved_state_is_on_the_cpu():
    nested = {"a": torch.ones(2, requires_grad=True), "b": [torch.zeros(1), (torch.ones(1), 3)], "c": "x"}
    out = to_cpu(nested)
    assert out["a"].device.type == "cpu" and not out["a"].requires_grad
    assert isinstance(out["b"][1], tuple) and out["b"][1][1] == 3 and out["c"] == "x"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_trainer_trains_from_a_file_and_saves_cpu_state(tmp_path, kafka_cfg):
    """The whole trainer on CUDA: pinned chunks, the buffer on the device, the sparse step, a checkpoint that loads
    on a CPU-only host."""
    import numpy as np

    from streamd.run.checkpoints import CheckpointStore

    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((6000, 16)).astype(np.float16))
    cfg = trainer_config(kafka_cfg, tmp_path / "run", device="cuda", every_tokens=None)
    t = Trainer(cfg, activation_file=path)
    assert t.run() > 0 and t.buffer.data.device.type == "cuda"
    latest = CheckpointStore(tmp_path / "run", writer=False).latest()
    state = CheckpointStore.read_trainer_state(latest, map_location=None)  # each tensor where it was saved from
    assert all(v.device.type == "cpu" for v in state["learners"]["t"]["sae"].values())
