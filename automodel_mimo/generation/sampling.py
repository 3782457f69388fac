"""Sampling parameters and generation results shared by every generator backend.

Logprob convention (both backends, and what the trainer must compute to compare): the logprob of each
sampled token under the distribution it was sampled from, i.e. log_softmax(logits / temperature) after
top-p truncation and renormalization (vLLM's `processed_logprobs`), banned tokens removed first. With top_p = 1 that is
log_softmax(logits / temperature); with temperature = 0 (greedy) the raw log_softmax(logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    n: int = 1  # samples per prompt
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (it is kept)
    seed: int | None = None
    banned_token_ids: tuple[int, ...] = ()  # never sampled (a MIMO image placeholder): their logits are -inf

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and n={self.n} must be >= 1")

    @property
    def logprob_temperature(self) -> float:
        """The temperature the reported logprobs are computed at (1 for greedy)."""
        return self.temperature if self.temperature > 0 else 1.0


# Images of the prompts, for a generator serving a MIMO model (a LLaVA folder): one float32 tensor
# (n_images, C, H, W) per prompt, preprocessed as the trainer preprocesses them, in placeholder order; a
# prompt without images has a tensor of 0 images.
PromptImages = list  # list[torch.Tensor]


@dataclass
class Generation:
    """One sample: `prompt_index` into the prompts list; n samples of a prompt are consecutive."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # one per generated token, see the module docstring
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    extra: dict = field(default_factory=dict)
