"""The optimizer of a model handle: one optimizer and schedule per part (pipeline stages, MIMO modules), and the
step every algorithm takes.

One step: the handle's global gradient norm (identical on every rank, however the parts are laid out), a
world-consensus decision to skip a non-finite step (distributed/nonfinite.py: weights and moments stay, the
schedule still advances), clipping of every part by that one norm, then every part's optimizer and schedule.
Fused AdamW (on CUDA) takes the vote as `found_inf` on the device and skips inside its kernel, so nothing waits
for the host between the backward and the optimizer step; the host reads the decision after the step is queued.
"""

from __future__ import annotations

import torch

from automodel_mimo.config import TrainConfig
from automodel_mimo.distributed.grad_norm import clip_grads, reduce_partial_grads
from automodel_mimo.distributed.nonfinite import nonfinite_vote, skip_step
from automodel_mimo.optim.part_optimizers import PartOptimizers


class HandleOptimizer(PartOptimizers):
    def __init__(self, handle, cfg: TrainConfig):
        super().__init__(handle.parts, cfg, names=handle.part_names)
        self.handle, self.grad_clip = handle, cfg.grad_clip

    def optimizer_step(self, loss: float | torch.Tensor | None = None, on_host: bool = True) -> dict:
        """Norm (before clipping), skip-or-clip-and-step, zero the gradients; the step's metrics (on_host=False:
        grad_norm and, with a fused optimizer, skipped as device tensors, for one read later)."""
        params = self.handle.parameters()
        reduce_partial_grads(params)  # torch 2.11 leaves some tp-replicated weights' gradients pending a sum
        grad_norm = self.handle.grad_norm()
        if self.grad_clip > 0:  # queued before the skip vote's host sync; a skipped step's gradients are dropped
            clip_grads(params, self.grad_clip, grad_norm)
        lr = self.lr
        if self.fused:  # the vote stays on the device and the kernels skip themselves: no sync before the step
            found_inf = nonfinite_vote(grad_norm, loss)
            self.step(found_inf)
            skipped = found_inf if not on_host else bool(found_inf.item())
        else:
            skipped = skip_step(grad_norm, loss)
            if skipped:
                self.skip()
            else:
                self.step()
        self.zero_grad()
        if not on_host:
            return {"grad_norm": grad_norm.detach(), "lr": lr, "skipped": skipped}
        return {"grad_norm": float(grad_norm), "lr": lr, "skipped": int(skipped)}
