"""MIMO DPO oracle under the LLM-pipelined and non-colocated layouts (docs/numerics.md): the real DPO step of
algorithms/dpo.py (reference logprobs through the weight swap, DPO + SFT loss, clipped optimizer step) equals the
single-process `reference_dpo_step` of test_mimo_dpo.py — loss, grad norm, preference accuracy, reward margin,
every encoder, projector and LLM gradient, post-step weights (SGD and clipped AdamW) — on every rank. Layouts:
LLM pp2 colocated (2 ranks: padded, packed, interleaved 1F1B; 4 ranks: pp2 x dp2, x cp2, x tp2) and non-colocated
(4 ranks: vision dp2 + language dp2 padded and packed, vision dp2 + language cp2; 3 ranks: vision dp1 + language
pp2 padded and packed, fan-out, fan-in, the LLM first). Each rank holds part of the model (a pp stage's LLM layers,
or one module): the union of the ranks' gradients and weights is compared. Also: the reference swap covers every
module bit for bit under two non-colocated layouts (from full tensors; encoder ranks read the LLM ranks'
reference logprobs)."""

import pytest
import torch

from automodel_mimo.algorithms.dpo import dpo_train_step
from automodel_mimo.data.batching import local_slice
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from policies.policy import Policy
from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, assert_step_close, build_modules
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, full_params, train_config
from tests.unit.test_mimo_dpo import (
    DPO, GLOBAL_BATCH, MOVE, OPTIMIZERS, GradsBeforeStep, _builder, move_each_module, preference_rows, reference_dpo_step)

CPU = torch.device("cpu")
INTERLEAVED_LAYERS = 4  # interleaved 1F1B on pp2: 2 virtual stages of 1 layer per rank
# (name, layout, micro_batch_size: sequences, or packed rows of whole pairs, packed); a pipeline microbatch holds
# whole (chosen, rejected) pairs (config/checks.py): 2 padded sequences, or 1 packed row. "interleaved" in a name:
# the interleaved1f1b schedule on an LLM of INTERLEAVED_LAYERS layers (else 2 layers, 1F1B)
TWO_RANKS = [
    ("vision-dp2+language-pp2", {"vision": {"dp": 2}, "language": {"pp": 2}}, 4, False),
    ("vision-dp2+language-pp2-packed", {"vision": {"dp": 2}, "language": {"pp": 2}}, 2, True),
    ("vision-tp2+language-pp2-interleaved", {"vision": {"tp": 2}, "language": {"pp": 2}}, 4, False),
]
FOUR_RANKS = [
    ("vision-dp4+language-pp2xdp2", {"vision": {"dp": 4}, "language": {"pp": 2, "dp": 2}}, 4, False),
    ("vision-dp4+language-pp2xcp2", {"vision": {"dp": 4}, "language": {"pp": 2, "cp": 2}}, 4, False),
    ("vision-dp4+language-pp2xtp2", {"vision": {"dp": 4}, "language": {"pp": 2, "tp": 2}}, 4, False),
    ("noncolocated vision-dp2+language-cp2", {"vision": {"dp": 2}, "language": {"cp": 2, "offset": 2}}, 4, False),
    ("noncolocated vision-dp2+language-dp2", {"vision": {"dp": 2}, "language": {"dp": 2, "offset": 2}}, 2, False),
    ("noncolocated vision-dp2+language-dp2-packed", {"vision": {"dp": 2}, "language": {"dp": 2, "offset": 2}}, 1, True),
]
THREE_RANKS = [
    ("noncolocated vision-dp1+language-pp2", {"vision": {"dp": 1}, "language": {"pp": 2, "offset": 1}}, 4, False),
    ("noncolocated vision-dp1+language-pp2-packed", {"vision": {"dp": 1}, "language": {"pp": 2, "offset": 1}}, 2, True),
    ("noncolocated vision-dp1+language-dp2-fan-out", {"vision": {"dp": 1}, "language": {"dp": 2, "offset": 1}}, 4, False),
    ("noncolocated vision-dp2+language-dp1-fan-in", {"vision": {"dp": 2}, "language": {"dp": 1, "offset": 2}}, 4, False),
    # the LLM first: rank 0 (which logs) is an LLM rank, the encoder the last rank
    ("noncolocated language-dp2+vision-dp1", {"vision": {"dp": 1, "offset": 2}, "language": {"dp": 2}}, 4, False),
]


def _layers(name: str) -> int:
    return INTERLEAVED_LAYERS if "interleaved" in name else 2


def _handle(name: str, layout: dict, micro: int, packed: bool, grids: dict | None = None) -> MimoHandle:
    encoders, llm = build_modules(packed=packed or layout["language"].get("cp", 1) > 1, layers=_layers(name))
    pipeline = {"schedule": "interleaved1f1b" if "interleaved" in name else "1f1b", "pp_microbatch_size": 1 if packed else 2,
                "layers_per_stage": None, "seq_len": 64, "micro_batch_size": micro}
    return MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                      grids=grids, pipeline=pipeline)


