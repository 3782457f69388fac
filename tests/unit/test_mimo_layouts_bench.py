"""bench/mimo_layouts.py's layout tables, checked without process groups: every layout the GPU benchmark may be
lent a machine for is a valid rank layout whose dims split both models (heads over tp, layers over pp, the
encoder's images and the LLM's rows), so a 4-GPU lease is not spent on a layout that cannot be built."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from automodel_mimo.distributed.grid_spec import GridSpec, validate_layout
from automodel_mimo.errors import UserInputError
from automodel_mimo.models.facts import check_pipeline_split, check_tp_divisibility
from tests.unit.bench_scripts import load_bench

BENCH = load_bench("mimo_layouts")
LAYOUTS = [(world, name, layout) for world in BENCH.LAYOUTS
           for name, layout in [*((n, v[1]) for n, v in BENCH.LAYOUTS[world].items()), *BENCH.NONCOLOCATED[world].items()]]
MODELS = {"1b": BENCH.FULL, "8b": {**BENCH.FULL, "llm": BENCH.LLM_8B}, "tiny": BENCH.TINY}


@pytest.mark.parametrize("world,name,layout", LAYOUTS, ids=[f"{w}-{n}" for w, n, _ in LAYOUTS])
@pytest.mark.parametrize("model", MODELS)
def test_every_layout_builds_for_every_model(world, name, layout, model):
    spec = MODELS[model]
    validate_layout([GridSpec.for_module(m, layout[m]) for m in ("vision", "language")], world, spec["global_batch"])
    for module, config in (("vision", spec["vision"]), ("language", spec["llm"])):
        check_tp_divisibility(SimpleNamespace(**config), layout[module].get("tp", 1))
    layers, pp = spec["llm"]["num_hidden_layers"], layout["language"].get("pp", 1)
    check_pipeline_split(layers, pp, "1f1b", BENCH.layers_per_stage(layers, pp))


def test_uneven_pipeline_split():
    assert BENCH.layers_per_stage(16, 2) is None  # even: AutoPipeline's own split
    assert BENCH.layers_per_stage(16, 3) == 6 and BENCH.layers_per_stage(32, 3) == 11  # 6/5/5 and 11/11/10
    with pytest.raises(UserInputError, match="4 LLM layers do not split into 3"):
        BENCH.layers_per_stage(4, 3)  # sizes 2 (two stages) or 1 (four): no three-stage split

