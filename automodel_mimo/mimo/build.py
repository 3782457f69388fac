"""A MIMO model from the config: vision tower + projector and the LLM, built identically on every rank (same seed),
then parallelized, each module on its own grid, behind a MimoHandle."""

from __future__ import annotations

import torch

from automodel_mimo.config import RunConfig
from automodel_mimo.errors import UserInputError
from automodel_mimo.mimo.handle import MimoHandle
from automodel_mimo.mimo.modules import build_vision_module
from automodel_mimo.models.build import build_hf_config, build_model


def placeholder_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise UserInputError(f"mimo.placeholder_token={token!r} is not a token of the tokenizer; add it as a special token")
    return int(ids[0])


def build_mimo_handle(cfg: RunConfig, tokenizer, device: torch.device) -> MimoHandle:
    """Collective: every rank builds every module and every grid."""
    m = cfg.mimo
    hf_config = build_hf_config(cfg.model, tokenizer)
    encoders = {m.encoder_name: build_vision_module(m.encoder, hf_config.hidden_size, cfg.seed, m.projector_hidden)}
    packed = cfg.data.packing or m.layout["language"].get("cp", 1) > 1
    llm = build_model(cfg.model, hf_config, cfg.seed, packed=packed)
    p = cfg.parallel  # its pipeline keys apply to mimo.layout.language.pp
    pipeline = {"schedule": p.pp_schedule, "pp_microbatch_size": p.pp_microbatch_size, "layers_per_stage": p.layers_per_stage,
                "seq_len": cfg.data.max_seq_len, "micro_batch_size": cfg.train.micro_batch_size}
    return MimoHandle(encoders, llm, m.layout, device, placeholder_id(tokenizer, m.placeholder_token), m.tokens_per_image,
                      pad_id=tokenizer.pad_token_id, dtype=cfg.model.dtype, global_batch_size=cfg.train.global_batch_size,
                      pipeline=pipeline)