def _dpo_step(rows: list[dict], name: str, layout: dict, grids: dict, micro: int, packed: bool, optimizer: str, clip: float) -> dict:
    """algorithms/dpo.dpo_train_step on this rank's block of pairs; this rank's full gradients and weights."""
    model = _handle(name, layout, micro, packed, grids)
    policy = GradsBeforeStep(model, train_config(optimizer, clip, GLOBAL_BATCH, micro))
    policy.init_reference()
    model.reshard()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(MOVE)
    microbatches = _builder(model, packed).build(local_slice(rows, *model.data_block()), micro, group=2)
    metrics = dpo_train_step(policy, microbatches, DPO)
    result = {**metrics, "grads": policy.grads, "params": full_params(model.named_parameters()),
              "microbatches": len(microbatches), "modules": sorted(model.module_parts),
              "llm_parts": len(model.module_parts.get("language", [])),
              "pairs_per_row": max(int((mb["seq_index"][:, :, 0] >= 0).sum(1).max()) // 2 for mb in microbatches)
              if packed else 1}
    model.destroy()
    return result


def _reference_swap(rows: list[dict], name: str, layout: dict, micro: int, packed: bool) -> dict:
    """The reference from full tensors (the single-process init), then the encoder, the projector and the LLM
    moved one after another; after each, the reference pass must give the initial logprobs exactly (every rank:
    encoder ranks receive them from the LLM ranks) and leave the moved weights and their logprobs untouched."""
    model = _handle(name, layout, micro, packed)
    policy = Policy(model, train_config("sgd", 0.0, GLOBAL_BATCH, micro))
    microbatches = _builder(model, False).build(local_slice(rows, *model.data_block()), micro, group=2)
    out = move_each_module(policy, microbatches, build_modules(layers=_layers(name)))
    model.destroy()
    return out


def _steps(rows: list[dict], layouts: list, swap: list) -> dict:
    results = {}
    for name, layout, micro, packed in layouts:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH)
        for optimizer, clip in OPTIMIZERS:
            results[name, optimizer] = _dpo_step(rows, name, layout, grids, micro, packed, optimizer, clip)
    for name, layout, micro, packed in swap:
        results["swap", name] = _reference_swap(rows, name, layout, micro, packed)
    return results


@pytest.fixture(scope="module")
def reference():
    """The single-process step per (LLM layers, optimizer)."""
    rows = preference_rows(seed=0)
    ref = {(layers, optimizer): reference_dpo_step(rows, optimizer, clip, layers)
           for layers in sorted({2, INTERLEAVED_LAYERS}) for optimizer, clip in OPTIMIZERS}
    assert all(r["grad_norm"] > 0.5 for (_, optimizer), r in ref.items() if optimizer == "adamw"), "the clip is active"
    return rows, ref


def _check(per_rank: list[dict], layouts: list, ref: dict) -> None:
    for name, layout, _, packed in layouts:
        for optimizer, _ in OPTIMIZERS:
            r, what = ref[_layers(name), optimizer], f"{name} {optimizer}"
            for rank, result in enumerate(per_rank):
                got = result[name, optimizer]
                assert got["skipped"] == 0 and got["pairs"] == 3, (what, rank, got["pairs"])  # pair 3: no rejected tokens
                for key in ("loss", "grad_norm"):
                    assert abs(got[key] - r[key]) <= TOL * abs(r[key]), (what, rank, key, got[key], r[key])
                # a mean of differences of nearby logprob sums (~1e-3): its rounding scales with the sums
                assert abs(got["reward_margin"] - r["reward_margin"]) <= 1e-5, (what, rank, got["reward_margin"])
                assert got["preference_accuracy"] == pytest.approx(r["preference_accuracy"], abs=1e-6), (what, rank)
            # each rank holds part of the model (its pp stage's layers, or one module): the union is the model
            merged = {kind: {k: v for result in per_rank for k, v in result[name, optimizer][kind].items()}
                      for kind in ("grads", "params")}
            assert_step_close(merged, r, what)
        steps = [result[name, "sgd"] for result in per_rank]
        assert all(s["microbatches"] >= 1 for s in steps), name
        assert not packed or max(s["pairs_per_row"] for s in steps) >= 2, name  # a packed row holds two pairs
        if "offset" in layout["language"]:  # disjoint: a rank holds the encoder or the LLM, never both
            assert all(len(s["modules"]) == 1 for s in steps) and {m for s in steps for m in s["modules"]} == {
                "vision", "language"}, (name, [s["modules"] for s in steps])
        if layout["language"].get("pp", 1) > 1:  # a stage's part of the LLM per LLM rank (interleaved: two)
            parts = 2 if "interleaved" in name else 1
            assert all(s["llm_parts"] == parts for s in steps if "language" in s["modules"]), name


