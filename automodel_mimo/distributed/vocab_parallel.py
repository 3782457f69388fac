"""Per-token logprobs from logits sharded over the vocabulary (TP), without gathering the vocabulary.

torch's `loss_parallel` does this for cross-entropy but needs `backward()` to run inside its context,
which the model's own backward (and later the pipeline schedule's) does not. This autograd function is
self-contained: max and sum-exp all-reduces over the tp group forward, the analytic gradient
`(onehot - softmax) * g` on the local shard backward (no collective needed there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
        local_logits = local_logits.float()
        vocab_local = local_logits.shape[-1]
        row_max = local_logits.max(-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = local_logits - row_max[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        in_shard = (labels >= vocab_start) & (labels < vocab_start + vocab_local)
        local_idx = (labels - vocab_start).clamp(0, vocab_local - 1)
        target = shifted.gather(-1, local_idx[:, None])[:, 0] * in_shard
        dist.all_reduce(target, group=group)
        ctx.save_for_backward(exp / sum_exp[:, None], local_idx, in_shard)
        return target - sum_exp.log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local_idx, in_shard = ctx.saved_tensors
        grad_logits = -softmax * grad[:, None]
        grad_logits.scatter_add_(-1, local_idx[:, None], (grad * in_shard)[:, None])
        return grad_logits, None, None, None


def vocab_parallel_logprobs(local_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    """log p(label) per row of `local_logits` [N, V/tp] (this rank's torch.chunk of the vocabulary)."""
    chunk = -(-vocab_size // dist.get_world_size(group))
    return _VocabParallelLogprob.apply(local_logits, labels, dist.get_rank(group) * chunk, group)
