"""Group relative policy optimization: the SPMD loop every rank runs.

Per step: prompts drawn by (seed, step), with their images for a MIMO model -> n samples each from the
generator (one engine, colocated on rank 0 or a Ray actor) -> exact-match reward against the reference
answer -> group advantages -> this DP rank's samples as microbatches (padded, or with data.packing packed
rows; a MIMO row carries its prompt's images) -> old logprobs (trainer) and reference logprobs (reference
weights swapped in; a MIMO model runs its encoder in both) -> one clipped policy-gradient step over the microbatches
(global token / sequence normalization) -> refit the generator (weight streaming). Held-out greedy accuracy,
through the generator, at step 0 and every eval.every_steps. Before step 0, optionally grpo.warmup_sft_steps
of SFT (the embedded default's start).
Checkpoints hold the policy, optimizer, schedule, RNG and the reference weights; a resume skips the warm-up,
loads them and starts the generator from the resumed weights, so it continues exactly (batches and sampling
seeds depend on (seed, step) only).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import datasets
import torch
import torch.distributed as dist

from automodel_mimo.algorithms.loop import finish, open_logs, resume_checkpoint, run_steps
from automodel_mimo.algorithms.run import Run, start_run
from automodel_mimo.algorithms.sft import image_processor, prepare_sft_data, step_microbatches
from automodel_mimo.algorithms.warmup import sft_warmup, warmup_accuracy, warmup_train_config
from automodel_mimo.checkpoint import Checkpointer, export_hf
from automodel_mimo.config import RunConfig
from automodel_mimo.data.batching import global_batch_indices, local_slice
from automodel_mimo.data.rows import Rows
from automodel_mimo.data.synthetic import grade_exact
from automodel_mimo.distributed.mesh import DTYPES
from automodel_mimo.errors import UserInputError
from automodel_mimo.generation import IMAGE_BACKENDS, Colocated, Generation, SamplingParams
from automodel_mimo.generation.weight_stream import WeightStream, build_stream_plan, local_parameters, stage_transport
from automodel_mimo.losses import IGNORE_INDEX, PGLossConfig, clipped_pg_loss, group_advantages, kl_penalty
from policies.policy import Policy


# ---------------------------------------------------------------- rollouts -> microbatches


def sample_rows(prompts: list[list[int]], samples: list[Generation], advantages: torch.Tensor,
                images: list[torch.Tensor] | None = None, placeholder: int | None = None, pad_id: int = 0) -> list[dict]:
    """One training row per sample: prompt + response ids, labels on the response tokens only, the
    generator's logprobs at the same (shifted) positions as the labels, the sample's advantage, and (a MIMO
    model) its prompt's images, which the old-logprob, reference and training passes encode again.
    A MIMO response may end with the image placeholder (a special token, so a stop token: sampled, never
    banned, so that the generator's distribution stays the trainer's); as the row's last input it feeds no
    label, and it is written as `pad_id` so that the row's placeholders are exactly its images'."""
    rows = []
    for s, advantage in zip(samples, advantages.tolist()):
        prompt = prompts[s.prompt_index]
        ids = prompt + s.token_ids
        if placeholder is not None and s.token_ids and s.token_ids[-1] == placeholder:
            ids[-1] = pad_id
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + s.token_ids + [IGNORE_INDEX]
        gen_lp = [0.0] * (len(prompt) - 1) + s.logprobs + [0.0]
        rows.append({"input_ids": ids, "labels": labels, "gen_logprobs": gen_lp, "advantages": advantage})
        if images is not None:
            rows[-1]["pixel_values"] = images[s.prompt_index]
    return rows


def prompt_images(rows: datasets.Dataset, processor) -> list[torch.Tensor] | None:
    """Each prompt's images preprocessed as for training (one tensor per prompt), or None without images."""
    return [processor(images) for images in rows["images"]] if processor is not None else None


def rewards_of(samples: list[Generation], references: list[str], tokenizer) -> torch.Tensor:
    """1 when the decoded response equals the prompt's reference answer (grade_exact), else 0."""
    return torch.tensor([float(grade_exact(tokenizer.decode(s.token_ids, skip_special_tokens=True),
                                           references[s.prompt_index])) for s in samples])


# ---------------------------------------------------------------- the step


def pg_config(cfg: RunConfig) -> PGLossConfig:
    g = cfg.grpo
    return PGLossConfig(eps_low=g.eps_low, eps_high=g.eps_high, dual_clip=g.dual_clip, kl_beta=g.kl_beta,
                        kl_type=g.kl_type, sequence_level=g.sequence_level, gspo=g.gspo,
                        truncated_is_cap=g.truncated_is_cap)


