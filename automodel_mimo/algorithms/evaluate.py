"""Held-out greedy accuracy through the trainer's own model (any handle: an LM, pipeline stages, a MIMO model).

Prompts are spread over the data blocks (`handle.data_block()`); every rank of a block passes the same prompts
(with their images), and grades the rows its model computed (`Policy.greedy_generate`); the counts are summed
over `handle.data_group`, whose ranks' rows partition the prompts, so every prompt counts once.
"""

from __future__ import annotations

import math

import datasets
import torch

from automodel_mimo.config import RunConfig
from automodel_mimo.data.images import ImageProcessor
from automodel_mimo.data.synthetic import grade_exact
from policies.policy import Policy


def evaluate_accuracy(cfg: RunConfig, policy: Policy, eval_ds: datasets.Dataset, tokenizer,
                      processor: ImageProcessor | None = None, banned: int | None = None) -> dict:
    """Exact-match accuracy of greedy answers on the held-out split (first eval.num_samples rows, 0: all); with
    images (`processor`), also over the rows that have one. `banned`: a token never generated (a MIMO image
    placeholder, which no encoder rows would fill)."""
    handle = policy.handle
    n = len(eval_ds) if cfg.eval.num_samples == 0 else min(cfg.eval.num_samples, len(eval_ds))
    index, count = handle.data_block()
    per_block = math.ceil(n / count)
    start = min(n, index * per_block)
    mine = eval_ds.select(range(start, min(n, start + per_block)))
    multiple = handle.rows_multiple()
    bs = math.ceil(cfg.eval.batch_size / multiple) * multiple  # rows split evenly over the LLM's dp slots
    stop_ids = set(tokenizer.all_special_ids)
    correct = torch.zeros(2, dtype=torch.float64)  # all rows, rows with an image
    for b in range(math.ceil(per_block / bs)):  # same number of calls on every rank of a block
        chunk = mine[b * bs:(b + 1) * bs] if b * bs < len(mine) else {k: [] for k in mine.column_names}
        prompts = chunk["prompt_ids"]
        extra = _images(chunk, processor, bs) if processor is not None else None
        rows, answers = policy.greedy_generate(prompts, cfg.eval.max_new_tokens, stop_ids, tokenizer.pad_token_id,
                                               extra, banned, rows=bs if processor is not None else None)
        for row, answer in zip(rows, answers):
            if row < len(prompts):
                ok = grade_exact(tokenizer.decode(answer, skip_special_tokens=True), chunk["reference"][row])
                correct += torch.tensor([ok, ok and processor is not None and chunk["num_images"][row] > 0])
    total = policy.sum_over_data_ranks(correct)
    result = {"eval/accuracy": float(total[0]) / max(1, n), "eval/num_samples": n}
    if processor is not None:
        n_image = sum(k > 0 for k in eval_ds.select(range(n))["num_images"])
        result["eval/accuracy_image_rows"] = float(total[1]) / max(1, n_image)
    return result


def _images(chunk: dict, processor: ImageProcessor, rows: int) -> dict:
    """The chunk's images, batch-major, and images per row (0 for the padding rows up to `rows`)."""
    pixels = [processor(images) for images in chunk["images"]]
    counts = [len(p) for p in pixels] + [0] * (rows - len(pixels))
    return {"pixel_values": torch.cat(pixels) if pixels else processor([]),
            "image_counts": torch.tensor(counts, dtype=torch.long)}
