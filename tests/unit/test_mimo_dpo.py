"""MIMO DPO oracle (docs/numerics.md): the DPO step of algorithms/dpo.py (reference logprobs through the weight
swap, DPO + SFT loss, clipped optimizer step) on a SigLIP + projector + Llama model under heterogeneous colocated
grids equals a single-process step written here — loss, preference accuracy, reward margin, global grad norm,
every encoder, projector and LLM gradient, post-step weights — on pairs that share their prompt's images
(a text-only pair, a two-image pair, a pair whose rejected row has no loss token), for fan-in, fan-out and LLM cp2,
padded (SGD and clipped AdamW) and packed (SGD). Also: the reference swap covers every module (encoder, projector,
LLM) bit for bit under a heterogeneous layout, from the live weights and from full tensors."""

import pytest
import torch
import torch.nn.functional as F

from automodel_mimo.algorithms.dpo import dpo_train_step
from automodel_mimo.config import DPOConfig
from automodel_mimo.data.batching import local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from policies.policy import Policy
from tests.unit.mimo_oracle import (
    IMAGE, PLACEHOLDER, TOKENS_PER_IMAGE, assert_step_close, build_modules, finish_reference_step, mimo_collate,
    named_mimo_parameters, reference_token_logprobs)
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, full_grads, full_params, train_config

CPU = torch.device("cpu")
PAIR_IMAGES = [1, 0, 2, 1]  # images per pair (both rows of a pair share them); pair 3's rejected row has no loss token
GLOBAL_BATCH = 2 * len(PAIR_IMAGES)  # sequences
DPO = DPOConfig(beta=0.5, sft_weight=0.3, average_logprobs=True)
MOVE = 1.05  # the policy = the reference's weights scaled, so rewards are not zero
OPTIMIZERS = [("sgd", 0.0), ("adamw", 0.5)]
# (name, layout, micro_batch_size in sequences): 4 ranks; every layout's data blocks hold 2 pairs
LAYOUTS = [
    ("fan-in", {"vision": {"dp": 4}, "language": {"dp": 2, "tp": 2}}, 4),
    ("fan-out", {"vision": {"dp": 2, "tp": 2}, "language": {"dp": 4}}, 4),  # each LLM slot: one pair
    ("cp2-fan-in", {"vision": {"dp": 4}, "language": {"dp": 2, "cp": 2}}, 2),
]
PACKED_SIZE = 64  # pairs (2 x 6-20 tokens) packed whole, one or two to a row


