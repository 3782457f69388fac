"""MIMO supervised fine-tuning: the SPMD loop every rank runs (colocated grids, docs/mimo.md).

data (seed, step) -> global batch -> this rank's block (the dp block of the module with the fewest dp
ranks, MimoModel.data_parallel) -> microbatches (collate_fn: rows -> the MIMO batch contract) -> policy
train step -> metrics / checkpoint. The dataset and its collation come from the caller (the data side
owns images, placeholder expansion and collation); this loop only needs rows it can index and a collate_fn
that returns input_ids/labels/attention_mask, pixel_values (batch-major) and image_counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from automodel_mimo.checkpoint import Checkpointer
from automodel_mimo.config import RunConfig
from automodel_mimo.data.batching import global_batch_indices, local_slice, split_microbatches
from automodel_mimo.distributed.mesh import init_distributed
from automodel_mimo.errors import UserInputError
from automodel_mimo.metrics import MetricsLogger
from automodel_mimo.mimo.model import MimoModel, build_vision_module
from automodel_mimo.models.build import build_hf_config, build_model
from policies.mimo_policy import MimoPolicy

CollateFn = Callable[[list], dict]


def placeholder_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise UserInputError(f"mimo.placeholder_token={token!r} is not a token of the tokenizer; add it as a special token")
    return int(ids[0])


def build_mimo(cfg: RunConfig, tokenizer, device: torch.device) -> MimoModel:
    """Encoder + projector and LLM built identically on every rank (same seed), then parallelized per grid."""
    m = cfg.mimo
    hf_config = build_hf_config(cfg.model, tokenizer)
    encoders = {m.encoder_name: build_vision_module(m.encoder, hf_config.hidden_size, cfg.seed, m.projector_hidden)}
    llm = build_model(cfg.model, hf_config, cfg.seed, packed=m.layout["language"].get("cp", 1) > 1)
    return MimoModel(encoders, llm, m.layout, device, placeholder_id(tokenizer, m.placeholder_token), m.tokens_per_image,
                     pad_id=tokenizer.pad_token_id, dtype=cfg.model.dtype, global_batch_size=cfg.train.global_batch_size)


def step_microbatches(cfg: RunConfig, dataset: Sequence, collate_fn: CollateFn, model: MimoModel, step: int) -> list[dict]:
    """This rank's microbatches of the global batch of `step` (0-based)."""
    t = cfg.train
    indices = global_batch_indices(step, len(dataset), t.global_batch_size, cfg.seed)
    index, count = model.data_parallel()
    rows = [dataset[i] for i in local_slice(indices, index, count)]
    return [{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in collate_fn(mb).items()}
            for mb in split_microbatches(rows, t.micro_batch_size)]


def run_mimo_sft(cfg: RunConfig, tokenizer, dataset: Sequence, collate_fn: CollateFn) -> None:
    device = init_distributed(cfg.launch.backend)
    model = build_mimo(cfg, tokenizer, device)
    policy = MimoPolicy(model, cfg.train)
    ckpt = Checkpointer(cfg.output_dir, cfg.checkpoint.keep_last)
    start = 0
    if cfg.checkpoint.resume and (latest := ckpt.latest()) is not None:
        start = ckpt.load(latest, model, policy.optimizer)
    rank0 = dist.get_rank() == 0
    if rank0:
        sizes = ", ".join(f"{n}: " + " ".join(f"{d}{g.size(d)}" for d in ("dp", "tp", "cp")) for n, g in model.grids.items())
        print(f"[mimo_sft] {dist.get_world_size()} ranks ({sizes}), {len(dataset)} train rows, start step {start}",
              flush=True)
    logger = MetricsLogger(cfg, start, enabled=rank0)
    began = time.perf_counter()
    for step in range(start, cfg.train.max_steps):
        t0 = time.perf_counter()
        metrics = policy.sft_train_step(step_microbatches(cfg, dataset, collate_fn, model, step))
        done = step + 1
        logger.log({"step": done, **metrics, "tokens_per_s": metrics["tokens"] / (time.perf_counter() - t0),
                    "elapsed_s": time.perf_counter() - began})
        if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0:
            ckpt.save(done, model, policy.optimizer)
    logger.close()
    model.destroy()
    dist.barrier()
