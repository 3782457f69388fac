"""The start every algorithm shares: process group, tokenizer, data, the model behind its handle (an LM, its
pipeline stages, or a MIMO model), the microbatch builder, and the banner line; `count_parameters` for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
import torch.distributed as dist

from automodel_mimo.config import RunConfig
from automodel_mimo.config.compile import compiles
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.distributed.mesh import build_parallel_state, init_distributed
from automodel_mimo.models.build import build_lm_handle
from automodel_mimo.models.handle import Handle
from automodel_mimo.models.tokenizer import load_tokenizer


@dataclass
class Run:
    cfg: RunConfig
    tokenizer: object
    data: datasets.DatasetDict  # "train" and "eval" splits, tokenized
    handle: Handle
    builder: MicrobatchBuilder

    @property
    def rank0(self) -> bool:
        return dist.get_rank() == 0

    def say(self, tag: str, text: str) -> None:
        if self.rank0:
            print(f"[{tag}] {text}", flush=True)


def build_handle(cfg: RunConfig, tokenizer, device: torch.device) -> Handle:
    """The run's model behind its handle: a MIMO model when mimo.layout is set, else the causal LM."""
    if cfg.mimo.layout:
        from automodel_mimo.mimo.build import build_mimo_handle

        return build_mimo_handle(cfg, tokenizer, device)
    state = build_parallel_state(cfg.parallel, device, cfg.model.dtype, compiles(cfg, device.type))
    return build_lm_handle(cfg, tokenizer, state)


def start_run(cfg: RunConfig, prepare_data: Callable[[RunConfig, object], datasets.DatasetDict]) -> Run:
    """Collective: join the job, load the tokenizer and the data (`prepare_data(cfg, tokenizer)`: deterministic,
    so every rank computes and rejects the same rows), build the handle and the microbatch builder."""
    device = init_distributed(cfg.launch.dist_backend)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained)
    data = prepare_data(cfg, tokenizer)
    handle = build_handle(cfg, tokenizer, device)
    return Run(cfg, tokenizer, data, handle, MicrobatchBuilder.for_run(cfg, handle, tokenizer.pad_token_id))


def count_parameters(handle: Handle) -> int:
    """Whole-model count (collective): the handle's own, which knows how its parts are laid out."""
    return handle.num_parameters()