def preference_rows(seed: int = 0) -> list[dict]:
    """(chosen, rejected) rows in pair order: one prompt (text + tokens_per_image placeholders per image) and its
    images, two responses of random length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, k in enumerate(PAIR_IMAGES):
        prompt = torch.randint(1, PLACEHOLDER, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        pixels = torch.randn(k, 3, IMAGE, IMAGE, generator=g)
        for side in ("chosen", "rejected"):
            response = torch.randint(1, PLACEHOLDER, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
            ids = torch.cat([prompt, torch.full((k * TOKENS_PER_IMAGE,), PLACEHOLDER), response])
            labels = torch.full_like(ids, IGNORE_INDEX)
            if (i, side) != (3, "rejected"):
                start = len(ids) - len(response)
                labels[start - 1:-1] = ids[start:]
            rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "pixel_values": pixels})
    return rows


def reference_dpo_step(rows: list[dict], optimizer: str, clip: float, layers: int = 2) -> dict:
    """One process, the whole batch: reference logprobs of the initial weights, the policy at MOVE x those weights,
    DPO (average logprobs) + sft_weight x NLL of the chosen rows over the pairs with loss tokens in both rows."""
    cfg = train_config(optimizer, clip, GLOBAL_BATCH, GLOBAL_BATCH)
    encoders, llm = build_modules(layers=layers)
    vision = encoders["vision"]
    named = named_mimo_parameters(vision, llm)
    batch = mimo_collate(rows)
    with torch.no_grad():
        ref = reference_token_logprobs(vision, llm, batch)[0].sum(-1)
        for _, p in named:
            p.mul_(MOVE)
    logp, valid = reference_token_logprobs(vision, llm, batch)
    seq, tokens = logp.sum(-1), valid.sum(-1).float()
    reward = (seq - ref) / tokens.clamp(min=1)
    pair = (tokens[0::2] > 0) & (tokens[1::2] > 0)
    margin = reward[0::2] - reward[1::2]
    dpo = -(F.logsigmoid(DPO.beta * margin) * pair).sum() / pair.sum()
    sft = -(seq[0::2] * pair).sum() / (tokens[0::2] * pair).sum()
    out = finish_reference_step(named, dpo + DPO.sft_weight * sft, optimizer, cfg.lr, cfg.eps, cfg.weight_decay, clip)
    out["preference_accuracy"] = float(((margin > 0) & pair).sum() / pair.sum())
    out["reward_margin"] = float((margin * pair).sum() / pair.sum())
    return out


class GradsBeforeStep(Policy):
    """The Policy, reading every gradient (full tensors) when the DPO step reaches its optimizer step."""

    def optimizer_step(self, *args, **kwargs) -> dict:
        self.grads = full_grads(self.handle.named_parameters())
        return super().optimizer_step(*args, **kwargs)


def _handle(layout: dict, grids: dict, packed: bool) -> MimoHandle:
    encoders, llm = build_modules(packed=packed or layout["language"].get("cp", 1) > 1)
    return MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                      grids=grids)


def _builder(model: MimoHandle, packed: bool) -> MicrobatchBuilder:
    return MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                             packed_size=PACKED_SIZE if packed else None, rows_multiple=model.rows_multiple())


def _dpo_step(rows: list[dict], layout: dict, grids: dict, micro: int, optimizer: str, clip: float, packed: bool) -> dict:
    """algorithms/dpo.dpo_train_step on this rank's block of pairs (rows 2i, 2i+1 whole in every split)."""
    model = _handle(layout, grids, packed)
    policy = GradsBeforeStep(model, train_config(optimizer, clip, GLOBAL_BATCH, micro))
    policy.init_reference()
    model.reshard()  # in-place writes must reach the shards the next forward gathers
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(MOVE)
    microbatches = _builder(model, packed).build(local_slice(rows, *model.data_block()), micro, group=2)
    metrics = dpo_train_step(policy, microbatches, DPO)
    result = {**metrics, "grads": policy.grads, "params": full_params(model.named_parameters())}
    if packed:
        result["sequences_per_row"] = [int(n) for mb in microbatches for n in (mb["seq_index"][:, :, 0] >= 0).sum(1)]
    model.destroy()
    return result


def _all_steps(rows: list[dict]) -> dict:
    results = {}
    for name, layout, micro in LAYOUTS:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH)
        for optimizer, clip in OPTIMIZERS:
            results[name, optimizer] = _dpo_step(rows, layout, grids, micro, optimizer, clip, packed=False)
        results["packed " + name, "sgd"] = _dpo_step(rows, layout, grids, 1, "sgd", 0.0, packed=True)
    results["swap"] = _reference_swap(rows)
    return results


