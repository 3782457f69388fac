"""Chat messages -> token ids with next-token labels on the assistant tokens only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX

Message = dict[str, str]

_IDS = datasets.List(datasets.Value("int64"))
# Explicit so an empty split still has the columns.
FEATURES = datasets.Features(
    {"input_ids": _IDS, "labels": _IDS, "prompt_ids": _IDS, "reference": datasets.Value("string")}
)


def _render(messages: list[Message], tokenizer: PreTrainedTokenizerBase, *, generation_prompt: bool) -> list[int]:
    if not messages:  # transformers refuses to render an empty conversation; an assistant-first turn has no prompt
        return []
    # Special tokens come from the template text itself (e.g. a bos it writes), so add none here.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_ids(messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool], list[int]]:
    """Full ids, a mask of assistant tokens, and the prompt ids of the final assistant turn.

    Assistant turn k spans the tokens between messages[:k] (with generation prompt) and messages[:k+1];
    this holds only when each rendering is a token prefix of the next, which is checked.
    """
    ids = _render(messages, tokenizer, generation_prompt=False)
    is_target = [False] * len(ids)
    prompt_ids: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(messages[:k], tokenizer, generation_prompt=True)
        through = _render(messages[: k + 1], tokenizer, generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise UserInputError(
                f"the tokenizer's chat template does not render messages[:{k}] as a token prefix of "
                f"messages[:{k + 1}], so the assistant tokens cannot be located; set data.chat_template=false "
                "or use a tokenizer whose chat template only appends per message"
            )
        is_target[len(before) : len(through)] = [True] * (len(through) - len(before))
        prompt_ids = before
    return ids, is_target, prompt_ids


def _plain_ids(messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool], list[int]]:
    """Contents concatenated as-is; the first gets the tokenizer's own specials (e.g. bos), answers end in eos."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserInputError(
            "data.chat_template=false needs a tokenizer with an eos token; set data.chat_template=true"
        )
    ids: list[int] = []
    is_target: list[bool] = []
    prompt_ids: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt_ids = list(ids)
            segment = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [eos]
        else:
            segment = tokenizer(message["content"], add_special_tokens=k == 0)["input_ids"]
        ids += segment
        is_target += [message["role"] == "assistant"] * len(segment)
    return ids, is_target, prompt_ids


def conversation_ids(messages: list[Message], tokenizer: PreTrainedTokenizerBase,
                     use_chat_template: bool) -> tuple[list[int], list[bool], list[int]]:
    """(ids, is_target per id, prompt_ids of the final turn) of a conversation ending in the assistant target,
    through the tokenizer's chat template when it has one and `use_chat_template`, else plain turns."""
    if not messages or messages[-1]["role"] != "assistant":
        raise UserInputError("the last message must be the assistant target; fix the data or data.messages_key")
    if use_chat_template and tokenizer.chat_template is not None:
        return _chat_ids(messages, tokenizer)
    return _plain_ids(messages, tokenizer)


def _shifted_labels(ids: list[int], is_target: list[bool]) -> list[int]:
    """labels[t] is the token the model should predict after position t, or -100 where that is not a target."""
    labels = [ids[t + 1] if is_target[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return (labels + [IGNORE_INDEX]) if ids else []


def tokenize_messages(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    use_chat_template: bool = True,
    truncate: bool = False,
) -> dict[str, Any]:
    """input_ids, shifted labels (assistant tokens only), prompt_ids of the final turn and its reference text.

    prompt_ids is never truncated: it feeds generation, not the training sequence.
    """
    ids, is_target, prompt_ids = conversation_ids(messages, tokenizer, use_chat_template)
    if len(ids) > max_seq_len:
        if not truncate:
            raise UserInputError(
                f"data.max_seq_len={max_seq_len} is too short for {len(ids)} tokens; "
                "raise data.max_seq_len or set data.truncate=true"
            )
        ids, is_target = ids[:max_seq_len], is_target[:max_seq_len]
    labels = _shifted_labels(ids, is_target)
    if all(label == IGNORE_INDEX for label in labels):
        raise UserInputError(
            f"no assistant token is left to train on within data.max_seq_len={max_seq_len} "
            f"({len(prompt_ids)} prompt tokens); raise data.max_seq_len"
        )
    return {"input_ids": ids, "labels": labels, "prompt_ids": prompt_ids, "reference": messages[-1]["content"]}


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    use_chat_template: bool,
    truncate: bool,
    split_name: str,
) -> datasets.Dataset:
    """tokenize_messages over a `messages` dataset, in memory; errors name the split and row."""
    kept = {name: feature for name, feature in ds.features.items() if name != "messages"}
    return map_tokenized(
        ds, lambda row: tokenize_messages(row["messages"], tokenizer, max_seq_len=max_seq_len,
                                          use_chat_template=use_chat_template, truncate=truncate),
        datasets.Features({**kept, **FEATURES}), split_name)


def map_tokenized(ds: datasets.Dataset, tokenize_one: Callable[[dict[str, Any]], dict[str, Any]],
                  features: datasets.Features, split_name: str) -> datasets.Dataset:
    """`tokenize_one(row)` over every row, in memory, replacing `messages`; errors name the split and row."""

    def tokenize_row(row: dict[str, Any], idx: int) -> dict[str, Any]:
        try:
            return tokenize_one(row)
        except UserInputError as err:
            raise UserInputError(f"row {idx} of the {split_name} split: {err}") from err

    if len(ds) == 0:  # map on an empty dataset would not produce the new columns
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return ds.map(
        tokenize_row, with_indices=True, remove_columns=["messages"], features=features,
        load_from_cache_file=False, keep_in_memory=True,
    )
