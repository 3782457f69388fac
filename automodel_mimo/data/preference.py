"""Preference pairs for DPO: synthetic (a right and a wrong sum), local files or hub datasets, as
(chosen, rejected) chat conversations, tokenized into two SFT-style rows per pair.

Columns accepted: `prompt` (text, or a list of chat messages, or absent) with `chosen` / `rejected` (text,
or a list of messages ending with the assistant answer). Key names come from data.prompt_key,
dpo.chosen_key and dpo.rejected_key.
"""

from __future__ import annotations

import random
from typing import Any

import datasets

from automodel_mimo.data.paths import SYNTHETIC_PREFIX
from automodel_mimo.data.sources import Prepare, hold_out, load_raw, pick_splits
from automodel_mimo.data.synthetic import sample_pairs
from automodel_mimo.data.tokenize import tokenize_messages
from automodel_mimo.errors import UserInputError

_IDS = datasets.List(datasets.Value("int64"))
# the pair's two rows, plus the chosen conversation's prompt and answer (held-out greedy accuracy of the warm-up)
TOKENIZED = datasets.Features({**{f"{side}_{key}": _IDS for side in ("chosen", "rejected") for key in ("input_ids", "labels")},
                               "prompt_ids": _IDS, "reference": datasets.Value("string")})


def wrong_sum(a: int, b: int, digits: int, rng: random.Random) -> str:
    """The fixed-width sum of a and b with one digit replaced by a different one: wrong, but plausible."""
    right = f"{a + b:0{digits + 1}d}"
    pos = rng.randrange(len(right))
    digit = rng.choice([d for d in "0123456789" if d != right[pos]])
    return right[:pos] + digit + right[pos + 1:]


def addition_preferences(num_train: int, num_eval: int, digits: int, seed: int) -> datasets.DatasetDict:
    """"a+b=" with the right sum chosen and a one-digit-wrong sum rejected; train and eval share no (a, b)."""
    if num_train < 1 or num_eval < 0:
        raise UserInputError(f"data.num_train={num_train}, data.num_eval={num_eval}: set data.num_train >= 1 and data.num_eval >= 0")
    pairs = sample_pairs(num_train + num_eval, digits, seed)
    rng = random.Random(seed + 1)
    rows = {"prompt": [f"{a:0{digits}d}+{b:0{digits}d}=" for a, b in pairs],
            "chosen": [f"{a + b:0{digits + 1}d}" for a, b in pairs],
            "rejected": [wrong_sum(a, b, digits, rng) for a, b in pairs]}
    full = datasets.Dataset.from_dict(rows)
    return datasets.DatasetDict({"train": full.select(range(num_train)), "eval": full.select(range(num_train, len(full)))})


SYNTHETIC_PREFERENCES = {"addition": addition_preferences}


def load_preference_dataset(cfg, prepare: Prepare | None = None) -> datasets.DatasetDict:
    """Splits "train" and "eval" with columns `chosen` and `rejected`: lists of chat messages (or what
    `prepare(split, split_name)` makes of them). As in load_sft_dataset, conversion and `prepare` run in the
    files' row order before the eval hold-out, so row errors name the file's row."""
    d = cfg.data

    def convert(ds: datasets.Dataset, split: str, keys: tuple) -> datasets.Dataset:
        ds = _to_conversations(ds, split, *keys)
        return prepare(ds, split) if prepare is not None else ds

    if d.dataset.startswith(SYNTHETIC_PREFIX):
        task = d.dataset[len(SYNTHETIC_PREFIX):]
        if task not in SYNTHETIC_PREFERENCES:
            raise UserInputError(f"data.dataset={d.dataset}: dpo's synthetic tasks are "
                                 + ", ".join(f"synthetic:{t}" for t in SYNTHETIC_PREFERENCES))
        raw = SYNTHETIC_PREFERENCES[task](d.num_train, d.num_eval, d.digits, cfg.seed)
        return datasets.DatasetDict({split: convert(ds, split, ("prompt", "chosen", "rejected"))
                                     for split, ds in raw.items()})
    picked = pick_splits(load_raw(d.dataset, d.name), train_split=d.train_split, eval_split=d.eval_split)
    keys = (d.prompt_key, cfg.dpo.chosen_key, cfg.dpo.rejected_key)
    shown = {"train": d.train_split, "eval": d.eval_split}  # the dataset's own split names
    converted = datasets.DatasetDict({split: convert(ds, shown[split], keys) for split, ds in picked.items()})
    return hold_out(converted, eval_fraction=d.eval_fraction, seed=cfg.seed)


