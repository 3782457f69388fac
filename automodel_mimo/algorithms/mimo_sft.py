"""MIMO supervised fine-tuning: the SPMD loop every rank runs (colocated grids, docs/mimo.md).

data (seed, step) -> global batch -> this rank's block (the dp block of the module with the fewest dp
ranks, MimoModel.data_parallel) -> microbatches (collate_fn: rows -> the MIMO batch contract) -> policy
train step -> metrics / eval / checkpoint; at the end an HF export of the LLM and the encoder + projector.
`run_mimo_sft_from_config` is the CLI's entry (data from the config: data/images.py, data/mimo_tokenize.py);
`run_mimo_sft` takes any indexable rows and a collate_fn that returns input_ids/labels/attention_mask,
pixel_values (batch-major) and image_counts.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

from automodel_mimo.algorithms.loop import finish, open_logs, resume, run_steps
from automodel_mimo.config import RunConfig
from automodel_mimo.data.batching import global_batch_indices, local_slice, split_microbatches
from automodel_mimo.data.images import ImageProcessor
from automodel_mimo.data.mimo_batching import collate_mimo, mimo_rows
from automodel_mimo.data.mimo_tokenize import prepare_mimo_data
from automodel_mimo.data.synthetic import grade_exact
from automodel_mimo.distributed.grid_spec import LANGUAGE
from automodel_mimo.distributed.mesh import init_distributed
from automodel_mimo.distributed.nonfinite import require_finite_weights
from automodel_mimo.errors import UserInputError
from automodel_mimo.mimo.model import MimoModel, build_vision_module
from automodel_mimo.models.build import build_hf_config, build_model
from automodel_mimo.models.tokenizer import load_tokenizer
from policies.mimo_policy import MimoPolicy

CollateFn = Callable[[list], dict]


def placeholder_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise UserInputError(f"mimo.placeholder_token={token!r} is not a token of the tokenizer; add it as a special token")
    return int(ids[0])


def build_mimo(cfg: RunConfig, tokenizer, device: torch.device) -> MimoModel:
    """Encoder + projector and LLM built identically on every rank (same seed), then parallelized per grid."""
    m = cfg.mimo
    hf_config = build_hf_config(cfg.model, tokenizer)
    encoders = {m.encoder_name: build_vision_module(m.encoder, hf_config.hidden_size, cfg.seed, m.projector_hidden)}
    llm = build_model(cfg.model, hf_config, cfg.seed, packed=m.layout["language"].get("cp", 1) > 1)
    return MimoModel(encoders, llm, m.layout, device, placeholder_id(tokenizer, m.placeholder_token), m.tokens_per_image,
                     pad_id=tokenizer.pad_token_id, dtype=cfg.model.dtype, global_batch_size=cfg.train.global_batch_size)


def step_microbatches(cfg: RunConfig, dataset: Sequence, collate_fn: CollateFn, model: MimoModel, step: int) -> list[dict]:
    """This rank's microbatches of the global batch of `step` (0-based)."""
    t = cfg.train
    indices = global_batch_indices(step, len(dataset), t.global_batch_size, cfg.seed)
    index, count = model.data_parallel()
    rows = [dataset[i] for i in local_slice(indices, index, count)]
    return [{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in collate_fn(mb).items()}
            for mb in split_microbatches(rows, t.micro_batch_size)]


class ImageRows(Sequence):
    """A tokenized MIMO split as collate_mimo rows; images are decoded and preprocessed when a row is read."""

    def __init__(self, split: datasets.Dataset, processor: ImageProcessor):
        self.split, self.processor = split, processor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return mimo_rows(self.split[i:i + 1], self.processor)[0]


def evaluate_accuracy(cfg: RunConfig, policy: MimoPolicy, eval_ds: datasets.Dataset, processor: ImageProcessor,
                      tokenizer) -> dict:
    """Exact-match accuracy of greedy answers on the held-out split (all rows, and rows with an image).

    Prompts are spread over the dp blocks of the coarse module; within a block every rank passes the same
    prompts and grades the rows its LLM computed, counted once per LLM replica (`reports_language_rows`)."""
    model = policy.model
    n = len(eval_ds) if cfg.eval.num_samples == 0 else min(cfg.eval.num_samples, len(eval_ds))
    index, count = model.data_parallel()
    per_block = math.ceil(n / count)
    start = min(n, index * per_block)
    mine = eval_ds.select(range(start, min(n, start + per_block)))
    multiple = model.rows_multiple()
    bs = math.ceil(cfg.eval.batch_size / multiple) * multiple  # rows split evenly over the LLM's dp slots
    grader = model.reports_language_rows()
    stop_ids = set(tokenizer.all_special_ids)
    correct = [0.0, 0.0]  # all rows, image rows
    for b in range(math.ceil(per_block / bs)):  # same number of calls on every rank
        chunk = mine[b * bs:(b + 1) * bs] if b * bs < len(mine) else {k: [] for k in mine.column_names}
        pixels = [processor(images) for images in chunk["images"]]
        pixel_values = torch.cat(pixels) if pixels else processor([])
        rows, answers = policy.greedy_generate(chunk["prompt_ids"], pixel_values, [len(p) for p in pixels], bs,
                                               cfg.eval.max_new_tokens, stop_ids, tokenizer.pad_token_id)
        for row, answer in zip(rows, answers):
            if grader and row < len(chunk["prompt_ids"]):
                ok = grade_exact(tokenizer.decode(answer, skip_special_tokens=True), chunk["reference"][row])
                correct[0] += ok
                correct[1] += ok and chunk["num_images"][row] > 0
    n_image = sum(k > 0 for k in eval_ds.select(range(n))["num_images"])
    total = torch.tensor(correct, dtype=torch.float64, device=model.device)
    dist.all_reduce(total)
    return {"eval/accuracy": float(total[0]) / max(1, n), "eval/accuracy_image_rows": float(total[1]) / max(1, n_image),
            "eval/num_samples": n}


