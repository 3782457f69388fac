"""Context parallelism oracle: one SFT step under cp2 (padded and packed), cp2 x tp2 and cp2 x pp2 with
packing equals the single-process reference (loss, grad norm, every gradient, post-step weights)."""

import datasets
import pytest
import torch

from automodel_mimo.algorithms.sft import step_microbatches
from automodel_mimo.config import DataConfig, ModelConfig, ParallelConfig, RunConfig
from automodel_mimo.distributed.mesh import build_parallel_state
from automodel_mimo.models.build import build_handle, build_model
from automodel_mimo.parallel.context_parallel import cp_indices
from policies.lm_policy import LMPolicy
from tests.unit.multirank import run_ranks
from tests.unit.oracle import (
    TOL, assert_tensors_close, full_grads, full_params, random_rows, reference_sft_step, tiny_llama_config, train_config)

ROWS = 8
OPTIMIZERS = [("sgd", 0.0), ("adamw", 0.5)]


def _model(packed: bool):
    return build_model(ModelConfig(config={"model_type": "llama"}), tiny_llama_config(num_hidden_layers=4), seed=3,
                       packed=packed)


def test_dual_chunk_swap_indices():
    # one segment of 8 tokens over cp2: chunks of 2; rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    assert cp_indices([0, 8], 2, 0) == [0, 1, 6, 7]
    assert cp_indices([0, 8], 2, 1) == [2, 3, 4, 5]
    # two segments (4 and 8 tokens): every rank holds a share of both
    assert cp_indices([0, 4, 12], 2, 1) == [1, 2, 6, 7, 8, 9]


def _layout_step(parallel: dict, packing: bool, micro: int, rows: list[dict]) -> dict:
    parallel = ParallelConfig(**parallel)
    state = build_parallel_state(parallel, torch.device("cpu"))
    data = DataConfig(packing=packing, packed_sequence_size=48, max_seq_len=24)
    results = {}
    for optimizer, clip in OPTIMIZERS:
        cfg = RunConfig(parallel=parallel, data=data, train=train_config(optimizer, clip, ROWS, micro), seed=0)
        handle = build_handle(cfg, _model(packed=True), state, pad_id=0)
        policy = LMPolicy(handle, state, cfg.train)
        microbatches = step_microbatches(cfg, datasets.Dataset.from_list(rows), 0, state, pad_id=0)
        metrics = policy.sft_forward_backward(microbatches)
        grads = full_grads(handle.named_parameters())
        metrics.update(policy.optimizer_step())
        results[optimizer] = {**metrics, "grads": grads, "params": full_params(handle.named_parameters())}
    return results


@pytest.fixture(scope="module")
def reference():
    rows = random_rows(ROWS, seed=9, max_len=22)
    return rows, {opt: reference_sft_step(_model(packed=False), rows, train_config(opt, clip, ROWS, ROWS))
                  for opt, clip in OPTIMIZERS}


@pytest.mark.parametrize("parallel,packing,micro", [
    ({"dp": 1, "cp": 2}, False, 4),
    ({"dp": 1, "cp": 2}, True, 1),
    ({"dp": 1, "cp": 2, "tp": 2}, True, 1),
    ({"dp": 1, "cp": 2, "pp": 2, "pp_microbatch_size": 1}, True, 2),
], ids=["cp2", "cp2-packed", "cp2xtp2-packed", "cp2xpp2-packed"])
def test_one_step_matches_single_process(reference, parallel, packing, micro):
    rows, ref = reference
    world = parallel.get("cp", 1) * parallel.get("tp", 1) * parallel.get("pp", 1)
    per_rank = run_ranks(_layout_step, world, parallel, packing, micro, rows)
    for opt, _ in OPTIMIZERS:
        grads, params = {}, {}
        for result in per_rank:
            r = result[opt]
            assert abs(r["loss"] - ref[opt]["loss"]) <= TOL * ref[opt]["loss"], (opt, r["loss"], ref[opt]["loss"])
            assert abs(r["grad_norm"] - ref[opt]["grad_norm"]) <= TOL * ref[opt]["grad_norm"]
            grads.update(r["grads"])
            params.update(r["params"])
        assert_tensors_close(grads, ref[opt]["grads"], f"{opt} gradients")
        assert_tensors_close(params, ref[opt]["params"], f"{opt} post-step weights")
