"""Supervised fine-tuning, of a causal LM or a MIMO model: the SPMD loop every rank runs.

data (seed, step) -> global batch -> this rank's block (`handle.data_block()`) -> whole-row microbatches (padded
or packed, text or text + images) -> policy train step -> metrics / eval / checkpoint; at the end an HF export.
"""

from __future__ import annotations

import time

import datasets
import torch.distributed as dist

from automodel_mimo.algorithms.evaluate import evaluate_accuracy
from automodel_mimo.algorithms.loop import finish, open_logs, resume, run_steps
from automodel_mimo.algorithms.run import Run, count_parameters, start_run
from automodel_mimo.checkpoint import export_hf
from automodel_mimo.config import RunConfig
from automodel_mimo.data.batching import global_batch_indices, local_slice
from automodel_mimo.data.rows import Rows
from automodel_mimo.data.sources import load_sft_dataset
from automodel_mimo.data.tokenize import tokenize_dataset
from policies.policy import Policy


def prepare_sft_data(cfg: RunConfig, tokenizer) -> datasets.DatasetDict:
    """Load and tokenize; deterministic, so every rank computes (and rejects) the same rows. Tokenized in the
    files' row order, before the eval hold-out, so errors name the file's row (load_sft_dataset). MIMO configs
    load image data (data/mimo_tokenize.py)."""
    d = cfg.data
    if cfg.mimo.layout:
        from automodel_mimo.data.mimo_tokenize import prepare_mimo_data

        return prepare_mimo_data(cfg, tokenizer, cfg.mimo.tokens_per_image)

    def tokenize(ds: datasets.Dataset, split: str) -> datasets.Dataset:
        return tokenize_dataset(ds, tokenizer, max_seq_len=d.max_seq_len, use_chat_template=d.chat_template,
                                truncate=d.truncate, split_name=split)

    return load_sft_dataset(
        d.dataset, seed=cfg.seed, prompt_key=d.prompt_key, response_key=d.response_key, messages_key=d.messages_key,
        train_split=d.train_split, eval_split=d.eval_split, eval_fraction=d.eval_fraction,
        num_train=d.num_train, num_eval=d.num_eval, digits=d.digits, name=d.name, prepare=tokenize)


def step_microbatches(cfg: RunConfig, run: Run, rows: Rows, step: int, seed: int | None = None) -> list[dict]:
    """This rank's microbatches of the global batch of `step` (0-based), drawn by (seed, step)."""
    t = cfg.train
    indices = global_batch_indices(step, len(rows), t.global_batch_size, cfg.seed if seed is None else seed)
    index, count = run.handle.data_block()
    return run.builder.build(rows.take(local_slice(indices, index, count)), t.micro_batch_size)


def image_processor(cfg: RunConfig):
    """MIMO runs preprocess images (data.image_*); text runs have none."""
    if not cfg.mimo.layout:
        return None
    from automodel_mimo.data.images import ImageProcessor

    return ImageProcessor.from_config(cfg.data)


def run_sft(cfg: RunConfig) -> None:
    run = start_run(cfg, prepare_sft_data)
    handle, data, tokenizer = run.handle, run.data, run.tokenizer
    processor = image_processor(cfg)
    train_rows = Rows(data["train"], processor)
    policy = Policy(handle, cfg.train)
    ckpt, start = resume(cfg, handle, policy.optimizer)
    run.say("sft", f"{dist.get_world_size()} ranks, {cfg.layout}, {len(data['train'])} train / {len(data['eval'])} eval "
                   f"rows, {count_parameters(handle):,} parameters, start step {start}")
    logger = open_logs(cfg, start, cfg.layout)
    banned = getattr(handle, "placeholder_id", None)  # MIMO: an image placeholder is never generated

    def step(i: int) -> dict:
        t0 = time.perf_counter()
        metrics = policy.sft_train_step(step_microbatches(cfg, run, train_rows, i))
        return {**metrics, "tokens_per_s": metrics["tokens"] / (time.perf_counter() - t0)}

    def evaluate(done: int) -> dict:
        return evaluate_accuracy(cfg, policy, data["eval"], tokenizer, processor, banned)

    run_steps(cfg, start, logger, step, evaluate, save=lambda done: ckpt.save(done, handle, policy.optimizer))
    finish(cfg, logger, "sft", lambda folder: export_hf(handle, tokenizer, folder))
