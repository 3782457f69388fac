"""Losses on per-token logprobs, pure tensor math on one microbatch.

    token.py            per-token logprobs (vocab-parallel under TP) and the NLL of SFT
    dpo.py              DPO (sequence rewards against a reference, optional SFT term)
    policy_gradient.py  the clipped policy gradient of GRPO / GSPO, KL penalties, group advantages

Global contract (docs/numerics.md): every loss and metric is this microbatch's share, pre-divided by a global
denominator (pairs, tokens or sequences summed over all microbatches and dp x cp ranks), so summing shares over
microbatches and ranks gives the global mean. Metrics named `*_min` / `*_max` are the exception: they combine by
min / max (metrics combine_metrics). Rows a mask leaves empty (weight-0 dummies) contribute nothing.
"""

from automodel_mimo.losses.dpo import dpo_loss, sequence_logprobs
from automodel_mimo.losses.policy_gradient import PGLossConfig, clipped_pg_loss, group_advantages, kl_penalty
from automodel_mimo.losses.token import IGNORE_INDEX, masked_nll, token_logprobs

__all__ = ["IGNORE_INDEX", "PGLossConfig", "clipped_pg_loss", "dpo_loss", "group_advantages", "kl_penalty",
           "masked_nll", "sequence_logprobs", "token_logprobs"]
