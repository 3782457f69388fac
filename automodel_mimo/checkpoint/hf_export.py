"""The Hugging Face export of a trained model: safetensors + config + tokenizer that plain transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from automodel_mimo.distributed.nonfinite import require_finite_weights


def export_hf(handle, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path | None:
    """Collective: gather the full weights of any handle; rank 0 has it write its Hugging Face folder(s)
    (`handle.write_hf`: a causal LM, or a MIMO model's modules) into `<out>.partial`, renamed into place once
    complete. Refused (RunStopped on every rank) when any weight is inf/NaN."""
    require_finite_weights(handle.parameters(), f"the HF export {out_dir}")
    state = handle.full_state_dict()
    out = Path(out_dir)
    if dist.get_rank() == 0:
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        handle.write_hf(state, tokenizer, partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    dist.barrier()
    return out
