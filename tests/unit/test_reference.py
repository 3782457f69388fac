"""Reference policy by weight swap: after training steps, reference logprobs equal the initial model's, and
the training weights come back bit for bit — under FSDP (dp2), TP DTensors (tp2) and pipeline stages (pp2).
Also: the logprob pass matches a plain single-process forward, and a reference loaded from full tensors."""

import pytest
import torch

from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig
from automodel_mimo.data.batching import collate, local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.distributed.mesh import build_parallel_state
from automodel_mimo.models.build import build_handle, build_model
from policies.policy import Policy
from tests.unit.multirank import run_ranks
from tests.unit.oracle import full_params, random_rows, tiny_llama_config, train_config

ROWS, SEED = 8, 3


def _model(seed: int = SEED):
    return build_model(ModelConfig(config={"model_type": "llama"}), tiny_llama_config(), seed=seed)


def _plain_logprobs(rows: list[dict], seed: int = SEED) -> torch.Tensor:
    batch = collate(rows, 0)
    logits = _model(seed)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    return (lp * batch["loss_mask"]).detach()


def _swap_run(parallel: dict, micro: int, rows: list[dict]) -> dict:
    parallel = ParallelConfig(**parallel)
    state = build_parallel_state(parallel, torch.device("cpu"))
    cfg = RunConfig(parallel=parallel, train=train_config("adamw", 1.0, ROWS, micro))
    handle = build_handle(cfg, _model(), state, pad_id=0)
    policy = Policy(handle, cfg.train)
    mbs = MicrobatchBuilder(0, state.device).build(local_slice(rows, *handle.data_block()), micro)
    initial = policy.logprobs(mbs)
    # a greedy eval right before the swap (as the RL warm-up's accuracy check does) must leave no gathered
    # parameters behind for the in-place swap to meet (a SIGSEGV under FSDP before greedy_generate resharded)
    policy.greedy_generate([r["input_ids"][:4] for r in rows[:2]], 2, set(), 0)
    policy.init_reference()
    for _ in range(2):
        policy.sft_train_step(mbs)
    trained = policy.logprobs(mbs)
    weights = full_params(handle.named_parameters())
    reference = policy.reference_logprobs(mbs)
    after = policy.logprobs(mbs)
    restored = full_params(handle.named_parameters())
    # a reference given as full tensors (here: another seed's model) is swapped in the same way
    other = _model(seed=SEED + 1)
    policy.init_reference(other.state_dict())
    loaded = policy.reference_logprobs(mbs)
    unchanged = full_params(handle.named_parameters())
    return {"initial": initial, "trained": trained, "reference": reference, "after": after, "loaded": loaded,
            "weights_equal": all(torch.equal(weights[n], restored[n]) and torch.equal(weights[n], unchanged[n]) for n in weights),
            "dp_rank": state.dp_rank}


@pytest.mark.parametrize("parallel,micro", [
    ({"dp": 2}, 2), ({"dp": 1, "tp": 2}, 4), ({"dp": 1, "pp": 2, "pp_microbatch_size": 1}, 4),
], ids=["dp2", "tp2", "pp2"])
def test_reference_swap(parallel, micro):
    rows = random_rows(ROWS, seed=9)
    plain = _plain_logprobs(rows)
    per_rank = ROWS // parallel["dp"]
    for r in run_ranks(_swap_run, 2, parallel, micro, rows):
        assert r["weights_equal"], "training weights not restored bit for bit"
        mine = plain[r["dp_rank"] * per_rank:(r["dp_rank"] + 1) * per_rank]
        row = 0
        for init, trained, ref, after, mb_len in zip(r["initial"], r["trained"], r["reference"], r["after"],
                                                     [x.shape[1] for x in r["initial"]]):
            n = init.shape[0]
            # the logprob pass equals a plain forward of the same rows (padding positions are 0 in both)
            assert torch.allclose(init, mine[row:row + n, :mb_len], atol=1e-5)
            assert torch.equal(ref, init), "reference logprobs differ from the initial model's"
            assert torch.equal(after, trained), "training logprobs changed by the swap"
            assert (trained - init).abs().max() > 1e-3, "training did not move the weights"
            row += n
    _assert_loaded_reference(rows, r, per_rank)


def _assert_loaded_reference(rows, r, per_rank):
    other = _plain_logprobs(rows, SEED + 1)[r["dp_rank"] * per_rank:(r["dp_rank"] + 1) * per_rank]
    row = 0
    for loaded in r["loaded"]:
        n = loaded.shape[0]
        assert torch.allclose(loaded, other[row:row + n, :loaded.shape[1]], atol=1e-5)
        row += n

