#!/usr/bin/env bash
# Create .venv and install automodel_mimo into it (editable, with test tools).
# Idempotent: re-running after the first install only re-checks the pinned pieces.
# torch is pinned to the 2.13.0 CPU wheel first, so no resolver ever pulls the CUDA build here;
# on a GPU cluster, install your CUDA torch (>=2.11) into the venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (the grep hides this machine's local-index warnings; pip's own exit status is kept)
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  pip install torch==2.13.0
fi
stamp=.venv/.automodel_mimo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing automodel_mimo and its dependencies"
  pip install -e ".[dev]"
  .venv/bin/python -c "import automodel_mimo, nemo_automodel, transformers, datasets" || { echo "[setup] install failed"; exit 1; }
  touch "$stamp"
fi
echo "[setup] ready: .venv/bin/automodel-mimo"
