#!/usr/bin/env bash
# Nightly end-to-end SFT: train the tiny recipe, gate on its metrics, and check that the
# Hugging Face export loads with plain transformers (no automodel_mimo code on the load path).
# Usage: tests/nightly/sft_tiny.sh [key=value override ...]
#   OUT=dir  output directory (relative paths are from the repo root; removed before the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/nightly/sft_tiny}
rm -rf -- "${OUT:?}"  # stale metrics from an earlier night must never be what gets checked

bash scripts/setup.sh
.venv/bin/automodel-mimo sft output_dir="$OUT" "$@"
.venv/bin/python -m automodel_mimo.metrics_check "$OUT/metrics.jsonl" \
  "loss@last < 0.1" "eval/accuracy@last >= 0.95"
.venv/bin/python -c 'import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1]); print("[nightly] HF export loads:", sys.argv[1])' "$OUT/hf"
echo "[nightly] sft_tiny passed"
