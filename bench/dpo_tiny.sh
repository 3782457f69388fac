#!/usr/bin/env bash
# Wall time and held-out preference accuracy of the embedded DPO default (`automodel-mimo dpo`), for
# docs/benchmarks.md. Usage: bench/dpo_tiny.sh [override ...]   (run on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench/dpo_tiny}
source bench/timed_run.sh
timed_run dpo "launch to exit, incl. start-up, SFT warm-up, evals and export" "$@"
.venv/bin/python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = {r["step"]: r for r in rows if "loss" in r}
print("| DPO step | loss | reward_margin | eval/preference_accuracy | eval/reward_margin | elapsed_s (DPO loop) |\n|---|---|---|---|---|---|")
for r in rows:
    if "eval/preference_accuracy" in r:
        t = train[r["step"]]
        print(f"| {r['step']} | {t['loss']:.4f} | {t['reward_margin']:.2f} | {r['eval/preference_accuracy']:.3f} | "
              f"{r['eval/reward_margin']:.2f} | {t['elapsed_s']:.0f} |")
PY
