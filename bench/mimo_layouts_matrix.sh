#!/usr/bin/env bash
# The 4-GPU MIMO layouts matrix (docs/benchmarks.md): every layout family (`--layouts all`: homogeneous,
# colocated heterogeneous, non-colocated) at equal global batch in three regimes, with the ~1.2B and the 8B
# LLM, plus the vision module alone eager vs compiled. One torchrun per run; its summary JSON goes to
# OUT/<run>.json and its log to OUT/<run>.log. A run that fails or passes LIMIT seconds is reported and the
# matrix goes on.
# Usage: bash bench/mimo_layouts_matrix.sh OUT [RUN ...]   RUN = REGIME:LLM (default: all of them, in order)
#   REGIME: images32 (32 rows x 1 image + 128 text tokens), multi_image (2 rows x 8 images),
#           text_heavy (32 rows x 1 image + 2048 text tokens), encoder_only (multi_image, vision alone)
#   LLM: 1b | 8b.   NPROC=4 ranks; TINY=1: tiny models on CPU (gloo), a smoke test of the matrix itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/mimo_layouts_matrix.sh OUT [REGIME:LLM ...]}
shift
mkdir -p "$OUT"
PY=${PY:-python3}
NPROC=${NPROC:-4}
LIMIT=${LIMIT:-1200}
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(images32:1b multi_image:1b text_heavy:1b encoder_only:1b
                               images32:8b multi_image:8b text_heavy:8b)
declare -A REGIME=(
  [images32]="--layouts all"
  [multi_image]="--layouts all --rows 2 --images-per-row 8"
  [text_heavy]="--layouts all --text-tokens 2048 --warmup 1 --steps 3"
  [encoder_only]="--rows 2 --images-per-row 8 --encoder-only --compile both"
)
status=0
for run in "${RUNS[@]}"; do
  regime=${run%%:*} llm=${run##*:}
  if [ -z "${REGIME[$regime]:-}" ] || { [ "$llm" != 1b ] && [ "$llm" != 8b ]; }; then
    echo "unknown run '$run': REGIME:LLM with REGIME in ${!REGIME[*]} and LLM 1b or 8b" >&2
    exit 2
  fi
  echo "=== $run"
  # shellcheck disable=SC2086  # the regime is a list of flags
  timeout "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" bench/mimo_layouts.py \
    ${REGIME[$regime]} --llm "$llm" ${TINY:+--tiny} > "$OUT/$run.log" 2>&1
  rc=$?
  grep -a '^\[mimo_layouts\]' "$OUT/$run.log" | cut -c1-240
  if [ $rc -ne 0 ]; then
    echo "$run: exit $rc (log: $OUT/$run.log)"
    status=1
    continue
  fi
  grep -a '^{' "$OUT/$run.log" | tail -1 > "$OUT/$run.json"
  "$PY" - "$OUT/$run.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
keys = [k for k in s if k.startswith(("best_", "speedup_"))] + ["first_loss_spread", "wall_s"]
print("  " + ", ".join(f"{k}={s[k]}" for k in keys if k in s))
PY
done
exit $status
