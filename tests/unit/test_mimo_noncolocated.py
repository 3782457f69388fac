"""Non-colocated MIMO (mimo.layout.<module>.offset: the encoder and the LLM on disjoint rank ranges), oracle
(docs/numerics.md): the encoder ranks encode and send their rows point-to-point to the LLM ranks, the embedding
gradients come back the same way (mimo/relay.py), and the step equals the single-process reference — loss, global
grad norm, every encoder AND LLM gradient, post-step weights with SGD and clipped AdamW — on a batch mixing
text-only and image rows with non-uniform loss masks, on every rank (encoder ranks included: their metrics come
from the LLM ranks). Layouts: vision dp2 on ranks 0-1 + language tp2 on ranks 2-3 (fan-in), vision dp1 + language
pp2 on 3 ranks, vision dp2 + language cp2 packed (fan-in), vision dp1 + language dp2 on 3 ranks (fan-out), vision
tp2 + language dp2 on 4 ranks (fan-out from a tensor-parallel encoder), language dp2 on ranks 0-1 + vision dp1 on
rank 2 (the LLM first), vision dp1 + language pp2 x dp2 on 5 ranks (fan-out into a pipelined LLM; slow). Also: logprobs and greedy generation on every rank equal the single process's; a non-colocated checkpoint
resumes under a colocated layout and back; bad placements fail with one line before any group exists."""

import pytest
import torch

from automodel_mimo.distributed.grid_spec import GridSpec, validate_layout
from automodel_mimo.errors import UserInputError
from automodel_mimo.mimo.handle import MimoHandle
from policies.policy import Policy
from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, build_modules, mimo_rows
from tests.unit.multirank import run_ranks
from tests.unit.oracle import train_config
from tests.unit.oracle import full_params
from tests.unit.test_mimo_pp import GLOBAL_BATCH, _microbatches, _model, _pipeline, assert_matches_reference, layout_steps

FOUR_RANKS = [  # (name, layout, micro_batch_size, parallel pipeline keys, packed)
    ("vision-dp2+language-tp2", {"vision": {"dp": 2}, "language": {"tp": 2, "offset": 2}}, 4, {}, False),
    ("vision-dp2+language-cp2-packed", {"vision": {"dp": 2}, "language": {"cp": 2, "offset": 2}}, 2, {}, True),
    ("vision-tp2+language-dp2-fan-out", {"vision": {"tp": 2}, "language": {"dp": 2, "offset": 2}}, 4, {}, False),
]
CPU = torch.device("cpu")
THREE_RANKS = [
    ("vision-dp1+language-pp2", {"vision": {"dp": 1}, "language": {"pp": 2, "offset": 1}}, 4, {}, False),
    ("vision-dp1+language-dp2-fan-out", {"vision": {"dp": 1}, "language": {"dp": 2, "offset": 1}}, 4, {}, False),
    # the LLM first: rank 0 (which logs) is an LLM rank, the encoder is the last rank
    ("language-dp2+vision-dp1-swapped", {"vision": {"dp": 1, "offset": 2}, "language": {"dp": 2}}, 4, {}, False),
]
# a pipelined LLM with dp: stage 0 on ranks 1-2, stage 1 on ranks 3-4; each LLM dp slot takes half of a
# microbatch's rows (fan-out), each slot's lead (its first stage) receives its rows and sends their gradient back
FIVE_RANKS = [
    ("vision-dp1+language-pp2xdp2-fan-out", {"vision": {"dp": 1}, "language": {"pp": 2, "dp": 2, "offset": 1}}, 4, {},
     False),
]


def _steps(rows: list[dict], layouts: list) -> dict:
    """Per layout and optimizer: this rank's metrics, the modules it holds, its full gradients and weights."""
    return layout_steps(rows, layouts, lambda model: {"modules": sorted(model.module_parts)})


def _check(per_rank: list[dict], layouts: list, ref: dict) -> None:
    """Every rank's loss, grad norm and step decision; the union of the ranks' gradients and weights (each rank
    holds one module's) against the reference, with rank 0's (an encoder rank's) metrics."""
    for name, layout, *_ in layouts:
        assert_matches_reference(per_rank, name, ref)
        vision = GridSpec.for_module("vision", layout["vision"])
        assert [r[name, "sgd"]["modules"] for r in per_rank] == [
            ["vision"] if vision.holds(rank) else ["language"] for rank in range(len(per_rank))], name  # disjoint
        assert all(r[name, "sgd"]["microbatches"] >= 2 for r in per_rank), name  # gradient accumulation
        assert "packed" not in name or max(r[name, "sgd"]["packed_max"] for r in per_rank) >= 2, name


@pytest.fixture(scope="module")
def reference():
    from tests.unit.test_mimo import reference_steps
    from tests.unit.test_mimo_pp import LAYERS

    return reference_steps(layers=LAYERS)


