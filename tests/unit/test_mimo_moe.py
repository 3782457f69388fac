"""MIMO with a mixture-of-experts language model (docs/moe.md): vision tower + projector at their own layout and a
tiny Qwen3-MoE LLM with its experts split over `mimo.layout.language.ep`, one SFT step on 2 gloo ranks (non-colocated:
3; 4 or 5 in slow tests), equals an independent single-process step of the vision module + transformers' own Qwen3-MoE
(its router and experts, a hand-written sequence-wise balance loss): loss, aux loss, grad norm, every gradient,
post-step weights (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from automodel_mimo.config import ModelConfig
from automodel_mimo.data.batching import local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from automodel_mimo.mimo.modules import build_vision_module
from automodel_mimo.models.build import build_model
from automodel_mimo.models.moe import to_hf_state
from policies.policy import Policy
from tests.unit.cli_runner import run_cli
from tests.unit.mimo_oracle import (
    PLACEHOLDER,
    TOKENS_PER_IMAGE,
    VISION,
    assert_step_close,
    finish_reference_step,
    mimo_collate,
    mimo_rows,
    named_mimo_parameters,
)
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, full_grads, full_params, train_config
from tests.unit.test_moe import balance_loss, moe_config

GLOBAL_BATCH = 8
OPTIMIZERS = [("sgd", 0.0), ("adamw", 0.5)]
CPU = torch.device("cpu")
LLM_SEED, VISION_SEED = 7, 11
# (name, layout, micro batch size): 2 ranks; ep2 splits the 4 experts over the LLM's 2 dense ranks
LAYOUTS = [
    ("vision dp2, language dp2 ep2", {"vision": {"dp": 2}, "language": {"dp": 2, "ep": 2}}, 2),
    ("fan-out: vision tp2, language dp2 ep2", {"vision": {"tp": 2}, "language": {"dp": 2, "ep": 2}}, 2),
    ("fan-in: vision dp2, language cp2 ep2", {"vision": {"dp": 2}, "language": {"cp": 2, "ep": 2}}, 1),
    # one MoE layer per stage: the router metrics and the balance loss cross the stages (ep1: one rank per stage)
    ("vision dp2, language pp2", {"vision": {"dp": 2}, "language": {"pp": 2}}, 4),
]
# 4 ranks: ep2 within each pipeline stage (dense dp2, or cp2: sequence sums over cp), fan-in from vision dp4; slow
PP_EP_LAYOUTS = [("vision dp4, language pp2 x dp2 ep2", {"vision": {"dp": 4}, "language": {"pp": 2, "dp": 2, "ep": 2}}, 2),
                 ("vision dp4, language pp2 x cp2 ep2", {"vision": {"dp": 4}, "language": {"pp": 2, "cp": 2, "ep": 2}}, 2)]

# language tp2 x ep2 (2 ranks, slow): each token into the ep dispatch once (docs/moe.md, "ep x tp"), fan-in from vision dp2
TP_EP_LAYOUTS = [("fan-in: vision dp2, language tp2 ep2", {"vision": {"dp": 2}, "language": {"tp": 2, "ep": 2}}, 1)]

# non-colocated: the encoder on rank 0, the LLM's expert view spans ranks 1-2 only (rank 0 builds its groups, holds none)
NONCOLOCATED_LAYOUTS = [("vision dp1 on rank 0, language dp2 ep2 on ranks 1-2",
                         {"vision": {"dp": 1}, "language": {"dp": 2, "ep": 2, "offset": 1}}, 4)]
# 4 ranks (slow): a fan-in into an LLM with cp (sequence sums over cp), and the LLM first (rank 0 holds experts)
NONCOLOCATED_FOUR_RANKS = [
    ("vision dp2 on ranks 0-1, language cp2 ep2 on ranks 2-3", {"vision": {"dp": 2}, "language": {"cp": 2, "ep": 2, "offset": 2}}, 2),
    ("language dp2 ep2 on ranks 0-1, vision dp2 on ranks 2-3", {"vision": {"dp": 2, "offset": 2}, "language": {"dp": 2, "ep": 2}}, 2),
    # one MoE layer per stage (ep1): the router metrics sum over the stages, then cross the relay
    ("vision dp2 on ranks 0-1, language pp2 on ranks 2-3", {"vision": {"dp": 2}, "language": {"pp": 2, "offset": 2}}, 4),
]
# 5 ranks (slow): ep2 within each stage of a pipelined LLM fed by a fan-out
NONCOLOCATED_FIVE_RANKS = [("vision dp1 on rank 0, language pp2 x dp2 ep2 on ranks 1-4",
                            {"vision": {"dp": 1}, "language": {"pp": 2, "dp": 2, "ep": 2, "offset": 1}}, 4)]


def _pipeline(micro: int) -> dict:
    """The LLM's pipeline settings (mimo.layout.language.pp > 1): 1F1B, one row per pipeline microbatch."""
    return {"schedule": "1f1b", "pp_microbatch_size": 1, "layers_per_stage": None, "seq_len": 64, "micro_batch_size": micro}