def grpo_loss_fn(loss_cfg: PGLossConfig, counts: dict):
    """Policy.forward_backward loss: clipped PG with the global denominators; kl to the reference is
    reported even when it is not part of the loss (kl_beta = 0)."""

    def loss_fn(logprobs: torch.Tensor, mb: dict):
        loss, metrics = clipped_pg_loss(
            logprobs, mb["old_logprobs"], mb["advantages"], mb["loss_mask"], loss_cfg,
            global_valid_tokens=counts["tokens"], global_valid_seqs=counts["seqs"],
            ref_logprobs=mb["ref_logprobs"], gen_logprobs=mb["gen_logprobs"])
        mask = mb["loss_mask"]
        if "kl" not in metrics:
            kl = kl_penalty(logprobs.detach(), mb["ref_logprobs"], loss_cfg.kl_type, loss_cfg.kl_input_clamp,
                            loss_cfg.kl_output_clamp)
            metrics["kl"] = (kl * mask).sum() / counts["tokens"]
        metrics["entropy"] = -(mb["old_logprobs"] * mask).sum() / counts["tokens"]  # sampled-token estimate
        return loss, metrics

    return loss_fn


def grpo_forward_backward(policy: Policy, microbatches: list[dict], loss_cfg: PGLossConfig, temperature: float) -> dict:
    """Old and reference logprobs, then the clipped-PG gradients of the global batch (no optimizer step).
    Returns the reduced metrics and the seconds spent on logprobs and on the backward pass."""
    t0 = time.perf_counter()
    for mb, old, ref in zip(microbatches, policy.logprobs(microbatches, temperature),
                            policy.reference_logprobs(microbatches, temperature)):
        mb["old_logprobs"], mb["ref_logprobs"] = old, ref
    counts = policy.global_counts(microbatches)
    t1 = time.perf_counter()
    policy.optimizer.zero_grad()
    metrics = policy.forward_backward(microbatches, grpo_loss_fn(loss_cfg, counts), temperature)
    metrics.update({"timing/logprobs_s": t1 - t0, "timing/training_s": time.perf_counter() - t1})
    return metrics


def grpo_train_step(policy: Policy, microbatches: list[dict], loss_cfg: PGLossConfig, temperature: float) -> dict:
    """`grpo_forward_backward` and one optimizer step."""
    metrics = grpo_forward_backward(policy, microbatches, loss_cfg, temperature)
    t1 = time.perf_counter()
    metrics.update(policy.optimizer_step(metrics["loss"]))
    metrics["timing/training_s"] += time.perf_counter() - t1
    return metrics


# ---------------------------------------------------------------- generator


def build_generator(cfg: RunConfig, folder: str, device: torch.device) -> Colocated:
    """The one engine of this job behind `Colocated`: in rank 0's process, or (generation.colocated=false)
    a Ray actor that rank 0 drives and refits over a broadcast group."""
    gen = cfg.generation
    backend = None
    if dist.get_rank() == 0:
        kwargs = {"dtype": DTYPES[cfg.model.dtype]}
        if gen.backend == "vllm":
            kwargs.update(max_model_len=gen.max_model_len, gpu_memory_utilization=gen.gpu_memory_utilization,
                          seed=cfg.seed)
            if gen.colocated and not cfg.logging.verbose:
                kwargs["log_file"] = Path(cfg.output_dir) / "logs" / "generator.log"
        if gen.colocated:
            if gen.backend == "hf":
                kwargs["device"] = device  # the trainer rank's accelerator
            from automodel_mimo.generation import build_generator as build_backend

            backend = build_backend(gen.backend, folder, **kwargs)
        else:
            from automodel_mimo.generation.remote import RemoteGenerator

            backend = RemoteGenerator(gen.backend, folder, num_cpus=gen.num_cpus, **kwargs)
    return Colocated(backend)


def banned_ids(handle) -> tuple[int, ...]:
    """Tokens greedy evaluation never picks: a MIMO model's image placeholder (as the trainer's evaluation)."""
    banned = getattr(handle, "placeholder_id", None)
    return () if banned is None else (banned,)


def sampling_params(cfg: RunConfig, tokenizer, step: int, placeholder: tuple[int, ...] = ()) -> SamplingParams:
    """Rollout sampling; a MIMO image `placeholder` is a stop token (see sample_rows) even when not special."""
    gen = cfg.generation
    stops = tuple(tokenizer.all_special_ids) + tuple(t for t in placeholder if t not in tokenizer.all_special_ids)
    return SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens,
                          n=cfg.grpo.num_generations, stop_token_ids=stops, seed=cfg.seed * 100_003 + step)