def _check_swap(per_rank: list[dict], name: str) -> None:
    expected = {prefix: {"reference_is_initial": True, "policy_moved": True, "policy_unchanged": True,
                         "weights_back": True} for prefix in ("vision.encoder.", "vision.projector.", "language.")}
    for rank, result in enumerate(per_rank):
        swap = dict(result["swap", name])
        swap.pop("rows")
        assert swap == expected, (name, rank, swap)
    assert per_rank[0]["swap", name]["rows"] > 0, name  # rank 0 (an encoder rank) reads the LLM ranks' logprobs


def test_mimo_dpo_pp2_two_ranks(reference):
    rows, ref = reference
    _check(run_ranks(_steps, 2, rows, TWO_RANKS, []), TWO_RANKS, ref)


@pytest.mark.slow  # tests/nightly/unit_slow.sh; CI: pp2 (two ranks) and non-colocated (three ranks) below
def test_mimo_dpo_pp2xdp2_and_noncolocated_four_ranks(reference):
    rows, ref = reference
    per_rank = run_ranks(_steps, 4, rows, FOUR_RANKS, FOUR_RANKS[1:2])
    _check(per_rank, FOUR_RANKS, ref)
    _check_swap(per_rank, FOUR_RANKS[1][0])


def test_mimo_dpo_noncolocated_three_ranks(reference):
    rows, ref = reference
    per_rank = run_ranks(_steps, 3, rows, THREE_RANKS, THREE_RANKS[:1])
    _check(per_rank, THREE_RANKS, ref)
    _check_swap(per_rank, THREE_RANKS[0][0])


# ---------------------------------------------------------------- dpo.reference=<the run's own LLaVA export>

# vision dp2 + language pp2: the encoder loads whole on both ranks, each LLM stage its layers of the folder (vision dp2
# + language tp2 passed too: one more layout's ~40 s, left out of CI)
FOLDER_LAYOUTS = [TWO_RANKS[0]]


def _reference_step(rows: list[dict], name: str, layout: dict, grids: dict, micro: int, reference: str) -> dict:
    """The DPO step with the reference chosen as the CLI chooses it (algorithms/dpo.init_reference)."""
    from types import SimpleNamespace

    from automodel_mimo.algorithms.dpo import init_reference

    model = _handle(name, layout, micro, False, grids)
    policy = GradsBeforeStep(model, train_config("adamw", 0.5, GLOBAL_BATCH, micro))
    init_reference(SimpleNamespace(dpo=SimpleNamespace(reference=reference)), policy)
    model.reshard()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(MOVE)
    microbatches = _builder(model, False).build(local_slice(rows, *model.data_block()), micro, group=2)
    result = {**dpo_train_step(policy, microbatches, DPO), "grads": policy.grads,
              "params": full_params(model.named_parameters())}
    model.destroy()
    return result


def _folder_vs_initial(rows: list[dict], folder: str) -> dict:
    from automodel_mimo.checkpoint import export_hf
    from automodel_mimo.models.tokenizer import build_default_tokenizer

    results = {}
    for name, layout, micro, _ in FOLDER_LAYOUTS:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH)
        export = f"{folder}/{name}"
        initial = _handle(name, layout, micro, False, grids)  # the run's initial weights, exported as a run does
        export_hf(initial, build_default_tokenizer(), export)
        initial.destroy()
        results[name] = {reference: _reference_step(rows, name, layout, grids, micro, reference)
                         for reference in ("initial", export)}
    return results


def test_mimo_dpo_reference_from_the_runs_own_llava_export_equals_initial(tmp_path):
    """dpo.reference=<the LLaVA folder the run's initial export wrote> gives the DPO step of dpo.reference=initial bit
    for bit (loss, metrics, every gradient and post-step weight), with the LLM pipelined."""
    rows = preference_rows(seed=0)
    per_rank = run_ranks(_folder_vs_initial, 2, rows, str(tmp_path))
    for name, *_ in FOLDER_LAYOUTS:
        for rank, result in enumerate(per_rank):
            initial, folder = (result[name][r] for r in ("initial", str(tmp_path / name)))
            assert abs(initial["reward_margin"]) > 1e-3, (name, initial["reward_margin"])  # the reference matters
            for key in ("loss", "grad_norm", "reward_margin", "preference_accuracy"):
                assert folder[key] == initial[key], (name, rank, key, folder[key], initial[key])
            for kind in ("grads", "params"):
                assert folder[kind].keys() == initial[kind].keys()
                unequal = [n for n, t in initial[kind].items() if not torch.equal(folder[kind][n], t)]
                assert not unequal, (name, rank, kind, unequal[:5])