def _messages(value: Any, key: str, row: int, split: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserInputError(f"{key}: row {row} of the {split} split holds {type(value).__name__}, not text or a list of "
                         "{role, content} messages; fix the data or the key")


def _to_conversations(ds: datasets.Dataset, split: str, prompt_key: str, chosen_key: str, rejected_key: str) -> datasets.Dataset:
    for column, key in ((chosen_key, "dpo.chosen_key"), (rejected_key, "dpo.rejected_key")):
        if column not in ds.column_names:
            raise UserInputError(f"{key}={column} is not a column of the {split} split; set {key} to one of "
                                 f"{', '.join(ds.column_names)}")
    has_prompt = prompt_key in ds.column_names
    out = {"chosen": [], "rejected": []}
    for i, row in enumerate(ds):
        prompt = row[prompt_key] if has_prompt else []
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "data.prompt_key", i, split)
        for side, column, key in (("chosen", chosen_key, "dpo.chosen_key"), ("rejected", rejected_key, "dpo.rejected_key")):
            messages = _messages(row[column], key, i, split)
            if all(m["role"] == "assistant" for m in messages):  # the answer only; else a whole conversation
                messages = prompt + messages
            if messages[-1]["role"] != "assistant":
                raise UserInputError(f"{key}: row {i} of the {split} split does not end with an assistant message")
            out[side].append(messages)
    return datasets.Dataset.from_dict(out)


def tokenize_pairs(ds: datasets.Dataset, tokenizer, *, max_seq_len: int, use_chat_template: bool, truncate: bool,
                   split_name: str) -> datasets.Dataset:
    """Each pair as two rows' input_ids / labels (response tokens only), prefixed chosen_ and rejected_."""
    out = {name: [] for name in TOKENIZED}
    for i, row in enumerate(ds):
        append_pair(out, row, f"row {i} of the {split_name} split", lambda messages: tokenize_messages(
            messages, tokenizer, max_seq_len=max_seq_len, use_chat_template=use_chat_template, truncate=truncate))
    return datasets.Dataset.from_dict(out, features=TOKENIZED)


def append_pair(out: dict, row: dict, where: str, tokenize) -> None:
    """Both sides of one pair, `tokenize(messages)` each, into `out`'s chosen_/rejected_ columns (and the chosen
    side's prompt_ids and reference); bad input names its side and `where`."""
    for side in ("chosen", "rejected"):
        try:
            t = tokenize(row[side])
        except UserInputError as err:
            raise UserInputError(f"{side} of {where}: {err}") from err
        out[f"{side}_input_ids"].append(t["input_ids"])
        out[f"{side}_labels"].append(t["labels"])
        if side == "chosen":
            out["prompt_ids"].append(t["prompt_ids"])
            out["reference"].append(t["reference"])


def pair_rows(ds: datasets.Dataset, processor=None, sides: tuple[str, ...] = ("chosen", "rejected")) -> list[dict]:
    """Tokenized pairs -> rows in pair order: chosen, rejected, chosen, rejected, ... (`sides`: only some). With an
    image `processor` (pairs with images, data/image_preference.py) both rows of a pair carry the prompt's images
    as `pixel_values`, preprocessed once."""
    rows = []
    for pair in ds:
        pixels = processor(pair["images"]) if processor is not None else None
        for side in sides:
            row = {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
            rows.append(row if pixels is None else {**row, "pixel_values": pixels})
    return rows
