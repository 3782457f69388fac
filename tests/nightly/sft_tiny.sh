#!/usr/bin/env bash
# Nightly end-to-end SFT: train the tiny recipe, gate on its metrics, and check that the
# Hugging Face export loads with plain transformers (no automodel_mimo code on the load path).
# Usage: tests/nightly/sft_tiny.sh [key=value override ...]
#   OUT=dir  output directory (relative paths are from the repo root; removed before the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/nightly/common.sh
nightly_start sft_tiny
.venv/bin/automodel-mimo sft output_dir="$OUT" "$@"
.venv/bin/python -m automodel_mimo.metrics.check "$OUT/metrics.jsonl" \
  "loss@last < 0.1" "eval/accuracy@last >= 0.95"
hf_export_loads "$OUT/hf"
echo "[nightly] sft_tiny passed"
