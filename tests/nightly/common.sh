# Sourced by the nightly scripts, from the repository root.

# nightly_start NAME: OUT (default outputs/nightly/NAME) emptied, the environment set up.
nightly_start() {
  OUT=${OUT:-outputs/nightly/$1}
  rm -rf -- "${OUT:?}"  # stale metrics from an earlier night must never be what gets checked
  bash scripts/setup.sh
}

# hf_export_loads DIR: the exported causal LM and its tokenizer load with plain transformers (no
# automodel_mimo code on the load path).
hf_export_loads() {
  .venv/bin/python -c 'import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1]); print("[nightly] HF export loads:", sys.argv[1])' "$1"
}

# llava_export_loads DIR: the exported LLaVA folder (a MIMO run's hf/) loads with plain transformers.
llava_export_loads() {
  .venv/bin/python -c 'import sys; from transformers import LlavaForConditionalGeneration; LlavaForConditionalGeneration.from_pretrained(sys.argv[1]); print("[nightly] LLaVA export loads:", sys.argv[1])' "$1"
}
