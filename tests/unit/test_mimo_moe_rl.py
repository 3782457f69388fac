"""Non-colocated MIMO DPO and GRPO with a mixture-of-experts LLM (docs/moe.md): the vision module on rank 0, a tiny
Qwen3-MoE (4 experts, top-2, balance loss coefficient 0.1) on ranks 1-2 with its experts split over ep2. The real
DPO step (algorithms/dpo.py: reference logprobs through the weight swap, DPO + SFT loss, SGD and clipped AdamW) and
the real GRPO step (old / reference logprobs, clipped PG with non-zero advantages, k3 KL, truncated IS) equal a
single-process step of the vision module + transformers' own Qwen3-MoE with the hand-written sequence-wise balance
loss: loss, aux loss, metrics, every gradient and post-step weight (the union of the ranks' modules), fp32, gloo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from automodel_mimo.algorithms.dpo import dpo_train_step
from automodel_mimo.algorithms.grpo import grpo_forward_backward
from automodel_mimo.data.batching import local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.losses import clipped_pg_loss
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from automodel_mimo.mimo.modules import build_vision_module
from automodel_mimo.models.moe import to_hf_state
from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, VISION, assert_step_close, mimo_collate
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, full_grads, full_params, train_config
from tests.unit.test_mimo_dpo import DPO, GLOBAL_BATCH, MOVE, OPTIMIZERS, GradsBeforeStep, preference_rows
from tests.unit.test_mimo_grpo import (LOSSES, METRICS, ROWS, TEMPERATURE, _close, moved_policy, rollout_batch,
                                       rollout_rows)
from tests.unit.test_mimo_moe import LLM_SEED, VISION_SEED, _modules
from tests.unit.test_moe import balance_loss, moe_config

CPU = torch.device("cpu")
# vision dp1 on rank 0 (every row), language dp2 ep2 on ranks 1-2 (each LLM slot half of each microbatch: a fan-out)
LAYOUT = {"vision": {"dp": 1}, "language": {"dp": 2, "ep": 2, "offset": 1}}
MICRO = 4  # two microbatches per rank (DPO: two pairs each)


def _handle(global_batch: int) -> MimoHandle:
    encoders, llm = _modules()
    grids = build_mimo_grids(LAYOUT, ["vision"], CPU, global_batch_size=global_batch)
    return MimoHandle(encoders, llm, LAYOUT, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=global_batch,
                      grids=grids)


def _microbatches(model: MimoHandle, rows: list[dict], group: int = 1) -> list[dict]:
    builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                                rows_multiple=model.rows_multiple())
    return builder.build(local_slice(rows, *model.data_block()), MICRO, group=group)


def _local_experts(model: MimoHandle) -> tuple | None:
    experts = next((p for n, p in model.named_parameters() if n.endswith("experts.down_projs")), None)
    return None if experts is None else tuple(experts.to_local().shape)


def _hf(result: dict) -> dict:
    """Gradients and weights under transformers' Qwen3-MoE names and layout (the reference's)."""
    return {**result, "grads": to_hf_state(result["grads"]), "params": to_hf_state(result["params"])}


# ---------------------------------------------------------------- single process, transformers' Qwen3-MoE


def _reference_modules():
    """The vision module and transformers' Qwen3-MoE with the trainer's initial weights (build_model's init, before
    its MoE swap), as named parameters."""
    llm_config = moe_config(num_hidden_layers=2)
    vision = build_vision_module(VISION, llm_config, seed=VISION_SEED)
    torch.manual_seed(LLM_SEED)
    llm = AutoModelForCausalLM.from_config(llm_config, dtype=torch.float32, attn_implementation="sdpa")
    named = [(f"vision.{n}", p) for n, p in vision.named_parameters()] + [(f"language.{n}", p) for n, p in llm.named_parameters()]
    return vision, llm, named


def _forward(vision, llm, batch: dict, temperature: float = 1.0):
    """Label logprobs [B, S] (0 off the loss mask) and the balance loss of the batch's rows (one sequence each)."""
    feats = vision.projector(vision.encoder(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1])
    embeds = llm.get_input_embeddings()(batch["input_ids"])
    embeds = embeds.masked_scatter((batch["input_ids"] == PLACEHOLDER)[..., None], feats.reshape(-1, feats.shape[-1]))
    out = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_router_logits=True)
    logp = torch.log_softmax(out.logits.float() / temperature, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    aux = balance_loss(out.router_logits, batch["attention_mask"], llm.config.num_experts_per_tok)
    return logp * (batch["labels"] != -100), aux


def _finish(named: list, loss: torch.Tensor, optimizer: str, clip: float, batch_size: int) -> dict:
    from tests.unit.mimo_oracle import finish_reference_step

    cfg = train_config(optimizer, clip, batch_size, batch_size)
    return finish_reference_step(named, loss, optimizer, cfg.lr, cfg.eps, cfg.weight_decay, clip)


def reference_dpo_step(rows: list[dict], optimizer: str, clip: float) -> dict:
    """test_mimo_dpo.reference_dpo_step with the MoE LLM: + the policy forward's balance loss."""
    vision, llm, named = _reference_modules()
    batch = mimo_collate(rows)
    with torch.no_grad():
        ref = _forward(vision, llm, batch)[0].sum(-1)
        for _, p in named:
            p.mul_(MOVE)
    logp, aux = _forward(vision, llm, batch)
    seq, tokens = logp.sum(-1), (batch["labels"] != -100).sum(-1).float()
    reward = (seq - ref) / tokens.clamp(min=1)
    pair = (tokens[0::2] > 0) & (tokens[1::2] > 0)
    margin = reward[0::2] - reward[1::2]
    dpo = -(F.logsigmoid(DPO.beta * margin) * pair).sum() / pair.sum()
    sft = -(seq[0::2] * pair).sum() / (tokens[0::2] * pair).sum()
    out = _finish(named, dpo + DPO.sft_weight * sft + aux, optimizer, clip, GLOBAL_BATCH)
    return {**out, "loss": float(dpo + DPO.sft_weight * sft), "moe_aux_loss": float(aux),
            "reward_margin": float((margin * pair).sum() / pair.sum()),
            "preference_accuracy": float(((margin > 0) & pair).sum() / pair.sum())}


def reference_grpo_step(rows: list[dict]) -> dict:
    """test_mimo_grpo.reference_grpo_steps ("grpo" loss, SGD) with the MoE LLM: + the policy forward's balance loss."""
    batch, mask, gen, advantages = rollout_batch(rows)
    vision, llm, named = _reference_modules()
    with torch.no_grad():
        ref_lp = _forward(vision, llm, batch, TEMPERATURE)[0]
        for _, p in named:
            p.mul_(1.05)
    lp, aux = _forward(vision, llm, batch, TEMPERATURE)
    loss, metrics = clipped_pg_loss(lp, lp.detach(), advantages, mask, LOSSES["grpo"], global_valid_tokens=mask.sum(),
                                    global_valid_seqs=(mask.sum(-1) > 0).sum(), ref_logprobs=ref_lp, gen_logprobs=gen)
    metrics["entropy"] = -(lp.detach() * mask).sum() / mask.sum()
    # the policy-gradient term alone (ratio 1 on-policy): -mean over tokens of A * logprob; its gradient is live
    pg_only = -(advantages[:, None] * lp * mask).sum() / mask.sum()
    out = _finish(named, loss + aux, "sgd", 0.0, ROWS)
    return {**out, "loss": float(loss), "moe_aux_loss": float(aux), "pg_only": float(pg_only),
            **{k: float(v) for k, v in metrics.items()}}


# ---------------------------------------------------------------- the library's steps on 3 ranks


def _dpo_steps(rows: list[dict]) -> dict:
    out = {}
    for optimizer, clip in OPTIMIZERS:
        model = _handle(GLOBAL_BATCH)
        policy = GradsBeforeStep(model, train_config(optimizer, clip, GLOBAL_BATCH, MICRO))
        policy.init_reference()
        model.reshard()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(MOVE)
        microbatches = _microbatches(model, rows, group=2)
        metrics = dpo_train_step(policy, microbatches, DPO)
        out[optimizer] = _hf({**metrics, "grads": policy.grads, "params": full_params(model.named_parameters()),
                              "modules": sorted(model.module_parts), "local_experts": _local_experts(model),
                              "microbatches": len(microbatches)})
        model.destroy()
    return out


def _grpo_step(rows: list[dict]) -> dict:
    model = _handle(ROWS)
    policy = moved_policy(model, MICRO)
    microbatches = _microbatches(model, rows)
    metrics = grpo_forward_backward(policy, microbatches, LOSSES["grpo"], TEMPERATURE)
    grads = full_grads(model.named_parameters())
    metrics.update(policy.optimizer_step())
    out = _hf({**{k: v for k, v in metrics.items() if not k.startswith("timing/")}, "grads": grads,
               "params": full_params(model.named_parameters()), "modules": sorted(model.module_parts),
               "local_experts": _local_experts(model), "microbatches": len(microbatches)})
    model.destroy()
    return out


def _check_placement(per_rank: list[dict]) -> None:
    assert [r["modules"] for r in per_rank] == [["vision"], ["language"], ["language"]], [r["modules"] for r in per_rank]
    assert [r["local_experts"] for r in per_rank] == [None, (2, 16, 32), (2, 16, 32)]  # 4 experts over ep2
    assert all(r["microbatches"] >= 2 for r in per_rank)


def _merged(per_rank: list[dict]) -> dict:
    return {kind: {k: v for r in per_rank for k, v in r[kind].items()} for kind in ("grads", "params")}


@pytest.mark.slow  # ~13 s alone, ~27 s on a busy machine (3 ranks, two optimizers); CI: the GRPO step below
def test_noncolocated_mimo_dpo_with_an_moe_llm_under_ep2_matches_single_process():
    rows = preference_rows(seed=0)
    ref = {opt: reference_dpo_step(rows, opt, clip) for opt, clip in OPTIMIZERS}
    assert ref["adamw"]["grad_norm"] > 0.5 and abs(ref["sgd"]["reward_margin"]) > 1e-3  # clip and reference live
    per_rank = run_ranks(_dpo_steps, 3, rows)
    for optimizer, _ in OPTIMIZERS:
        results, r = [p[optimizer] for p in per_rank], ref[optimizer]
        _check_placement(results)
        for rank, got in enumerate(results):  # the encoder rank logs the LLM ranks' metrics (relayed)
            assert got["skipped"] == 0 and got["pairs"] == 3, (optimizer, rank, got["pairs"])
            for key in ("loss", "grad_norm", "moe_aux_loss"):
                assert abs(got[key] - r[key]) <= TOL * abs(r[key]), (optimizer, rank, key, got[key], r[key])
            assert abs(got["reward_margin"] - r["reward_margin"]) <= 1e-5, (optimizer, rank, got["reward_margin"])
            assert got["preference_accuracy"] == pytest.approx(r["preference_accuracy"], abs=1e-6)
        assert_step_close(_merged(results), r, f"dpo {optimizer}")


def test_noncolocated_mimo_grpo_with_an_moe_llm_under_ep2_matches_single_process():
    rows = rollout_rows()
    ref = reference_grpo_step(rows)
    # the PG term is live: most rows with response tokens carry non-zero advantages, and A * logprob does not vanish
    live = [r["advantages"] for r in rows if any(label != -100 for label in r["labels"])]
    assert sum(a != 0 for a in live) >= 4 and abs(ref["pg_only"]) > 1e-2, (live, ref["pg_only"])
    assert abs(ref["kl"]) > 1e-4 and ref["moe_aux_loss"] > 0
    per_rank = run_ranks(_grpo_step, 3, rows)
    _check_placement(per_rank)
    for rank, got in enumerate(per_rank):
        assert _close(got["loss"], ref["loss"]), (rank, got["loss"], ref["loss"])
        assert abs(got["moe_aux_loss"] - ref["moe_aux_loss"]) <= TOL * ref["moe_aux_loss"], (rank, got["moe_aux_loss"])
        for key in METRICS:
            assert _close(got[key], ref[key]), (rank, key, got[key], ref[key])
        assert abs(got["ratio_min"] - 1) < 1e-6 and abs(got["ratio_max"] - 1) < 1e-6 and got["skipped"] == 0
    assert_step_close(_merged(per_rank), ref, "grpo")


# ---------------------------------------------------------------- the GRPO loop from the CLI, with rewards

GRPO_NONCOLOCATED = [
    "--config", "configs/mimo_grpo_tiny.yaml", "model.config.model_type=qwen3_moe", "model.config.num_experts=4",
    "model.config.num_experts_per_tok=2", "model.config.moe_intermediate_size=16", "mimo.layout.language.tp=1",
    "launch.nproc=3", "mimo.layout.vision.dp=1", "mimo.layout.language.dp=2", "mimo.layout.language.ep=2",
    "mimo.layout.language.offset=1", "train.max_steps=3", "grpo.prompts_per_step=4", "grpo.num_generations=4",
    "train.global_batch_size=16", "train.micro_batch_size=8", "data.num_train=4000", "data.num_eval=20",
    # warmed up until a quarter of the held-out answers are exact (step ~125): rewards are not all 0
    "grpo.warmup_sft_steps=400", "grpo.warmup_sft_target_accuracy=0.25", "eval.every_steps=0", "logging.progress=false"]


@pytest.mark.slow  # ~70 s: the SFT warm-up until exact answers appear
def test_noncolocated_mimo_grpo_cli_with_an_moe_llm_has_rewards_and_stays_on_policy(tmp_path):
    """The GRPO loop, the hf generator on the encoder rank, the MoE LLM's experts over ep2 on the other two: some
    rewards are non-zero (the PG term has a gradient), and every step is on-policy after the refits."""
    from tests.unit.cli_runner import metrics, run_cli

    r = run_cli("grpo", *GRPO_NONCOLOCATED, f"output_dir={tmp_path}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in metrics(tmp_path) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert any(row["reward"] > 0 for row in rows), [row["reward"] for row in rows]
    for row in rows:
        assert row["gen_kl_error"] < 1e-5 and abs(row["ratio_min"] - 1) < 1e-6 and abs(row["ratio_max"] - 1) < 1e-6, row
        assert row["moe_aux_loss"] > 0 and row["skipped"] == 0, row
    assert rows[-1]["kl"] > 0, rows  # the refits carried moved weights
