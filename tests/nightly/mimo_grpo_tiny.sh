#!/usr/bin/env bash
# Nightly end-to-end MIMO GRPO: the embedded recipe (configs/mimo_grpo_tiny.yaml: the MIMO SFT default's model,
# vision dp2 + language tp2 on 2 ranks; a deliberately under-trained SFT start made by the command, then GRPO on
# synthetic:shapes image prompts with the hf generator serving the run's LLaVA export on rank 0), gated on the
# held-out greedy accuracy it gains, on trainer/generator logprob parity at every step (the generator is refit
# module by module after each step), and on its wall time; plus a check that the LLaVA export loads.
# Usage: tests/nightly/mimo_grpo_tiny.sh [key=value override ...]
#   OUT=dir           output directory (relative paths are from the repo root; removed before the run)
#   WALL_LIMIT_S=900  fail when the command takes longer (the recipe's promise: 15 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
WALL_LIMIT_S=${WALL_LIMIT_S:-900}
source tests/nightly/common.sh
nightly_start mimo_grpo_tiny
start=$SECONDS
.venv/bin/automodel-mimo grpo --config configs/mimo_grpo_tiny.yaml output_dir="$OUT" "$@"
wall=$((SECONDS - start))
echo "[nightly] mimo_grpo_tiny wall time: ${wall}s (limit ${WALL_LIMIT_S}s)"
.venv/bin/python -m automodel_mimo.metrics.check "$OUT/metrics.jsonl" \
  "eval/accuracy_gain@last >= 0.15" "gen_kl_error@max < 1e-5" "ratio_min@min > 0.999999" "ratio_max@max < 1.000001"
llava_export_loads "$OUT/hf"
if (( wall > WALL_LIMIT_S )); then echo "[nightly] mimo_grpo_tiny took ${wall}s > ${WALL_LIMIT_S}s"; exit 1; fi
echo "[nightly] mimo_grpo_tiny passed"
