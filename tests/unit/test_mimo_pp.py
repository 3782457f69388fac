"""MIMO with a pipelined LLM (mimo.layout.language.pp > 1), oracle (docs/numerics.md): the three-phase step
(encoder + bridge on the whole step's images, the LLM's schedule on their detached result, the encoder's
backward from the gradient the first stage captured and broadcast) equals the single-process reference —
loss, global grad norm, every encoder AND LLM gradient, post-step weights with SGD and clipped AdamW — on a
batch mixing text-only and image rows with non-uniform loss masks, under fan-in, fan-out and equal bridges,
interleaved 1F1B, LLM cp2 with packing and several microbatches per rank. Also: pipelined logprobs and greedy
generation equal the non-pipelined model's, and a pp2 checkpoint resumes under pp1 with the same weights."""

import pytest
import torch

from automodel_mimo.data.batching import local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from policies.policy import Policy
from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, build_modules, mimo_rows
from tests.unit.multirank import run_ranks
from tests.unit.oracle import full, full_grads, full_params, train_config
from tests.unit.test_mimo import OPTIMIZERS, _assert_layout_matches, reference_steps

GLOBAL_BATCH = 8
LAYERS = 4  # 2 stages of 2 layers (1F1B), or 4 virtual stages of 1 (interleaved)
CPU = torch.device("cpu")
PACKED_SIZE = 32  # rows of 6-20 tokens pack 1-4 to a row: several packed microbatches per rank

# (name, layout, micro_batch_size, parallel pipeline keys, packed); every rank runs 2 microbatches or more
TWO_RANKS = [
    ("pp2-fan-in", {"vision": {"dp": 2}, "language": {"pp": 2}}, 4, {}, False),
    ("pp2-equal-interleaved", {"vision": {"tp": 2}, "language": {"pp": 2}}, 4, {"schedule": "interleaved1f1b"}, False),
    ("pp2-fan-in-packed", {"vision": {"dp": 2}, "language": {"pp": 2}}, 2, {}, True),
]
FOUR_RANKS = [
    ("pp2xdp2-fan-in", {"vision": {"dp": 4}, "language": {"pp": 2, "dp": 2}}, 2, {}, False),
    ("pp2xdp2-fan-out", {"vision": {"tp": 4}, "language": {"pp": 2, "dp": 2}}, 4, {}, False),
    ("pp2xcp2-packed", {"vision": {"dp": 4}, "language": {"pp": 2, "cp": 2}}, 2, {}, True),
    ("pp2xtp2-fan-in", {"vision": {"dp": 4}, "language": {"pp": 2, "tp": 2}}, 4, {}, False),
]


def _pipeline(micro: int, keys: dict) -> dict:
    return {"schedule": "1f1b", "pp_microbatch_size": 1, "layers_per_stage": None, "seq_len": 64,
            "micro_batch_size": micro, **keys}


def _model(layout: dict, micro: int, keys: dict, packed: bool, grids=None, **options) -> MimoHandle:
    """`options`: MimoHandle's compile / activation_checkpointing."""
    encoders, llm = build_modules(packed=packed or layout["language"].get("cp", 1) > 1, layers=LAYERS)
    return MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                      grids=grids, pipeline=_pipeline(micro, keys), **options)


def _microbatches(model: MimoHandle, rows: list[dict], micro: int, packed: bool) -> list[dict]:
    builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                                packed_size=PACKED_SIZE if packed else None, rows_multiple=model.rows_multiple())
    return builder.build(local_slice(rows, *model.data_block()), micro)


