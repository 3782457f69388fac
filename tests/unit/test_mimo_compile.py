"""train.compile under MIMO, oracle (docs/numerics.md): with the LLM's decoder layers and the vision tower's encoder
layers compiled in place (inductor's CPU backend here), a step equals the single-process EAGER reference — loss,
global grad norm, every encoder AND LLM gradient, post-step weights with SGD and clipped AdamW — on a batch mixing
text-only and image rows with non-uniform loss masks; each layout also asserts how many layers of each module were
compiled, so nothing compiled fails. Layouts: colocated vision dp2 + language dp2, language tp2 (vocab-parallel
embedding, spliced, into compiled layers), language pp2 (each stage's layers), language cp2 packed, non-colocated
vision dp1 + language dp1,
vision tp2 (the tower's own TP plan inside its compiled layers; fan-out to language dp2).
Also: train.compile from a YAML config and the command line reaches every module (mimo/build.py); where torch.compile
breaks (an MoE LLM's split or fp32 experts) train.compile=true is one clear error and unset resolves to off."""

import logging

import pytest
import torch

from automodel_mimo.distributed.grid_spec import GridSpec
from tests.unit.mimo_oracle import VISION, compiled_layers
from tests.unit.multirank import run_ranks
from tests.unit.test_mimo_pp import LAYERS, assert_matches_reference, layout_steps

# (name, layout, micro_batch_size, parallel pipeline keys, packed): 2 ranks each, 2 microbatches or more per rank
LAYOUTS = [
    ("vision-dp2+language-dp2", {"vision": {"dp": 2}, "language": {"dp": 2}}, 2, {}, False),
    ("language-tp2", {"vision": {"dp": 2}, "language": {"tp": 2}}, 4, {}, False),
    ("language-pp2", {"vision": {"dp": 2}, "language": {"pp": 2}}, 4, {}, False),
    ("language-cp2-packed", {"vision": {"dp": 2}, "language": {"cp": 2}}, 2, {}, True),
    ("noncolocated", {"vision": {"dp": 1}, "language": {"dp": 1, "offset": 1}}, 4, {}, False),
    ("vision-tp2", {"vision": {"tp": 2}, "language": {"dp": 2}}, 4, {}, False),  # the tower's TP plan, fan-out
]


def _steps(rows: list[dict], layouts: list) -> dict:
    """Also dynamo's graphs so far on this rank: the step really ran compiled code."""
    from torch._dynamo.utils import counters

    def compiled(model) -> dict:
        return {"compiled": compiled_layers(model), "graphs": counters["stats"]["unique_graphs"]}

    return layout_steps(rows, layouts, compiled, compile=True)


@pytest.fixture(scope="module")
def reference():
    from tests.unit.test_mimo import reference_steps

    return reference_steps(layers=LAYERS)


def _expected_compiled(layout: dict, rank: int) -> dict[str, int]:
    """Every vision tower layer on the encoder's ranks, the LLM's layers of this rank's stage on the LLM's."""
    expected = {}
    for name in ("vision", "language"):
        spec = GridSpec.for_module(name, layout[name])
        if spec.holds(rank):
            expected[name] = VISION["num_hidden_layers"] if name == "vision" else LAYERS // spec.dim_size("pp")
    return expected