def test_noncolocated_oracle_four_ranks(reference):
    rows, ref = reference
    _check(run_ranks(_steps, 4, rows, FOUR_RANKS), FOUR_RANKS, ref)


@pytest.mark.slow  # 5 ranks on 2 cores; tests/nightly/unit_slow.sh (the 3- and 4-rank oracles cover pp and fan-out in CI)
def test_noncolocated_oracle_five_ranks_pipelined_llm_with_dp(reference):
    rows, ref = reference
    _check(run_ranks(_steps, 5, rows, FIVE_RANKS), FIVE_RANKS, ref)


def _nan_step(rows: list[dict]) -> dict:
    """A NaN gradient on the last rank (an LLM stage): every rank, the encoder's too, skips the step."""
    name, layout, micro, keys, packed = THREE_RANKS[0]
    model = _model(layout, micro, keys, packed)
    policy = Policy(model, train_config("sgd", 0.0, GLOBAL_BATCH, micro))
    before = full_params(model.named_parameters())
    policy.sft_forward_backward(_microbatches(model, rows, micro, packed))
    if torch.distributed.get_rank() == 2:
        grad = next(p.grad for n, p in model.named_parameters() if n.startswith("language.") and p.grad is not None)
        grad.to_local().fill_(float("nan"))
    step = policy.optimizer_step()
    after = full_params(model.named_parameters())
    model.destroy()
    return {"skipped": step["skipped"], "unchanged": all(torch.equal(before[k], after[k]) for k in before)}


def _three_ranks(rows: list[dict]) -> list:
    return [_steps(rows, THREE_RANKS), _nan_step(rows)]


def test_noncolocated_oracle_three_ranks(reference):
    rows, ref = reference
    per_rank = run_ranks(_three_ranks, 3, rows)
    _check([r[0] for r in per_rank], THREE_RANKS, ref)
    assert [r[1] for r in per_rank] == [{"skipped": 1, "unchanged": True}] * 3, [r[1] for r in per_rank]


# ---------------------------------------------------------------- inference: logprobs and greedy generation

INFERENCE = [("fan-in", {"vision": {"dp": 2}, "language": {"tp": 2, "offset": 2}}),
             ("pp2", {"vision": {"dp": 1}, "language": {"pp": 2, "dp": 1, "offset": 1}})]


def _inference(rows: list[dict], layouts: list) -> dict:
    from tests.unit.test_mimo_cli import GEN_COUNTS, GEN_TOKENS, _generation_prompts
    from tests.unit.test_mimo_pp import _reference_logprobs

    out = {}
    for name, layout in layouts:
        encoders, llm = build_modules(layers=2)
        model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                           pipeline=_pipeline(2, {}))
        policy = Policy(model, train_config("sgd", 0.0, GLOBAL_BATCH, 2))
        microbatches = _microbatches(model, rows, 2, packed=False)
        got = policy.logprobs(microbatches)
        mine = [model.language_row_range(mb["input_ids"].shape[0]) for mb in microbatches]
        errors = [float((g - _reference_logprobs(mb)[r.start:r.stop]).abs().max()) if len(r) else 0.0
                  for g, mb, r in zip(got, microbatches, mine)]
        prompts, pixels = _generation_prompts()
        images = {"pixel_values": pixels, "image_counts": torch.tensor(GEN_COUNTS)}
        rows_done, answers = policy.greedy_generate(prompts, GEN_TOKENS, set(), 0, images, banned=PLACEHOLDER, rows=4)
        counted = int(policy.sum_over_data_ranks(torch.tensor(float(len(rows_done)))))  # how eval counts rows
        out[name] = {"logprob_errors": errors, "logprob_rows": [len(g) for g in got], "mine": [len(r) for r in mine],
                     "answers": dict(zip(rows_done, answers)), "counted": counted}
        model.destroy()
    return out


def test_noncolocated_logprobs_and_greedy_generation_match_single_process():
    """The LLM ranks compute, the encoder ranks get the results of the rows they stand for (a block's first
    encoder slot: all of its rows; the others: none), so eval counts every prompt once on every rank."""
    from tests.unit.test_mimo_cli import _reference_generation

    reference = _reference_generation()
    per_rank = run_ranks(_inference, 4, mimo_rows(seed=5), INFERENCE[:1])
    per_rank3 = run_ranks(_inference, 3, mimo_rows(seed=5), INFERENCE[1:])
    for name, ranks in (("fan-in", per_rank), ("pp2", per_rank3)):
        results = [r[name] for r in ranks]
        assert all(max(r["logprob_errors"]) < 1e-5 for r in results), (name, [r["logprob_errors"] for r in results])
        assert all(r["logprob_rows"] == r["mine"] for r in results), name
        assert all(r["counted"] == 4 for r in results), (name, [r["counted"] for r in results])
        for r in results:
            assert all(answer == reference[row] for row, answer in r["answers"].items()), (name, r["answers"], reference)
        assert len(results[0]["answers"]) == 4, name  # rank 0, an encoder rank, holds every answer of its block
    assert [len(r["fan-in"]["answers"]) for r in per_rank] == [4, 0, 4, 4]  # encoder slot 1 stands for no rows


