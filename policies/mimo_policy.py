"""MimoPolicy: the SFT train step of a MimoModel (encoder + projector + LLM on heterogeneous grids).

One global token count N for both modules (docs/numerics.md): N counts the loss tokens of the whole global
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
from policies.lm_policy import _until_stop


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

    def optimizer_step(self, loss: float | None = None) -> dict:
        return self.optimizer.step(loss)

    def sft_train_step(self, microbatches: list[dict]) -> dict:
        self.optimizer.zero_grad()
        metrics = self.sft_forward_backward(microbatches)
        metrics.update(self.optimizer_step(metrics["loss"]))
        return metrics

    @torch.no_grad()
    def greedy_generate(self, prompts: list[list[int]], pixel_values: torch.Tensor, image_counts: list[int],
                        rows: int, max_new_tokens: int, stop_ids: set[int], pad_id: int) -> tuple[range, list[list[int]]]:
        """Greedy continuations of a coarse-block batch (every rank of a dp block of the coarse module passes
        the same prompts, padded with image-free dummy rows to `rows`, a multiple of `MimoModel.rows_multiple()`).

        Returns the rows this rank's LLM computed (`MimoModel.language_row_range`) and their answers, cut at
        any of `stop_ids`; the image placeholder is never generated (no encoder rows would fill it). Rows are
        right-padded to prompt + max_new_tokens and each new token is written at its row's own length, so
        positions start at 0 in every row — which is also what the LLM's cp sharding of a padded row assumes
        (`as_single_segments`). Every rank runs the same number of forward passes (FSDP/TP/cp/bridge
        collectives are shared): the loop ends when no rank has an unfinished row. No KV cache: each step
        re-runs the encoder and the whole sequence, cheap for the short answers evaluated during training.
        """
        model = self.model
        device = model.device
        width = max((len(p) for p in prompts), default=1) + max(1, max_new_tokens)
        ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        lengths = torch.ones(rows, dtype=torch.long, device=device)  # dummy rows: one pad token
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, device=device)
            lengths[i] = len(p)
        positions = torch.arange(width, device=device).expand(rows, width).contiguous()
        counts = torch.tensor(list(image_counts) + [0] * (rows - len(image_counts)), dtype=torch.long)
        mine = model.language_row_range(rows)
        done = torch.tensor([r >= len(prompts) for r in mine], dtype=torch.bool, device=device)
        stops = torch.as_tensor(sorted(stop_ids), device=device)
        out = []
        model.eval()
        for _ in range(max_new_tokens):
            unfinished = (~done).any().to(torch.int32)
            dist.all_reduce(unfinished, op=dist.ReduceOp.MAX)
            if not unfinished:
                break
            mb = {"input_ids": ids, "attention_mask": (positions < lengths[:, None]).long(), "position_ids": positions,
                  "loss_mask": torch.zeros_like(ids, dtype=torch.float32), "pixel_values": pixel_values,
                  "image_counts": counts}
            logits, _ = model.forward(mb)
            mine_lengths = lengths[mine.start:mine.stop]
            last = model.logits_at(logits, mine_lengths - 1)
            last[:, model.placeholder_id] = -torch.inf  # a placeholder has no image rows to fill it
            nxt = torch.where(done, pad_id, last.argmax(-1))
            out.append(nxt)
            live = torch.nonzero(~done).flatten()  # rows still generating take the token (a stop token too)
            ids[mine.start + live, mine_lengths[live]] = nxt[live]
            lengths[mine.start + live] += 1  # other rows belong to sibling LLM ranks: never read here
            done |= torch.isin(nxt, stops)
        model.train()
        tokens = torch.stack(out, 1).tolist() if out else [[] for _ in mine]
        return mine, [_until_stop(t, stop_ids) for t in tokens]