def export_mimo_hf(model: MimoModel, tokenizer, out_dir: str | Path) -> Path:
    """Collective. Rank 0 writes, atomically: `<out>/language` (the LLM + tokenizer, loadable by plain
    transformers), and `<out>/<encoder>` (the vision tower via save_pretrained, usable as
    mimo.encoder.pretrained, plus projector.safetensors)."""
    require_finite_weights(model.parameters(), f"the HF export {out_dir}")
    state = model.full_state_dict()
    out = Path(out_dir)
    if dist.get_rank() == 0:
        partial_dir = out.with_name(out.name + ".partial")
        shutil.rmtree(partial_dir, ignore_errors=True)
        llm_state = _prefixed(state, LANGUAGE + ".")
        config = model.modules[LANGUAGE].config
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        llm.load_state_dict(llm_state, assign=True, strict=True)
        llm.tie_weights()
        llm.config.use_cache = True
        llm.save_pretrained(partial_dir / LANGUAGE, safe_serialization=True)
        tokenizer.save_pretrained(partial_dir / LANGUAGE)
        name = model.encoder_name
        vision = model.modules[name]
        with torch.device("meta"):
            encoder = AutoModel.from_config(vision.config, dtype=torch.float32)
        encoder.load_state_dict(_prefixed(state, f"{name}.encoder."), assign=True, strict=True)
        encoder.save_pretrained(partial_dir / name, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in _prefixed(state, f"{name}.projector.").items()},
                  str(partial_dir / name / "projector.safetensors"))
        shutil.rmtree(out, ignore_errors=True)
        partial_dir.rename(out)
    dist.barrier()
    return out


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def run_mimo_sft_from_config(cfg: RunConfig) -> None:
    """The CLI's entry: tokenizer, image data (data.*), then the loop with held-out eval and HF export."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained)
    data = prepare_mimo_data(cfg, tokenizer, cfg.mimo.tokens_per_image)
    processor = ImageProcessor.from_config(cfg.data)
    run_mimo_sft(cfg, tokenizer, ImageRows(data["train"], processor), partial(collate_mimo, pad_id=tokenizer.pad_token_id),
                 eval_ds=data["eval"], processor=processor)


def run_mimo_sft(cfg: RunConfig, tokenizer, dataset: Sequence, collate_fn: CollateFn,
                 eval_ds: datasets.Dataset | None = None, processor: ImageProcessor | None = None) -> None:
    """The loop; eval (eval.every_steps) needs `eval_ds` (prepare_mimo_data's eval split) and `processor`."""
    device = init_distributed(cfg.launch.dist_backend)
    model = build_mimo(cfg, tokenizer, device)
    policy = MimoPolicy(model, cfg.train)
    ckpt, start = resume(cfg, model, policy.optimizer)
    rank0 = dist.get_rank() == 0
    sizes = ", ".join(f"{n}: " + " ".join(f"{d}{g.size(d)}" for d in ("dp", "tp", "cp")) for n, g in model.grids.items())
    if rank0:
        n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in model.modules.items()}
        print(f"[mimo_sft] {dist.get_world_size()} ranks ({sizes}), {len(dataset)} train rows"
              + (f" / {len(eval_ds)} eval rows" if eval_ds is not None else "")
              + f", parameters {n_params}, start step {start}", flush=True)
    logger = open_logs(cfg, start, sizes)

    def step(i: int) -> dict:
        t0 = time.perf_counter()
        metrics = policy.sft_train_step(step_microbatches(cfg, dataset, collate_fn, model, i))
        return {**metrics, "tokens_per_s": metrics["tokens"] / (time.perf_counter() - t0)}

    evaluate = (lambda done: evaluate_accuracy(cfg, policy, eval_ds, processor, tokenizer)) if eval_ds is not None else None
    run_steps(cfg, start, logger, step, evaluate, save=lambda done: ckpt.save(done, model, policy.optimizer))
    finish(cfg, logger, "mimo_sft", lambda folder: export_mimo_hf(model, tokenizer, folder))
    model.destroy()
