"""Direct preference optimization: the SPMD loop every rank runs.

data (seed, step) -> global batch of (chosen, rejected) pairs -> this DP rank's pairs -> microbatches
(rows 2i, 2i+1 are pair i, or with data.packing sequence slots 2i, 2i+1 of one packed row; a pair never
splits) -> reference logprobs (reference weights swapped in) ->
DPO train step -> metrics / held-out preference accuracy / checkpoint; at the end an HF export.
"""

from __future__ import annotations

import math
import time

import datasets
import torch
import torch.distributed as dist

from automodel_mimo.algorithms import sft
from automodel_mimo.algorithms.loop import finish, open_logs, resume, run_steps
from automodel_mimo.checkpoint import export_hf
from automodel_mimo.config import DPOConfig, RunConfig, packed_row_size, pad_multiple
from automodel_mimo.data.batching import collate, global_batch_indices, local_slice, split_microbatches
from automodel_mimo.data.packing import pack_microbatches
from automodel_mimo.data.preference import load_preference_dataset, pair_rows, tokenize_pairs
from automodel_mimo.distributed.mesh import build_parallel_state, init_distributed
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.models.build import build_lm_handle
from automodel_mimo.models.tokenizer import load_tokenizer
from automodel_mimo.parallel.context_parallel import as_single_segments, shard_batch
from automodel_mimo.losses import dpo_loss, sequence_logprobs
from policies.lm_policy import LMPolicy


# ---------------------------------------------------------------- the step


def attach_reference(policy: LMPolicy, microbatches: list[dict]) -> None:
    """Each microbatch gets `ref_seq_logprobs`: the reference policy's summed response logprobs, one per
    row [B] (packed: one per sequence slot [R, K])."""
    for mb, lp in zip(microbatches, policy.reference_logprobs(microbatches)):
        mb["ref_seq_logprobs"] = (lp * policy.sequence_mask(mb)).sum(-1)


def dpo_loss_fn(cfg: DPOConfig, counts: dict):
    """LMPolicy.forward_backward loss: DPO over the microbatch's pairs with the global denominators."""

    def loss_fn(logprobs: torch.Tensor, mb: dict):
        seq, tokens = sequence_logprobs(logprobs, mb["loss_mask"])
        return dpo_loss(seq, mb["ref_seq_logprobs"], tokens, beta=cfg.beta, global_pairs=counts["pairs"],
                        average_logprobs=cfg.average_logprobs, sft_weight=cfg.sft_weight,
                        global_chosen_tokens=counts["chosen_tokens"])

    return loss_fn


def dpo_train_step(policy: LMPolicy, microbatches: list[dict], cfg: DPOConfig) -> dict:
    """Reference logprobs, one DPO forward/backward over the global batch, one optimizer step."""
    attach_reference(policy, microbatches)
    counts = policy.global_counts(microbatches)
    policy.optimizer.zero_grad()
    metrics = policy.forward_backward(microbatches, dpo_loss_fn(cfg, counts))
    metrics.update(policy.optimizer_step(metrics["loss"]))
    return metrics


# ---------------------------------------------------------------- data


def prepare_dpo_data(cfg: RunConfig, tokenizer) -> datasets.DatasetDict:
    """Load and tokenize the pairs; deterministic, so every rank computes (and rejects) the same rows. Tokenized
    in the files' row order, before the eval hold-out, so errors name the file's row."""
    d = cfg.data

    def tokenize(ds: datasets.Dataset, split: str) -> datasets.Dataset:
        return tokenize_pairs(ds, tokenizer, max_seq_len=d.max_seq_len, use_chat_template=d.chat_template,
                              truncate=d.truncate, split_name=split)

    return load_preference_dataset(cfg, prepare=tokenize)