def _modules(packed: bool = False):
    llm_config = moe_config(num_hidden_layers=2)
    vision = build_vision_module(VISION, llm_config, seed=VISION_SEED)
    llm = build_model(ModelConfig(config={"model_type": "qwen3_moe"}), llm_config, seed=LLM_SEED, packed=packed)
    return {"vision": vision}, llm


def reference_step(rows: list[dict], optimizer: str, clip: float) -> dict:
    """One process: vision -> projector -> splice -> transformers' Qwen3-MoE; NLL token mean + balance loss."""
    from transformers import AutoModelForCausalLM

    cfg = train_config(optimizer, clip, GLOBAL_BATCH, GLOBAL_BATCH)
    llm_config = moe_config(num_hidden_layers=2)
    vision = build_vision_module(VISION, llm_config, seed=VISION_SEED)
    torch.manual_seed(LLM_SEED)  # build_model's initialization, before its MoE swap
    llm = AutoModelForCausalLM.from_config(llm_config, dtype=torch.float32, attn_implementation="sdpa")
    batch = mimo_collate(rows)
    feats = vision.projector(vision.encoder(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1])
    embeds = llm.get_input_embeddings()(batch["input_ids"])
    embeds = embeds.masked_scatter((batch["input_ids"] == PLACEHOLDER)[..., None], feats.reshape(-1, feats.shape[-1]))
    out = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_router_logits=True)
    logp = torch.log_softmax(out.logits.float(), -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    valid = batch["labels"] != -100
    nll = -(logp * valid).sum() / valid.sum()
    aux = balance_loss(out.router_logits, batch["attention_mask"], llm_config.num_experts_per_tok)
    step = finish_reference_step(named_mimo_parameters(vision, llm), nll + aux, optimizer, cfg.lr, cfg.eps,
                                 cfg.weight_decay, clip)
    return {**step, "loss": float(nll), "moe_aux_loss": float(aux)}


def _layout_steps(rows: list[dict], layouts: list) -> dict:
    results = {}
    for name, layout, micro in layouts:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH)
        cp, pp = layout["language"].get("cp", 1), layout["language"].get("pp", 1)
        for optimizer, clip in OPTIMIZERS:
            encoders, llm = _modules(packed=cp > 1)
            model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                               grids=grids, pipeline=_pipeline(micro) if pp > 1 else None)
            policy = Policy(model, train_config(optimizer, clip, GLOBAL_BATCH, micro))
            builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                                        rows_multiple=model.rows_multiple())
            microbatches = builder.build(local_slice(rows, *model.data_block()), micro)
            metrics = policy.sft_forward_backward(microbatches)
            grads = to_hf_state(full_grads(model.named_parameters()))
            metrics.update(policy.optimizer_step())
            params = to_hf_state(full_params(model.named_parameters()))
            experts = next((p for n, p in model.named_parameters() if n.endswith("experts.down_projs")), None)
            experts = experts.to_local() if isinstance(experts, DTensor) else experts
            # under pp each rank holds its stage's LLM part; non-colocated, each rank one module's
            keep = dist.get_rank() == 0 or pp > 1 or not model.colocated
            results[name, optimizer] = {**metrics, "local_experts": None if experts is None else tuple(experts.shape),
                                        "modules": sorted(model.module_parts), "microbatches": len(microbatches),
                                        **({"grads": grads, "params": params} if keep else {})}
            model.destroy()
    return results


def _check(per_rank: list[dict], layouts: list, ref: dict) -> None:
    """Every rank: loss, aux loss, grad norm, its expert shard; the gradients and post-step weights of every
    module (under pp: each stage's LLM part from the rank holding it, with rank 0's encoder)."""
    for name, layout, _ in layouts:
        ep = layout["language"].get("ep", 1)
        for optimizer, _ in OPTIMIZERS:
            r, what = ref[optimizer], f"{name} {optimizer}"
            for result in per_rank:
                got = result[name, optimizer]
                for key in ("loss", "moe_aux_loss", "grad_norm"):
                    assert abs(got[key] - r[key]) <= TOL * r[key], (what, key, got[key], r[key])
                assert got["skipped"] == 0, what
                if "language" in got["modules"]:  # non-colocated: the encoder ranks hold no experts
                    assert got["local_experts"][0] == 4 // ep, (what, got["local_experts"])
                assert got["microbatches"] >= 2, what  # gradient accumulation over microbatches
            merged = {kind: {k: v for result in reversed(per_rank) for k, v in result[name, optimizer].get(kind, {}).items()}
                      for kind in ("grads", "params")}
            assert_step_close(merged, r, what)


