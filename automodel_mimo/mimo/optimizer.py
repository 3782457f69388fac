"""MimoOptimizer: one optimizer + LR schedule per MIMO module, one global gradient norm, one decision.

- Global norm: each module's squared gradient norm is reduced over that module's whole grid (a DTensor
  norm covers its dp/cp/tp shards), placed in that module's slot of a world vector (non-members would
  hold 0; members all hold the same value), the slots are combined over the world with MAX, and the norm
  is sqrt(sum of slots). Every module is clipped by that one norm.
- Skip on an inf/NaN norm or loss by world consensus (distributed/nonfinite.py, shared with LMPolicy): every
  rank takes the same branch, so none waits in a collective; a skipped step still advances the LR schedules.
- State is keyed `<module>.<key>` (keys of each module's flattened DCP optimizer state, by parameter
  name), so a checkpoint resumes under another layout and never mixes modules.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from automodel_mimo.config import TrainConfig
from automodel_mimo.distributed.grad_norm import clip_grads, global_grad_norm
from automodel_mimo.distributed.nonfinite import skip_step
from automodel_mimo.optim import PartOptimizers


class MimoOptimizer:
    def __init__(self, model, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.parts = {name: PartOptimizers([module], cfg) for name, module in model.modules.items()}

    @property
    def lr(self) -> float:
        return next(iter(self.parts.values())).lr

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of every module's gradients, identical on every rank."""
        device = self.model.device
        slots = torch.zeros(len(self.parts), dtype=torch.float32, device=device)
        for i, module in enumerate(self.model.modules.values()):
            slots[i] = global_grad_norm(module.parameters(), device) ** 2
        # NaN would vanish in a MAX reduction; inf survives it, so any rank's inf/NaN reaches every rank
        slots = torch.nan_to_num(slots, nan=math.inf)
        dist.all_reduce(slots, op=dist.ReduceOp.MAX)
        return slots.sum().sqrt()

    def step(self, loss: float | None = None) -> dict:
        """Norm, consensus on finiteness (norm and `loss`), then clip and step every module and its schedule,
        or on a skip advance the schedules only; the gradients are zeroed either way."""
        norm = self.grad_norm()
        skipped = skip_step(norm, loss)
        lr = self.lr
        for name, part in self.parts.items():
            if skipped:
                part.skip()
                continue
            if self.cfg.grad_clip > 0:
                clip_grads(list(self.model.modules[name].parameters()), self.cfg.grad_clip, norm)
            part.step()
        self.zero_grad()
        return {"grad_norm": float(norm), "lr": lr, "skipped": int(skipped)}

    def zero_grad(self) -> None:
        for part in self.parts.values():
            part.zero_grad()

    # ------------------------------------------------------------ state (Checkpointer's interface)
    def state_dict(self) -> dict:
        return {f"{name}.{k}": v for name, part in self.parts.items() for k, v in part.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            prefix = name + "."
            part.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def scheduler_state(self) -> dict:
        return {name: part.scheduler_state() for name, part in self.parts.items()}

    def load_scheduler_state(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.load_scheduler_state(state[name])
