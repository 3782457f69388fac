#!/usr/bin/env bash
# Nightly end-to-end MoE SFT (docs/moe.md): the tiny Qwen3-MoE recipe with experts over 2 ranks (ep2), gated on
# its metrics; the Hugging Face export loads with plain transformers.
# Usage: tests/nightly/moe_sft_tiny.sh [key=value override ...]
#   OUT=dir  output directory (relative paths are from the repo root; removed before the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/nightly/common.sh
nightly_start moe_sft_tiny
.venv/bin/automodel-mimo sft --config configs/moe_sft_tiny.yaml output_dir="$OUT" "$@"
.venv/bin/python -m automodel_mimo.metrics.check "$OUT/metrics.jsonl" \
  "loss@last < 0.1" "eval/accuracy@last >= 0.95"
hf_export_loads "$OUT/hf"
echo "[nightly] moe_sft_tiny passed"