@pytest.fixture(scope="module")
def reference():
    rows = mimo_rows(seed=5)
    return rows, {opt: reference_step(rows, opt, clip) for opt, clip in OPTIMIZERS}


def test_moe_language_model_under_ep2_matches_single_process(reference):
    rows, ref = reference
    assert ref["adamw"]["grad_norm"] > 0.5, "the clip must be active for the AdamW check to cover it"
    _check(run_ranks(_layout_steps, 2, rows, LAYOUTS), LAYOUTS, ref)


@pytest.mark.slow
def test_moe_language_model_under_tp2_x_ep2_matches_single_process(reference):
    rows, ref = reference
    _check(run_ranks(_layout_steps, 2, rows, TP_EP_LAYOUTS), TP_EP_LAYOUTS, ref)


@pytest.mark.slow
def test_moe_language_model_under_pp2_with_ep2_per_stage_matches_single_process(reference):
    """Expert parallelism inside each pipeline stage: the stage's ep all-gather dispatch runs within the schedule,
    the balance loss's gradient enters each stage's MoE layer in its backward, the metrics sum over the stages."""
    rows, ref = reference
    _check(run_ranks(_layout_steps, 4, rows, PP_EP_LAYOUTS), PP_EP_LAYOUTS, ref)


def test_moe_language_model_under_ep2_non_colocated_matches_single_process(reference):
    """The encoder and the MoE LLM on disjoint ranks: rows and their gradients cross the relay, the ep dispatch runs on
    the LLM's ranks only, the encoder rank logs the LLM ranks' router metrics."""
    rows, ref = reference
    per_rank = run_ranks(_layout_steps, 3, rows, NONCOLOCATED_LAYOUTS)
    assert [r[NONCOLOCATED_LAYOUTS[0][0], "sgd"]["modules"] for r in per_rank] == [["vision"], ["language"], ["language"]]
    _check(per_rank, NONCOLOCATED_LAYOUTS, ref)


@pytest.mark.slow
def test_moe_language_model_under_ep2_non_colocated_four_ranks_matches_single_process(reference):
    rows, ref = reference
    per_rank = run_ranks(_layout_steps, 4, rows, NONCOLOCATED_FOUR_RANKS)
    assert [r[NONCOLOCATED_FOUR_RANKS[1][0], "sgd"]["modules"] for r in per_rank] == [["language"]] * 2 + [["vision"]] * 2
    _check(per_rank, NONCOLOCATED_FOUR_RANKS, ref)


@pytest.mark.slow
def test_moe_language_model_under_pp2_x_ep2_non_colocated_matches_single_process(reference):
    rows, ref = reference
    _check(run_ranks(_layout_steps, 5, rows, NONCOLOCATED_FIVE_RANKS), NONCOLOCATED_FIVE_RANKS, ref)


MIMO_MOE = ["--config", "configs/mimo_sft_tiny.yaml", "model.config.model_type=qwen3_moe", "model.config.num_experts=4",
            "model.config.num_experts_per_tok=2", "model.config.moe_intermediate_size=16", "mimo.layout.language.tp=1",
            "mimo.layout.language.cp=2"]


