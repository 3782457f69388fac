"""MIMO rows (images + chat messages) -> token ids with one placeholder per encoder output row.

The prompt holds one `<|image|>` marker per image (written as the model's own image token when a LLaVA
checkpoint has another one); each marker token becomes `tokens_per_image` contiguous placeholder ids, which
the model overwrites with the projected encoder rows. Labels follow the text path (data/tokenize.py): shifted,
on assistant tokens only, so placeholders never carry loss.
"""

from __future__ import annotations

from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from automodel_mimo.data.images import _UNDECODED, load_image_dataset
from automodel_mimo.data.tokenize import FEATURES as TEXT_FEATURES
from automodel_mimo.data.tokenize import Message, conversation_ids, labeled_row, map_tokenized
from automodel_mimo.errors import UserInputError
from automodel_mimo.models.tokenizer import IMAGE, image_token_id

FEATURES = datasets.Features({**TEXT_FEATURES, "num_images": datasets.Value("int64")})


def _expand(ids: list[int], is_target: list[bool], placeholder_id: int, tokens_per_image: int) -> tuple[list[int], list[bool]]:
    out_ids: list[int] = []
    out_target: list[bool] = []
    for token, target in zip(ids, is_target):
        repeat = tokens_per_image if token == placeholder_id else 1
        out_ids += [token] * repeat
        out_target += [target] * repeat
    return out_ids, out_target


def tokenize_mimo_messages(
    messages: list[Message],
    num_images: int,
    tokenizer: PreTrainedTokenizerBase,
    *,
    placeholder_id: int,
    tokens_per_image: int,
    max_seq_len: int,
    use_chat_template: bool = True,
    truncate: bool = False,
) -> dict[str, Any]:
    """input_ids with expanded placeholders, shifted labels (assistant tokens only), prompt_ids, reference, num_images.

    prompt_ids (the final turn's prompt, placeholders expanded) is never truncated: it feeds generation.
    Truncation cuts text after the last placeholder only; a cut through an image is an error.
    """
    marker = tokenizer.convert_ids_to_tokens(placeholder_id)
    if marker != IMAGE:  # a LLaVA checkpoint's own image token (e.g. <image>); the data marks images with <|image|>
        messages = [{**m, "content": m["content"].replace(IMAGE, marker)} for m in messages]
    ids, is_target, prompt_ids = conversation_ids(messages, tokenizer, use_chat_template)
    if any(token == placeholder_id and target for token, target in zip(ids, is_target)):
        raise UserInputError(f"an assistant message holds the image marker {marker}; images belong in the prompt")
    markers = ids.count(placeholder_id)
    if markers != num_images or prompt_ids.count(placeholder_id) != num_images:
        raise UserInputError(
            f"the prompt holds {markers} {marker} markers but the row has {num_images} images (data.image_key); "
            f"put one {marker} in the prompt per image"
        )
    ids, is_target = _expand(ids, is_target, placeholder_id, tokens_per_image)
    prompt_ids, _ = _expand(prompt_ids, [False] * len(prompt_ids), placeholder_id, tokens_per_image)
    if len(ids) > max_seq_len:
        if not truncate:
            raise UserInputError(
                f"data.max_seq_len={max_seq_len} is too short for {len(ids)} tokens "
                f"({num_images} images x {tokens_per_image} placeholders); raise data.max_seq_len or set data.truncate=true"
            )
        last_placeholder = max((t for t, token in enumerate(ids) if token == placeholder_id), default=-1)
        if last_placeholder >= max_seq_len:
            raise UserInputError(
                f"data.max_seq_len={max_seq_len} would cut through image placeholders (the last is at position "
                f"{last_placeholder}); raise data.max_seq_len"
            )
        ids, is_target = ids[:max_seq_len], is_target[:max_seq_len]
    return {**labeled_row(ids, is_target, prompt_ids, messages, max_seq_len), "num_images": num_images}


def tokenize_mimo_dataset(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    placeholder_id: int,
    tokens_per_image: int,
    max_seq_len: int,
    use_chat_template: bool,
    truncate: bool,
    split_name: str,
) -> datasets.Dataset:
    """tokenize_mimo_messages over an `images` + `messages` dataset (data/images.py); keeps `images`."""
    images = ds.features["images"]
    features = datasets.Features({"images": _UNDECODED["images"], **FEATURES})
    # Undecoded while mapping: only the image count matters here, and decoding every image would be slow.
    undecoded = ds.cast_column("images", _UNDECODED["images"]) if len(ds) else ds
    out = map_tokenized(
        undecoded, lambda row: tokenize_mimo_messages(
            row["messages"], len(row["images"]), tokenizer, placeholder_id=placeholder_id,
            tokens_per_image=tokens_per_image, max_seq_len=max_seq_len,
            use_chat_template=use_chat_template, truncate=truncate),
        features, split_name)
    return out.cast_column("images", images)


def run_placeholder_id(cfg, tokenizer: PreTrainedTokenizerBase) -> int:
    """The image placeholder of a run: a LLaVA model.pretrained's own image token, else the tokenizer's <|image|>."""
    if cfg.model.pretrained:  # a LLaVA folder (mimo/llava.py)
        from automodel_mimo.mimo.llava import llava_config

        return llava_config(cfg.model.pretrained).image_token_index
    return image_token_id(tokenizer)


def prepare_mimo_data(cfg, tokenizer: PreTrainedTokenizerBase, tokens_per_image: int) -> datasets.DatasetDict:
    """Load (data.dataset, data.image_key, ...) and tokenize for a RunConfig; deterministic on every rank.

    Splits "train" and "eval": images, input_ids, labels, prompt_ids, reference, num_images.
    """
    d = cfg.data
    raw = load_image_dataset(
        d.dataset, seed=cfg.seed, image_key=d.image_key, prompt_key=d.prompt_key, response_key=d.response_key,
        messages_key=d.messages_key, train_split=d.train_split, eval_split=d.eval_split,
        eval_fraction=d.eval_fraction, name=d.name, num_train=d.num_train, num_eval=d.num_eval,
        image_size=d.image_size, text_only_fraction=d.text_only_fraction)
    placeholder_id = run_placeholder_id(cfg, tokenizer)
    return datasets.DatasetDict({
        split: tokenize_mimo_dataset(ds, tokenizer, placeholder_id=placeholder_id, tokens_per_image=tokens_per_image,
                                     max_seq_len=d.max_seq_len, use_chat_template=d.chat_template,
                                     truncate=d.truncate, split_name=split)
        for split, ds in raw.items()})