def layout_steps(rows: list[dict], layouts: list, extra, **options) -> dict:
    """Per layout and optimizer: one SFT step's metrics, its microbatch count and largest packed row, this rank's
    full gradients and post-step weights, and `extra(model)` (what the caller checks of the layout); `options`:
    compile (train.compile), activation_checkpointing."""
    results = {}
    for name, layout, micro, keys, packed in layouts:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH, **options)
        for optimizer, clip in OPTIMIZERS:
            model = _model(layout, micro, keys, packed, grids, **options)
            policy = Policy(model, train_config(optimizer, clip, GLOBAL_BATCH, micro))
            microbatches = _microbatches(model, rows, micro, packed)
            metrics = policy.sft_forward_backward(microbatches)
            grads = full_grads(model.named_parameters())
            metrics.update(policy.optimizer_step())
            params = full_params(model.named_parameters())
            results[name, optimizer] = {**metrics, **extra(model), "microbatches": len(microbatches),
                                        "packed_max": max(int((mb["seq_index"][:, :, 0] >= 0).sum(1).max())
                                                          for mb in microbatches) if packed else 0,
                                        "grads": grads, "params": params}
            model.destroy()
    return results


def _steps(rows: list[dict], layouts: list) -> dict:
    return layout_steps(rows, layouts, lambda model: {"llm_parts": len(model.module_parts["language"])})


def _merged(per_rank: list[dict], name: str, optimizer: str) -> dict:
    """Every stage's LLM gradients and weights (each rank holds its stages') with rank 0's encoder ones."""
    got = dict(per_rank[0][name, optimizer])
    for kind in ("grads", "params"):
        got[kind] = {k: v for r in per_rank for k, v in r[name, optimizer][kind].items()}
    return got


@pytest.fixture(scope="module")
def reference():
    return reference_steps(layers=LAYERS)


def assert_matches_reference(per_rank: list[dict], name: str, ref: dict, what: str = "") -> None:
    """Per optimizer: the union of the ranks' gradients and weights (each rank holds its stages' or modules'), with
    rank 0's metrics, against the single-process reference."""
    for optimizer, _ in OPTIMIZERS:
        merged = [{**r, (name, optimizer): _merged(per_rank, name, optimizer)} if i == 0 else r
                  for i, r in enumerate(per_rank)]
        _assert_layout_matches(merged, name, optimizer, ref[optimizer], f"{what}{name} {optimizer}")


def _check(per_rank: list[dict], layouts: list, ref: dict) -> None:
    for name, *_ in layouts:
        assert_matches_reference(per_rank, name, ref)
        assert all(r[name, "sgd"]["microbatches"] >= 2 for r in per_rank), name  # gradient accumulation
        assert "packed" not in name or max(r[name, "sgd"]["packed_max"] for r in per_rank) >= 2, name  # really packed
        stages = 2 if "interleaved" in name else 1  # virtual stages per rank
        assert all(r[name, "sgd"]["llm_parts"] == stages for r in per_rank), name


def test_mimo_pp_oracle_two_ranks(reference):
    rows, ref = reference
    _check(run_ranks(_steps, 2, rows, TWO_RANKS), TWO_RANKS, ref)


def test_mimo_pp_oracle_four_ranks(reference):
    rows, ref = reference
    _check(run_ranks(_steps, 4, rows, FOUR_RANKS), FOUR_RANKS, ref)


# ---------------------------------------------------------------- inference: logprobs and greedy generation

INFERENCE = [("pp2xdp2", {"vision": {"dp": 4}, "language": {"pp": 2, "dp": 2}}),
             ("pp2xcp2", {"vision": {"dp": 4}, "language": {"pp": 2, "cp": 2}}),
             ("pp2xtp2", {"vision": {"dp": 4}, "language": {"pp": 2, "tp": 2}})]


@torch.no_grad()
def _reference_logprobs(mb: dict) -> torch.Tensor:
    """One process, the unparallelized modules: encoder -> splice -> LLM -> per-token logprobs of the labels."""
    from automodel_mimo.losses import token_logprobs

    encoders, llm = build_modules(layers=2)
    embeds = llm.get_input_embeddings()(mb["input_ids"])
    if mb["pixel_values"].shape[0]:  # a microbatch of text-only rows has no image to encode
        rows = encoders["vision"](mb["pixel_values"]).reshape(-1, llm.config.hidden_size)
        embeds = embeds.masked_scatter((mb["input_ids"] == PLACEHOLDER)[..., None], rows)
    mask = mb.get("attention_mask")  # cp-ready rows are one right-padded segment each: causal attention suffices
    return token_logprobs(llm(inputs_embeds=embeds, attention_mask=mask).logits, mb["labels"])


