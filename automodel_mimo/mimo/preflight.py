"""MIMO checks that need the tokenizer and the encoder's config, run once by the CLI before ranks start.

config/checks.py (validate_mimo) checks the config on its own (layout, batch divisibility); these read files: the
placeholder must be a token of the tokenizer, the encoder config must load, its rows per image must equal
mimo.tokens_per_image, and the images must be preprocessed to the encoder's size. Each failure is one
UserInputError naming the key and the fix.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from automodel_mimo.config import RunConfig
from automodel_mimo.distributed.grid_spec import LANGUAGE
from automodel_mimo.errors import UserInputError
from automodel_mimo.models.facts import check_pipeline_split, check_tp_divisibility
from automodel_mimo.models.tokenizer import IMAGE

# Encoder rows per image for the towers we know: SigLIP yields its patches, CLIP adds a class token.
EXTRA_ROWS = {"siglip_vision_model": 0, "clip_vision_model": 1}


def encoder_config(encoder: dict) -> PretrainedConfig:
    """The vision tower's config, from `mimo.encoder.pretrained` (a tower or a full CLIP/SigLIP) or its kwargs."""
    cfg = dict(encoder)
    try:
        if cfg.get("pretrained"):
            config = AutoConfig.from_pretrained(cfg["pretrained"])
            return getattr(config, "vision_config", config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (OSError, ValueError, TypeError, KeyError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserInputError(f"mimo.encoder: cannot load the encoder config ({detail})") from None


def rows_per_image(config: PretrainedConfig) -> int | None:
    """Encoder output rows per image, or None for a tower we do not know (checked at the first step then)."""
    extra = EXTRA_ROWS.get(config.model_type)
    if extra is None or not getattr(config, "patch_size", None):
        return None
    return (config.image_size // config.patch_size) ** 2 + extra


def check_mimo(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, llm_config: PretrainedConfig) -> None:
    m = cfg.mimo
    if m.placeholder_token != IMAGE:
        raise UserInputError(f"mimo.placeholder_token={m.placeholder_token!r}: the image data marks images with "
                             f"{IMAGE!r}; other placeholder tokens are not supported yet")
    if m.placeholder_token not in tokenizer.get_vocab():
        raise UserInputError(f"mimo.placeholder_token={m.placeholder_token!r} is not a token of the tokenizer "
                             f"({cfg.model.tokenizer or cfg.model.pretrained}); add it as a special token (and resize "
                             "the LLM's embeddings), or use the built-in tokenizer (model.tokenizer: null), which has it")
    config = encoder_config(m.encoder)
    rows = rows_per_image(config)
    if rows is not None and rows != m.tokens_per_image:
        raise UserInputError(f"mimo.tokens_per_image={m.tokens_per_image}, but the {config.model_type} encoder yields "
                             f"{rows} rows per image; set mimo.tokens_per_image={rows}")
    size = getattr(config, "image_size", None)
    if size is not None and size != cfg.data.image_size:
        raise UserInputError(f"data.image_size={cfg.data.image_size}, but the encoder takes {size}x{size} images; "
                             f"set data.image_size={size}")
    vision_tp = m.layout[m.encoder_name].get("tp", 1)
    heads = getattr(config, "num_attention_heads", None)
    if vision_tp > 1 and heads is not None and heads % vision_tp:
        raise UserInputError(f"mimo.layout.{m.encoder_name}.tp={vision_tp} must divide the encoder's "
                             f"num_attention_heads={heads}")
    p = cfg.parallel
    try:
        check_tp_divisibility(llm_config, m.layout[LANGUAGE].get("tp", 1))
        check_pipeline_split(llm_config.num_hidden_layers, m.layout[LANGUAGE].get("pp", 1), p.pp_schedule,
                             p.layers_per_stage)
    except UserInputError as e:
        raise UserInputError(str(e).replace("parallel.tp", f"mimo.layout.{LANGUAGE}.tp")
                             .replace("parallel.pp=", f"mimo.layout.{LANGUAGE}.pp=")
                             .replace("change parallel.pp", f"change mimo.layout.{LANGUAGE}.pp")) from None
