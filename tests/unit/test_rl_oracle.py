"""RL oracle: DPO and the clipped policy-gradient loss through Policy.forward_backward under dp2, cp2, pp2, tp2
and 1 vs 4 microbatches equal the single-process result of the same global batch (loss, every gradient, post-step
weights with SGD) on non-uniform masks; reference logprobs of the DPO step come through the weight swap. The GRPO
step as run_grpo wires it (the microbatch builder on rollout rows, old / reference logprobs at the sampling
temperature, clipped PG with the generator's logprobs) is checked the same way. So are the DPO and GRPO steps
with data.packing (sequences packed into rows, a DPO pair whole in one row; the losses see one sequence per
row), against the same padded single-process reference, GRPO also with GSPO sequence-level normalization."""


import pytest
import torch

from automodel_mimo.config import DPOConfig, ModelConfig, ParallelConfig, RunConfig, pad_multiple
from automodel_mimo.data.batching import collate, local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.distributed.mesh import build_parallel_state
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.models.build import build_handle, build_model
from automodel_mimo.algorithms.dpo import attach_reference, dpo_loss_fn, dpo_train_step
from automodel_mimo.algorithms.grpo import grpo_forward_backward
from automodel_mimo.losses import PGLossConfig, clipped_pg_loss, dpo_loss
from policies.policy import Policy
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, assert_tensors_close, full_grads, full_params, random_rows, rel_err, tiny_llama_config, train_config

ROWS = 8
SEED = 11
DPO = DPOConfig(beta=0.5, sft_weight=0.3, average_logprobs=True)
PG = {
    "token": PGLossConfig(eps_low=0.05, eps_high=0.1, dual_clip=1.05, kl_beta=0.1, kl_type="k3", truncated_is_cap=1.02),
    "gspo-seq": PGLossConfig(eps_low=0.005, eps_high=0.01, gspo=True, sequence_level=True, kl_beta=0.1, kl_type="k1"),
}
GRPO = PGLossConfig(eps_low=0.2, eps_high=0.2, kl_beta=0.1, kl_type="k3", truncated_is_cap=1.02)
GRPO_SEQ = PGLossConfig(eps_low=0.2, eps_high=0.2, gspo=True, sequence_level=True, kl_beta=0.1, kl_type="k1")
PACKED_SIZE = 64  # the 8 rows (6-20 tokens) pack 1-4 to a row: DPO 1-2 pairs a row, GRPO 1-4 sequences
TEMPERATURE = 0.7


def _model(packed: bool = False):
    return build_model(ModelConfig(config={"model_type": "llama"}), tiny_llama_config(), seed=SEED, packed=packed)


