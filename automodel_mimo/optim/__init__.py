"""Optimizers: one per model part (pipeline stages, MIMO modules) stepped together (part_optimizers.py), the
step of a handle with its global norm and non-finite guard (handle_optimizer.py), and the LR schedule."""

from automodel_mimo.optim.handle_optimizer import HandleOptimizer
from automodel_mimo.optim.part_optimizers import PartOptimizers, build_optimizer
from automodel_mimo.optim.schedule import build_scheduler, lr_factor

__all__ = ["HandleOptimizer", "PartOptimizers", "build_optimizer", "build_scheduler", "lr_factor"]
