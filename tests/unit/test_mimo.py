"""MIMO oracle (docs/numerics.md): SigLIP + projector + Llama on heterogeneous colocated grids equals the
single-process reference — loss, global grad norm, every encoder AND LLM gradient, post-step weights with
SGD and clipped AdamW — on a batch mixing text-only and image rows, for fan-in, fan-out, equal dp and
LLM cp2. Also: the bridge is bit-exact; grids match nemo's enumeration; bad layouts and placeholder
mismatches fail with the same error on every rank; a checkpoint resumes under another layout."""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from automodel_mimo.config import load_config
from automodel_mimo.data.batching import local_slice
from automodel_mimo.distributed.grid_spec import GridSpec, check_view, validate_layout
from automodel_mimo.distributed.grids import build_grids
from automodel_mimo.errors import UserInputError
from automodel_mimo.mimo.bridge import Bridge, sibling_groups
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from policies.policy import Policy
from tests.unit.mimo_oracle import (
    PLACEHOLDER, VISION, TOKENS_PER_IMAGE, assert_step_close, build_modules, mimo_rows, reference_mimo_step)
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, full, full_grads, full_params, tiny_llama_config, train_config

GLOBAL_BATCH = 8
OPTIMIZERS = [("sgd", 0.0), ("adamw", 0.5)]
CPU = torch.device("cpu")

# (name, layout, micro_batch_size): every layout on 4 ranks
LAYOUTS = [
    ("fan-in", {"vision": {"dp": 4}, "language": {"dp": 2, "tp": 2}}, 2),
    ("fan-out", {"vision": {"dp": 2, "tp": 2}, "language": {"dp": 4}}, 2),
    ("equal", {"vision": {"dp": 2, "tp": 2}, "language": {"dp": 2, "tp": 2}}, 4),
    # one LLM row per microbatch: the 2 encoder slots split each row's images (1 image: one slot gets none)
    ("cp2-fan-in", {"vision": {"dp": 4}, "language": {"dp": 2, "cp": 2}}, 1),
]


def _spec(name, **sizes):
    return GridSpec.for_module(name, sizes)


# ---------------------------------------------------------------- pure layout checks (no process group)


def _error(fn, *args) -> str:
    with pytest.raises(UserInputError) as e:
        fn(*args)
    return str(e.value)


def test_layout_validation_messages():
    assert "do not nest" in _error(validate_layout, [_spec("vision", dp=3, tp=2), _spec("language", dp=2, tp=3)], 6)
    # dp innermost in one grid: blocks {0,2},{1,3} against {0,1},{2,3}
    strided = GridSpec("vision", (("pp", 1), ("tp", 2), ("cp", 1), ("dp", 2)))
    assert "do not nest" in _error(validate_layout, [strided, _spec("language", dp=2, tp=2)], 4)
    assert "overlap" in _error(validate_layout, [_spec("vision", dp=2), _spec("language", dp=4)], 4)
    assert "encoders are not pipelined" in _error(validate_layout, [_spec("vision", dp=2, pp=2), _spec("language", dp=4)], 4)
    validate_layout([_spec("vision", dp=4), _spec("language", pp=2, tp=2)], 4)  # LLM pp x tp (test_mimo_pp.py)
    validate_layout([_spec("vision", dp=4), _spec("language", dp=2, pp=2)], 4)  # LLM dp blocks {0, 2}, {1, 3}
    assert "encoders do not shard" in _error(validate_layout, [_spec("vision", dp=2, cp=2), _spec("language", dp=4)], 4)
    assert "missing" in _error(validate_layout, [_spec("vision", dp=4)], 4)
    assert "global_batch_size=6" in _error(validate_layout, [_spec("vision", dp=2, tp=2), _spec("language", dp=4)], 4, 6)
    validate_layout([_spec("vision", dp=4), _spec("language", dp=2, tp=2)], 4, 6)  # encoders split images, not rows
    base = _spec("language", dp=2, cp=1, tp=2)
    check_view(base, GridSpec("expert", (("pp", 1), ("edp", 2), ("ep", 2), ("etp", 1))), ("pp",))
    assert "groups ranks differently" in _error(
        check_view, base, GridSpec("expert", (("pp", 1), ("tp", 2), ("ep", 2))), ("tp",))


