"""The clipped policy gradient of GRPO / GSPO (asymmetric and dual clip, k1/k3 KL, token or sequence
normalization, truncated importance sampling) and group-relative advantages. Pure tensor math on one
microbatch; the global contract is in losses/__init__.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PGLossConfig:
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ... and above at 1 + eps_high (asymmetric: "clip-higher")
    dual_clip: float | None = None  # c > 1: for A < 0 the per-token loss is capped at -A * c
    kl_beta: float = 0.0  # coefficient of the KL penalty to the reference (needs ref logprobs when > 0)
    kl_type: str = "k3"  # k1: lp - lp_ref; k3: exp(lp_ref - lp) - (lp_ref - lp) - 1
    kl_input_clamp: float = 20.0  # |lp_ref - lp| is clamped to this before the estimator
    kl_output_clamp: float = 10.0  # the estimator's value is clamped to [-this, this]
    sequence_level: bool = False  # False: mean over tokens (global_valid_tokens); True: mean of per-sequence means (global_valid_seqs)
    gspo: bool = False  # sequence ratio exp(mean over the row's tokens of lp - lp_old), shared by its tokens
    truncated_is_cap: float | None = None  # weight tokens by min(exp(lp_old - lp_gen), cap) (needs generator logprobs)

    def validate(self) -> None:
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"eps_low={self.eps_low}, eps_high={self.eps_high}: must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip={self.dual_clip}: must be > 1 (or None)")
        if self.kl_type not in ("k1", "k3"):
            raise ValueError(f"kl_type={self.kl_type}: use k1 or k3")
        if self.truncated_is_cap is not None and self.truncated_is_cap <= 0:
            raise ValueError(f"truncated_is_cap={self.truncated_is_cap}: must be > 0 (or None)")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str, input_clamp: float,
               output_clamp: float) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token logprobs (k1 or k3)."""
    log_ratio = (ref_logprobs - logprobs).clamp(-input_clamp, input_clamp)  # log(p_ref / p)
    kl = -log_ratio if kind == "k1" else torch.exp(log_ratio) - log_ratio - 1
    return kl.clamp(-output_clamp, output_clamp)


def clipped_pg_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cfg: PGLossConfig, *, global_valid_tokens: torch.Tensor | float,
                    global_valid_seqs: torch.Tensor | float, ref_logprobs: torch.Tensor | None = None,
                    gen_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss (PPO / GRPO / GSPO family) of one microbatch.

    logprobs (differentiable), old_logprobs, ref_logprobs, gen_logprobs, mask: [B, T] in the same token
    layout (whole rows: the handle gathers context-parallel shards before the loss, models/loss_view.py);
    advantages: [B] (one per sequence) or [B, T]. Per token:
        ratio = exp(lp - lp_old)                     (GSPO: exp(mean over the row of lp - lp_old))
        pg    = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
        pg    = min(pg, -A * dual_clip)  where A < 0 (dual clip)
        pg   *= min(exp(lp_old - lp_gen), cap)       (truncated importance weight, detached)
        loss  = pg + kl_beta * kl(lp, lp_ref)
    reduced as sum(loss * mask) / global_valid_tokens, or with `sequence_level` as the sum over rows of
    each row's token mean divided by global_valid_seqs (rows with no tokens count for nothing).
    """
    mask = mask.to(logprobs.dtype)
    if advantages.ndim == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    log_ratio = logprobs - old_logprobs
    seq_tokens = mask.sum(-1)
    if cfg.gspo:
        seq_mean = (log_ratio * mask).sum(-1) / seq_tokens.clamp(min=1)
        log_ratio = seq_mean[:, None].expand_as(logprobs)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    unclipped_loss, clipped_loss = -advantages * ratio, -advantages * clipped_ratio
    pg = torch.maximum(unclipped_loss, clipped_loss)
    dual_clipped = torch.zeros_like(mask, dtype=torch.bool)
    if cfg.dual_clip is not None:
        cap = -advantages * cfg.dual_clip
        dual_clipped = (advantages < 0) & (pg > cap)
        pg = torch.where(advantages < 0, torch.minimum(pg, cap), pg)
    if cfg.truncated_is_cap is not None:
        if gen_logprobs is None:
            raise ValueError("truncated_is_cap is set but no generator logprobs were given")
        weight = torch.exp(old_logprobs - gen_logprobs).clamp(max=cfg.truncated_is_cap).detach()
        pg = pg * weight
    per_token = pg
    kl = None
    if cfg.kl_beta > 0:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs reference logprobs")
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_type, cfg.kl_input_clamp, cfg.kl_output_clamp)
        per_token = pg + cfg.kl_beta * kl

    def reduce(values: torch.Tensor) -> torch.Tensor:
        """sum of values over masked tokens, normalized as configured (token- or sequence-level)."""
        if cfg.sequence_level:
            return ((values * mask).sum(-1) / seq_tokens.clamp(min=1)).sum() / global_valid_seqs
        return (values * mask).sum() / global_valid_tokens

    loss = reduce(per_token)
    with torch.no_grad():
        on = mask > 0
        clipped = (clipped_loss > unclipped_loss) & on
        big = torch.finfo(ratio.dtype).max
        metrics = {
            "loss": loss.detach(),
            "pg_loss": reduce(pg),
            "clip_fraction": reduce(clipped.to(mask.dtype)),
            "dual_clip_fraction": reduce((dual_clipped & on).to(mask.dtype)),
            "ratio_mean": reduce(ratio),
            "ratio_min": torch.where(on, ratio, big).min() if on.any() else torch.tensor(math.inf),
            "ratio_max": torch.where(on, ratio, -big).max() if on.any() else torch.tensor(-math.inf),
            "advantage_mean": reduce(advantages),
        }
        if kl is not None:
            metrics["kl"] = reduce(kl)
        if gen_logprobs is not None:
            diff = (old_logprobs - gen_logprobs).abs()
            metrics["gen_kl_error"] = reduce(diff)
            metrics["token_mult_prob_error"] = reduce(torch.exp(diff))
    return loss, metrics


# ---------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: rewards [N] in consecutive groups of `group_size` samples of one prompt.

    A = r - mean(group), divided by (std(group) + eps) when `normalize_std` (unbiased std, as torch.std).
    A group whose rewards are all equal gets exactly 0 (no signal, and no rounding noise from the mean).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size).to(torch.float64)
    centered = groups - groups.mean(-1, keepdim=True)
    if normalize_std and group_size > 1:
        centered = centered / (groups.std(-1, keepdim=True) + eps)
    flat = groups == groups[:, :1]
    centered = torch.where(flat.all(-1, keepdim=True), 0.0, centered)
    return centered.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)
