# Sourced by the embedded-default benchmarks (bench/sft_tiny.sh, bench/dpo_tiny.sh), from the repository root.

# timed_run ALGO WHAT [override ...]: set up, run `automodel-mimo ALGO` into $OUT (emptied first) and
# print the machine and the wall time (WHAT says what it includes).
timed_run() {
  local algo=$1 what=$2 start end
  shift 2
  rm -rf -- "${OUT:?}"
  bash scripts/setup.sh
  start=$(date +%s.%N)
  .venv/bin/automodel-mimo "$algo" output_dir="$OUT" logging.progress=false "$@"
  end=$(date +%s.%N)
  echo "machine: $(nproc) cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())'), $(date -u +%F)"
  echo "wall time ($what): $(python3 -c "print(f'{$end - $start:.1f}')") s"
}
