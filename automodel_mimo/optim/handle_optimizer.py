"""The optimizer of a model handle: one optimizer and schedule per part (pipeline stages, MIMO modules), and the
step every algorithm takes.

One step: the handle's global gradient norm (identical on every rank, however the parts are laid out), a
world-consensus decision to skip a non-finite step (distributed/nonfinite.py: weights and moments stay, the
schedule still advances), clipping of every part by that one norm, then every part's optimizer and schedule.
"""

from __future__ import annotations

from automodel_mimo.config import TrainConfig
from automodel_mimo.distributed.grad_norm import clip_grads
from automodel_mimo.distributed.nonfinite import skip_step
from automodel_mimo.optim.part_optimizers import PartOptimizers


class HandleOptimizer(PartOptimizers):
    def __init__(self, handle, cfg: TrainConfig):
        super().__init__(handle.parts, cfg, names=handle.part_names)
        self.handle, self.grad_clip = handle, cfg.grad_clip

    def optimizer_step(self, loss: float | None = None) -> dict:
        """Norm (before clipping), skip-or-clip-and-step, zero the gradients; the step's metrics."""
        params = self.handle.parameters()
        grad_norm = self.handle.grad_norm()
        if self.grad_clip > 0:  # queued before the skip vote's host sync; a skipped step's gradients are dropped
            clip_grads(params, self.grad_clip, grad_norm)
        skipped = skip_step(grad_norm, loss)
        lr = self.lr
        if skipped:
            self.skip()
        else:
            self.step()
        self.zero_grad()
        return {"grad_norm": float(grad_norm), "lr": lr, "skipped": int(skipped)}
