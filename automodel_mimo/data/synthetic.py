"""Synthetic tasks with exact answers: no downloads, and a grader that later serves as a reward."""

from __future__ import annotations

import random
from collections.abc import Callable

import datasets

from automodel_mimo.errors import UserInputError

# 10**9 operands give 10**18 pairs, the most a Python range can hold (its length must fit in 64 bits).
MAX_DIGITS = 9
# Explicit so an empty eval split still has string columns.
FEATURES = datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string")})


def sample_pairs(count: int, digits: int, seed: int) -> list[tuple[int, int]]:
    """Distinct (a, b) pairs, sampled without replacement so no pair repeats across splits."""
    if not 1 <= digits <= MAX_DIGITS:
        raise UserInputError(f"data.digits={digits} is out of range; set data.digits between 1 and {MAX_DIGITS}")
    base = 10**digits
    if count > base * base:
        raise UserInputError(
            f"data.num_train + data.num_eval = {count} exceeds the {base * base} distinct (a, b) pairs "
            f"with data.digits={digits}; lower data.num_train/data.num_eval or raise data.digits"
        )
    codes = random.Random(seed).sample(range(base * base), count)
    return [divmod(code, base) for code in codes]


def _to_dataset(pairs: list[tuple[int, int]], digits: int) -> datasets.Dataset:
    # Fixed width ("07+85=" -> "092"): every digit keeps its place value's position, which lets a tiny
    # model learn the carries in minutes instead of hours.
    return datasets.Dataset.from_dict(
        {"prompt": [f"{a:0{digits}d}+{b:0{digits}d}=" for a, b in pairs],
         "response": [f"{a + b:0{digits + 1}d}" for a, b in pairs]},
        features=FEATURES,
    )


def addition_dataset(num_train: int, num_eval: int, digits: int, seed: int) -> datasets.DatasetDict:
    """"a+b=" -> "sum" (zero-padded to fixed width) with operands uniform in [0, 10**digits); train and eval share no (a, b) pair."""
    if num_train < 1 or num_eval < 0:
        raise UserInputError(
            f"data.num_train={num_train}, data.num_eval={num_eval}: set data.num_train >= 1 and data.num_eval >= 0"
        )
    pairs = sample_pairs(num_train + num_eval, digits, seed)
    return datasets.DatasetDict({"train": _to_dataset(pairs[:num_train], digits), "eval": _to_dataset(pairs[num_train:], digits)})


def grade_exact(response: str, reference: str) -> bool:
    """True when the response equals the reference, ignoring surrounding whitespace."""
    return response.strip() == reference.strip()


SYNTHETIC_TASKS: dict[str, Callable[..., datasets.DatasetDict]] = {"addition": addition_dataset}