def evaluate_greedy(cfg: RunConfig, generator: Colocated, eval_ds: datasets.Dataset, tokenizer, processor=None,
                    banned: tuple[int, ...] = ()) -> dict:
    """Exact-match accuracy of the generator's greedy answers on the held-out prompts (with their images;
    the generator holds the trainer's current weights after each refit); every rank gets the same result."""
    n = len(eval_ds) if cfg.eval.num_samples == 0 else min(cfg.eval.num_samples, len(eval_ds))
    rows = eval_ds.select(range(n))
    sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens, n=1,
                              stop_token_ids=tuple(tokenizer.all_special_ids), banned_token_ids=banned)
    samples = generator.generate(rows["prompt_ids"], sampling, prompt_images(rows, processor))
    correct = rewards_of(samples, rows["reference"], tokenizer).sum()
    return {"eval/accuracy": float(correct) / max(1, n), "eval/num_samples": n}


# ---------------------------------------------------------------- setup


def prepare_grpo_data(cfg: RunConfig, tokenizer) -> datasets.DatasetDict:
    """prepare_sft_data, then `check_prompt_images` (every rank, on the same rows, before any collective)."""
    data = prepare_sft_data(cfg, tokenizer)
    check_prompt_images(cfg, data)
    return data


def check_prompt_images(cfg: RunConfig, data: datasets.DatasetDict) -> None:
    """Prompts with images need a generator backend that takes them (IMAGE_BACKENDS): refused, naming a row,
    where the config could not tell (a data file; synthetic:shapes is refused before spawn, config/checks.py)."""
    if cfg.generation.backend in IMAGE_BACKENDS:
        return
    from automodel_mimo.config.checks import MIMO_VLLM

    for split, rows in data.items():
        counts = rows["num_images"] if "num_images" in rows.column_names else []
        row = next((i for i, n in enumerate(counts) if n > 0), None)
        if row is not None:
            raise UserInputError(f"{MIMO_VLLM}; data.dataset={cfg.data.dataset}: {split} row {row} has "
                                 f"{counts[row]} image(s)")


def warm_up(cfg: RunConfig, run: Run) -> None:
    """Up to grpo.warmup_sft_steps SFT steps on the task's answers, until grpo.warmup_sft_target_accuracy held-out
    accuracy when set: the starting policy, deliberately under-trained in the embedded default so that GRPO has
    room to improve it (and stopped at a level of skill, so that it has the same room on every seed). Deterministic."""
    g = cfg.grpo
    warm_cfg = dataclasses.replace(cfg, train=warmup_train_config(cfg.train, g.warmup_sft_steps, g.warmup_sft_lr),
                                   seed=cfg.seed + 1)
    processor = image_processor(cfg)
    rows = Rows(run.data["train"], processor)
    banned = getattr(run.handle, "placeholder_id", None)
    sft_warmup("grpo", run.handle, warm_cfg.train, lambda step: step_microbatches(warm_cfg, run, rows, step),
               warmup_accuracy(cfg, run.data["eval"], run.tokenizer, processor, banned), g.warmup_sft_target_accuracy)


def step_prompts(cfg: RunConfig, train: datasets.Dataset, step: int,
                 processor=None) -> tuple[list[list[int]], list[str], list[torch.Tensor] | None]:
    """The global batch's prompts (same on every rank): grpo.prompts_per_step rows drawn by (seed, step), their
    reference answers and (with `processor`, a MIMO model) their images."""
    rows = train.select(global_batch_indices(step, len(train), cfg.grpo.prompts_per_step, cfg.seed + 2))
    return rows["prompt_ids"], rows["reference"], prompt_images(rows, processor)


# ---------------------------------------------------------------- the loop