MIMO_YAML = """
model: {config: {model_type: llama, hidden_size: 32}}
train: {global_batch_size: 8, micro_batch_size: 2}
mimo:
  layout: {vision: {dp: 4}, language: {dp: 2, tp: 2}}
  encoder: {model_type: siglip_vision_model, image_size: 16, patch_size: 8}
  tokens_per_image: 4
"""


def test_mimo_config_validation(tmp_path):
    path = tmp_path / "mimo.yaml"
    path.write_text(MIMO_YAML)
    cfg = load_config("sft", str(path), world_size=4)
    assert cfg.mimo.layout["language"] == {"dp": 2, "tp": 2}
    # fan-in: one row per microbatch is fine (the encoder slots split its images)
    assert load_config("sft", str(path), ["train.micro_batch_size=1"], world_size=4).train.micro_batch_size == 1
    fan_out = "mimo.layout={vision: {dp: 2, tp: 2}, language: {dp: 4}}"
    bad = {
        ("mimo.layout.language.dp=3",): "module rank ranges overlap",
        ("mimo.layout.language.offset=1",): "module rank ranges overlap",
        ("mimo.layout.language.offset=-1",): "mimo.layout.language.offset=-1: must be an integer >= 0",
        ("mimo.layout.vision={dp: 2, pp: 2}",): "mimo.layout.vision.pp=2: encoders are not pipelined",
        ("mimo.layout.language={pp: 2, dp: 2}", "train.micro_batch_size=1"): "1 pipeline microbatches, fewer than "
                                                                          "mimo.layout.language.pp=2",
        ("mimo.layout.vision.ep=2",): "unknown dims",  # experts belong to the language model only
        ("mimo.layout={vision: {dp: 4}}",): "expected ['language', 'vision']",
        (fan_out, "train.micro_batch_size=1"): "multiple of the dp ratio 2",
        ("train.global_batch_size=7",): "global_batch_size=7 is not divisible by mimo.layout.language.dp=2",
        ("train.global_batch_size=6",): "must divide the 3 rows",
        ("mimo.tokens_per_image=5",): "set mimo.tokens_per_image=4",
        ("parallel.tp=2",): "leave the parallel section",
    }
    for overrides, message in bad.items():
        with pytest.raises(UserInputError, match=re.escape(message)):
            load_config("sft", str(path), list(overrides), world_size=4)


def test_sibling_groups():
    # fan-in: the two encoder dp ranks feeding one LLM dp block, per encoder tp index
    assert sibling_groups(_spec("vision", dp=4), _spec("language", dp=2, tp=2)) == [[0, 1], [2, 3]]
    # fan-out: per (encoder dp block, LLM tp/cp coordinate), in LLM dp order
    assert sibling_groups(_spec("vision", dp=1, tp=4), _spec("language", dp=2, tp=2)) == [[0, 2], [1, 3]]
    assert sibling_groups(_spec("vision", dp=2, tp=2), _spec("language", dp=2, tp=2)) == []


# ---------------------------------------------------------------- bridge: bit-exact, 4 ranks