@pytest.mark.parametrize("override,expected", [
    ("mimo.layout.language.ep=3", "mimo.layout.language.ep=3: the expert view etp*ep*edp must equal tp*cp*dp"),
    ("mimo.layout.language.etp=2", "mimo.layout.language.etp=2: expert tensor parallelism is not supported"),
    ("mimo.layout.vision.ep=2", "mimo.layout.vision: unknown dims ['ep']"),
    ("mimo.layout.language.ep=2 model.config.model_type=llama", "mimo.layout.language.ep=2 needs a mixture-of-experts"),
    ("mimo.layout.language.ep=2 mimo.layout.language.cp=1 mimo.layout.language.pp=2",  # per stage: 1 rank
     "mimo.layout.language.ep=2: the expert view etp*ep*edp must equal tp*cp*dp = 1*1*1 = 1 ranks per pipeline stage"),
])
def test_mimo_expert_layout_errors_are_one_clear_line(tmp_path, override, expected):
    r = run_cli("sft", *MIMO_MOE, f"output_dir={tmp_path}", *override.split(), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_mimo_expert_layout_non_colocated_is_accepted():
    """The CLI config of the non-colocated oracle's layout passes validation (it was refused before any rank started)."""
    from automodel_mimo.config import load_config

    cfg = load_config("sft", MIMO_MOE[1], [*MIMO_MOE[2:-1], "launch.nproc=3", "mimo.layout.vision.dp=1",
                                           "mimo.layout.language.dp=2", "mimo.layout.language.ep=2",
                                           "mimo.layout.language.offset=1", "train.micro_batch_size=4"])
    assert cfg.mimo.layout["language"] == {"tp": 1, "dp": 2, "ep": 2, "offset": 1}, cfg.mimo.layout


@pytest.mark.slow
def test_mimo_grpo_with_an_moe_llm_under_ep2_is_on_policy(tmp_path):
    """The MIMO refit streams the LLaVA names with the experts in transformers' layout: the hf (LLaVA) generator holds
    the trainer's weights after each refit (gen_kl_error ~ 0 at step 2, after an update that moved the policy)."""
    from tests.unit.cli_runner import metrics

    r = run_cli("grpo", "--config", "configs/mimo_grpo_tiny.yaml", *MIMO_MOE[2:-1], "mimo.layout.language.dp=2",
                "mimo.layout.language.ep=2", "train.max_steps=2", "grpo.prompts_per_step=4", "grpo.num_generations=4",
                "train.global_batch_size=16", "train.micro_batch_size=8", "grpo.warmup_sft_steps=20", "data.num_train=64",
                "data.num_eval=6", "eval.every_steps=0", "logging.progress=false", f"output_dir={tmp_path}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "language: dp=2 tp=1 cp=1 pp=1 ep=2" in r.stdout, r.stdout
    rows = [row for row in metrics(tmp_path) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["gen_kl_error"] < 1e-5 and row["moe_aux_loss"] > 0, row
    assert rows[1]["kl"] > 0, rows  # the refit before step 2 carried moved weights


MIMO_MOE_DPO = ["--config", "configs/mimo_dpo_tiny.yaml", *MIMO_MOE[2:-1], "model.config.router_aux_loss_coef=0.01",
                "data.num_train=64", "data.num_eval=6", "train.global_batch_size=8", "train.micro_batch_size=4",
                "train.max_steps=3", "train.warmup_steps=0", "eval.every_steps=3", "dpo.warmup_sft_steps=2",
                "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false"]


@pytest.mark.slow  # ~90 s: two CLI runs (2 and 4 ranks); the step itself is the SFT oracle's above
def test_mimo_dpo_with_an_moe_llm_under_pp2_x_ep2_matches_ep2(tmp_path):
    """MIMO DPO with an MoE LLM (SFT warm-up, reference swap, DPO steps through the same handle): language dp2 ep2 on
    2 ranks and language pp2 x dp2 with ep2 per stage on 4 ranks log the same losses, grad norms and router metrics."""
    from tests.unit.cli_runner import metrics

    layouts = {"ep2": ["mimo.layout.language.dp=2", "mimo.layout.language.ep=2"],
               "pp2xep2": ["launch.nproc=4", "mimo.layout.vision.dp=4", "mimo.layout.language.pp=2",
                           "mimo.layout.language.dp=2", "mimo.layout.language.ep=2", "parallel.pp_microbatch_size=2"]}
    rows = {}
    for name, overrides in layouts.items():
        r = run_cli("dpo", *MIMO_MOE_DPO, *overrides, f"output_dir={tmp_path / name}", timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        rows[name] = [row for row in metrics(tmp_path / name) if "loss" in row]
    assert [row["step"] for row in rows["ep2"]] == [1, 2, 3] == [row["step"] for row in rows["pp2xep2"]]
    assert abs(rows["ep2"][0]["loss"] - 0.6931472) < 1e-6  # the reference is the warmed-up policy: log 2
    for a, b in zip(rows["ep2"], rows["pp2xep2"]):
        assert a["moe_aux_loss"] > 0 and a["moe_idle_experts"] == b["moe_idle_experts"], (a, b)
        for key in ("loss", "grad_norm", "moe_aux_loss", "moe_load_imbalance"):
            assert abs(a[key] - b[key]) <= TOL * abs(a[key]), (key, a, b)