def run_grpo(cfg: RunConfig) -> None:
    run = start_run(cfg, prepare_grpo_data)
    handle, data, tokenizer = run.handle, run.data, run.tokenizer
    if cfg.generation.backend == "vllm" and handle.device.type == "cpu":  # before minutes of warm-up
        from automodel_mimo.generation.vllm_backend import check_cpu_model

        check_cpu_model(handle.config)
    ckpt = Checkpointer(cfg.output_dir, cfg.checkpoint.keep_last)
    latest = resume_checkpoint(cfg, ckpt)
    began = time.perf_counter()
    if cfg.grpo.warmup_sft_steps and latest is None:  # a resume loads the reference and the policy instead
        warm_up(cfg, run)
    warmup_s = time.perf_counter() - began
    policy = Policy(handle, cfg.train)
    policy.init_reference()  # the starting weights
    start, initial_accuracy = 0, None
    if latest is not None:
        ckpt.load_reference(latest, handle, policy.reference)
        start = ckpt.load(latest, handle, policy.optimizer)
        initial_accuracy = ckpt.extra(latest).get("initial_accuracy")

    # the generator starts from an HF export of the current (starting or resumed) weights; refits stream in place
    init_folder = export_hf(handle, tokenizer, Path(cfg.output_dir) / "init_hf")
    # a backend without image inputs serves the text model (a MIMO model's LLM: the prompts have no images, above)
    folder = handle.serve_generator(init_folder, images=cfg.generation.backend in IMAGE_BACKENDS)
    generator = build_generator(cfg, str(folder), handle.device)
    plan = build_stream_plan(handle, DTYPES[cfg.model.dtype], cfg.generation.bucket_bytes)
    transport = stage_transport(plan)
    generator.validate_manifest(plan.manifest)
    loss_cfg = pg_config(cfg)
    g = cfg.grpo
    processor, banned = image_processor(cfg), banned_ids(handle)
    where = "colocated on rank 0" if cfg.generation.colocated else "in a Ray actor"
    run.say("grpo", f"{dist.get_world_size()} ranks, {cfg.layout}, {cfg.generation.backend} generator {where}, "
                    f"{g.prompts_per_step} prompts x {g.num_generations} samples per step, {len(data['train'])} train / "
                    f"{len(data['eval'])} eval prompts, warm-up {warmup_s:.1f}s, start step {start}")
    logger = open_logs(cfg, start, cfg.layout)
    if cfg.eval.every_steps and start == 0:
        first = evaluate_greedy(cfg, generator, data["eval"], tokenizer, processor, banned)
        initial_accuracy = first["eval/accuracy"]
        logger.log({"step": 0, **first, "eval/accuracy_gain": 0.0})

    def step(i: int) -> dict:
        t0 = time.perf_counter()
        prompts, references, images = step_prompts(cfg, data["train"], i, processor)
        samples = generator.generate(prompts, sampling_params(cfg, tokenizer, i, banned), images)
        t_gen = time.perf_counter() - t0
        rewards = rewards_of(samples, references, tokenizer)
        advantages = group_advantages(rewards, g.num_generations, g.normalize_advantages_std)
        rows = sample_rows(prompts, samples, advantages, images, getattr(handle, "placeholder_id", None),
                           tokenizer.pad_token_id)
        run.builder.check_fits(rows, "a rollout of prompt + response")  # all rollouts, on every rank: all raise alike
        index, count = handle.data_block()
        microbatches = run.builder.build(local_slice(rows, index, count), cfg.train.micro_batch_size)
        metrics = grpo_train_step(policy, microbatches, loss_cfg, cfg.generation.temperature)
        t1 = time.perf_counter()
        # the device: a rank may hold no generator parameter (a MIMO encoder-only rank when the LLM alone is served)
        generator.refit(WeightStream(plan, local_parameters(handle), handle.device, transport=transport))
        t_refit = time.perf_counter() - t1
        step_s = time.perf_counter() - t0
        tokens = sum(len(prompts[s.prompt_index]) + len(s.token_ids) for s in samples)
        return {**metrics, "reward": float(rewards.mean()), "accuracy": float((rewards > 0).float().mean()),
                "response_len": sum(len(s.token_ids) for s in samples) / len(samples),
                "tokens_per_s": tokens / step_s, "timing/generation_s": t_gen, "timing/refit_s": t_refit, "step_s": step_s}

    def evaluate(done: int) -> dict:
        result = evaluate_greedy(cfg, generator, data["eval"], tokenizer, processor, banned)
        if initial_accuracy is not None:  # None after resuming a run that had no step-0 eval
            result["eval/accuracy_gain"] = result["eval/accuracy"] - initial_accuracy
        return result

    def save(done: int) -> None:
        ckpt.save(done, handle, policy.optimizer, reference=policy.reference, extra={"initial_accuracy": initial_accuracy})

    run_steps(cfg, start, logger, step, evaluate, save)
    finish(cfg, logger, "grpo", lambda folder: export_hf(handle, tokenizer, folder))
    if generator.backend is not None:
        generator.backend.shutdown()
