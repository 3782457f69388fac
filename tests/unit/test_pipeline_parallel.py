"""Pipeline-parallel inference paths: last-stage capture (per-token logprobs) and greedy generation under
pp2 / interleaved / dp2 x pp2 equal the single-process model, including batches that need weight-0 padding
rows and data-parallel ranks holding different numbers of rows (weight-0 dummy schedule steps)."""

import pytest
import torch

from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig
from automodel_mimo.data.batching import collate
from automodel_mimo.distributed.mesh import build_parallel_state
from automodel_mimo.losses import token_logprobs
from automodel_mimo.models.build import build_handle, build_model
from policies.policy import Policy
from tests.unit.multirank import run_ranks
from tests.unit.oracle import random_rows, rel_err, tiny_llama_config, train_config

ROWS_PER_STEP = 4
# rows held by each data-parallel rank: 6 needs 2 schedule steps (one padded), 3 needs 1 padded step and,
# next to a rank with 6, one weight-0 dummy step
ROW_COUNTS = {1: [6], 2: [6, 3]}


def _model():
    return build_model(ModelConfig(config={"model_type": "llama"}), tiny_llama_config(num_hidden_layers=4), seed=5)


def _my_rows(rows: list[dict], dp: int, dp_rank: int) -> list[dict]:
    counts = ROW_COUNTS[dp]
    start = sum(counts[:dp_rank])
    return rows[start:start + counts[dp_rank]]


def _capture(parallel: dict, rows: list[dict], prompts: list[list[int]]) -> dict:
    parallel = ParallelConfig(**parallel)
    state = build_parallel_state(parallel, torch.device("cpu"))
    cfg = RunConfig(parallel=parallel, train=train_config("sgd", 0.0, 8, ROWS_PER_STEP))
    handle = build_handle(cfg, _model(), state, pad_id=0)
    batch = collate(_my_rows(rows, parallel.dp, state.dp_rank), pad_id=0)
    logprobs = handle.forward_capture(batch, lambda logits, mb: token_logprobs(logits, mb["labels"]),
                                      (batch["labels"].shape[1],), torch.float32)
    my_prompts = prompts[state.dp_rank::parallel.dp]
    _, tokens = Policy(handle, cfg.train).greedy_generate(my_prompts, 5, stop_ids={1}, pad_id=0)
    return {"dp_rank": state.dp_rank, "logprobs": logprobs, "tokens": tokens}


@pytest.mark.parametrize("parallel", [
    {"dp": 1, "pp": 2},
    {"dp": 1, "pp": 2, "pp_schedule": "interleaved1f1b", "pp_microbatch_size": 2},
    {"dp": 2, "pp": 2},
], ids=["pp2", "pp2-interleaved", "dp2xpp2"])
def test_capture_and_greedy_match_single_process(parallel):
    rows = random_rows(9, seed=11)
    prompts = [r["input_ids"][:4 + i % 3] for i, r in enumerate(rows[:5])]
    model = _model().eval()
    dp = parallel["dp"]
    for result in run_ranks(_capture, 2 * dp, parallel, rows, prompts):
        batch = collate(_my_rows(rows, dp, result["dp_rank"]), pad_id=0)
        with torch.no_grad():
            ref = token_logprobs(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        assert result["logprobs"].shape == ref.shape
        assert rel_err(result["logprobs"], ref) < 1e-5
        for prompt, got in zip(prompts[result["dp_rank"]::dp], result["tokens"]):
            assert got == _greedy(model, prompt, 5, stop=1)


def _greedy(model, prompt: list[int], n: int, stop: int) -> list[int]:
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == stop:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def _train_uneven(rows: list[dict], parallel: dict) -> dict:
    """Data ranks holding 6 and 3 rows: loss and gradients of one step."""
    from tests.unit.oracle import full_grads

    parallel = ParallelConfig(**parallel)
    state = build_parallel_state(parallel, torch.device("cpu"))
    cfg = RunConfig(parallel=parallel, train=train_config("sgd", 0.0, 8, ROWS_PER_STEP))
    handle = build_handle(cfg, _model(), state, pad_id=0)
    mine = _my_rows(rows, 2, state.dp_rank)
    microbatches = [collate(mine[i:i + ROWS_PER_STEP], pad_id=0) for i in range(0, len(mine), ROWS_PER_STEP)]
    metrics = Policy(handle, cfg.train).sft_forward_backward(microbatches)
    return {"loss": metrics["loss"], "grads": full_grads(handle.named_parameters())}


@pytest.mark.parametrize("parallel", [{"dp": 2}, {"dp": 2, "pp": 2}], ids=["dp2", "dp2xpp2"])
def test_data_ranks_with_different_row_counts_train_exactly(parallel):
    """Rank 0 runs 2 microbatches / schedule steps, rank 1 one (plus a weight-0 dummy): no hang, same result."""
    from tests.unit.oracle import assert_tensors_close, reference_sft_step

    rows = random_rows(9, seed=11)
    ref = reference_sft_step(_model(), rows, train_config("sgd", 0.0, 9, 9))
    results = run_ranks(_train_uneven, 2 * parallel.get("pp", 1), rows, parallel)
    grads = {}
    for r in results:
        assert abs(r["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]
        grads.update(r["grads"])
    assert_tensors_close(grads, ref["grads"], "gradients")
