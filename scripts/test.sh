#!/usr/bin/env bash
# The project's test command (README, CI's .ci/run): set up, lint, the unit tests, then the embedded defaults
# end to end, each gated on the result the README promises (tests/nightly/*.sh). Fails on the first failure.
#   bash scripts/test.sh           everything (47 min on 2 CPU cores after the set-up, 2026-12-01)
#   bash scripts/test.sh --unit    set-up, lint and unit tests only
set -euo pipefail
cd "$(dirname "$0")/.."
began=$SECONDS
stage() { echo "[test] $1 ($(( (SECONDS - began) / 60 ))m$(( (SECONDS - began) % 60 ))s so far)"; }
bash scripts/setup.sh
stage "lint"
.venv/bin/ruff check automodel_mimo policies tests bench
stage "unit tests"
.venv/bin/python -m pytest tests/unit -q -m "not slow" --durations=15  # slow ones: tests/nightly/unit_slow.sh
[ "${1:-}" = "--unit" ] && { stage "done (unit only)"; exit 0; }
# MIMO: the default's first 600 steps (the whole default, ~10 more minutes, is tests/nightly/mimo_sft_tiny.sh)
for gate in sft_tiny dpo_tiny grpo_tiny mimo_sft_tiny_short; do
  stage "recipe gate $gate"
  bash "tests/nightly/$gate.sh"
done
stage "all passed"
