"""Policy workers: train / logprobs / refit over a ModelHandle."""
