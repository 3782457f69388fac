"""Silence third-party start-up noise that says nothing actionable to users of a run.

Only known, harmless messages are filtered (by text), so new warnings still show.
"""

from __future__ import annotations

import logging
import os
import warnings

_HARMLESS = (
    "Slicing a flattened dim from root mesh",  # torch, from nemo-automodel's mesh helpers
    "returned a view tensor",  # FSDP2 on HF embeddings: the models do not modify it in place
    "Transformer Engine and Apex are not installed",  # megatron-fsdp probing optional GPU kernels
    "is an Enum subclass and is now natively supported",  # torch pytree registration by torchao
)


def quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM logs INFO lines per refit and per generate call (engine processes inherit this); warnings stay.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    for text in _HARMLESS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    # torchao (imported by nemo-automodel) logs a warning per CUDA-only kernel it cannot load on CPU.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # DTensor's hint that gathering FSDP x TP shards takes two all-gathers: only the one-off export does it.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