def _inference(rows: list[dict]) -> dict:
    from tests.unit.test_mimo_cli import GEN_COUNTS, GEN_TOKENS, _generation_prompts

    out = {}
    for name, layout in INFERENCE:
        encoders, llm = build_modules(packed=layout["language"].get("cp", 1) > 1, layers=2)
        model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                           pipeline=_pipeline(2, {}))
        policy = Policy(model, train_config("sgd", 0.0, GLOBAL_BATCH, 2))
        microbatches = _microbatches(model, rows, 2, packed=False)
        got = policy.logprobs(microbatches)
        errors = [float((g - _reference_logprobs(mb)).abs().max()) for g, mb in zip(got, microbatches)]
        prompts, pixels = _generation_prompts()
        images = {"pixel_values": pixels, "image_counts": torch.tensor(GEN_COUNTS)}
        _, answers = policy.greedy_generate(prompts, GEN_TOKENS, set(), 0, images, banned=PLACEHOLDER, rows=4)
        out[name] = {"logprob_errors": errors, "answers": answers}
        model.destroy()
    return out


def test_mimo_pp_logprobs_and_greedy_generation_match_single_process():
    """The last stage captures per-token logprobs / the next token (cp: from the rank holding the position)
    and broadcasts them over the pp group: every rank equals the unparallelized model."""
    from tests.unit.test_mimo_cli import _reference_generation

    reference = _reference_generation()
    for result in run_ranks(_inference, 4, mimo_rows(seed=5)):
        for name, _ in INFERENCE:
            assert max(result[name]["logprob_errors"]) < 1e-5, (name, result[name]["logprob_errors"])
            assert result[name]["answers"] == reference, (name, result[name]["answers"], reference)


# ---------------------------------------------------------------- checkpoints: pp2 <-> pp1

PP2 = {"vision": {"dp": 2}, "language": {"pp": 2}}
PP1 = {"vision": {"dp": 2}, "language": {"tp": 2}}


def _state(model: MimoHandle, policy: Policy) -> dict:
    """This rank's full weights and optimizer state (under pp: its stages' share of the LLM's)."""
    optim = {k: full(v) for k, v in policy.optimizer.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"model": full_params(model.named_parameters()), "optim": optim}


def _save_and_resume(rows: list[dict], out_dir: str) -> dict:
    """Train one step under pp2 and save; load under pp1, save again; load under pp2."""
    from automodel_mimo.checkpoint import Checkpointer

    states = {}
    for i, layout in enumerate((PP2, PP1, PP2)):
        encoders, llm = build_modules(layers=2)
        model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                           pipeline=_pipeline(4, {}))
        policy = Policy(model, train_config("adamw", 0.5, GLOBAL_BATCH, 4))
        if i == 0:
            policy.sft_train_step(_microbatches(model, rows, 4, packed=False))
        else:
            Checkpointer(f"{out_dir}/{i - 1}").load(Checkpointer(f"{out_dir}/{i - 1}").latest(), model, policy.optimizer)
        Checkpointer(f"{out_dir}/{i}").save(1, model, policy.optimizer)
        states[i] = _state(model, policy)
        model.destroy()
    return states


def test_mimo_pp2_checkpoint_resumes_under_pp1_and_back(tmp_path):
    per_rank = run_ranks(_save_and_resume, 2, mimo_rows(seed=5), str(tmp_path))
    merged = {i: {kind: {k: v for r in per_rank for k, v in r[i][kind].items()} for kind in ("model", "optim")}
              for i in range(3)}
    assert any(k.startswith("language.model.layers.1.") for k in merged[0]["model"])  # stage 1's, unsplit names
    for i in (1, 2):
        for kind in ("model", "optim"):
            assert merged[i][kind].keys() == merged[0][kind].keys(), (i, kind)
            for key, value in merged[0][kind].items():
                assert torch.equal(value, merged[i][kind][key]), (i, kind, key)
