"""Checkpoints and exports.

    checkpointer.py  sharded DCP checkpoints, published atomically, verified on resume (falls back past damage)
    manifest.py      a checkpoint's manifest: every file's size and checksum
    hf_export.py     the Hugging Face export (safetensors + config + tokenizer)
"""

from automodel_mimo.checkpoint.checkpointer import Checkpointer
from automodel_mimo.checkpoint.hf_export import export_hf

__all__ = ["Checkpointer", "export_hf"]
