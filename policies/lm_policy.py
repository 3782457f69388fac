"""LMPolicy: the training-side worker of one causal LM — train steps, logprobs, greedy generation.

It owns the optimizer and LR schedule and talks to the model only through ModelHandle, so the same
policy drives a plain module and pipeline stages, with or without context parallelism. Every method is collective: all ranks call it
with their own data-parallel share of the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from automodel_mimo.config import TrainConfig
from automodel_mimo.distributed.grad_norm import clip_grads, global_grad_norm
from automodel_mimo.distributed.mesh import ParallelState
from automodel_mimo.losses import masked_nll, token_logprobs
from automodel_mimo.models.handle import ModelHandle
from automodel_mimo.optim import PartOptimizers
from automodel_mimo.parallel.context_parallel import cp_attention


class LMPolicy:
    def __init__(self, handle: ModelHandle, state: ParallelState, cfg: TrainConfig):
        self.handle, self.state, self.cfg = handle, state, cfg
        self.optimizer = PartOptimizers(handle.parts, cfg)

    def sum_over_data_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(self.state.device, torch.float64)
        dist.all_reduce(value, group=self.state.dp_cp_group)
        return value

    # ------------------------------------------------------------ training
    def sft_forward_backward(self, microbatches: list[dict]) -> dict:
        """Accumulate gradients of the global-batch mean NLL; returns the global loss and token count."""
        local_tokens = sum(mb["loss_mask"].sum() for mb in microbatches)
        global_tokens = self.sum_over_data_ranks(torch.as_tensor(local_tokens)).clamp(min=1).float()

        def loss_fn(logits: torch.Tensor, mb: dict):
            loss = masked_nll(token_logprobs(logits, mb["labels"]), mb["loss_mask"], global_tokens)
            return loss, {"loss": loss.detach()}

        self.handle.train()
        with cp_attention(self.state.cp_group):  # microbatches arrive sharded over cp
            per_mb = self.handle.forward_backward(microbatches, loss_fn)
        local = torch.tensor([sum(float(m["loss"]) for m in per_mb),
                              sum(real_tokens(mb) for mb in microbatches)], dtype=torch.float64)
        loss, tokens = self.sum_over_data_ranks(local).tolist()
        # cp ranks share rows and each counts the whole row's tokens (cu_seqlens are not sharded)
        return {"loss": loss, "tokens": int(tokens) // self.state.cp_size, "loss_tokens": int(global_tokens)}

    def optimizer_step(self) -> dict:
        """Global grad norm (before clipping), clip, step, advance the LR schedule."""
        params = self.handle.parameters()
        grad_norm = global_grad_norm(params, self.state.device, extra_group=self.handle.stage_group)
        if self.cfg.grad_clip > 0:
            clip_grads(params, self.cfg.grad_clip, grad_norm)
        lr = self.optimizer.lr
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"grad_norm": float(grad_norm), "lr": lr}

    def sft_train_step(self, microbatches: list[dict]) -> dict:
        self.optimizer.zero_grad()
        metrics = self.sft_forward_backward(microbatches)
        metrics.update(self.optimizer_step())
        return metrics

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def greedy_generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int) -> list[list[int]]:
        """Greedy continuations of this rank's prompts, stopping at any of `stop_ids`.

        Every rank runs the same number of forward passes (FSDP and TP collectives are shared): the loop
        ends when no rank has an unfinished prompt. No KV cache: each step re-runs the whole prefix, which
        is cheap for the short answers evaluated during training.
        """
        self.handle.eval()
        device = self.state.device
        width = max((len(p) for p in prompts), default=1)
        ids = torch.full((max(1, len(prompts)), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding keeps every prompt's last token in the last column
            ids[i, width - len(p):] = torch.as_tensor(p, device=device)
            mask[i, width - len(p):] = 1
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        done[len(prompts):] = True
        stops = torch.as_tensor(sorted(stop_ids), device=device)
        out = []
        for _ in range(max_new_tokens):
            unfinished = (~done).any().to(torch.int32)
            dist.all_reduce(unfinished, op=dist.ReduceOp.MAX)
            if not unfinished:
                break
            batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
            nxt = self.handle.forward_capture(batch, _last_position_argmax, (), torch.long)
            nxt = torch.where(done, pad_id, nxt)
            out.append(nxt)
            done |= torch.isin(nxt, stops)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        self.handle.train()
        tokens = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
        return [_until_stop(t, stop_ids) for t in tokens[: len(prompts)]]


def real_tokens(batch: dict) -> float:
    """Non-padding tokens of a padded (attention_mask) or packed (cu_seqlens) batch."""
    if "cu_seqlens" in batch:
        return float(batch["cu_seqlens"][:, -1].sum())
    return float(batch["attention_mask"].sum())


def _last_position_argmax(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    last = logits[:, -1]
    if isinstance(last, DTensor):  # vocab-sharded under TP: gather one position only
        last = last.full_tensor()
    return last.argmax(-1)


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens
