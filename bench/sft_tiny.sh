#!/usr/bin/env bash
# Wall time and accuracy curve of the embedded default (README's run command), for docs/benchmarks.md.
# Usage: bench/sft_tiny.sh [override ...]   (run on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench/sft_tiny}
source bench/timed_run.sh
timed_run sft "launch to exit, incl. start-up, eval and export" "$@"
.venv/bin/python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = {r["step"]: r for r in rows if "loss" in r}
print("| step | loss | eval/accuracy | elapsed_s |\n|---|---|---|---|")
for r in rows:
    if "eval/accuracy" in r:
        t = train[r["step"]]
        print(f"| {r['step']} | {t['loss']:.4f} | {r['eval/accuracy']:.3f} | {t['elapsed_s']:.0f} |")
tps = sorted(t["tokens_per_s"] for t in train.values())
print(f"median tokens/s: {tps[len(tps) // 2]:.0f}")
PY