def move_each_module(policy: Policy, microbatches: list[dict], modules: tuple) -> dict:
    """The reference from the full tensors of `modules` (encoders, llm), then the encoder, the projector and the LLM
    scaled by MOVE one after another; per module: whether the reference pass gave the initial logprobs exactly, the
    policy's moved, the policy's (and its weights) came back unchanged. A rank holding no LLM rows (a non-colocated
    encoder slot) has no logprobs that could move."""
    model = policy.handle
    encoders, llm = modules
    policy.init_reference({f"{module}.{k}": v for module, part in (("vision", encoders["vision"]), ("language", llm))
                           for k, v in part.state_dict().items()})
    initial = policy.logprobs(microbatches)
    out = {"rows": sum(len(lp) for lp in initial)}
    for prefix in ("vision.encoder.", "vision.projector.", "language."):
        model.reshard()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.startswith(prefix):
                    p.mul_(MOVE)
        moved, weights = policy.logprobs(microbatches), full_params(model.named_parameters())
        reference = policy.reference_logprobs(microbatches)
        after, restored = policy.logprobs(microbatches), full_params(model.named_parameters())
        out[prefix] = {
            "reference_is_initial": all(torch.equal(a, b) for a, b in zip(reference, initial)),
            "policy_moved": out["rows"] == 0 or not all(torch.equal(a, b) for a, b in zip(moved, initial)),
            "policy_unchanged": all(torch.equal(a, b) for a, b in zip(after, moved)),
            "weights_back": all(torch.equal(w, restored[n]) for n, w in weights.items()),
        }
    return out


def _reference_swap(rows: list[dict]) -> dict:
    """Fan-in (vision dp4, language dp2 x tp2): the reference from full tensors (the single-process init), then the
    encoder, the projector and the LLM moved one after another; after each, the reference pass must give the initial
    logprobs exactly and leave the moved weights and their logprobs untouched."""
    name, layout, micro = LAYOUTS[0]
    model = _handle(layout, None, packed=False)
    policy = Policy(model, train_config("sgd", 0.0, GLOBAL_BATCH, micro))
    microbatches = _builder(model, False).build(local_slice(rows, *model.data_block()), micro)
    out = move_each_module(policy, microbatches, build_modules())
    assert out.pop("rows") > 0  # every fan-in rank holds LLM rows: its policy logprobs must move
    model.destroy()
    return out


@pytest.fixture(scope="module")
def reference():
    rows = preference_rows(seed=0)
    ref = {optimizer: reference_dpo_step(rows, optimizer, clip) for optimizer, clip in OPTIMIZERS}
    assert ref["adamw"]["grad_norm"] > 0.5, "the clip must be active for the AdamW check to cover it"
    assert 0 < ref["sgd"]["preference_accuracy"] < 1, "pairs on both sides of the margin"
    return rows, ref


def test_mimo_dpo_step_matches_single_process(reference):
    rows, ref = reference
    per_rank = run_ranks(_all_steps, 4, rows)
    checked = [(name, optimizer) for name, _, _ in LAYOUTS for optimizer, _ in OPTIMIZERS]
    checked += [("packed " + name, "sgd") for name, _, _ in LAYOUTS]
    for name, optimizer in checked:
        r, what = ref[optimizer], f"{name} {optimizer}"
        for result in per_rank:
            got = result[name, optimizer]
            assert got["skipped"] == 0 and got["pairs"] == 3, (what, got["pairs"])  # pair 3 has no rejected tokens
            for key in ("loss", "grad_norm"):
                assert abs(got[key] - r[key]) <= TOL * abs(r[key]), (what, key, got[key], r[key])
            # a mean of differences of nearby logprob sums (~1e-3 here): its rounding scales with the sums
            assert abs(got["reward_margin"] - r["reward_margin"]) <= 1e-5, (what, got["reward_margin"], r["reward_margin"])
            assert got["preference_accuracy"] == pytest.approx(r["preference_accuracy"], abs=1e-6), what
        assert_step_close(per_rank[0][name, optimizer], r, what)
    held = [n for result in per_rank for name, _, _ in LAYOUTS for n in result["packed " + name, "sgd"]["sequences_per_row"]]
    assert max(held) >= 4, held  # a packed row holds two whole pairs (and their images)
    for result in per_rank:
        assert result["swap"] == {prefix: {"reference_is_initial": True, "policy_moved": True, "policy_unchanged": True,
                                           "weights_back": True}
                                  for prefix in ("vision.encoder.", "vision.projector.", "language.")}, result["swap"]
