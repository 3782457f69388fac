"""Non-colocated MIMO under the cross-module 1F1B schedule (mimo/cross_schedule.py), with 4 microbatches per step
(gradient accumulation over the encoder's and the LLM's microbatches): oracle against the single-process
reference (docs/numerics.md) — loss, global grad norm, every encoder and LLM gradient, post-step weights with
SGD and clipped AdamW, non-uniform loss masks, text-only rows — and the order of what each rank did, which
proves the overlap structurally: the encoder runs its forward of microbatch k+1 before the gradient of k arrives
and its backward of k before its forward of k+2; the LLM receives microbatch k's rows only after its step on
k-1. The old schedule (every forward, every row sent; every step; every gradient back; one backward) fails both.
Layouts (4 ranks): vision dp2 on ranks 0-1 + language pp2 on ranks 2-3 (fan-in from two encoder ranks into a
pipelined LLM, one train microbatch per schedule step) and vision tp2 + language dp2 (fan-out: two LLM slots; the
encoder's tp1 rank receives gradients, sends nothing)."""

import pytest

from automodel_mimo.distributed.grid_spec import GridSpec
from tests.unit.multirank import run_ranks
from tests.unit.test_mimo_noncolocated import _check
from tests.unit.test_mimo_pp import layout_steps

MICROBATCHES = 4
LAYOUTS = [  # (name, layout, micro_batch_size, parallel pipeline keys, packed): 8 rows, 2 per microbatch
    ("vision-dp2+language-pp2", {"vision": {"dp": 2}, "language": {"pp": 2, "offset": 2}}, 2, {}, False),
    ("vision-tp2+language-dp2-fan-out", {"vision": {"tp": 2}, "language": {"dp": 2, "offset": 2}}, 2, {}, False),
]


def _encoder_order(n: int) -> list[tuple[str, int]]:
    """F0 F1 | wait g0 | B0 F2 | wait g1 | B1 F3 | ... | wait g(n-1) | B(n-1)"""
    order = [("forward", 0), ("forward", 1)]
    for k in range(n):
        order += [("wait", k), ("backward", k)] + ([("forward", k + 2)] if k + 2 < n else [])
    return order


def _language_order(n: int) -> list[tuple[str, int]]:
    """wait rows 0 | step 0 | wait rows 1 (gradient 0 sent with it) | step 1 | ..."""
    return [event for k in range(n) for event in (("wait", k), ("step", k))]


def _steps(rows: list[dict]) -> dict:
    return layout_steps(rows, LAYOUTS, lambda model: {"modules": sorted(model.module_parts),
                                                      "order": model.schedule_trace.order()})


@pytest.fixture(scope="module")
def per_rank():
    from tests.unit.test_mimo import reference_steps
    from tests.unit.test_mimo_pp import LAYERS

    rows, ref = reference_steps(layers=LAYERS)
    return run_ranks(_steps, 4, rows), ref


def test_cross_schedule_oracle_four_microbatches(per_rank):
    results, ref = per_rank
    _check(results, LAYOUTS, ref)
    assert all(r[name, "sgd"]["microbatches"] == MICROBATCHES for r in results for name, *_ in LAYOUTS)


def test_cross_schedule_overlaps_encoder_and_llm(per_rank):
    results, _ = per_rank
    for name, layout, *_ in LAYOUTS:
        vision = GridSpec.for_module("vision", layout["vision"])
        for rank, r in enumerate(results):
            order = [e for e in r[name, "sgd"]["order"] if e != ("wait", MICROBATCHES)]  # the last sends' wait
            if vision.holds(rank):
                assert order == _encoder_order(MICROBATCHES), (name, rank, order)
                assert order.index(("forward", 1)) < order.index(("wait", 0)) < order.index(("forward", 2))
            else:
                assert order == _language_order(MICROBATCHES), (name, rank, order)