def _bridge_case(layout: dict) -> dict:
    """Bridge forward/backward on variable rows per sample vs slicing the global tensor directly."""
    grids = build_grids([_spec("vision", **layout["vision"]), _spec("language", **layout["language"])], CPU)
    enc, lm = grids["vision"], grids["language"]
    bridge = Bridge(enc, lm)
    g = torch.Generator().manual_seed(0)
    per_sample = [3, 0, 2, 1, 0, 0, 4, 1]  # rows each sample contributes (text-only samples: 0)
    x = torch.randn(sum(per_sample), 5, generator=g)
    w = torch.randn(sum(per_sample), 5, generator=g)

    def rows_of(samples: range) -> slice:
        return slice(sum(per_sample[:samples.start]), sum(per_sample[:samples.stop]))

    def samples_of(grid) -> range:
        n = len(per_sample) // grid.size("dp")
        return range(grid.local_rank("dp") * n, (grid.local_rank("dp") + 1) * n)

    enc_rows, lm_rows = rows_of(samples_of(enc)), rows_of(samples_of(lm))
    coarse = enc if enc.size("dp") <= lm.size("dp") else lm
    block = samples_of(coarse)
    step = len(block) // bridge.scale
    slot_rows = [sum(per_sample[block.start + s * step: block.start + (s + 1) * step]) for s in range(bridge.scale)]
    mine = x[enc_rows].clone().requires_grad_(True)
    out = bridge(mine, slot_rows)
    # under cp each cp rank's loss sees only its share of the rows (its sequence chunks)
    cp, cp_rank = lm.size("cp"), lm.local_rank("cp")
    share = torch.zeros(out.shape[0], 1)
    share[cp_rank::cp] = 1
    (out * w[lm_rows] * share).sum().backward()
    result = {"forward": torch.equal(out, x[lm_rows]), "backward": torch.equal(mine.grad, w[enc_rows]),
              "direction": bridge.direction}
    bridge.destroy()
    return result


def _bad_layouts() -> list[str]:
    """Each bad layout raises the same error on every rank before any group exists (no hang)."""
    messages = []
    for layout in ({"vision": {"dp": 2}, "language": {"dp": 4}},  # vision spans 2 of 4 ranks
                   {"vision": {"dp": 2, "tp": 2}, "language": {"dp": 4}}):  # batch 6 not divisible by LLM dp 4
        try:
            build_grids([_spec(n, **s) for n, s in layout.items()], CPU, global_batch_size=6)
        except UserInputError as e:
            messages.append(str(e))
    dist.barrier()  # every rank is still in step
    return messages


def _grid_and_bridge_checks() -> dict:
    cases = {
        "fan-in": {"vision": {"dp": 4}, "language": {"dp": 2, "tp": 2}},
        "fan-out": {"vision": {"dp": 2, "tp": 2}, "language": {"dp": 4}},
        "equal": {"vision": {"dp": 2, "tp": 2}, "language": {"dp": 2, "cp": 2}},
        "fan-in-cp2": {"vision": {"dp": 4}, "language": {"dp": 2, "cp": 2}},
        "fan-out-cp2": {"vision": {"dp": 1, "tp": 4}, "language": {"dp": 2, "cp": 2}},
    }
    out = {name: _bridge_case(layout) for name, layout in cases.items()}
    out["bad_layouts"] = _bad_layouts()
    # an expert view of the LLM grid (edp x ep x etp == dp x cp x tp, pp shared): its groups are the spec's
    language = build_grids([_spec("vision", dp=4), _spec("language", dp=2, tp=2)], CPU)["language"]
    view = language.view("expert", (("pp", 1), ("edp", 2), ("ep", 2), ("etp", 1)), shared=("pp",))
    out["ep_group"] = dist.get_process_group_ranks(view["ep"].get_group())
    return out


def _check_bridge_results(per_rank: list[dict]) -> None:
    for rank, result in enumerate(per_rank):
        for name in ("fan-in", "fan-out", "equal", "fan-in-cp2", "fan-out-cp2"):
            assert result[name]["forward"] and result[name]["backward"], (rank, name, result[name])
        assert result["fan-in"]["direction"] == "fan_in" and result["fan-out"]["direction"] == "fan_out"
        assert result["ep_group"] == [[0, 1], [2, 3]][rank // 2]
        assert len(result["bad_layouts"]) == 2 and result["bad_layouts"] == per_rank[0]["bad_layouts"]
    assert "module rank ranges overlap" in per_rank[0]["bad_layouts"][0]
    assert "global_batch_size=6" in per_rank[0]["bad_layouts"][1]


# ---------------------------------------------------------------- the oracle: 4 layouts in one 4-rank run


def _mimo_model(layout: dict, grids: dict | None = None) -> MimoHandle:
    encoders, llm = build_modules(packed=layout["language"].get("cp", 1) > 1)
    return MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH, grids=grids)


