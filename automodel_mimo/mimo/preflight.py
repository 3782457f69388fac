"""MIMO checks that need the tokenizer and the encoder's config, run once by the CLI before ranks start.

config/checks.py (validate_mimo) checks the config on its own (layout, batch divisibility); these read files: the
placeholder must be a token of the tokenizer, the encoder config must load, its rows per image must equal
mimo.tokens_per_image, and the images must be preprocessed to the encoder's size. A model.pretrained must be a
LLaVA folder with a special image token (the placeholder then); its vision config and feature selection replace
mimo.encoder's. A dpo.reference folder must be a LLaVA folder whose modules have the run's shapes
(models/reference_shapes.py).
Each failure is one UserInputError naming the key and the fix.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from automodel_mimo.config import RunConfig
from automodel_mimo.distributed.grid_spec import LANGUAGE
from automodel_mimo.errors import UserInputError
from automodel_mimo.models.facts import check_expert_split, check_pipeline_split, check_tp_divisibility
from automodel_mimo.models.moe import is_moe
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


def rows_per_image(config: PretrainedConfig, select_strategy: str) -> int | None:
    """Encoder output rows per image (LLaVA's feature selection: "default" drops the first row), or None for a
    tower we do not know (checked at the first step then)."""
    extra = EXTRA_ROWS.get(config.model_type)
    if extra is None or not getattr(config, "patch_size", None):
        return None
    return (config.image_size // config.patch_size) ** 2 + extra - (select_strategy == "default")


def _check_llava_image_token(path: str, llava: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """The image token must be one of the tokenizer's added tokens: the data's <|image|> markers are written as it,
    and no text may tokenize into it."""
    index = llava.image_token_index
    if not 0 <= index < len(tokenizer):
        raise UserInputError(f"model.pretrained={path}: its image_token_index={index} is not a token of the tokenizer "
                             f"({len(tokenizer)} tokens); the LLaVA folder needs its image token in its tokenizer")
    if index not in tokenizer.added_tokens_decoder:
        raise UserInputError(f"model.pretrained={path}: its image token {tokenizer.convert_ids_to_tokens(index)!r} "
                             f"(image_token_index={index}) is not a special token of the tokenizer, so text could "
                             "tokenize into it; the LLaVA folder needs a special image token such as <image>")


def built_llava_config(mimo, vision_config: PretrainedConfig, llm_config: PretrainedConfig) -> PretrainedConfig:
    """The LLaVA config of a model built from mimo.encoder and model.config, as mimo/modules.py makes it."""
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=vision_config.to_dict(), text_config=llm_config.to_dict(),
                       vision_feature_layer=mimo.vision_feature_layer,
                       vision_feature_select_strategy=mimo.vision_feature_select_strategy)


def _check_reference(path: str, ours: PretrainedConfig) -> None:
    """dpo.reference=<folder>: a LLaVA folder whose modules have the run's parameter shapes (`ours`: its config)."""
    from transformers import LlavaForConditionalGeneration

    from automodel_mimo.mimo.llava import llava_config
    from automodel_mimo.models.reference_shapes import check_reference_shapes

    check_reference_shapes("dpo.reference", path, llava_config(path, "dpo.reference"), ours, LlavaForConditionalGeneration)


def _check_language_experts(llm_config: PretrainedConfig, ep: int) -> None:
    """mimo.layout.language.ep splits an MoE LLM's routed experts (a LLaVA folder's text model included)."""
    key = f"mimo.layout.{LANGUAGE}.ep"
    if ep > 1 and not is_moe(llm_config):
        raise UserInputError(f"{key}={ep} needs a mixture-of-experts language model; this one is a "
                             f"{llm_config.model_type} without routed experts (e.g. qwen3_moe with num_experts): "
                             f"set {key}=1")
    try:
        check_expert_split(llm_config, ep)
    except UserInputError as e:
        raise UserInputError(str(e).replace("parallel.ep", key)) from None


def check_mimo(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, llm_config: PretrainedConfig) -> None:
    m = cfg.mimo
    if m.placeholder_token != IMAGE:
        raise UserInputError(f"mimo.placeholder_token={m.placeholder_token!r}: the image data marks images with "
                             f"{IMAGE!r}; other placeholder tokens are not supported yet")
    if cfg.model.pretrained:  # a LLaVA folder: its image token, vision config and feature selection
        from automodel_mimo.mimo.llava import llava_config

        llava = llava_config(cfg.model.pretrained)
        _check_llava_image_token(cfg.model.pretrained, llava, tokenizer)
        config, strategy, llm_config = llava.vision_config, llava.vision_feature_select_strategy, llava.text_config
        source = f"the LLaVA folder's {config.model_type} tower (vision_feature_select_strategy={strategy})"
    else:
        config, strategy = encoder_config(m.encoder), m.vision_feature_select_strategy
        source = f"the {config.model_type} encoder"
    if not cfg.model.pretrained and m.placeholder_token not in tokenizer.get_vocab():
        raise UserInputError(f"mimo.placeholder_token={m.placeholder_token!r} is not a token of the tokenizer "
                             f"({cfg.model.tokenizer or cfg.model.pretrained}); add it as a special token (and resize "
                             "the LLM's embeddings), or use the built-in tokenizer (model.tokenizer: null), which has it")
    rows = rows_per_image(config, strategy)
    if rows is not None and rows != m.tokens_per_image:
        raise UserInputError(f"mimo.tokens_per_image={m.tokens_per_image}, but {source} yields {rows} rows per image; "
                             f"set mimo.tokens_per_image={rows}")
    size = getattr(config, "image_size", None)
    if size is not None and size != cfg.data.image_size:
        raise UserInputError(f"data.image_size={cfg.data.image_size}, but the encoder takes {size}x{size} images; "
                             f"set data.image_size={size}")
    if cfg.algo == "dpo" and cfg.dpo.reference != "initial":  # the reference is read as the export is written
        _check_reference(cfg.dpo.reference, llava if cfg.model.pretrained else built_llava_config(m, config, llm_config))
    vision_tp = m.layout[m.encoder_name].get("tp", 1)
    heads = getattr(config, "num_attention_heads", None)
    if vision_tp > 1 and heads is not None and heads % vision_tp:
        raise UserInputError(f"mimo.layout.{m.encoder_name}.tp={vision_tp} must divide the encoder's "
                             f"num_attention_heads={heads}")
    lm_tp, vocab = m.layout[LANGUAGE].get("tp", 1), getattr(llm_config, "vocab_size", None)
    if lm_tp > 1 and vocab is not None and vocab % lm_tp:  # uneven vocabulary shards break the gathers (a gloo abort)
        raise UserInputError(f"mimo.layout.{LANGUAGE}.tp={lm_tp} must divide the LLM's vocab_size={vocab}; pad the "
                             "vocabulary (and the embeddings) to a multiple of it, or choose another tp")
    p = cfg.parallel
    _check_language_experts(llm_config, m.layout[LANGUAGE].get("ep", 1))
    try:
        check_tp_divisibility(llm_config, lm_tp)
        check_pipeline_split(llm_config.num_hidden_layers, m.layout[LANGUAGE].get("pp", 1), p.pp_schedule,
                             p.layers_per_stage)
    except UserInputError as e:
        raise UserInputError(str(e).replace("parallel.tp", f"mimo.layout.{LANGUAGE}.tp")
                             .replace("parallel.pp=", f"mimo.layout.{LANGUAGE}.pp=")
                             .replace("change parallel.pp", f"change mimo.layout.{LANGUAGE}.pp")) from None
