#!/usr/bin/env bash
# Build .venv-saelens: a separate venv with SAELens, used only by tests/test_saelens_compat.py to check that
# streamd checkpoints load with sae_lens.SAE.load_from_disk. Kept apart so SAELens' dependency tree
# (transformer-lens, ...) never constrains streamd's own environment.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
"$py" -m venv "$root/.venv-saelens"
"$root/.venv-saelens/bin/pip" install --upgrade pip
"$root/.venv-saelens/bin/pip" install torch==2.13.0 sae-lens -c "$root/scripts/saelens-constraints.txt"
"$root/.venv-saelens/bin/python" -c "import sae_lens; print('sae_lens', sae_lens.__version__)"
