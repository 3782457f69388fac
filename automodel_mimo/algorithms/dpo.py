"""Direct preference optimization, of a causal LM or a MIMO model: the SPMD loop every rank runs.

data (seed, step) -> global batch of (chosen, rejected) pairs -> this rank's block of pairs -> whole-row
microbatches (rows 2i, 2i+1 are pair i, or with data.packing sequence slots 2i, 2i+1 of one packed row; a pair
never splits; pairs with images carry the prompt's images in both rows) -> reference logprobs (reference weights
swapped in) -> DPO train step -> metrics / held-out preference accuracy / checkpoint; at the end an HF export.
"""

from __future__ import annotations

import dataclasses
import math
import time

import datasets
import torch
import torch.distributed as dist

from automodel_mimo.algorithms.loop import finish, open_logs, resume, run_steps
from automodel_mimo.algorithms.run import Run, start_run
from automodel_mimo.algorithms.sft import image_processor
from automodel_mimo.algorithms.warmup import sft_warmup, warmup_accuracy, warmup_train_config
from automodel_mimo.checkpoint import export_hf
from automodel_mimo.config import DPOConfig, RunConfig, round_up
from automodel_mimo.data.batching import global_batch_indices, local_slice
from automodel_mimo.data.preference import load_preference_dataset, pair_rows, tokenize_pairs
from automodel_mimo.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs
from policies.policy import Policy


# ---------------------------------------------------------------- the step


def attach_reference(policy: Policy, microbatches: list[dict]) -> None:
    """Each microbatch gets `ref_seq_logprobs`: the reference policy's summed response logprobs, one per
    row [B] (packed: one per sequence slot [R, K])."""
    for mb, lp in zip(microbatches, policy.reference_logprobs(microbatches)):
        mb["ref_seq_logprobs"] = (lp * policy.sequence_mask(mb)).sum(-1)


def dpo_loss_fn(cfg: DPOConfig, counts: dict):
    """Policy.forward_backward loss: DPO over the microbatch's pairs with the global denominators."""

    def loss_fn(logprobs: torch.Tensor, mb: dict):
        seq, tokens = sequence_logprobs(logprobs, mb["loss_mask"])
        return dpo_loss(seq, mb["ref_seq_logprobs"], tokens, beta=cfg.beta, global_pairs=counts["pairs"],
                        average_logprobs=cfg.average_logprobs, sft_weight=cfg.sft_weight,
                        global_chosen_tokens=counts["chosen_tokens"])

    return loss_fn


def dpo_train_step(policy: Policy, microbatches: list[dict], cfg: DPOConfig) -> dict:
    """Reference logprobs, one DPO forward/backward over the global batch, one optimizer step."""
    attach_reference(policy, microbatches)
    counts = policy.global_counts(microbatches)
    policy.optimizer.zero_grad()
    metrics = policy.forward_backward(microbatches, dpo_loss_fn(cfg, counts))
    metrics.update(policy.optimizer_step(metrics["loss"]))
    return {**metrics, "tokens": counts["data_tokens"]}


# ---------------------------------------------------------------- data


def prepare_dpo_data(cfg: RunConfig, tokenizer) -> datasets.DatasetDict:
    """Load and tokenize the pairs; deterministic, so every rank computes (and rejects) the same rows. Tokenized
    in the files' row order, before the eval hold-out, so errors name the file's row. MIMO configs load pairs
    with images (data/image_preference.py)."""
    d = cfg.data
    if cfg.mimo.layout:
        from automodel_mimo.data.image_preference import load_image_preferences

        return load_image_preferences(cfg, tokenizer)

    def tokenize(ds: datasets.Dataset, split: str) -> datasets.Dataset:
        return tokenize_pairs(ds, tokenizer, max_seq_len=d.max_seq_len, use_chat_template=d.chat_template,
                              truncate=d.truncate, split_name=split)

    return load_preference_dataset(cfg, prepare=tokenize)


