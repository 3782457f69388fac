#!/usr/bin/env bash
# The embedded default under dp2 and tp2 (2 ranks each), side by side in one run: wall time inside the
# training loop, median tokens/s and the eval curve. Used on the GPU machines (NCCL) for docs/benchmarks.md.
# Usage: OUT=dir bench/sft_tiny_layouts.sh [override ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench/sft_tiny_layouts}
PY=${PY:-python3}
for layout in tp=1 tp=2; do
  dir="$OUT/$layout"
  rm -rf -- "${dir:?}"
  echo "=== parallel.$layout"
  "$PY" -m automodel_mimo.cli sft launch.nproc=2 "parallel.$layout" logging.tensorboard=false \
    logging.progress=false output_dir="$dir" "$@" 2>&1 | grep '^\[sft\]'
  "$PY" -m automodel_mimo.metrics_check "$dir/metrics.jsonl" "loss@last < 0.1" "eval/accuracy@last >= 0.95"
  "$PY" - "$dir/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if "loss" in r]
tps = sorted(r["tokens_per_s"] for r in train)
print(f"loop time {train[-1]['elapsed_s']:.1f} s, median tokens/s {tps[len(tps) // 2]:.0f}")
print("eval/accuracy by step:", [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r])
PY
done
