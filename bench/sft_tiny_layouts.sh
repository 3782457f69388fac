#!/usr/bin/env bash
# The embedded default under several 2-rank layouts, side by side in one run: loop time, median tokens/s
# and the eval curve per layout. Used on the GPU machines (NCCL) for docs/benchmarks.md.
# Usage: OUT=dir bench/sft_tiny_layouts.sh [override ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench/sft_tiny_layouts}
PY=${PY:-python3}
LAYOUTS=(
  "parallel.tp=1"
  "parallel.tp=2"
  "parallel.pp=2 parallel.pp_microbatch_size=8"
  "parallel.pp=2 parallel.pp_microbatch_size=8 parallel.pp_schedule=interleaved1f1b"
)
for i in "${!LAYOUTS[@]}"; do
  layout=${LAYOUTS[$i]}
  dir="$OUT/layout$i"
  rm -rf -- "${dir:?}"
  echo "=== $layout"
  # shellcheck disable=SC2086  # the layout is a list of overrides
  "$PY" -m automodel_mimo.cli sft launch.nproc=2 $layout logging.tensorboard=false logging.progress=false \
    checkpoint.export_hf=false output_dir="$dir" "$@" 2>&1 | grep '^\[sft\]'
  "$PY" -m automodel_mimo.metrics.check "$dir/metrics.jsonl" "loss@last < 0.1" "eval/accuracy@last >= 0.95" || true
  "$PY" - "$dir/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if "loss" in r]
tps = sorted(r["tokens_per_s"] for r in train)
print(f"loop time {train[-1]['elapsed_s']:.1f} s, median tokens/s {tps[len(tps) // 2]:.0f}")
print("eval/accuracy by step:", [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r])
PY
done
