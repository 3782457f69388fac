"""Shared pieces of the generation tests: a tiny Llama exported as an HF folder, and trainer logprobs."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from automodel_mimo.generation.sampling import Generation
from automodel_mimo.models.tokenizer import build_default_tokenizer
from tests.unit.oracle import tiny_llama_config

PROMPTS = [[5, 17, 33, 2], [40, 41], [7, 8, 9, 10, 11, 12]]


class Trainer:
    """A single-process stand-in for the trainer's ModelHandle (generator_parameters is all a plan needs): a bare
    transformers model's names already are the generator's."""

    def __init__(self, model):
        self.model = model

    def generator_parameters(self):
        return self.model.named_parameters()


def tiny_config(**overrides):
    """head_dim 32: vLLM's CPU attention has no kernel for the oracle's head_dim 8."""
    return tiny_llama_config(**{"vocab_size": len(build_default_tokenizer()), "max_position_embeddings": 128,
                                "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, **overrides})


def tiny_model(seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides), dtype=torch.float32).eval()


def export(model: torch.nn.Module, path) -> str:
    """The pieces of checkpoint.export_hf without a process group: safetensors, config, tokenizer."""
    model.save_pretrained(path, safe_serialization=True)
    build_default_tokenizer().save_pretrained(path)
    return str(path)


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, prompt: list[int], sample: Generation, temperature: float) -> torch.Tensor:
    """Per-token logprobs of the sampled tokens computed the trainer's way: one full forward over
    prompt + response, log_softmax(logits / T) at each response position."""
    ids = torch.tensor([prompt + sample.token_ids])
    logits = model(input_ids=ids).logits.float()[0, len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]


def max_abs_rel(got: list[float], ref: torch.Tensor) -> tuple[float, float]:
    got = torch.tensor(got, dtype=torch.float64)
    diff = (got - ref.double()).abs()
    return float(diff.max()), float((diff / ref.double().abs().clamp(min=1e-30)).max())
