"""Optimizers: one per model part (pipeline stages, MIMO modules) stepped together, and the LR schedule."""

from automodel_mimo.optim.part_optimizers import PartOptimizers, build_optimizer
from automodel_mimo.optim.schedule import build_scheduler, lr_factor

__all__ = ["PartOptimizers", "build_optimizer", "build_scheduler", "lr_factor"]
