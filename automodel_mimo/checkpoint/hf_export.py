"""The Hugging Face export of a trained model: safetensors + config + tokenizer that plain transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from automodel_mimo.distributed.nonfinite import require_finite_weights
from automodel_mimo.models.handle import ModelHandle


def export_hf(handle: ModelHandle, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path | None:
    """Collective: gather full weights; rank 0 writes an HF folder (safetensors, config, tokenizer) atomically."""
    require_finite_weights(handle.parameters(), f"the HF export {out_dir}")
    state = handle.full_state_dict()
    out = Path(out_dir)
    if dist.get_rank() == 0:
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        config = handle.config
        config.use_cache = True
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        config.use_cache = False
    dist.barrier()
    return out
