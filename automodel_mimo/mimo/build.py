"""A MIMO model from the config: vision tower + projector and the LLM, built identically on every rank (same seed)
or loaded from a LLaVA folder (model.pretrained, mimo/llava.py), then parallelized, each module on its own grid,
behind a MimoHandle."""

from __future__ import annotations

import torch

from automodel_mimo.config import RunConfig
from automodel_mimo.config.compile import compiles
from automodel_mimo.errors import UserInputError
from automodel_mimo.mimo.handle import MimoHandle
from automodel_mimo.mimo.modules import build_vision_module
from automodel_mimo.models import packed_attention
from automodel_mimo.models.build import build_hf_config, build_model


def placeholder_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise UserInputError(f"mimo.placeholder_token={token!r} is not a token of the tokenizer; add it as a special token")
    return int(ids[0])


def build_mimo_handle(cfg: RunConfig, tokenizer, device: torch.device) -> MimoHandle:
    """Collective: every rank builds every module and every grid."""
    m = cfg.mimo
    packed = cfg.data.packing or m.layout["language"].get("cp", 1) > 1
    if cfg.model.pretrained:  # a LLaVA folder holds every module (mimo.encoder and model.config are not used)
        from automodel_mimo.mimo.llava import llava_config, load_llava

        llava_config(cfg.model.pretrained)  # a clear error for anything else
        vision, llm = load_llava(cfg.model.pretrained, packed_attention.NAME if packed else cfg.model.attn_implementation)
    else:
        hf_config = build_hf_config(cfg.model, tokenizer)
        vision = build_vision_module(m.encoder, hf_config, cfg.seed, m.vision_feature_layer, m.vision_feature_select_strategy)
        llm = build_model(cfg.model, hf_config, cfg.seed, packed=packed)
    p = cfg.parallel  # its pipeline keys apply to mimo.layout.language.pp
    pipeline = {"schedule": p.pp_schedule, "pp_microbatch_size": p.pp_microbatch_size, "layers_per_stage": p.layers_per_stage,
                "seq_len": cfg.data.max_seq_len, "micro_batch_size": cfg.train.micro_batch_size}
    # a LLaVA folder's image token is the placeholder (the data writes <|image|> markers as it)
    image = vision.llava_config.image_token_index if cfg.model.pretrained else placeholder_id(tokenizer, m.placeholder_token)
    return MimoHandle({m.encoder_name: vision}, llm, m.layout, device, image, m.tokens_per_image,
                      pad_id=tokenizer.pad_token_id, dtype=cfg.model.dtype, global_batch_size=cfg.train.global_batch_size,
                      pipeline=pipeline, compile=compiles(cfg, device.type),
                      activation_checkpointing=p.activation_checkpointing)
