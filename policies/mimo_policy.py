"""MimoPolicy: the SFT train step of a MimoModel (encoder + projector + LLM on heterogeneous grids).

One global token count N for both modules (NUMERICS.md): N counts the loss tokens of the whole global
batch (the LLM's rows, summed over the LLM's dp ranks; cp ranks hold the same rows before sharding). Each
microbatch contributes sum(token loss) / N; the encoder's gradient flows only through that loss and the
bridge, so both modules' gradients are scaled by 1/N exactly once, and FSDP sums them over each module's
own data ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from automodel_mimo.config import TrainConfig
from automodel_mimo.losses import masked_nll, token_logprobs
from automodel_mimo.mimo.model import MimoModel
from automodel_mimo.mimo.optimizer import MimoOptimizer


class MimoPolicy:
    def __init__(self, model: MimoModel, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.optimizer = MimoOptimizer(model, cfg)

    def _sum(self, values: list[float], group) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.model.device)
        dist.all_reduce(t, group=group)
        return t.tolist()

    def sft_forward_backward(self, microbatches: list[dict]) -> dict:
        """Gradients of the global-batch mean NLL in every module; microbatches hold this rank's block
        (MimoModel.data_parallel()) of the global batch, all ranks the same number of them."""
        model, grid = self.model, self.model.grids["language"]
        model.check_batch(microbatches)
        text = [model.language_rows(mb) for mb in microbatches]
        local = [float(sum(t["loss_mask"].sum() for t in text)),
                 float(sum(t["attention_mask"].sum() if "attention_mask" in t else t["input_ids"].numel() for t in text))]
        global_tokens, tokens = self._sum(local, grid.group("dp"))
        n = torch.tensor(max(global_tokens, 1.0), dtype=torch.float32, device=model.device)
        model.train()
        loss_sum = 0.0
        for i, mb in enumerate(microbatches):
            model.set_gradient_sync(i == len(microbatches) - 1)
            logits, batch = model.forward(mb)
            loss = masked_nll(token_logprobs(logits, batch["labels"]), batch["loss_mask"], n)
            loss.backward()
            loss_sum += float(loss.detach())
        (loss,) = self._sum([loss_sum], model.language_state.dp_cp_group)  # cp shards hold partial sums
        return {"loss": loss, "tokens": int(tokens), "loss_tokens": int(global_tokens)}

    def optimizer_step(self) -> dict:
        return self.optimizer.step()

    def sft_train_step(self, microbatches: list[dict]) -> dict:
        self.optimizer.zero_grad()
        metrics = self.sft_forward_backward(microbatches)
        metrics.update(self.optimizer_step())
        return metrics
