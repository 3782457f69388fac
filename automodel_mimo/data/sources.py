"""Every dataset source (synthetic task, local file or directory, hub name) normalized to chat `messages`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError

from automodel_mimo.data.paths import FILE_BUILDERS, SYNTHETIC_PREFIX, looks_like_path
from automodel_mimo.data.synthetic import SYNTHETIC_TASKS
from automodel_mimo.errors import UserInputError

# Explicit so an empty split still gets the column, and every source yields the same schema.
MESSAGE = {"role": datasets.Value("string"), "content": datasets.Value("string")}
FEATURES = datasets.Features({"messages": datasets.List(MESSAGE)})
# prepare(split, split_name): what a loader does to each split after conversion (e.g. tokenization)
Prepare = Callable[[datasets.Dataset, str], datasets.Dataset]


def _load_synthetic(task: str, *, num_train: int, num_eval: int, digits: int, seed: int) -> datasets.DatasetDict:
    if task not in SYNTHETIC_TASKS:
        raise UserInputError(
            f"data.dataset=synthetic:{task} is not a synthetic task; use one of "
            + ", ".join(f"synthetic:{name}" for name in sorted(SYNTHETIC_TASKS))
        )
    return SYNTHETIC_TASKS[task](num_train=num_train, num_eval=num_eval, digits=digits, seed=seed)


def load_raw(source: str, name: str | None) -> datasets.DatasetDict:
    """A local file, a local directory, or a hub dataset, as loaded by `datasets`."""
    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise UserInputError(
                f"data.dataset={source} has an unsupported extension; use one of {', '.join(FILE_BUILDERS)}"
            )
        return datasets.load_dataset(builder, data_files=str(path))
    if path.is_dir():
        return datasets.load_dataset(str(path), name=name)
    if looks_like_path(source):
        raise UserInputError(
            f"data.dataset={source} does not exist; point data.dataset at an existing file or directory"
        )
    try:
        return datasets.load_dataset(source, name=name)
    except DatasetNotFoundError as err:
        raise UserInputError(
            f"data.dataset={source} is neither a local path nor a hub dataset this machine can reach; "
            f"fix data.dataset ({err})"
        ) from err


def train_eval(
    raw: datasets.DatasetDict, *, train_split: str, eval_split: str | None, eval_fraction: float, seed: int
) -> datasets.DatasetDict:
    """Use the named eval split when present; otherwise hold out eval_fraction of train."""
    return hold_out(pick_splits(raw, train_split=train_split, eval_split=eval_split),
                     eval_fraction=eval_fraction, seed=seed)


def pick_splits(raw: datasets.DatasetDict, *, train_split: str, eval_split: str | None) -> datasets.DatasetDict:
    """"train" (data.train_split), and "eval" when the dataset has data.eval_split; rows in the files' order."""
    if train_split not in raw:
        raise UserInputError(
            f"data.train_split={train_split} is not a split of the dataset; use one of {', '.join(raw)}"
        )
    if eval_split is not None and eval_split in raw:
        return datasets.DatasetDict({"train": raw[train_split], "eval": raw[eval_split]})
    return datasets.DatasetDict({"train": raw[train_split]})


def hold_out(splits: datasets.DatasetDict, *, eval_fraction: float, seed: int) -> datasets.DatasetDict:
    """Without an "eval" split, eval_fraction of "train" held out (a seeded shuffle, the same for any columns)."""
    if "eval" in splits:
        return splits
    if not 0.0 < eval_fraction < 1.0:
        raise UserInputError(
            f"data.eval_fraction={eval_fraction} must be in (0, 1) to hold out an eval split from train"
        )
    parts = splits["train"].train_test_split(test_size=eval_fraction, seed=seed)
    return datasets.DatasetDict({"train": parts["train"], "eval": parts["test"]})


def require_column(ds: datasets.Dataset, column: str, key: str) -> None:
    if column not in ds.column_names:
        offer_messages = key != "data.messages_key" and "messages" in ds.column_names
        hint = ", or set data.messages_key=messages" if offer_messages else ""
        raise UserInputError(
            f"{key}={column} is not a column of the dataset; set {key} to one of {', '.join(ds.column_names)}{hint}"
        )