def _microbatches(model: MimoHandle, rows: list[dict], micro: int) -> list[dict]:
    builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple)
    return builder.build(local_slice(rows, *model.data_block()), micro)


def _layout_steps(rows: list[dict]) -> dict:
    results = {}
    for name, layout, micro in LAYOUTS:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH)
        for optimizer, clip in OPTIMIZERS:
            model = _mimo_model(layout, grids)
            policy = Policy(model, train_config(optimizer, clip, GLOBAL_BATCH, micro))
            metrics = policy.sft_forward_backward(_microbatches(model, rows, micro))
            grads = full_grads(model.named_parameters())
            metrics.update(policy.optimizer_step())
            params = full_params(model.named_parameters())
            q = next(p for n, p in model.named_parameters() if n.startswith("vision.") and n.endswith("q_proj.weight"))
            metrics["vision_q_mesh"] = [getattr(d, "value", d) for d in q.device_mesh.mesh_dim_names]
            results[name, optimizer] = {**metrics, **({"grads": grads, "params": params} if dist.get_rank() == 0 else {})}
            model.destroy()
    # a NaN gradient on one rank: every rank skips the step (world consensus), weights unchanged
    model = _mimo_model(LAYOUTS[0][1])
    policy = Policy(model, train_config("sgd", 0.0, GLOBAL_BATCH, 2))
    before = full_params(model.named_parameters())
    policy.sft_forward_backward(_microbatches(model, rows, 2))
    if dist.get_rank() == 2:
        grad = dict(model.named_parameters())["vision.projector.linear_2.bias"].grad
        grad.to_local().fill_(float("nan"))
    step = policy.optimizer_step()
    after = full_params(model.named_parameters())
    results["nan_step"] = {"skipped": step["skipped"], "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
    # a row whose placeholders do not match its images: the same error on every rank, before any forward
    bad = _microbatches(model, rows, 2)
    if dist.get_rank() == 3:
        bad[1]["input_ids"][0, -1] = PLACEHOLDER
    try:
        Policy(model, train_config("sgd", 0.0, GLOBAL_BATCH, 2)).sft_forward_backward(bad)
    except UserInputError as e:
        results["mismatch"] = str(e)
    return results


PACKED_LAYOUTS = [LAYOUTS[0], LAYOUTS[1], LAYOUTS[3]]  # fan-in, fan-out, LLM cp2 (fan-in)
PACKED_SIZE = 48  # the rows (6-24 tokens with their image placeholders) pack 2-4 to a row


def _packed_steps(rows: list[dict]) -> dict:
    """Each layout with data.packing: rows (image placeholders with their text) bin-packed into rows of
    PACKED_SIZE tokens, one packed row per microbatch (weight-0 rows added where a fan-out needs an even count)."""
    results = {}
    for name, layout, _ in PACKED_LAYOUTS:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=GLOBAL_BATCH)
        for optimizer, clip in OPTIMIZERS:
            encoders, llm = build_modules(packed=True)
            model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=GLOBAL_BATCH,
                               grids=grids)
            builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                                        packed_size=PACKED_SIZE, rows_multiple=model.rows_multiple())
            microbatches = builder.build(local_slice(rows, *model.data_block()), 1)
            policy = Policy(model, train_config(optimizer, clip, GLOBAL_BATCH, 1))
            metrics = policy.sft_forward_backward(microbatches)
            grads = full_grads(model.named_parameters())
            metrics.update(policy.optimizer_step())
            params = full_params(model.named_parameters())
            packed = [int(n) for mb in microbatches for n in (mb["seq_index"][:, :, 0] >= 0).sum(1)]
            results[name, optimizer] = {**metrics, "sequences_per_row": packed,
                                        **({"grads": grads, "params": params} if dist.get_rank() == 0 else {})}
            model.destroy()
    return results


