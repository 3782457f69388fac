"""MIMO GRPO under the LLM-pipelined layout (vision dp2 + language pp2, colocated, 2 ranks) and a non-colocated one
(vision dp1 on rank 0 + language tp2 on ranks 1-2): the GRPO step (old / reference logprobs and the clipped-PG step
through the pipeline or the relay) equals the single-process step of test_mimo_grpo.py (loss, metrics, every
gradient and post-step weight: the union of the ranks' parts); the refit streams each weight group once from the
lowest rank holding it (the encoder + projector; each LLM stage) and gives the hf generator (LLaVA, on rank 0)
bit-identical weights; a rollout sampled by the refit generator on image prompts is on-policy in the next GRPO
step (ratio 1, gen_kl_error < 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from automodel_mimo.algorithms.grpo import grpo_forward_backward, sample_rows
from automodel_mimo.data.batching import local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from policies.policy import Policy
from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, build_modules, mimo_rows
from tests.unit.multirank import run_ranks
from tests.unit.oracle import full_grads, full_params, train_config
from tests.unit.test_mimo_grpo import (
    LOSSES, METRICS, ROWS, TEMPERATURE, _assert_step_close, _close, moved_policy, reference_grpo_steps, rollout_rows)

CPU = torch.device("cpu")
BUCKET_BYTES = 16 << 10  # many buckets per group
# (name, layout, micro_batch_size, world)
PP2 = ("vision-dp2+language-pp2", {"vision": {"dp": 2}, "language": {"pp": 2}}, 4, 2)
NONCOLOCATED = ("vision-dp1+language-tp2 offset 1", {"vision": {"dp": 1}, "language": {"tp": 2, "offset": 1}}, 4, 3)


def _handle(layout: dict, micro: int, grids: dict | None = None) -> MimoHandle:
    encoders, llm = build_modules()
    pipeline = {"schedule": "1f1b", "pp_microbatch_size": 1, "layers_per_stage": None, "seq_len": 64,
                "micro_batch_size": micro}
    return MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=ROWS, grids=grids,
                      pipeline=pipeline)


def _microbatches(model: MimoHandle, rows: list[dict], micro: int) -> list[dict]:
    builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                                rows_multiple=model.rows_multiple())
    return builder.build(local_slice(rows, *model.data_block()), micro)


def _grpo_steps(rows: list[dict], layout: dict, micro: int, losses: list[str]) -> dict:
    """The GRPO step of test_mimo_grpo.py (reference = the initial weights, the policy x 1.05, SGD) per loss; this
    rank's metrics, full gradients and post-step weights."""
    grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=ROWS)
    out = {}
    for loss_name in losses:
        cfg = LOSSES[loss_name]
        model = _handle(layout, micro, grids)
        policy = moved_policy(model, micro)
        metrics = grpo_forward_backward(policy, _microbatches(model, rows, micro), cfg, TEMPERATURE)
        grads = full_grads(model.named_parameters())
        metrics.update(policy.optimizer_step())
        out[loss_name] = {**{k: v for k, v in metrics.items() if not k.startswith("timing/")}, "grads": grads,
                          "params": full_params(model.named_parameters())}
        model.destroy()
    return out


def _refit_and_rollout(folder: str, layout: dict, micro: int) -> dict:
    """Export the initial weights (the generator's folder), move every module, refit, compare the generator's
    weights with the trainer's, then one GRPO forward-backward on the refit generator's samples."""
    from automodel_mimo.checkpoint import export_hf
    from automodel_mimo.generation import Colocated, SamplingParams
    from automodel_mimo.generation.hf_backend import HFGenerator
    from automodel_mimo.generation.weight_stream import WeightStream, build_stream_plan, local_parameters, stage_transport
    from automodel_mimo.mimo.llava import to_llava
    from automodel_mimo.models.tokenizer import build_default_tokenizer

    model = _handle(layout, micro)
    export_hf(model, build_default_tokenizer(), folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.01 * (len(name) % 7 + 1))
    rank = dist.get_rank()
    generator = Colocated(HFGenerator(folder) if rank == 0 else None)
    plan = build_stream_plan(model, torch.float32, BUCKET_BYTES)
    transport = stage_transport(plan)
    generator.validate_manifest(plan.manifest)
    generator.refit(WeightStream(plan, local_parameters(model), transport=transport))
    out = {"sources": sorted({(e.name.split(".")[1] if e.name.startswith("model.") else e.name.split(".")[0], e.source)
                              for e in plan.manifest.entries}),
           "buckets": len(plan.buckets), "modules": sorted(model.module_parts)}
    full = model.full_state_dict()
    if rank == 0:
        served, expected = generator.backend.model.state_dict(), to_llava(full, "vision")
        out["keys_equal"] = set(served) == set(expected)
        out["differ"] = [n for n in expected if not torch.equal(served[n], expected[n])]
    prompt_rows = mimo_rows(seed=9, counts=[1, 2, 1, 0])
    prompts = [r["input_ids"][:len(r["input_ids"]) - 3] for r in prompt_rows]  # ends after the placeholders
    images = [r["pixel_values"] for r in prompt_rows]
    samples = generator.generate(prompts, SamplingParams(temperature=TEMPERATURE, max_new_tokens=5, n=2, seed=5,
                                                         stop_token_ids=(1, PLACEHOLDER)), images)
    advantages = torch.linspace(-1.0, 1.0, len(samples))
    rows = sample_rows(prompts, samples, advantages, images, PLACEHOLDER)
    policy = Policy(model, train_config("sgd", 0.0, len(rows), micro))
    policy.init_reference()
    metrics = grpo_forward_backward(policy, _microbatches(model, rows, micro), LOSSES["grpo"], TEMPERATURE)
    out.update({k: metrics[k] for k in ("gen_kl_error", "ratio_min", "ratio_max", "kl")})
    out["tokens"] = sum(len(s.token_ids) for s in samples)
    model.destroy()
    return out


