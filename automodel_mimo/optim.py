"""Optimizer and learning-rate schedule.

Parameters are grouped by mesh (and weight decay) so torch's multi-tensor (foreach) kernels never mix
DTensors that live on different meshes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor

from automodel_mimo.config import TrainConfig


def _param_groups(named_params, weight_decay: float) -> list[dict]:
    groups: dict[tuple, list] = defaultdict(list)
    for name, p in named_params:
        if not p.requires_grad:
            continue
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        decay = weight_decay if p.ndim >= 2 else 0.0  # no decay on norms and biases
        groups[(id(mesh), decay)].append(p)
    return [{"params": ps, "weight_decay": decay} for (_, decay), ps in groups.items()]


def build_optimizer(named_params, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(named_params, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warmup, then decay to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_decay == "cosine" else 1 - progress
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
