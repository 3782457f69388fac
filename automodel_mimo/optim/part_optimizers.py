"""Optimizer and learning-rate schedule.

Parameters are grouped by mesh (and weight decay) so torch's multi-tensor (foreach) kernels never mix
DTensors that live on different meshes.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor

from automodel_mimo.config import TrainConfig
from automodel_mimo.optim.schedule import build_scheduler


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
    # fused on CUDA: one kernel over all tensors, no foreach temporaries (~23 GiB at 8B; docs/benchmarks.md)
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    fused = (on_cuda if cfg.fused_optimizer is None else cfg.fused_optimizer) and bool(groups)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


class PartOptimizers:
    """One optimizer and LR schedule per model part, stepped together.

    Pipeline stages give a rank several parts (interleaved schedules), a MIMO model one per module, and DCP's
    optimizer state dict maps parameters to names through one module at a time; the flattened per-part dicts
    (keys by parameter name, prefixed `<name>.` when the parts are named, as MIMO modules are) merge into one
    that any layout (pp1 or pp2, another MIMO layout) can load.
    """

    def __init__(self, parts: list[torch.nn.Module], cfg: TrainConfig, names: list[str] | None = None):
        self.parts = parts
        self.prefixes = [f"{n}." for n in names] if names else [""] * len(parts)
        self.optimizers = [build_optimizer(part.named_parameters(), cfg) for part in parts]
        self.schedulers = [build_scheduler(opt, cfg) for opt in self.optimizers]

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    @property
    def fused(self) -> bool:
        """Every optimizer is one fused AdamW kernel, which can skip its own update on the device (found_inf)."""
        return all(opt.defaults.get("fused") for opt in self.optimizers)

    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """`found_inf` (fused optimizers only): a 0-d float tensor; where it is 1 the kernels leave
        weights, moments and step counts unchanged (torch's AMP skip), so the skip needs no host decision."""
        for opt, sched in zip(self.optimizers, self.schedulers):
            if found_inf is not None:
                opt.found_inf = found_inf
            try:
                opt.step()
            finally:
                opt.__dict__.pop("found_inf", None)
            sched.step()

    def skip(self) -> None:
        """A skipped step (non-finite loss or gradients): weights and moments stay, the LR schedule still
        advances, so the learning rate stays a function of the step alone (and resume stays exact)."""
        with warnings.catch_warnings():  # torch warns when a schedule steps before its optimizer ever did
            warnings.filterwarnings("ignore", message="Detected call of")
            for sched in self.schedulers:
                sched.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every floating-point tensor of the optimizers' state (AdamW moments, SGD momentum), this rank's shards."""
        return [v for opt in self.optimizers for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim > 0]

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        merged = {}
        for part, opt, prefix in zip(self.parts, self.optimizers, self.prefixes):
            merged.update({prefix + k: v for k, v in get_optimizer_state_dict(part, opt, options=options).items()})
        return merged

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
        for part, opt, prefix in zip(self.parts, self.optimizers, self.prefixes):
            mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state
            set_optimizer_state_dict(part, opt, mine, options=options)

    def scheduler_state(self) -> dict:
        return self.schedulers[0].state_dict()  # identical for every part

    def load_scheduler_state(self, state: dict) -> None:
        """The schedule is a function of the step alone. The saved per-group lists (base_lrs, _last_lr,
        lr_lambdas) have one entry per param group, whose count depends on the layout (groups are per mesh),
        so they are rebuilt for this optimizer's groups rather than loaded."""
        for sched in self.schedulers:
            per_group = {"base_lrs": sched.base_lrs, "lr_lambdas": [None] * len(sched.base_lrs)}
            sched.load_state_dict({**state, **per_group})
            for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
