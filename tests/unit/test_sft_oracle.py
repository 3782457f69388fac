"""SFT oracle: one step under dp2, tp2, dp2 x tp2 and 1 vs 4 microbatches equals the single-process reference
(loss, grad norm, every gradient, post-step weights with SGD and with clipped AdamW), on non-uniform masks."""

import pytest
import torch

from automodel_mimo.config import ModelConfig, ParallelConfig
from automodel_mimo.data.batching import collate, local_slice, split_microbatches
from automodel_mimo.distributed.mesh import build_parallel_state
from automodel_mimo.models.build import build_model, parallelize
from automodel_mimo.models.handle import ModelHandle
from policies.lm_policy import LMPolicy
from tests.unit.multirank import run_ranks
from tests.unit.oracle import (
    TOL, assert_tensors_close, full_grads, full_params, random_rows, reference_sft_step, tiny_llama_config, tiny_qwen2_config,
    train_config)

GLOBAL_BATCH = 8
SEED = 7
# (optimizer, grad_clip): SGD exposes a wrongly scaled gradient directly; AdamW with an active clip checks
# the global norm across meshes (its first step alone is nearly lr * sign(grad)).
OPTIMIZERS = [("sgd", 0.0), ("adamw", 0.5)]


def _model(family: str = "llama"):
    hf_config = tiny_llama_config() if family == "llama" else tiny_qwen2_config()
    return build_model(ModelConfig(config={"model_type": family}), hf_config, seed=SEED)


def _layout_step(dp: int, tp: int, micro: int, rows: list[dict], family: str = "llama") -> dict | None:
    state = build_parallel_state(ParallelConfig(dp=dp, tp=tp), torch.device("cpu"))
    results = {}
    for optimizer, clip in OPTIMIZERS:
        handle = ModelHandle(parallelize(_model(family), state))
        policy = LMPolicy(handle, state, train_config(optimizer, clip, GLOBAL_BATCH, micro))
        local = local_slice(rows, state.dp_rank, dp)
        metrics = policy.sft_forward_backward([collate(mb, 0) for mb in split_microbatches(local, micro)])
        grads = full_grads(handle.named_parameters())
        metrics.update(policy.optimizer_step())
        results[optimizer] = {**metrics, "grads": grads, "params": full_params(handle.named_parameters())}
    return results if torch.distributed.get_rank() == 0 else None


def _reference(family: str):
    rows = random_rows(GLOBAL_BATCH, seed=3)
    return rows, {opt: reference_sft_step(_model(family), rows, train_config(opt, clip, GLOBAL_BATCH, GLOBAL_BATCH))
                  for opt, clip in OPTIMIZERS}


@pytest.fixture(scope="module")
def reference():
    return _reference("llama")


@pytest.mark.parametrize("dp,tp,micro", [
    (1, 1, 2),  # 4 microbatches vs the reference's 1
    (2, 1, 4),
    (1, 2, 8),
    (2, 2, 1),  # dp2 x tp2, 4 microbatches per rank
], ids=["mb4", "dp2", "tp2", "dp2xtp2-mb4"])
def test_one_step_matches_single_process(reference, dp, tp, micro):
    rows, ref = reference
    _assert_matches(run_ranks(_layout_step, dp * tp, dp, tp, micro, rows)[0], ref)


def test_qwen2_tp2_matches_single_process():
    """Qwen2 adds q/k/v biases, which nemo-automodel's TP plan shards with the projections."""
    rows, ref = _reference("qwen2")
    _assert_matches(run_ranks(_layout_step, 2, 1, 2, 4, rows, "qwen2")[0], ref)


def _assert_matches(got: dict, ref: dict) -> None:
    for opt, _ in OPTIMIZERS:
        r, g = ref[opt], got[opt]
        assert abs(g["loss"] - r["loss"]) <= TOL * abs(r["loss"]), (opt, g["loss"], r["loss"])
        assert abs(g["grad_norm"] - r["grad_norm"]) <= TOL * r["grad_norm"], (opt, g["grad_norm"], r["grad_norm"])
        assert_tensors_close(g["grads"], r["grads"], f"{opt} gradients")
        assert_tensors_close(g["params"], r["params"], f"{opt} post-step weights")
    assert ref["adamw"]["grad_norm"] > 0.5, "the clip must be active for the AdamW check to cover it"