def to_microbatches(cfg: RunConfig, rows: list[dict], state, pad_id: int, micro_rows: int) -> list[dict]:
    """Rows (pairs adjacent) -> padded microbatches of `micro_rows` rows (even: pairs stay whole), sharded
    over cp like SFT's."""
    microbatches = [collate(mb, pad_id, state.device) for mb in split_microbatches(rows, micro_rows)]
    if cfg.parallel.cp > 1:
        microbatches = [shard_batch(as_single_segments(mb, cfg.parallel.cp, pad_id), cfg.parallel.cp, state.cp_rank)
                        for mb in microbatches]
    return microbatches


def packed_microbatches(cfg: RunConfig, rows: list[dict], state, pad_id: int) -> list[dict]:
    """Rows (pairs adjacent) -> packed microbatches of train.micro_batch_size rows of
    data.packed_sequence_size tokens. Each pair is packed whole into one row, chosen then rejected, so
    its sequences are slots 2i, 2i+1 of that row (rows hold even slot counts) and any row slice (a
    pipeline microbatch) keeps pairs whole; sharded over cp like SFT's."""
    size = packed_row_size(cfg.data)
    packed = pack_microbatches(rows, size, pad_multiple(cfg.parallel), cfg.train.micro_batch_size, pad_id,
                               state.device, group=2)
    return [shard_batch(mb, cfg.parallel.cp, state.cp_rank) for mb, _ in packed]


def step_microbatches(cfg: RunConfig, train: datasets.Dataset, step: int, state, pad_id: int) -> list[dict]:
    """This DP rank's microbatches of the global batch of `step`: train.global_batch_size rows = half as
    many pairs, drawn by (seed, step) like SFT's; each DP rank gets a contiguous block of whole pairs."""
    t = cfg.train
    pairs = global_batch_indices(step, len(train), t.global_batch_size // 2, cfg.seed)
    mine = train.select(local_slice(pairs, state.dp_rank, cfg.dp))
    if cfg.data.packing:
        return packed_microbatches(cfg, pair_rows(mine), state, pad_id)
    return to_microbatches(cfg, pair_rows(mine), state, pad_id, t.micro_batch_size)


def warmup_microbatches(cfg: RunConfig, train: datasets.Dataset, step: int, state, pad_id: int) -> list[dict]:
    """SFT warm-up batches: the chosen responses of train.global_batch_size pairs drawn by (seed, step)."""
    t = cfg.train
    pairs = global_batch_indices(step, len(train), t.global_batch_size, cfg.seed + 1)
    mine = train.select(local_slice(pairs, state.dp_rank, cfg.dp))
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(mine["chosen_input_ids"], mine["chosen_labels"])]
    return to_microbatches(cfg, rows, state, pad_id, t.micro_batch_size)


def sft_warmup(cfg: RunConfig, handle, state, data: datasets.DatasetDict, tokenizer) -> None:
    """Up to dpo.warmup_sft_steps SFT steps on the chosen responses (until dpo.warmup_sft_target_accuracy held-out
    accuracy, when set), so DPO starts from (and, with dpo.reference=initial, is anchored to) a model that already
    writes answers. Deterministic: a resumed run repeats it."""
    d = cfg.dpo
    sft.sft_warmup("dpo", handle, state, sft.warmup_train_config(cfg.train, d.warmup_sft_steps, d.warmup_sft_lr),
                   lambda step: warmup_microbatches(cfg, data["train"], step, state, tokenizer.pad_token_id),
                   sft.warmup_accuracy(cfg, data["eval"], tokenizer), d.warmup_sft_target_accuracy)


def eval_microbatches(cfg: RunConfig, eval_ds: datasets.Dataset, state, pad_id: int) -> list[dict]:
    """This rank's share of the held-out pairs (ceil(n / dp) each; a rank left without pairs gets one
    weight-0 pair so every rank runs the same passes)."""
    n = len(eval_ds) if cfg.eval.num_samples == 0 else min(cfg.eval.num_samples, len(eval_ds))
    per_rank = math.ceil(n / cfg.dp)
    start = min(n, state.dp_rank * per_rank)
    rows = pair_rows(eval_ds.select(range(start, min(n, start + per_rank))))
    if not rows:
        rows = [dict(r, labels=[IGNORE_INDEX] * len(r["labels"])) for r in pair_rows(eval_ds.select([0]))]
    return to_microbatches(cfg, rows, state, pad_id, 2 * cfg.eval.batch_size)


