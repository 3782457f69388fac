"""A tokenized split as training rows: the dicts the microbatch builder takes (data/microbatches.py).

Text rows carry `input_ids` and `labels`; a split with an `images` column (MIMO data, data/mimo_tokenize.py)
also gives each row its `pixel_values`, decoded and preprocessed only when the row is taken.
"""

from __future__ import annotations

import datasets

from automodel_mimo.data.images import ImageProcessor


class Rows:
    def __init__(self, split: datasets.Dataset, processor: ImageProcessor | None = None):
        self.split, self.processor = split, processor

    def __len__(self) -> int:
        return len(self.split)

    def take(self, indices: list[int]) -> list[dict]:
        """The rows at `indices`, in that order."""
        columns = self.split[indices]
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(columns["input_ids"], columns["labels"])]
        if self.processor is not None:
            for row, images in zip(rows, columns["images"]):
                row["pixel_values"] = self.processor(images)
        return rows
