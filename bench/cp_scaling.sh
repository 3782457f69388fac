#!/usr/bin/env bash
# Sweep of bench/cp_scaling.py: for cp=1 and cp=2 (CPS="1 2"), growing sequence lengths until one does not
# fit. Usage: [CPS="1 2"] [AC=1] bash bench/cp_scaling.sh [lengths...]   (one JSON line per run on stdout;
# AC=1: with activation checkpointing)
set -u
lengths=${*:-16384 32768 65536 98304 131072}
for cp in ${CPS:-1 2}; do
  for L in $lengths; do
    line=$(timeout 300 torchrun --standalone --nproc_per_node="$cp" bench/cp_scaling.py --seq-len "$L" ${TINY:+--tiny} ${AC:+--activation-checkpointing} \
           2>"/tmp/cp_scaling_err_$cp.txt" | grep '^{')
    if [ -z "$line" ]; then
      echo "{\"seq_len\": $L, \"cp\": $cp, \"failed\": true}"; tail -3 "/tmp/cp_scaling_err_$cp.txt"; break
    fi
    echo "$line"
    case "$line" in *'"oom": true'*) break ;; esac
  done
done