def test_mimo_packed_oracle(mimo_reference):
    """data.packing under MIMO: a packed step equals the unpacked single-process step (fan-in, fan-out, LLM cp2)."""
    rows, ref = mimo_reference
    per_rank = run_ranks(_packed_steps, 4, rows)
    for name, _, _ in PACKED_LAYOUTS:
        for optimizer, _ in OPTIMIZERS:
            _assert_layout_matches(per_rank, name, optimizer, ref[optimizer], f"packed {name} {optimizer}")
        rows_held = [n for result in per_rank for n in result[name, "sgd"]["sequences_per_row"]]
        assert max(rows_held) >= 2, (name, rows_held)  # rows really hold several sequences (and their images)


def _assert_layout_matches(per_rank: list, name: str, optimizer: str, r: dict, what: str) -> None:
    """every rank's loss and grad norm, rank 0's gradients and post-step weights equal the reference step"""
    for result in per_rank:
        got = result[name, optimizer]
        assert abs(got["loss"] - r["loss"]) <= TOL * r["loss"], (what, got["loss"], r["loss"])
        assert abs(got["grad_norm"] - r["grad_norm"]) <= TOL * r["grad_norm"], (what, got["grad_norm"])
        assert got["skipped"] == 0, what
    assert_step_close(per_rank[0][name, optimizer], r, what)


def reference_steps(layers: int = 2) -> tuple[list[dict], dict]:
    """The oracle's rows and, per optimizer, the single-process step on them."""
    rows = mimo_rows(seed=5)
    ref = {}
    for optimizer, clip in OPTIMIZERS:
        cfg = train_config(optimizer, clip, GLOBAL_BATCH, GLOBAL_BATCH)
        ref[optimizer] = reference_mimo_step(rows, optimizer, cfg.lr, cfg.eps, cfg.weight_decay, clip, layers=layers)
    return rows, ref


@pytest.fixture(scope="module")
def mimo_reference():
    rows, ref = reference_steps()
    assert ref["adamw"]["grad_norm"] > 0.5, "the clip must be active for the AdamW check to cover it"
    return rows, ref


def test_mimo_oracle_all_layouts(mimo_reference):
    rows, ref = mimo_reference
    per_rank = run_ranks(_layout_steps, 4, rows)
    for name, _, _ in LAYOUTS:
        for optimizer, _ in OPTIMIZERS:
            _assert_layout_matches(per_rank, name, optimizer, ref[optimizer], f"{name} {optimizer}")
    # the vision tower's own TP plan is applied where vision tp=2 (q_proj sharded over FSDP x TP)
    assert "tp" in per_rank[0]["fan-out", "sgd"]["vision_q_mesh"], per_rank[0]["fan-out", "sgd"]["vision_q_mesh"]
    assert "tp" not in per_rank[0]["fan-in", "sgd"]["vision_q_mesh"]
    assert all(result["nan_step"] == {"skipped": 1, "unchanged": True} for result in per_rank), [r["nan_step"] for r in per_rank]
    messages = {result.get("mismatch") for result in per_rank}
    assert len(messages) == 1 and "row 0 of microbatch 1 has 5 image placeholder tokens" in messages.pop()


# ---------------------------------------------------------------- checkpoint: save fan-in, resume fan-out


def _full_optimizer_state(policy: Policy) -> dict:
    return {k: full(v) for k, v in policy.optimizer.state_dict().items() if isinstance(v, torch.Tensor)}


def _save_and_resume(rows: list[dict], out_dir: str) -> dict:
    from automodel_mimo.checkpoint import Checkpointer

    saved = {}
    for name, layout, micro in (LAYOUTS[0], LAYOUTS[3]):  # fan-in saves; cp2 (another layout) resumes
        model = _mimo_model(layout)
        policy = Policy(model, train_config("adamw", 0.5, GLOBAL_BATCH, micro))
        ckpt = Checkpointer(out_dir)
        if not saved:
            policy.sft_train_step(_microbatches(model, rows, micro))
            ckpt.save(1, model, policy.optimizer)
            saved = {"model": full_params(model.named_parameters()), "optim": _full_optimizer_state(policy)}
        else:
            step = ckpt.load(ckpt.latest(), model, policy.optimizer)
            resumed = {"model": full_params(model.named_parameters()), "optim": _full_optimizer_state(policy),
                       "step": step, "lr": policy.optimizer.lr}
        model.destroy()
    return {"saved": saved, "resumed": resumed}


