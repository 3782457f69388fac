#!/usr/bin/env bash
# Nightly end-to-end GRPO: the embedded recipe (a deliberately under-trained SFT start made by the command,
# then GRPO with the vLLM engine colocated on rank 0), gated on the held-out greedy accuracy it gains, on
# trainer/generator logprob parity at every step, and on its wall time; plus a check that the Hugging Face
# export loads with plain transformers. Usage: tests/nightly/grpo_tiny.sh [key=value override ...]
#   OUT=dir           output directory (relative paths are from the repo root; removed before the run)
#   WALL_LIMIT_S=900  fail when the command takes longer (the recipe's promise: 15 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
WALL_LIMIT_S=${WALL_LIMIT_S:-900}
source tests/nightly/common.sh
nightly_start grpo_tiny
start=$SECONDS
.venv/bin/automodel-mimo grpo output_dir="$OUT" "$@"
wall=$((SECONDS - start))
echo "[nightly] grpo_tiny wall time: ${wall}s (limit ${WALL_LIMIT_S}s)"
.venv/bin/python -m automodel_mimo.metrics.check "$OUT/metrics.jsonl" \
  "eval/accuracy_gain@last >= 0.15" "gen_kl_error@max < 1e-5" "ratio_min@min > 0.999999" "ratio_max@max < 1.000001"
hf_export_loads "$OUT/hf"
if (( wall > WALL_LIMIT_S )); then echo "[nightly] grpo_tiny took ${wall}s > ${WALL_LIMIT_S}s"; exit 1; fi
echo "[nightly] grpo_tiny passed"
