"""MIMO with a mixture-of-experts language model (docs/moe.md): vision tower + projector at their own layout and a
tiny Qwen3-MoE LLM with its experts split over `mimo.layout.language.ep`, one SFT step on 2 gloo ranks, equals an
independent single-process step of the vision module + transformers' own Qwen3-MoE (its router and experts, a
hand-written sequence-wise balance loss): loss, aux loss, grad norm, every gradient, post-step weights (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

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
]


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


def _layout_steps(rows: list[dict]) -> dict:
    results = {}
    for name, layout, micro in LAYOUTS:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH)
        cp = layout["language"].get("cp", 1)
        for optimizer, clip in OPTIMIZERS:
            encoders, llm = _modules(packed=cp > 1)
            model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                               grids=grids)
            policy = Policy(model, train_config(optimizer, clip, GLOBAL_BATCH, micro))
            builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple)
            metrics = policy.sft_forward_backward(builder.build(local_slice(rows, *model.data_block()), micro))
            grads = to_hf_state(full_grads(model.named_parameters()))
            metrics.update(policy.optimizer_step())
            params = to_hf_state(full_params(model.named_parameters()))
            experts = next(p for n, p in model.named_parameters() if n.endswith("experts.down_projs"))
            results[name, optimizer] = {**metrics, "local_experts": tuple(experts.to_local().shape),
                                        **({"grads": grads, "params": params} if dist.get_rank() == 0 else {})}
            model.destroy()
    return results


@pytest.fixture(scope="module")
def reference():
    rows = mimo_rows(seed=5)
    return rows, {opt: reference_step(rows, opt, clip) for opt, clip in OPTIMIZERS}


def test_moe_language_model_under_ep2_matches_single_process(reference):
    rows, ref = reference
    assert ref["adamw"]["grad_norm"] > 0.5, "the clip must be active for the AdamW check to cover it"
    per_rank = run_ranks(_layout_steps, 2, rows)
    for name, _, _ in LAYOUTS:
        for optimizer, _ in OPTIMIZERS:
            r, what = ref[optimizer], f"{name} {optimizer}"
            for result in per_rank:
                got = result[name, optimizer]
                for key in ("loss", "moe_aux_loss", "grad_norm"):
                    assert abs(got[key] - r[key]) <= TOL * r[key], (what, key, got[key], r[key])
                assert got["skipped"] == 0 and got["local_experts"][0] == 2, (what, got["local_experts"])  # 4 / ep2
            assert_step_close(per_rank[0][name, optimizer], r, what)


MIMO_MOE = ["--config", "configs/mimo_sft_tiny.yaml", "model.config.model_type=qwen3_moe", "model.config.num_experts=4",
            "model.config.num_experts_per_tok=2", "model.config.moe_intermediate_size=16", "mimo.layout.language.tp=1",
            "mimo.layout.language.cp=2"]


@pytest.mark.parametrize("override,expected", [
    ("mimo.layout.language.ep=3", "mimo.layout.language.ep=3: the expert view etp*ep*edp must equal tp*cp*dp"),
    ("mimo.layout.language.etp=2", "mimo.layout.language.etp=2: expert tensor parallelism is not supported"),
    ("mimo.layout.vision.ep=2", "mimo.layout.vision: unknown dims ['ep']"),
    ("mimo.layout.language.ep=2 model.config.model_type=llama", "mimo.layout.language.ep=2 needs a mixture-of-experts"),
    ("mimo.layout.language.ep=2 mimo.layout.language.pp=2 launch.nproc=4 mimo.layout.vision.dp=4",
     "mimo.layout.language.ep=2 with mimo.layout.language.pp=2 is not supported under MIMO yet"),
    ("mimo.layout.language.ep=2 model.pretrained=configs", "mimo.layout.language.ep=2 with model.pretrained"),
    ("mimo.layout.language.ep=2 mimo.layout.language.cp=1 mimo.layout.language.dp=2 mimo.layout.language.offset=2 "
     "launch.nproc=4 train.micro_batch_size=16", "runs colocated layouts only so far"),
])
def test_mimo_expert_layout_errors_are_one_clear_line(tmp_path, override, expected):
    r = run_cli("sft", *MIMO_MOE, f"output_dir={tmp_path}", *override.split(), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


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
