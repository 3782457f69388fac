#!/usr/bin/env bash
# Nightly: the unit tests marked slow (long oracle variants, e.g. every compiled layout; CI runs the others).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
.venv/bin/python -m pytest tests/unit -q -m slow --durations=15
