"""parallel.activation_checkpointing under MIMO, oracle (docs/numerics.md): with every module's transformer layers
checkpointed (nemo-automodel's wrappers: the vision tower's attention, MLP and norms, the LLM's whole layers), a
step equals the single-process reference — loss, grad norm, every encoder AND LLM gradient, post-step weights with
SGD and clipped AdamW — on text-only and image rows with non-uniform loss masks; each layout also asserts that both
modules were wrapped, so a silently ignored flag fails (it was, before 2026-12-01)."""

import pytest

from tests.unit.multirank import run_ranks
from tests.unit.test_mimo_pp import LAYERS, assert_matches_reference, layout_steps

LAYOUTS = [  # (name, layout, micro_batch_size, pipeline keys, packed): 2 ranks
    ("vision-dp2+language-dp2", {"vision": {"dp": 2}, "language": {"dp": 2}}, 2, {}, False),
    ("language-pp2", {"vision": {"dp": 2}, "language": {"pp": 2}}, 4, {}, False),
]


def checkpointed(model) -> dict[str, int]:
    """Per module on this rank: the modules wrapped for activation checkpointing, or (nemo on one rank) layers
    set to transformers' own gradient checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {name: sum(isinstance(m, CheckpointWrapper) or isinstance(m, GradientCheckpointingLayer)
                      and m.gradient_checkpointing for part in parts for m in part.modules())
            for name, parts in model.module_parts.items()}


def _steps(rows: list[dict], layouts: list) -> dict:
    return layout_steps(rows, layouts, lambda model: {"checkpointed": checkpointed(model)}, activation_checkpointing=True)


@pytest.fixture(scope="module")
def reference():
    from tests.unit.test_mimo import reference_steps

    return reference_steps(layers=LAYERS)


@pytest.mark.parametrize("case", [LAYOUTS[0], pytest.param(LAYOUTS[1], marks=pytest.mark.slow)],
                         ids=[c[0] for c in LAYOUTS])
def test_checkpointed_mimo_step_matches_single_process(reference, case):
    rows, ref = reference
    name, layout, *_ = case
    per_rank = run_ranks(_steps, 2, rows, [case])
    assert_matches_reference(per_rank, name, ref, "checkpointed ")
    stages = layout["language"].get("pp", 1)
    for r in per_rank:  # the tower: attention, MLP and both norms of each layer; the LLM: each layer of its stage
        assert r[name, "sgd"]["checkpointed"] == {"vision": 4 * 2, "language": LAYERS // stages}, name



def _built(path: str) -> dict:
    """build_mimo_handle from the YAML with parallel.activation_checkpointing=true on the command line (one rank)."""
    import torch

    from automodel_mimo.config import load_config
    from automodel_mimo.mimo.build import build_mimo_handle
    from automodel_mimo.models.tokenizer import load_tokenizer

    cfg = load_config("sft", path, ["parallel.activation_checkpointing=true"], world_size=1)
    handle = build_mimo_handle(cfg, load_tokenizer(None), torch.device("cpu"))
    return {"grids": [g.mesh_context.activation_checkpointing for g in handle.grids.values()],
            "checkpointed": checkpointed(handle)}


def test_activation_checkpointing_reaches_every_module_from_the_config(tmp_path):
    from tests.unit.test_mimo_compile import COMPILE_YAML

    path = tmp_path / "mimo.yaml"
    path.write_text(COMPILE_YAML)
    built = run_ranks(_built, 1, str(path))[0]
    assert built == {"grids": [True, True], "checkpointed": {"vision": 4 * 2, "language": 3}}, built  # 2 + 3 layers