def _side(n: int, width: int, scale: float, seed: int) -> torch.Tensor:
    """Per-token noise for rows 0..n-1 (fixed per row and position, whatever the layout's padding)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(ROWS, 64, generator=g) * 2 - 1)[:n, :width] * scale


def _pg_inputs(lp: torch.Tensor, rows: slice) -> dict:
    """Old / reference / generator logprobs near the current ones, and per-sequence advantages."""
    width = lp.shape[1]
    noise = {k: _side(ROWS, width, s, seed)[rows] for k, s, seed in (("old", 0.1, 1), ("ref", 0.5, 2), ("gen", 0.05, 3))}
    adv = torch.linspace(-1.5, 2.0, ROWS)[rows]
    return {"old_logprobs": lp + noise["old"], "ref_logprobs": lp + noise["ref"], "gen_logprobs": lp + noise["old"] + noise["gen"],
            "advantages": adv}


def _rollout_rows(rows: list[dict]) -> tuple[list[dict], torch.Tensor]:
    """The rows as grpo.sample_rows makes them (per-token generator logprobs, 0 off the response) and
    per-sequence advantages."""
    g = torch.Generator().manual_seed(4)
    out = []
    for r in rows:
        noise = -4.2 + 0.3 * torch.randn(len(r["input_ids"]), generator=g)
        gen = torch.where(torch.tensor(r["labels"]) != IGNORE_INDEX, noise, 0.0)
        out.append({**r, "gen_logprobs": gen.tolist()})
    return out, torch.linspace(-1.5, 2.0, ROWS)


def _pg_loss_fn(cfg: PGLossConfig, counts: dict):
    def loss_fn(lp, mb):
        return clipped_pg_loss(lp, mb["old_logprobs"], mb["advantages"], mb["loss_mask"], cfg,
                               global_valid_tokens=counts["tokens"], global_valid_seqs=counts["seqs"],
                               ref_logprobs=mb["ref_logprobs"], gen_logprobs=mb["gen_logprobs"])
    return loss_fn


def _layout(parallel: dict, micro: int, rows: list[dict]) -> dict:
    parallel = ParallelConfig(**parallel)
    state = build_parallel_state(parallel, torch.device("cpu"))
    cfg = RunConfig(parallel=parallel, train=train_config("sgd", 0.0, ROWS, micro))
    per_rank = ROWS // parallel.dp
    mine = slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)
    local = local_slice(rows, state.dp_rank, parallel.dp)
    results = {}

    cp = parallel.cp

    def fresh(packed: bool = False):
        handle = build_handle(cfg, _model(packed=packed or cp > 1), state, pad_id=0)
        if parallel.tp > 1:  # the TP plan applied: the LM head is vocab-sharded
            head = dict(handle.named_parameters())["lm_head.weight"]
            assert any(p.is_shard(0) for p in head.placements), head.placements
        return handle, Policy(handle, cfg.train)

    padded = MicrobatchBuilder(0, state.device, cp=cp)  # under cp: each row one shardable segment
    packed = MicrobatchBuilder(0, state.device, cp=cp, pad_multiple=pad_multiple(parallel), packed_size=PACKED_SIZE)

    def microbatches():
        return padded.build(local, micro)

    def perturbed(packed: bool = False):  # the reference is the initial model; scaled weights make rewards non-zero
        handle, policy = fresh(packed)
        policy.init_reference()
        handle.reshard()  # in-place writes must reach the shards the next forward gathers
        with torch.no_grad():
            for p in handle.parameters():
                p.mul_(1.05)
        return handle, policy

    def finished(handle, policy, metrics: dict) -> dict:  # gradients, then the SGD step
        grads = full_grads(handle.named_parameters())
        metrics.update(policy.optimizer_step())
        return {**metrics, "grads": grads, "params": full_params(handle.named_parameters())}

    handle, policy = perturbed()  # the whole step: reference pass, loss, SGD
    metrics = dpo_train_step(policy, microbatches(), DPO)
    results["dpo"] = {"loss": metrics["loss"], "accuracy": metrics["preference_accuracy"],
                      "params": full_params(handle.named_parameters())}
    handle, policy = perturbed()  # the same step stopped before the optimizer, for the gradients
    mbs = microbatches()
    attach_reference(policy, mbs)
    policy.forward_backward(mbs, dpo_loss_fn(DPO, policy.global_counts(mbs)))
    results["dpo"]["grads"] = full_grads(handle.named_parameters())

    for name, pg_cfg in PG.items():
        handle, policy = fresh()
        mbs = microbatches()
        start = mine.start
        for mb, lp in zip(mbs, policy.logprobs(mbs)):
            n = lp.shape[0]
            mb.update(_pg_inputs_rows(lp, start, n))
            start += n
        metrics = policy.forward_backward(mbs, _pg_loss_fn(pg_cfg, policy.global_counts(mbs)))
        results[name] = finished(handle, policy, metrics)

    handle, policy = perturbed()  # GRPO: the reference is the initial model, the policy has moved
    rollout, advantages = _rollout_rows(rows)
    rollout = local_slice([{**r, "advantages": float(a)} for r, a in zip(rollout, advantages)], state.dp_rank, parallel.dp)
    mbs = padded.build(rollout, micro)
    results["grpo"] = finished(handle, policy, grpo_forward_backward(policy, mbs, GRPO, TEMPERATURE))

    # data.packing: the same steps on packed rows (micro counts packed rows), through the microbatch builder
    handle, policy = perturbed(packed=True)  # dpo_train_step, with the gradients read before the optimizer
    mbs = packed.build(local, micro, group=2)
    results["dpo_row_sequences"] = _row_sequences(mbs)
    attach_reference(policy, mbs)
    metrics = policy.forward_backward(mbs, dpo_loss_fn(DPO, policy.global_counts(mbs)))
    results["packed-dpo"] = finished(handle, policy, {**metrics, "accuracy": metrics["preference_accuracy"]})
    for name, pg_cfg in (("packed-grpo", GRPO), ("packed-grpo-seq", GRPO_SEQ)):
        handle, policy = perturbed(packed=True)
        mbs = packed.build(rollout, micro)
        results["grpo_row_sequences"] = _row_sequences(mbs)
        results[name] = finished(handle, policy, grpo_forward_backward(policy, mbs, pg_cfg, TEMPERATURE))
    return results


def _metric_close(got: float, ref: float) -> bool:
    """Within TOL of the reference, relative to its size or to 0.1 when smaller: means of signed per-token terms
    (k1 kl, pg_loss) nearly cancel, so their rounding error scales with the terms (~0.1-1 here), not with the mean
    (a kl of -0.0023 differed by 6e-8 = 2.5e-5 relative under tp2, on main as well)."""
    return abs(got - ref) <= TOL * max(abs(ref), 0.1)


def _row_sequences(microbatches: list[dict]) -> list[int]:
    """How many sequences each packed row holds."""
    return [int(n) for mb in microbatches for n in (mb["seq_index"][:, :, 0] >= 0).sum(1)]


def _pg_inputs_rows(lp: torch.Tensor, start: int, n: int) -> dict:
    full = torch.zeros(ROWS, lp.shape[1])
    full[start:start + n] = lp
    return {k: v[start:start + n] for k, v in _pg_inputs(full, slice(None)).items()}


def _reference(rows: list[dict]) -> dict:
    """Single process, whole global batch in one forward, plain model (no FSDP, no Policy)."""
    batch = collate(rows, 0)
    mask = batch["loss_mask"]
    lr = train_config("sgd", 0.0, ROWS, ROWS).lr

    def logprobs(model, temperature: float = 1.0):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float() / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
        return lp * mask

    def finish(model, loss, extra):
        loss.backward()
        grads = full_grads(model.named_parameters())
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        return {"loss": float(loss), **extra, "grads": grads, "params": full_params(model.named_parameters())}

    out = {}
    model = _model()
    with torch.no_grad():
        ref_seq = logprobs(model).sum(-1)
        for p in model.parameters():
            p.mul_(1.05)
    seq, tokens = (logprobs(model)).sum(-1), mask.sum(-1)
    valid = (tokens[0::2] > 0) & (tokens[1::2] > 0)
    pairs, chosen_tokens = valid.sum(), (tokens[0::2] * valid).sum()
    loss, m = dpo_loss(seq, ref_seq, tokens, beta=DPO.beta, global_pairs=pairs, average_logprobs=True,
                       sft_weight=DPO.sft_weight, global_chosen_tokens=chosen_tokens)
    out["dpo"] = finish(model, loss, {"accuracy": float(m["preference_accuracy"])})
    for name, pg_cfg in PG.items():
        model = _model()
        lp = logprobs(model)
        side = _pg_inputs(lp.detach(), slice(None))
        loss, m = clipped_pg_loss(lp, side["old_logprobs"], side["advantages"], mask, pg_cfg,
                                  global_valid_tokens=mask.sum(), global_valid_seqs=(tokens > 0).sum(),
                                  ref_logprobs=side["ref_logprobs"], gen_logprobs=side["gen_logprobs"])
        out[name] = finish(model, loss, {k: float(v) for k, v in m.items()})

    model = _model()
    with torch.no_grad():
        ref_lp = logprobs(model, TEMPERATURE)
        for p in model.parameters():
            p.mul_(1.05)
    rollout, advantages = _rollout_rows(rows)
    gen = torch.zeros_like(mask)
    for i, r in enumerate(rollout):
        gen[i, :len(r["gen_logprobs"])] = torch.tensor(r["gen_logprobs"])
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    for name, pg_cfg in (("grpo", GRPO), ("grpo-seq", GRPO_SEQ)):
        model.load_state_dict(moved)
        model.zero_grad(set_to_none=True)
        lp = logprobs(model, TEMPERATURE)
        loss, m = clipped_pg_loss(lp, lp.detach(), advantages, mask, pg_cfg, global_valid_tokens=mask.sum(),
                                  global_valid_seqs=(tokens > 0).sum(), ref_logprobs=ref_lp, gen_logprobs=gen)
        m["entropy"] = -(lp.detach() * mask).sum() / mask.sum()
        out[name] = finish(model, loss, {k: float(v) for k, v in m.items()})
    return out


@pytest.fixture(scope="module")
def reference():
    rows = random_rows(ROWS, seed=5)
    return rows, _reference(rows)


@pytest.mark.parametrize("parallel,micro", [
    ({"dp": 1}, 2), ({"dp": 2}, 4), ({"dp": 1, "cp": 2}, 4),
    ({"dp": 1, "pp": 2, "pp_microbatch_size": 2}, 4),  # 2 pipeline microbatches of one pair each per schedule step
    ({"dp": 1, "tp": 2}, 4),  # vocab-sharded logits: token logprobs through the TP-parallel log-softmax
], ids=["mb4", "dp2", "cp2", "pp2", "tp2"])
def test_rl_losses_match_single_process(reference, parallel, micro):
    rows, ref = reference
    world = parallel["dp"] * parallel.get("cp", 1) * parallel.get("pp", 1) * parallel.get("tp", 1)
    got = run_ranks(_layout, world, parallel, micro, rows)
    checked = {name: name for name in ("dpo", *PG, "grpo")}  # each run's result -> its single-process reference
    checked.update({"packed-dpo": "dpo", "packed-grpo": "grpo", "packed-grpo-seq": "grpo-seq"})
    for name, ref_name in checked.items():  # pipeline stages each hold part of the parameters: merge over ranks
        grads, params = {}, {}
        for rank in got:
            grads.update(rank[name]["grads"])
            params.update(rank[name]["params"])
        assert_tensors_close(grads, ref[ref_name]["grads"], f"{name} gradients")
        assert_tensors_close(params, ref[ref_name]["params"], f"{name} post-step weights (SGD)")
    for rank in got:
        for name, ref_name in checked.items():
            g, r = rank[name], ref[ref_name]
            assert abs(g["loss"] - r["loss"]) <= TOL * abs(r["loss"]), (name, g["loss"], r["loss"])
        for name in ("dpo", "packed-dpo"):
            assert abs(rank[name]["accuracy"] - ref["dpo"]["accuracy"]) < 1e-9, name
        for name in PG:  # the globally reduced metrics equal the whole-batch ones, min/max included
            for key in ("kl", "clip_fraction", "ratio_min", "ratio_max", "gen_kl_error", "pg_loss"):
                assert rel_err(torch.tensor(rank[name][key]), torch.tensor(ref[name][key])) < TOL, (name, key)
        for name, ref_name in (("grpo", "grpo"), ("packed-grpo", "grpo"), ("packed-grpo-seq", "grpo-seq")):
            for key in ("kl", "gen_kl_error", "token_mult_prob_error", "pg_loss", "entropy", "advantage_mean"):
                assert _metric_close(rank[name][key], ref[ref_name][key]), (name, key, rank[name][key], ref[ref_name][key])
            assert abs(rank[name]["ratio_min"] - 1) < 1e-6 and abs(rank[name]["ratio_max"] - 1) < 1e-6  # on-policy
    # the packed layouts are not trivial: a row holds two pairs, another one; rows of 1 to 3+ rollouts
    dpo_rows = [n for rank in got for n in rank["dpo_row_sequences"]]
    grpo_rows = [n for rank in got for n in rank["grpo_row_sequences"]]
    assert 4 in dpo_rows and 2 in dpo_rows, dpo_rows
    assert max(grpo_rows) >= 3 and min(grpo_rows) < max(grpo_rows), grpo_rows
    # the options are exercised: some tokens clipped, not all
    for name in PG:
        assert 0 < ref[name]["clip_fraction"] < 1, (name, ref[name]["clip_fraction"])