def _sft_loop(rows: list[dict], out_dir: str) -> list[dict]:
    """The one SFT loop (algorithms/sft.run_sft) on a MIMO config: 2 steps on the fan-out layout, synthetic images."""
    import json

    from automodel_mimo.algorithms.sft import run_sft
    from automodel_mimo.config import (
        CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, MimoConfig, ModelConfig, RunConfig)
    from tests.unit.oracle import TINY

    llm = {k: v for k, v in TINY.items() if k not in ("vocab_size", "pad_token_id")}
    cfg = RunConfig(output_dir=out_dir, model=ModelConfig(config={"model_type": "llama", **llm}),
                    data=DataConfig(dataset="synthetic:shapes", num_train=16, num_eval=4, image_size=16, max_seq_len=64),
                    train=train_config("adamw", 1.0, GLOBAL_BATCH, 2), eval=EvalConfig(every_steps=0),
                    logging=LoggingConfig(progress=False, tensorboard=False), checkpoint=CheckpointConfig(every_steps=2),
                    mimo=MimoConfig(layout=LAYOUTS[1][1], encoder=VISION, tokens_per_image=TOKENS_PER_IMAGE))
    cfg.train.max_steps = 2
    run_sft(cfg)
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if dist.get_rank() == 0 else []
    return [json.loads(line) for line in lines]


def _infrastructure(rows: list[dict], out_dir: str) -> dict:
    return {"bridge": _grid_and_bridge_checks(), "checkpoint": _save_and_resume(rows, out_dir),
            "sft": _sft_loop(rows, out_dir + "/sft")}


def test_bridge_bad_layouts_and_checkpoint_under_another_layout(tmp_path):
    """One 4-rank run: the bridge cases and bad layouts, then save under fan-in and resume under cp2."""
    per_rank = run_ranks(_infrastructure, 4, mimo_rows(seed=5), str(tmp_path))
    _check_bridge_results([r["bridge"] for r in per_rank])
    result = per_rank[0]["checkpoint"]
    saved, resumed = result["saved"], result["resumed"]
    assert resumed["step"] == 1
    assert any(k.startswith("vision.") for k in saved["optim"]) and any(k.startswith("language.") for k in saved["optim"])
    assert saved["optim"].keys() == resumed["optim"].keys()
    for kind in ("model", "optim"):
        for key, value in saved[kind].items():
            assert torch.equal(value, resumed[kind][key]), (kind, key)
    # the SFT loop: 2 steps, loss going down, a checkpoint at step 2
    steps = [m for m in per_rank[0]["sft"] if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and steps[1]["loss"] < steps[0]["loss"], steps
    assert (tmp_path / "sft" / "checkpoints" / "step_2" / "trainer_state.pt").is_file()


def test_vision_encoder_from_pretrained(tmp_path):
    """A saved vision tower, and the vision half of a full SigLIP checkpoint, load with their weights."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    from automodel_mimo.mimo.modules import build_vision_module

    vision = {k: v for k, v in VISION.items() if k not in ("model_type", "vision_use_head")}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    for source in (SiglipVisionModel(SiglipVisionConfig(**vision)), SiglipModel(SiglipConfig(text_config=text, vision_config=vision))):
        source.save_pretrained(tmp_path / type(source).__name__)
        loaded = build_vision_module({"pretrained": str(tmp_path / type(source).__name__)}, tiny_llama_config(), seed=0)
        expected = getattr(source, "vision_model", source).state_dict()
        assert isinstance(loaded.encoder, SiglipVisionModel)
        assert [torch.equal(a, b) for a, b in zip(loaded.encoder.state_dict().values(), expected.values())] == [True] * len(expected)
