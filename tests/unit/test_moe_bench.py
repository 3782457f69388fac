"""bench/moe_throughput.py's parameter count (what its MFU divides by) against the model it really builds."""

from __future__ import annotations

import pytest

from tests.unit.bench_scripts import load_bench


@pytest.mark.parametrize("variant", [{}, {"head_dim": 8, "num_experts_per_tok": 3, "num_key_value_heads": 4}])
def test_param_counts_match_the_built_model(variant):
    import torch

    bench = load_bench("moe_throughput")
    cfg = {**bench.MODELS["tiny"], **variant}
    model = bench.new_model(cfg, seq=32, device=torch.device("cpu"))
    assert bench.measured_params(model, cfg) == bench.param_counts(cfg)
    assert any(".experts." in n for n, _ in model.named_parameters())  # nemo's experts, not HF's block


def test_the_3b_model_is_the_documented_size():
    bench = load_bench("moe_throughput")
    counts = bench.param_counts(bench.MODELS["3b"])
    assert round(counts["total"] / 1e9, 2) == 5.27 and round(counts["active"] / 1e9, 2) == 1.04
