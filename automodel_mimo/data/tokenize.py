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


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without added special tokens (they come from the template text itself, e.g. a
    bos it writes). A fast tokenizer's Rust backend is called directly: transformers' per-call Python overhead
    was the largest cost of tokenizing a dataset."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _renderings(messages: list[Message], tokenizer: PreTrainedTokenizerBase,
                prefixes: list[tuple[int, bool]]) -> dict[tuple[int, bool], list[int]]:
    """Token ids of messages[:n] (with the generation prompt when `gen`) for each (n, gen), tokenized in one
    batched call (per-call overhead dominated tokenizing a dataset one text at a time)."""
    unique = list(dict.fromkeys(prefixes))
    texts = {key: tokenizer.apply_chat_template(messages[:key[0]], tokenize=False, add_generation_prompt=key[1])
             for key in unique if key[0] > 0}  # an empty conversation renders as nothing (assistant-first turn)
    ids = dict(zip(texts, encode(tokenizer, list(texts.values()))))
    return {key: ids.get(key, []) for key in unique}


def _chat_ids(messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool], list[int]]:
    """Full ids, a mask of assistant tokens, and the prompt ids of the final assistant turn.

    Assistant turn k spans the tokens between messages[:k] (with generation prompt) and messages[:k+1];
    this holds only when each rendering is a token prefix of the next, which is checked.
    """
    turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    full = (len(messages), False)
    rendered = _renderings(messages, tokenizer, [full, *((k, True) for k in turns), *((k + 1, False) for k in turns)])
    ids = rendered[full]
    is_target = [False] * len(ids)
    prompt_ids: list[int] = []
    for k in turns:
        before, through = rendered[(k, True)], rendered[(k + 1, False)]
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
    eos = tokenizer.eos_token_id  # present: conversation_ids checked
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


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> None:
    """Conversations need a chat template or, rendered as plain turns, an eos token that ends each answer."""
    if tokenizer.eos_token_id is not None or (use_chat_template and tokenizer.chat_template is not None):
        return
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if use_chat_template:
        raise UserInputError(
            f"the tokenizer {name} has neither a chat template nor an eos token, so answers cannot be delimited; "
            "use a tokenizer that has one (model.tokenizer=<path>), or add a chat_template or eos_token to its "
            "tokenizer_config.json")
    raise UserInputError(
        f"data.chat_template=false renders turns as plain text ended by the eos token, but the tokenizer {name} "
        "has no eos token; set data.chat_template=true if it has a chat template, or use a tokenizer with an eos token")


def conversation_ids(messages: list[Message], tokenizer: PreTrainedTokenizerBase,
                     use_chat_template: bool) -> tuple[list[int], list[bool], list[int]]:
    """(ids, is_target per id, prompt_ids of the final turn) of a conversation ending in the assistant target,
    through the tokenizer's chat template when it has one and `use_chat_template`, else plain turns."""
    if not messages or messages[-1]["role"] != "assistant":
        raise UserInputError("the last message must be the assistant target; fix the data or data.messages_key")
    check_tokenizer(tokenizer, use_chat_template)
    if use_chat_template and tokenizer.chat_template is not None:
        return _chat_ids(messages, tokenizer)
    return _plain_ids(messages, tokenizer)


def shifted_labels(ids: list[int], is_target: list[bool]) -> list[int]:
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
    return labeled_row(ids, is_target, prompt_ids, messages, max_seq_len)


def labeled_row(ids: list[int], is_target: list[bool], prompt_ids: list[int], messages: list[Message],
                max_seq_len: int) -> dict[str, Any]:
    """A tokenized row: ids, shifted labels (at least one), the final turn's prompt ids and reference answer."""
    labels = shifted_labels(ids, is_target)
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
    check_tokenizer(tokenizer, use_chat_template)  # once before the rows, so the error names no row
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
