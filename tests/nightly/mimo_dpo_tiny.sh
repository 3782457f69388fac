#!/usr/bin/env bash
# Nightly end-to-end MIMO DPO: the embedded MIMO DPO default (configs/mimo_dpo_tiny.yaml: SFT warm-up of the tiny
# SigLIP-like tower + projector + Llama on synthetic:shapes, then DPO on (right, wrong) answer pairs that share the
# image, against the warmed-up reference; vision dp2 + language tp2 on 2 ranks), gated on its held-out preference
# accuracy, and a check that the exports load with plain transformers.
# Usage: tests/nightly/mimo_dpo_tiny.sh [key=value override ...]
#   OUT=dir  output directory (relative paths are from the repo root; removed before the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/nightly/common.sh
nightly_start mimo_dpo_tiny
.venv/bin/automodel-mimo dpo --config configs/mimo_dpo_tiny.yaml output_dir="$OUT" "$@"
.venv/bin/python -m automodel_mimo.metrics.check "$OUT/metrics.jsonl" \
  "eval/preference_accuracy@last >= 0.9" "eval/reward_margin@last > 0" "eval/loss@last < 0.5"
hf_export_loads "$OUT/hf/language"
llava_export_loads "$OUT/hf"
echo "[nightly] mimo_dpo_tiny passed"