# compiling on CPU (inductor builds C++ per rank and layout) takes 70 s or more per layout on 2 shared cores: all
# nightly (tests/nightly/unit_slow.sh); CI keeps the config test below
@pytest.mark.slow
@pytest.mark.parametrize("case", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_compiled_mimo_step_matches_eager_single_process(reference, case):
    rows, ref = reference
    name, layout, *_ = case
    per_rank = run_ranks(_steps, 2, rows, [case])
    assert_matches_reference(per_rank, name, ref, "compiled ")
    assert [r[name, "sgd"]["compiled"] for r in per_rank] == [_expected_compiled(layout, k) for k in range(2)], name
    # compiled code really ran: dynamo captured a graph per module held, at least
    assert all(r[name, "sgd"]["graphs"] >= len(_expected_compiled(layout, k)) for k, r in enumerate(per_rank)), name
    assert all(r[name, "sgd"]["microbatches"] >= 2 for r in per_rank), name  # gradient accumulation
    assert "packed" not in name or max(r[name, "sgd"]["packed_max"] for r in per_rank) >= 2, name  # really packed


# ---------------------------------------------------------------- train.compile from the config reaches every module

MIMO_SECTION = """
mimo:
  layout: {vision: {dp: 1}, language: {dp: 1}}
  encoder: {model_type: siglip_vision_model, image_size: 16, patch_size: 8, hidden_size: 32, intermediate_size: 64,
            num_hidden_layers: 2, num_attention_heads: 4}
  tokens_per_image: 4
data: {image_size: 16}
"""
COMPILE_YAML = """
model: {config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3,
                 num_attention_heads: 4, num_key_value_heads: 2}}
train: {global_batch_size: 2, micro_batch_size: 1}
""" + MIMO_SECTION


def _built(path: str, runs: list[list[str]]) -> list[dict]:
    """build_mimo_handle on one rank per list of overrides: each module's compiled layers, the grids' compile flag,
    nemo's warnings about compiling."""
    from automodel_mimo.config import load_config
    from automodel_mimo.mimo.build import build_mimo_handle
    from automodel_mimo.models.tokenizer import load_tokenizer

    out = []
    for overrides in runs:
        warnings = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: warnings.append(record.getMessage())
        logging.getLogger("nemo_automodel").addHandler(handler)
        cfg = load_config("sft", path, overrides, world_size=1)
        handle = build_mimo_handle(cfg, load_tokenizer(None), torch.device("cpu"))
        logging.getLogger("nemo_automodel").removeHandler(handler)
        flags = {n: g.mesh_context.strategy_config.enable_compile for n, g in handle.grids.items()}
        out.append({"compiled": compiled_layers(handle), "grids": flags, "warnings": [w for w in warnings if "compile" in w]})
    return out


def test_train_compile_reaches_every_module_from_the_config(tmp_path):
    """train.compile=true (CLI override of the YAML) compiles the tower's 2 and the LLM's 3 layers, without nemo's
    'heuristic layer extraction' warning; false, and unset on CPU (on only on CUDA), compile none."""
    path = tmp_path / "mimo.yaml"
    path.write_text(COMPILE_YAML)
    on, off, unset = run_ranks(_built, 1, str(path), [["train.compile=true"], ["train.compile=false"], []])[0]
    assert on == {"compiled": {"vision": 2, "language": 3}, "grids": {"vision": True, "language": True}, "warnings": []}, on
    for result in (off, unset):
        assert result == {"compiled": {"vision": 0, "language": 0}, "grids": {"vision": False, "language": False},
                          "warnings": []}, result


MOE_YAML = """
model: {config: {model_type: qwen3_moe, hidden_size: 32, intermediate_size: 64, moe_intermediate_size: 16,
                 num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, num_experts: 4,
                 num_experts_per_tok: 2}}
train: {global_batch_size: 4, micro_batch_size: 2}
"""


@pytest.mark.parametrize("mimo", [False, True], ids=["lm", "mimo"])
def test_compile_is_refused_where_torch_compile_breaks(tmp_path, mimo):
    """An MoE LLM: experts split over ranks (nemo's all-gather dispatch) or fp32 experts (torch._grouped_mm compiles in
    bf16 only; no CPU fp32 oracle can cover a compiled MoE LLM) fail with train.compile=true before any rank starts,
    naming the keys; unset, compile resolves to off there, on for an LM's bf16 experts on CUDA (a MIMO model: off,
    measured slower), off on CPU."""
    import re

    from automodel_mimo.config import load_config
    from automodel_mimo.config.compile import compiles
    from automodel_mimo.errors import UserInputError

    path = tmp_path / "moe.yaml"
    path.write_text(MOE_YAML + (MIMO_SECTION if mimo else ""))
    ep2 = ["mimo.layout={vision: {dp: 2}, language: {dp: 2, ep: 2}}"] if mimo else ["parallel.ep=2"]
    ep1 = ["mimo.layout={vision: {dp: 2}, language: {dp: 2}}"] if mimo else []
    key = "mimo.layout.language.ep" if mimo else "parallel.ep"
    for overrides, message in ((ep2, f"train.compile=true with {key}=2: torch.compile cannot trace"),
                               (ep1, "train.compile=true with model.dtype=float32 with a mixture-of-experts model")):
        with pytest.raises(UserInputError, match=re.escape(message)):
            load_config("sft", str(path), [*overrides, "train.compile=true"], world_size=2)
    bf16 = ["model.dtype=bfloat16"]
    assert load_config("sft", str(path), [*ep1, *bf16, "train.compile=true"], world_size=2).train.compile
    resolved = [compiles(load_config("sft", str(path), overrides, world_size=2), device)
                for overrides, device in ((ep2 + bf16, "cuda"), (ep1, "cuda"), (ep1 + bf16, "cuda"), (ep1 + bf16, "cpu"))]
    assert resolved == [False, False, not mimo, False]
