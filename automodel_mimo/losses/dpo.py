"""DPO on per-token logprobs: summed (or averaged) sequence rewards against a reference, with an optional SFT
term on the chosen responses. Pure tensor math on one microbatch; the global contract is in losses/__init__.py."""

from __future__ import annotations


import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- sequence sums


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of logprobs over masked tokens, and the row's token count ([B] each)."""
    return (logprobs * mask).sum(-1), mask.sum(-1).detach()


# ---------------------------------------------------------------- DPO


def dpo_loss(seq_logprobs: torch.Tensor, ref_seq_logprobs: torch.Tensor, seq_tokens: torch.Tensor, *,
             beta: float, global_pairs: torch.Tensor | float, average_logprobs: bool = False,
             sft_weight: float = 0.0, global_chosen_tokens: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, dict]:
    """DPO on rows that alternate (chosen, rejected): rows 2i and 2i+1 are pair i.

    seq_logprobs / ref_seq_logprobs: [B] sums of the policy's / reference's logprobs over each row's
    response tokens; seq_tokens: [B] their counts. The sequence reward is r = seq_logprobs - ref_seq_logprobs,
    divided by seq_tokens when `average_logprobs`. Per pair: -logsigmoid(beta * (r_chosen - r_rejected)),
    summed over pairs with tokens in both rows and divided by `global_pairs`. With `sft_weight` > 0, adds
    sft_weight * NLL of the chosen rows, normalized by `global_chosen_tokens`.

    Metrics (global shares): loss, dpo_loss, sft_loss, preference_accuracy (r_chosen > r_rejected),
    reward_margin (r_chosen - r_rejected), chosen_reward, rejected_reward, pairs.
    """
    if seq_logprobs.shape[0] % 2:
        raise ValueError(f"DPO rows come in (chosen, rejected) pairs; got {seq_logprobs.shape[0]} rows")
    rewards = seq_logprobs - ref_seq_logprobs
    if average_logprobs:
        rewards = rewards / seq_tokens.clamp(min=1)
    chosen, rejected = rewards[0::2], rewards[1::2]
    valid = ((seq_tokens[0::2] > 0) & (seq_tokens[1::2] > 0)).to(rewards.dtype)
    margin = chosen - rejected
    dpo = -(F.logsigmoid(beta * margin) * valid).sum() / global_pairs
    sft = -(seq_logprobs[0::2] * valid).sum() / global_chosen_tokens
    loss = dpo + sft_weight * sft if sft_weight else dpo
    detached = margin.detach()
    metrics = {
        "loss": loss.detach(), "dpo_loss": dpo.detach(), "sft_loss": sft.detach(),
        "preference_accuracy": ((detached > 0).to(valid.dtype) * valid).sum() / global_pairs,
        "reward_margin": (detached * valid).sum() / global_pairs,
        "chosen_reward": (chosen.detach() * valid).sum() / global_pairs,
        "rejected_reward": (rejected.detach() * valid).sum() / global_pairs,
        "pairs": valid.sum(),
    }
    return loss, metrics


# ---------------------------------------------------------------- clipped policy gradient