def step_microbatches(cfg: RunConfig, run: Run, step: int) -> list[dict]:
    """This rank's microbatches of the global batch of `step`: train.global_batch_size rows = half as many
    pairs, drawn by (seed, step) like SFT's; each data block gets a contiguous run of whole pairs, packed whole
    into one row each with data.packing."""
    t = cfg.train
    pairs = global_batch_indices(step, len(run.data["train"]), t.global_batch_size // 2, cfg.seed)
    index, count = run.handle.data_block()
    return run.builder.build(pair_rows(run.data["train"].select(local_slice(pairs, index, count)), image_processor(cfg)),
                             t.micro_batch_size, group=2)


def padded(run: Run):
    """The run's builder with padded rows (the warm-up and the held-out pairs are never packed)."""
    return dataclasses.replace(run.builder, packed_size=None)


def warmup_microbatches(cfg: RunConfig, run: Run, step: int) -> list[dict]:
    """SFT warm-up batches: the chosen responses of train.global_batch_size pairs drawn by (seed, step)."""
    t, train = cfg.train, run.data["train"]
    pairs = global_batch_indices(step, len(train), t.global_batch_size, cfg.seed + 1)
    index, count = run.handle.data_block()
    rows = pair_rows(train.select(local_slice(pairs, index, count)), image_processor(cfg), sides=("chosen",))
    return padded(run).build(rows, t.micro_batch_size)


def warm_up(cfg: RunConfig, run: Run) -> None:
    """Up to dpo.warmup_sft_steps SFT steps on the chosen responses (until dpo.warmup_sft_target_accuracy held-out
    accuracy, when set), so DPO starts from (and, with dpo.reference=initial, is anchored to) a model that already
    writes answers. Deterministic: a resumed run repeats it."""
    d = cfg.dpo
    sft_warmup("dpo", run.handle, warmup_train_config(cfg.train, d.warmup_sft_steps, d.warmup_sft_lr),
               lambda step: warmup_microbatches(cfg, run, step),
               warmup_accuracy(cfg, run.data["eval"], run.tokenizer, image_processor(cfg),
                               getattr(run.handle, "placeholder_id", None)),  # MIMO: never generate a placeholder
               d.warmup_sft_target_accuracy)


def eval_microbatches(cfg: RunConfig, run: Run) -> list[dict]:
    """This block's share of the held-out pairs (ceil(n / blocks) each), topped up with weight-0 pairs to a
    multiple of the handle's rows_multiple() pairs (at least one, so every rank runs the same passes), in
    microbatches of as many pairs: a microbatch split over the LLM's dp slots (MIMO fan-out) splits whole pairs."""
    eval_ds, processor, multiple = run.data["eval"], image_processor(cfg), run.handle.rows_multiple()
    n = len(eval_ds) if cfg.eval.num_samples == 0 else min(cfg.eval.num_samples, len(eval_ds))
    index, count = run.handle.data_block()
    per_block = math.ceil(n / count)
    start = min(n, index * per_block)
    rows = pair_rows(eval_ds.select(range(start, min(n, start + per_block))), processor)
    blank = [dict(r, labels=[IGNORE_INDEX] * len(r["labels"])) for r in pair_rows(eval_ds.select([0]), processor)]
    rows += blank * (round_up(max(1, len(rows) // 2), multiple) - len(rows) // 2)
    return padded(run).build(rows, 2 * round_up(cfg.eval.batch_size, multiple))


def sequence_sums(policy: Policy, microbatches: list[dict], logprobs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(lp * policy.sequence_mask(mb)).sum(-1) for mb, lp in zip(microbatches, logprobs)]


def evaluate_preferences(cfg: RunConfig, policy: Policy, microbatches: list[dict], ref_sums: list[torch.Tensor]) -> dict:
    """Held-out DPO loss, preference accuracy (r_chosen > r_rejected) and reward margin."""
    counts = policy.global_counts(microbatches)
    per_mb = []
    for mb, seq, ref in zip(microbatches, sequence_sums(policy, microbatches, policy.logprobs(microbatches)), ref_sums):
        tokens = policy.sequence_mask(mb).sum(-1)
        _, m = dpo_loss(seq, ref, tokens, beta=cfg.dpo.beta, global_pairs=counts["pairs"],
                        average_logprobs=cfg.dpo.average_logprobs)
        per_mb.append(m)
    m = policy.reduce_metrics(per_mb)
    return {"eval/preference_accuracy": m["preference_accuracy"], "eval/reward_margin": m["reward_margin"],
            "eval/loss": m["dpo_loss"], "eval/num_pairs": int(m["pairs"])}


# ---------------------------------------------------------------- the loop


def init_reference(cfg: RunConfig, policy: Policy) -> None:
    """dpo.reference: the weights training starts from, or an HF model directory's weights (the handle reads its
    own export format: a causal LM's folder, a MIMO model's LLaVA folder)."""
    if cfg.dpo.reference == "initial":
        policy.init_reference()
        return
    policy.init_reference(policy.handle.hf_state(cfg.dpo.reference, "dpo.reference"))


def run_dpo(cfg: RunConfig) -> None:
    run = start_run(cfg, prepare_dpo_data)
    handle, data, tokenizer = run.handle, run.data, run.tokenizer
    policy = Policy(handle, cfg.train)
    if cfg.dpo.warmup_sft_steps:
        warm_up(cfg, run)
    init_reference(cfg, policy)  # before a resume: "initial" means the weights of step 0

    ckpt, start = resume(cfg, handle, policy.optimizer)
    eval_mbs = eval_microbatches(cfg, run) if cfg.eval.every_steps else []
    eval_ref = sequence_sums(policy, eval_mbs, policy.reference_logprobs(eval_mbs)) if eval_mbs else []
    run.say("dpo", f"{dist.get_world_size()} ranks, {cfg.layout}, {len(data['train'])} train / {len(data['eval'])} "
                   f"eval pairs, reference {cfg.dpo.reference}, start step {start}")
    logger = open_logs(cfg, start, cfg.layout)

    def step(i: int) -> dict:
        t0 = time.perf_counter()
        microbatches = step_microbatches(cfg, run, i)
        metrics = dpo_train_step(policy, microbatches, cfg.dpo)
        step_s = time.perf_counter() - t0
        return {**metrics, "tokens_per_s": metrics["tokens"] / step_s, "step_s": step_s}

    run_steps(cfg, start, logger, step, evaluate=lambda done: evaluate_preferences(cfg, policy, eval_mbs, eval_ref),
              save=lambda done: ckpt.save(done, handle, policy.optimizer))
    finish(cfg, logger, "dpo", lambda folder: export_hf(handle, tokenizer, folder))