def sequence_sums(policy: LMPolicy, microbatches: list[dict], logprobs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(lp * policy.whole_rows(mb["loss_mask"], mb)).sum(-1) for mb, lp in zip(microbatches, logprobs)]


def evaluate_preferences(cfg: RunConfig, policy: LMPolicy, microbatches: list[dict], ref_sums: list[torch.Tensor]) -> dict:
    """Held-out DPO loss, preference accuracy (r_chosen > r_rejected) and reward margin."""
    counts = policy.global_counts(microbatches)
    per_mb = []
    for mb, seq, ref in zip(microbatches, sequence_sums(policy, microbatches, policy.logprobs(microbatches)), ref_sums):
        tokens = policy.whole_rows(mb["loss_mask"], mb).sum(-1)
        _, m = dpo_loss(seq, ref, tokens, beta=cfg.dpo.beta, global_pairs=counts["pairs"],
                        average_logprobs=cfg.dpo.average_logprobs)
        per_mb.append(m)
    m = policy.reduce_metrics(per_mb)
    return {"eval/preference_accuracy": m["preference_accuracy"], "eval/reward_margin": m["reward_margin"],
            "eval/loss": m["dpo_loss"], "eval/num_pairs": int(m["pairs"])}


# ---------------------------------------------------------------- the loop


def init_reference(cfg: RunConfig, policy: LMPolicy) -> None:
    """dpo.reference: the weights training starts from, or an HF model directory's weights."""
    if cfg.dpo.reference == "initial":
        policy.init_reference()
        return
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(cfg.dpo.reference, dtype=torch.float32).state_dict()
    policy.init_reference(state)


def run_dpo(cfg: RunConfig) -> None:
    device = init_distributed(cfg.launch.dist_backend)
    state = build_parallel_state(cfg.parallel, device, cfg.model.dtype)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained)
    data = prepare_dpo_data(cfg, tokenizer)
    handle = build_lm_handle(cfg, tokenizer, state)
    policy = LMPolicy(handle, state, cfg.train)
    pad = tokenizer.pad_token_id
    if cfg.dpo.warmup_sft_steps:
        sft_warmup(cfg, handle, state, data, tokenizer)
    init_reference(cfg, policy)  # before a resume: "initial" means the weights of step 0

    ckpt, start = resume(cfg, handle, policy.optimizer)
    eval_mbs = eval_microbatches(cfg, data["eval"], state, pad) if cfg.eval.every_steps else []
    eval_ref = sequence_sums(policy, eval_mbs, policy.reference_logprobs(eval_mbs)) if eval_mbs else []
    if state.is_rank0:
        print(f"[dpo] {dist.get_world_size()} ranks, {cfg.layout}, "
              f"{len(data['train'])} train / {len(data['eval'])} eval pairs, reference {cfg.dpo.reference}, "
              f"start step {start}", flush=True)
    logger = open_logs(cfg, start, cfg.layout)

    def step(i: int) -> dict:
        t0 = time.perf_counter()
        microbatches = step_microbatches(cfg, data["train"], i, state, pad)
        metrics = dpo_train_step(policy, microbatches, cfg.dpo)
        tokens = policy.data_tokens(microbatches)
        step_s = time.perf_counter() - t0
        return {**metrics, "tokens": tokens, "tokens_per_s": tokens / step_s, "step_s": step_s}

    run_steps(cfg, start, logger, step, evaluate=lambda done: evaluate_preferences(cfg, policy, eval_mbs, eval_ref),
              save=lambda done: ckpt.save(done, handle, policy.optimizer))
    finish(cfg, logger, "dpo", lambda folder: export_hf(handle, tokenizer, folder))
