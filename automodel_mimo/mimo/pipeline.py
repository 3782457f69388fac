"""The MIMO LLM as AutoPipeline stages (mimo.layout.language.pp > 1; encoders stay pp = 1 on every rank).

A step runs in three phases (mimo/handle.py):
  1. every rank: the encoder on the whole step's images and the bridge; the bridged rows are placed at their
     placeholder positions of a [B, T, H] tensor (`image_embeddings`), cp-sharded like the token ids;
  2. the LLM's schedule (parallel/pipeline_parallel.py) over microbatch slices of that tensor, DETACHED: the
     first stage's input embedding overwrites its placeholder positions with them (`install_splice`), and
     the driver returns their gradient, broadcast from the first stage to every stage;
  3. every rank: backward from that gradient through the shard, the bridge and the encoder (its FSDP
     reduction runs here, once, after the encoder's gradients exist).
The pipeline machinery is the LM's: one PipelineDriver, the loss adapter, the last-stage capture.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from automodel_mimo.distributed.mesh import DTYPES, ParallelState
from automodel_mimo.models.facts import check_pipeline_split
from automodel_mimo.parallel.pipeline_parallel import PipelineDriver, build_pipeline

IMAGE_EMBEDS = "image_embeds"  # first-stage input: [B, T, H], encoder rows at placeholder positions, 0 elsewhere


def image_embeddings(input_ids: torch.Tensor, rows: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """[B, T, H] zeros with `rows` (batch-major) written at the placeholder positions, in order (differentiable)."""
    mask = (input_ids == placeholder_id)[..., None]
    dense = rows.new_zeros((*input_ids.shape, rows.shape[-1]))
    return dense.masked_scatter(mask, rows)


def install_splice(parts: list[nn.Module], placeholder_id: int) -> None:
    """Every stage part drops the `image_embeds` keyword the schedule hands it; the part holding the input
    embedding (the first stage) overwrites the placeholder positions of its output with them. Hooks, since the
    stage forward is nemo's patched HF forward (the embedding runs inside the part's FSDP forward)."""
    for part in parts:
        _splice_hooks(part, getattr(getattr(part, "model", None), "embed_tokens", None), placeholder_id)


def _splice_hooks(part: nn.Module, embed: nn.Module | None, placeholder_id: int) -> None:
    current: dict[str, torch.Tensor | None] = {}

    def take(module, args, kwargs):
        current["images"] = kwargs.pop(IMAGE_EMBEDS, None)
        return args, kwargs

    def splice(module, args, embeds):
        images = current.pop("images", None)
        if images is None:
            return embeds
        ids = args[0].to_local() if isinstance(args[0], DTensor) else args[0]  # LLM tp: the plan made ids a DTensor
        return torch.where((ids == placeholder_id)[..., None], images.to(embeds.dtype), embeds)

    part.register_forward_pre_hook(take, with_kwargs=True)
    if embed is not None:
        embed.register_forward_hook(splice)


def build_language_pipeline(language: nn.Module, state: ParallelState, pipeline: dict, rows_per_step: int,
                            pad_id: int, placeholder_id: int, parallelize_fn) -> PipelineDriver:
    """AutoPipeline stages of the LLM on its grid, splicing on the first stage. `pipeline`: schedule,
    pp_microbatch_size, layers_per_stage, seq_len, dtype (parallel.* and data.max_seq_len, model.dtype)."""
    check_pipeline_split(language.config.num_hidden_layers, state.pp_size, pipeline["schedule"],
                         pipeline.get("layers_per_stage"))
    built = build_pipeline(
        language.to(state.device), state, schedule=pipeline["schedule"], rows_per_step=rows_per_step,
        pp_microbatch_size=pipeline["pp_microbatch_size"], layers_per_stage=pipeline.get("layers_per_stage"),
        seq_len=pipeline["seq_len"], compute_dtype=DTYPES[pipeline.get("dtype", "float32")],
        parallelize_fn=lambda part, **_: parallelize_fn(part))
    driver = PipelineDriver(built, rows_per_step, pad_id, state.dp_cp_group, state.pp_group, state.device,
                            first_stage_inputs=(IMAGE_EMBEDS,))
    install_splice(list(driver.info.model_parts), placeholder_id)
    return driver
