"""automodel_mimo: SFT/DPO/GRPO for causal LMs and MIMO models on DTensor + nemo-automodel."""

__version__ = "0.1.0"