def _as_text(value: Any, key: str, row: int) -> str:
    """Strings pass through; numbers (as CSV columns often are) become their text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserInputError(f"{key}: row {row} holds {type(value).__name__} {value!r}, not text; fix the data or {key}")


def pair_to_messages(row: dict[str, Any], idx: int, prompt_key: str, response_key: str) -> dict[str, Any]:
    prompt = _as_text(row[prompt_key], "data.prompt_key", idx)
    response = _as_text(row[response_key], "data.response_key", idx)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def clean_messages(row: dict[str, Any], idx: int, messages_key: str) -> dict[str, Any]:
    """Keep only role/content, and check the conversation ends with the assistant target."""
    messages = row[messages_key]
    where = f"data.messages_key={messages_key}: row {idx}"
    if not isinstance(messages, list) or not messages:
        raise UserInputError(
            f"{where} is not a non-empty list of {{role, content}} messages; fix the data or data.messages_key"
        )
    cleaned = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserInputError(f"{where} has a message without a string 'role'; fix the data or data.messages_key")
        cleaned.append({"role": message["role"], "content": _as_text(message.get("content"), "data.messages_key", idx)})
    if cleaned[-1]["role"] != "assistant":
        raise UserInputError(
            f"{where} ends with role {cleaned[-1]['role']!r}; the last message must be the assistant target"
        )
    return {"messages": cleaned}


def chat_column(ds: datasets.Dataset, prompt_key: str, messages_key: str | None) -> str | None:
    """The chat column to read: data.messages_key, or `messages` when the data has it and no prompt column."""
    if messages_key is None and prompt_key not in ds.column_names and "messages" in ds.column_names:
        return "messages"
    return messages_key


def _to_messages(
    ds: datasets.Dataset, split: str, *, prompt_key: str, response_key: str, messages_key: str | None
) -> datasets.Dataset:
    messages_key = chat_column(ds, prompt_key, messages_key)
    if messages_key is not None:
        require_column(ds, messages_key, "data.messages_key")
        fn, kwargs = clean_messages, {"messages_key": messages_key}
    else:
        require_column(ds, prompt_key, "data.prompt_key")
        require_column(ds, response_key, "data.response_key")
        fn, kwargs = pair_to_messages, {"prompt_key": prompt_key, "response_key": response_key}
    if len(ds) == 0:  # map on an empty dataset would not produce the new column
        return datasets.Dataset.from_dict({"messages": []}, features=FEATURES)
    try:
        return ds.map(
            fn, fn_kwargs=kwargs, with_indices=True, remove_columns=ds.column_names, features=FEATURES,
            load_from_cache_file=False, keep_in_memory=True,
        )
    except UserInputError as err:
        raise UserInputError(f"{split} split: {err}") from err


def load_sft_dataset(
    source: str,
    *,
    seed: int,
    prompt_key: str = "prompt",
    response_key: str = "response",
    messages_key: str | None = None,
    train_split: str = "train",
    eval_split: str | None = "test",
    eval_fraction: float = 0.05,
    num_train: int = 9500,
    num_eval: int = 500,
    digits: int = 2,
    name: str | None = None,
    prepare: Prepare | None = None,
) -> datasets.DatasetDict:
    """Splits "train" and "eval", each with one column `messages` whose last message is the assistant target
    (or what `prepare(split, split_name)` makes of it, e.g. the tokenized rows).

    Conversion and `prepare` run on the dataset's own splits in the files' row order, before eval_fraction is
    held out, so a row error names the row of the file (row i of a .jsonl is its line i + 1, blank lines aside).
    num_train/num_eval/digits apply to synthetic tasks only; the defaults fill the 10**4 two-digit pairs.
    """

    def convert(ds: datasets.Dataset, split: str) -> datasets.Dataset:
        ds = _to_messages(ds, split, prompt_key=prompt_key, response_key=response_key, messages_key=messages_key)
        return prepare(ds, split) if prepare is not None else ds

    if source.startswith(SYNTHETIC_PREFIX):
        task = source[len(SYNTHETIC_PREFIX):]
        splits = _load_synthetic(task, num_train=num_train, num_eval=num_eval, digits=digits, seed=seed)
        return datasets.DatasetDict({split: convert(ds, split) for split, ds in splits.items()})
    picked = pick_splits(load_raw(source, name), train_split=train_split, eval_split=eval_split)
    shown = {"train": train_split, "eval": eval_split}  # the dataset's own split names
    converted = datasets.DatasetDict({split: convert(ds, shown[split]) for split, ds in picked.items()})
    return hold_out(converted, eval_fraction=eval_fraction, seed=seed)
