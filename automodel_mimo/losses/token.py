"""Per-token logprobs and the losses built on them, under the global-denominator contract (docs/numerics.md).

Each microbatch contributes `sum(per_token_loss * mask) / global_valid_tokens`; summed over microbatches
and (by the SUM gradient reduction) over data-parallel ranks, that is exactly the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from automodel_mimo.distributed.vocab_parallel import vocab_parallel_logprobs

IGNORE_INDEX = -100


def _dense_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, V] logits (any float dtype), [N] labels -> [N] fp32 logprobs."""
    return -F.cross_entropy(logits.float(), labels, reduction="none")


_dense = _dense_logprobs


def compile_logprobs() -> None:
    """Compile the dense logprobs (under train.compile on CUDA): one fused pass reads the bf16 logits for the
    log-sum-exp and the label's logit, and backward writes the bf16 gradient directly, so no fp32 copy of
    the [tokens, vocab] logits (nor log_softmax's saved output) is ever held: ~6 GiB less at 4096 tokens x
    128k vocabulary. Eager (the CPU reference) keeps torch's log_softmax kernels."""
    global _dense
    _dense = torch.compile(_dense_logprobs, dynamic=True)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | prefix) per position, fp32, 0 where labels == IGNORE_INDEX.

    `labels` are already shifted (labels[t] is the token after position t). Under TP the logits are a
    DTensor sharded over the vocabulary; the log-softmax then runs vocab-parallel (max/sum all-reduces
    over tp) instead of gathering the full vocabulary.
    """
    flat_labels = labels.reshape(-1)
    valid = flat_labels != IGNORE_INDEX
    if isinstance(logits, DTensor):
        if logits.placements != (Shard(logits.ndim - 1),):
            raise ValueError(f"expected logits sharded on the vocabulary over one mesh dim, got {logits.placements}")
        local = logits.to_local().flatten(0, 1)
        lp = vocab_parallel_logprobs(local, flat_labels.where(valid, 0), logits.shape[-1], logits.device_mesh.get_group())
    else:
        lp = _dense(logits.flatten(0, 1), flat_labels.where(valid, 0))
    return (lp * valid).view(labels.shape)


def masked_nll(logprobs: torch.Tensor, mask: torch.Tensor, global_valid_tokens: torch.Tensor | float) -> torch.Tensor:
    """This microbatch's share of the global mean negative log-likelihood."""
    return -(logprobs * mask).sum() / global_valid_tokens
