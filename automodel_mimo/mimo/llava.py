"""transformers' LLaVA layout (`LlavaForConditionalGeneration`) as the MIMO model's checkpoint format.

A MIMO model with one vision encoder is LLaVA's model split into modules: `<encoder>.encoder` is the vision tower,
`<encoder>.projector` the `multi_modal_projector` (linear-GELU-linear), `language` the causal LM (LLaVA's
`language_model` + `lm_head`). The features agree by construction (mimo/modules.py VisionModule reads
`vision_feature_layer` / `vision_feature_select_strategy` from the LLaVA config it carries), so the import and the
export are renames of the state dict; loading and saving are transformers' own (`from_pretrained`, with its key
mapping of older LLaVA checkpoints, and `save_pretrained`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from automodel_mimo.distributed.grid_spec import LANGUAGE
from automodel_mimo.errors import UserInputError
from automodel_mimo.mimo.handle import prefixed
from automodel_mimo.mimo.modules import VisionModule
from automodel_mimo.models.moe import build_moe_model, is_moe

# (MIMO prefix without the encoder's name, LLaVA prefix): LlavaForConditionalGeneration's module names
NAMES = ((".encoder.", "model.vision_tower."), (".projector.", "model.multi_modal_projector."),
         ("language.model.", "model.language_model."), ("language.lm_head.", "lm_head."))


def _prefixes(encoder_name: str) -> list[tuple[str, str]]:
    return [(encoder_name + ours if ours.startswith(".") else ours, theirs) for ours, theirs in NAMES]


def _rename(state: dict, pairs: list[tuple[str, str]]) -> dict:
    out = {}
    for key, value in state.items():
        old, new = next(((a, b) for a, b in pairs if key.startswith(a)), (None, None))
        if old is None:
            raise KeyError(f"{key}: no LLaVA name for it")
        out[new + key[len(old):]] = value
    return out


def to_llava(state: dict, encoder_name: str) -> dict:
    """MIMO state names (`<encoder>.encoder.*`, `language.*`) -> LlavaForConditionalGeneration's."""
    return _rename(state, _prefixes(encoder_name))


def from_llava(state: dict, encoder_name: str) -> dict:
    """LlavaForConditionalGeneration's state names -> MIMO's."""
    return _rename(state, [(b, a) for a, b in _prefixes(encoder_name)])


def llava_config(path: str, field: str = "model.pretrained") -> LlavaConfig:
    """The LLaVA config of `model.pretrained` (or `field`: a local folder or hub name); anything else is a
    UserInputError."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserInputError(f"{field}={path}: cannot load its config ({detail})") from None
    if not isinstance(config, LlavaConfig):
        unset = " or unset (the modules from model.config and mimo.encoder)" if field == "model.pretrained" else ""
        raise UserInputError(f"{field}={path} is a {config.model_type} checkpoint; under mimo it must be a "
                             f"transformers LLaVA folder (model_type llava, e.g. the hf/ export of a MIMO run){unset}")
    return config


def _complete_llava(path: str, field: str = "model.pretrained") -> LlavaForConditionalGeneration:
    """The LLaVA checkpoint, fp32 on CPU; weights its config needs but the checkpoint lacks are an error
    (transformers would initialize them at random, after a report only)."""
    llava, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserInputError(f"{field}={path}: {len(missing)} weights of its LLaVA config are missing from "
                             f"its checkpoint (e.g. {missing[0]}); point it at a complete LLaVA folder")
    return llava


def llava_state(path: str, encoder_name: str, field: str = "model.pretrained") -> dict:
    """A LLaVA checkpoint's full tensors under the MIMO model's names (`<encoder>.encoder.*`, `language.*`)."""
    return from_llava(_complete_llava(path, field).state_dict(), encoder_name)


def load_llava(path: str, attn_implementation: str = "sdpa") -> tuple[VisionModule, nn.Module]:
    """The vision module and the causal LM of a LLaVA checkpoint, fp32 on CPU, the same on every rank."""
    llava = _complete_llava(path)
    vision = VisionModule(llava.model.vision_tower, llava.model.multi_modal_projector, llava.config)
    llm = AutoModelForCausalLM.from_config(llava.config.text_config, dtype=torch.float32,
                                           attn_implementation=attn_implementation)
    llm.load_state_dict(prefixed(from_llava(llava.state_dict(), "vision"), LANGUAGE + "."), strict=True)
    llm.tie_weights()
    llm.config.use_cache = False
    if is_moe(llm.config):  # nemo's MoE layers holding the folder's experts, as build_model's (docs/moe.md)
        llm = build_moe_model(llm)
    return vision, llm


def export_config(llava_config: LlavaConfig, vision_config, text_config, image_token_id: int,
                  tokens_per_image: int) -> LlavaConfig:
    """The LLaVA config of a MIMO model: its vision module's (`VisionModule.llava_config`, `.encoder.config`),
    with the LLM's current config and the image token."""
    config = copy.deepcopy(llava_config)
    config.vision_config = copy.deepcopy(vision_config)
    config.text_config = copy.deepcopy(text_config)
    config.text_config.use_cache = True
    config.image_token_index, config.image_seq_length = image_token_id, tokens_per_image
    config.tie_word_embeddings = bool(text_config.tie_word_embeddings)
    return config


def save_llava(state: dict, encoder_name: str, config: LlavaConfig, tokenizer, folder: Path) -> None:
    """`state` (full MIMO tensors) as a LlavaForConditionalGeneration folder with the tokenizer."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.load_state_dict(to_llava(state, encoder_name), assign=True, strict=True)
    model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
