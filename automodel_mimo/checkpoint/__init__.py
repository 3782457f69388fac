"""Checkpoints and exports.

    checkpointer.py  sharded DCP checkpoints, published atomically, verified on resume (falls back past damage)
    manifest.py      a checkpoint's manifest: every file's size and checksum
    listing.py       which checkpoints an output_dir holds (no torch: the CLI reads it before ranks start)
    hf_export.py     the Hugging Face export of any handle

`Checkpointer` and `export_hf` are imported on first use, so that `checkpoint.listing` stays light.
"""

__all__ = ["Checkpointer", "export_hf"]


def __getattr__(name: str):
    if name == "Checkpointer":
        from automodel_mimo.checkpoint.checkpointer import Checkpointer

        return Checkpointer
    if name == "export_hf":
        from automodel_mimo.checkpoint.hf_export import export_hf

        return export_hf
    raise AttributeError(name)
