"""Parameter names without the wrappers that activation checkpointing, torch.compile and FSDP1 insert
(`model.layers.0._checkpoint_wrapped_module.mlp...` -> `model.layers.0.mlp...`): the model's own names,
which checkpoints, HF exports and the generator use whatever the layout."""

WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name