def _run(rows: list[dict], folder: str, layout: dict, micro: int, losses: list[str]) -> dict:
    return {"steps": _grpo_steps(rows, layout, micro, losses), "refit": _refit_and_rollout(folder, layout, micro)}


def _check_steps(per_rank: list[dict], ref: dict, what: str) -> None:
    for loss_name in per_rank[0]["steps"]:
        r = ref[loss_name]
        for rank, result in enumerate(per_rank):
            got = result["steps"][loss_name]
            assert _close(got["loss"], r["loss"]), (what, loss_name, rank, got["loss"], r["loss"])
            for key in METRICS:
                assert _close(got[key], r[key]), (what, loss_name, rank, key, got[key], r[key])
            assert abs(got["ratio_min"] - 1) < 1e-6 and abs(got["ratio_max"] - 1) < 1e-6 and got["skipped"] == 0
        merged = {kind: {k: v for result in per_rank for k, v in result["steps"][loss_name][kind].items()}
                  for kind in ("grads", "params")}  # each rank holds part of the model
        _assert_step_close(merged, r, f"{what} {loss_name}")


def _check_refit(per_rank: list[dict], sources: list, what: str) -> None:
    first = per_rank[0]["refit"]
    assert first["keys_equal"] and first["differ"] == [], (what, first["differ"][:5])
    for rank, result in enumerate(per_rank):
        refit = result["refit"]
        assert refit["sources"] == sources, (what, rank, refit["sources"])
        assert refit["gen_kl_error"] < 1e-5, (what, rank, refit["gen_kl_error"])
        assert abs(refit["ratio_min"] - 1) < 1e-6 and abs(refit["ratio_max"] - 1) < 1e-6, (what, rank)
        assert refit["kl"] == 0.0 and refit["tokens"] > 8, (what, rank)


def test_mimo_grpo_under_language_pp2(tmp_path):
    """vision dp2 + language pp2 on 2 ranks: every rank holds the encoder, rank r the LLM's stage r. The encoder and
    projector come once from rank 0; the LLM's first stage (embeddings, layer 0) from rank 0, its last (layer 1, norm,
    head) from rank 1."""
    rows = rollout_rows()
    ref = reference_grpo_steps(rows)
    name, layout, micro, world = PP2
    per_rank = run_ranks(_run, world, rows, str(tmp_path / "llava"), layout, micro, list(LOSSES))
    _check_steps(per_rank, ref, name)
    _check_refit(per_rank, [("language_model", 0), ("language_model", 1), ("lm_head", 1),
                            ("multi_modal_projector", 0), ("vision_tower", 0)], name)


def test_mimo_grpo_noncolocated(tmp_path):
    """vision dp1 on rank 0 + language tp2 on ranks 1-2: the generator lives on rank 0, an encoder-only rank; the
    encoder and projector stream from rank 0 itself, the LLM from rank 1 (gathered from its tp shards by ranks 1-2)."""
    rows = rollout_rows()
    ref = reference_grpo_steps(rows)
    name, layout, micro, world = NONCOLOCATED
    per_rank = run_ranks(_run, world, rows, str(tmp_path / "llava"), layout, micro, ["grpo"])  # GSPO: pp2 above
    assert [r["refit"]["modules"] for r in per_rank] == [["vision"], ["language"], ["language"]]
    _check_steps(per_rank, ref, name)
    _check_refit(per_rank, [("language_model", 1), ("lm_head", 1), ("multi_modal_projector", 0), ("vision_tower", 0)],
                 name)


@pytest.mark.slow  # tests/nightly/unit_slow.sh; the oracle tests above cover the step and the refit in CI
@pytest.mark.parametrize("layout", [["mimo.layout.language={pp: 2}", "parallel.pp_microbatch_size=2"],
                                    ["mimo.layout={vision: {dp: 1}, language: {offset: 1}}"]], ids=["pp2", "noncolocated"])
def test_mimo_grpo_cli_runs_on_policy(tmp_path, layout):
    """The GRPO loop (export, generator on rank 0, refit after every step, evals, final export) under LLM pp2 and
    with the vision module on rank 0 and the LLM on rank 1: every step on-policy (ratio 1, gen_kl_error < 1e-5)."""
    from tests.unit.cli_runner import metrics, run_cli
    from tests.unit.test_mimo_grpo import CONFIG, SHORT

    out = tmp_path / "run"
    r = run_cli("grpo", *CONFIG, *SHORT, *layout, f"output_dir={out}", "train.max_steps=2",
                env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    train = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in train] == [1, 2]
    for row in train:
        assert abs(row["ratio_min"] - 1) < 1e-6 and abs(row["ratio_max"] - 1) < 1e-6 and row["gen_kl_error"] < 1e-5, row
    assert [e["eval/num_samples"] for e in metrics(out) if "eval/accuracy" in e] == [6, 6, 6]
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(out / "hf")