# ---------------------------------------------------------------- checkpoints: non-colocated <-> colocated

NONCOLOCATED = {"vision": {"dp": 2}, "language": {"tp": 2, "offset": 2}}
COLOCATED = {"vision": {"dp": 4}, "language": {"dp": 2, "tp": 2}}


def _save_and_resume(rows: list[dict], out_dir: str) -> dict:
    """Train one step non-colocated and save; load colocated, train a step and save; load non-colocated."""
    from automodel_mimo.checkpoint import Checkpointer
    from tests.unit.oracle import full
    from tests.unit.test_mimo_pp import _state

    states = {}
    for i, layout in enumerate((NONCOLOCATED, COLOCATED, NONCOLOCATED)):
        encoders, llm = build_modules(layers=2)
        model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH)
        policy = Policy(model, train_config("adamw", 0.5, GLOBAL_BATCH, 4))
        if i > 0:
            Checkpointer(f"{out_dir}/{i - 1}").load(Checkpointer(f"{out_dir}/{i - 1}").latest(), model, policy.optimizer)
        states[i, "loaded"] = _state(model, policy)
        metrics = policy.sft_train_step(_microbatches(model, rows, 4, packed=False)) if i < 2 else {}
        Checkpointer(f"{out_dir}/{i}").save(1, model, policy.optimizer)
        states[i, "saved"] = {**_state(model, policy), "loss": metrics.get("loss")}
        states[i, "full"] = {k: full(v) for k, v in model.full_state_dict().items()}
        model.destroy()
    return states


def _union(per_rank: list[dict], key: tuple) -> dict:
    return {kind: {k: v for r in per_rank for k, v in r[key][kind].items()} for kind in ("model", "optim")}


def test_noncolocated_checkpoint_resumes_colocated_and_back(tmp_path):
    """Weights and optimizer moments survive both directions exactly; the colocated run's step after the
    non-colocated one continues from them (its loss is the loaded model's), and the full state for exports
    reaches rank 0 (an encoder rank) with every module's tensors."""
    per_rank = run_ranks(_save_and_resume, 4, mimo_rows(seed=5), str(tmp_path))
    for saved, loaded in (((0, "saved"), (1, "loaded")), ((1, "saved"), (2, "loaded"))):
        a, b = _union(per_rank, saved), _union(per_rank, loaded)
        for kind in ("model", "optim"):
            assert a[kind].keys() == b[kind].keys() and a[kind], (saved, kind)
            for key, value in a[kind].items():
                assert torch.equal(value, b[kind][key]), (saved, kind, key)
    full = per_rank[0][0, "full"]
    assert any(k.startswith("vision.") for k in full) and any(k.startswith("language.") for k in full)
    assert full.keys() == per_rank[0][1, "full"].keys()
    for key, value in _union(per_rank, (0, "saved"))["model"].items():
        assert torch.equal(full[key], value), key
    assert per_rank[0][1, "saved"]["loss"] < per_rank[0][0, "saved"]["loss"]


# ---------------------------------------------------------------- bad placements: one line, before any group

def _error(specs: list, world: int) -> str:
    with pytest.raises(UserInputError) as e:
        validate_layout([GridSpec.for_module(n, s) for n, s in specs], world)
    return str(e.value)


def test_bad_placements_fail_with_one_line():
    overlap = _error([("vision", {"dp": 2}), ("language", {"tp": 2, "offset": 1})], 4)
    assert overlap.startswith("mimo.layout: module rank ranges overlap (vision on ranks 0..1") and "\n" not in overlap
    gap = _error([("vision", {"dp": 1}), ("language", {"tp": 2, "offset": 2})], 4)
    assert gap.startswith("mimo.layout: module rank ranges do not cover ranks 0..3 exactly"), gap
    short = _error([("vision", {"dp": 2}), ("language", {"tp": 1, "offset": 2})], 4)
    assert "do not cover ranks 0..3" in short, short
    assert "encoders are not pipelined" in _error([("vision", {"pp": 2}), ("language", {"tp": 2, "offset": 2})], 4)
    assert "do not nest" in _error([("vision", {"dp": 3}), ("language", {"dp": 2, "offset": 3})], 5)
    validate_layout([GridSpec.for_module("vision", {"dp": 2}), GridSpec.for_module("language", {"tp": 2, "offset": 2})], 4)
    validate_layout([GridSpec.for_module("vision", {"dp": 1, "offset": 2}), GridSpec.for_module("language", {"dp": 2})], 3)
