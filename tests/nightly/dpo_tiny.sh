#!/usr/bin/env bash
# Nightly end-to-end DPO: the embedded recipe (SFT warm-up, then DPO against the warmed-up reference),
# gated on its held-out preference accuracy, and a check that the Hugging Face export loads with plain
# transformers. Usage: tests/nightly/dpo_tiny.sh [key=value override ...]
#   OUT=dir  output directory (relative paths are from the repo root; removed before the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/nightly/common.sh
nightly_start dpo_tiny
.venv/bin/automodel-mimo dpo output_dir="$OUT" "$@"
.venv/bin/python -m automodel_mimo.metrics.check "$OUT/metrics.jsonl" \
  "eval/preference_accuracy@last >= 0.9" "eval/reward_margin@last > 0" "eval/loss@last < 0.5"
hf_export_loads "$OUT/hf"
echo "[nightly] dpo_tiny passed"
