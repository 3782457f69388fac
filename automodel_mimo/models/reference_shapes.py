"""dpo.reference=<folder>: its weights must fill the run's model, parameter for parameter. Checked by the CLI before
any rank starts (cli.py for a causal LM, mimo/preflight.py for a LLaVA folder): both models are built on the meta
device from their configs (no weights read, no memory) and their state-dict names and shapes compared, so every
field that decides a shape counts, whatever the model type; the error names the config fields that differ.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from automodel_mimo.errors import UserInputError

# Config fields that decide parameter shapes or names, named in the error (the comparison itself is of the shapes).
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size",
                "image_size", "patch_size", "num_channels", "projection_dim",
                "multimodal_projector_bias")
SUB_CONFIGS = ("text_config", "vision_config")  # a LLaVA config's modules


def meta_shapes(config: PretrainedConfig, build) -> dict[str, tuple[int, ...]]:
    """State-dict name -> shape of the model `build(config)` makes, built on the meta device."""
    import torch

    with torch.device("meta"):
        model = build(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def field_differences(theirs: PretrainedConfig, ours: PretrainedConfig, prefix: str = "") -> list[str]:
    """'<field> <theirs> != model's <ours>' for the shape-deciding fields that differ (LLaVA: per sub-config)."""
    out = []
    for field in SHAPE_FIELDS:
        a, b = getattr(theirs, field, None), getattr(ours, field, None)
        if a != b and a is not None and b is not None:
            out.append(f"{prefix}{field} {a} != model's {b}")
    for sub in SUB_CONFIGS:
        a, b = getattr(theirs, sub, None), getattr(ours, sub, None)
        if isinstance(a, PretrainedConfig) and isinstance(b, PretrainedConfig):
            out += field_differences(a, b, f"{prefix}{sub}.")
    return out


def shape_differences(theirs: dict, ours: dict) -> list[str]:
    """The first parameter whose name or shape differs (when no known field explains it)."""
    missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if missing:
        return [f"no {missing[0]} ({len(missing)} of the model's weights have no counterpart)"]
    if extra:
        return [f"{extra[0]} is not a weight of the model ({len(extra)} such)"]
    name = next(n for n in ours if theirs[n] != ours[n])
    return [f"{name} {list(theirs[name])} != model's {list(ours[name])}"]


def check_reference_shapes(field: str, path: str, theirs: PretrainedConfig, ours: PretrainedConfig, build) -> None:
    """UserInputError (one line) unless the model `build(theirs)` (the folder's config) has the state-dict names and
    shapes of `build(ours)` (the run's model config); `build`: e.g. AutoModelForCausalLM.from_config."""
    a, b = meta_shapes(theirs, build), meta_shapes(ours, build)
    if a == b:
        return
    what = field_differences(theirs, ours) or shape_differences(a, b)
    raise UserInputError(f"{field}={path}: {'; '.join(what)}; the reference must have the model's architecture "
                         "(point it at a folder of the same model, e.g. another run's hf/ export)")
