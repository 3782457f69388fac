#!/usr/bin/env bash
# Nightly end-to-end MIMO SFT: train the embedded MIMO default (configs/mimo_sft_tiny.yaml: tiny SigLIP-like
# tower + projector + tiny Llama on synthetic:shapes, vision dp2 + language tp2 on 2 ranks), gate on its
# held-out accuracy, and check that the exports load with plain transformers.
# Usage: tests/nightly/mimo_sft_tiny.sh [key=value override ...]
#   OUT=dir  output directory (relative paths are from the repo root; removed before the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/nightly/common.sh
nightly_start mimo_sft_tiny
.venv/bin/automodel-mimo sft --config configs/mimo_sft_tiny.yaml output_dir="$OUT" "$@"
.venv/bin/python -m automodel_mimo.metrics.check "$OUT/metrics.jsonl" \
  "loss@last < 0.1" "eval/accuracy@last >= 0.9" "eval/accuracy_image_rows@last >= 0.85"
hf_export_loads "$OUT/hf/language"
llava_export_loads "$OUT/hf"
echo "[nightly] mimo_sft_tiny passed"
