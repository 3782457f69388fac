"""The non-finite guard: every rank skips a step any rank saw inf/NaN in, a skipped step leaves weights and
moments alone while the LR schedule advances, train.max_skipped_steps skips in a row stop the run, and
nothing (checkpoint, HF export) is written from non-finite weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

from automodel_mimo.config import TrainConfig
from automodel_mimo.optim import PartOptimizers, lr_factor
from tests.unit.cli_runner import TINY, metrics, run_cli
from tests.unit.multirank import run_ranks


def _votes_and_refused_save(out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from automodel_mimo.checkpoint import Checkpointer
    from automodel_mimo.distributed.nonfinite import skip_step, weights_finite
    from automodel_mimo.errors import RunStopped
    from automodel_mimo.config import ParallelConfig
    from automodel_mimo.distributed.mesh import build_parallel_state
    from automodel_mimo.models.handle import ModelHandle

    rank, nan, inf = dist.get_rank(), float("nan"), float("inf")
    out = {
        "finite": skip_step(torch.tensor(1.0), 2.0),
        "nan_loss_on_rank1": skip_step(torch.tensor(1.0), nan if rank == 1 else 2.0),
        "inf_norm_on_rank0": skip_step(torch.tensor(inf if rank == 0 else 1.0), 2.0),
    }
    # a DTensor weight sharded over both ranks, NaN in rank 1's shard only
    sharded = distribute_tensor(torch.zeros(4, 2), init_device_mesh("cpu", (2,)), [Shard(0)])
    out["sharded_finite"] = weights_finite([sharded])
    if rank == 1:
        sharded.to_local()[0, 0] = nan
    out["sharded_nan_on_rank1"] = weights_finite([sharded])

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    state = build_parallel_state(ParallelConfig(dp=dist.get_world_size()), torch.device("cpu"))
    handle, optimizers = ModelHandle(model, state), PartOptimizers([model], TrainConfig())
    ckpt = Checkpointer(out_dir)
    ckpt.save(1, handle, optimizers)  # finite: written
    model(torch.ones(1, 4)).sum().backward()
    optimizers.step()  # AdamW moments exist now
    moment = optimizers.optimizers[0].state[model.weight]["exp_avg_sq"]
    saved = moment.clone()
    if rank == 0:
        moment[0, 0] = inf  # finite weights, an overflowed second moment on one rank
    try:
        ckpt.save(2, handle, optimizers)
        out["refused_moments"] = None
    except RunStopped as e:
        out["refused_moments"] = str(e)
    moment.copy_(saved)
    if rank == 1:
        with torch.no_grad():
            model.weight[0, 0] = inf
    try:
        ckpt.save(2, handle, optimizers)
        out["refused"] = None
    except RunStopped as e:
        out["refused"] = str(e)
    dist.barrier()
    out["published"] = sorted(p.name for p in Path(out_dir, "checkpoints").iterdir())
    return out


def test_every_rank_votes_alike_and_no_checkpoint_holds_nan(tmp_path):
    per_rank = run_ranks(_votes_and_refused_save, 2, str(tmp_path))
    for r in per_rank:
        assert r["finite"] is False and r["nan_loss_on_rank1"] is True and r["inf_norm_on_rank0"] is True, r
        assert r["sharded_finite"] is True and r["sharded_nan_on_rank1"] is False, r
        assert r["refused"] and "checkpoint step_2 is not written" in r["refused"], r
        assert r["refused_moments"] and r["refused_moments"].startswith("the optimizer state (moments) hold inf/NaN"), r
        assert r["published"] == ["step_1"], r


def test_skipped_step_keeps_weights_and_moments_and_advances_the_schedule():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, min_lr=0.1)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    opt = PartOptimizers([model], cfg)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # one real step, so AdamW has moments to keep
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.optimizers[0].state[model.weight].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skip() must not warn
        opt.skip()
        opt.skip()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in opt.optimizers[0].state[model.weight].items())
    assert opt.lr == lr_factor(3, cfg)  # steps 1 and 2 were skipped, the schedule is at step 3 all the same


def test_fused_adamw_skips_on_the_device_vote_as_the_host_skip_does():
    """found_inf=1: a fused AdamW step leaves weights, moments and the step count as skip() does, while the
    schedule advances; found_inf=0 steps exactly like a step without it."""
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, min_lr=0.1, fused_optimizer=True)
    runs = {}
    for skip_on_device in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 3)
        opt = PartOptimizers([model], cfg)
        assert opt.fused
        for found in (0.0, 1.0, 0.0):
            model.zero_grad()
            model(torch.ones(1, 3)).sum().backward()
            if skip_on_device:
                opt.step(torch.tensor(found))
            elif found:
                opt.skip()
            else:
                opt.step()
        state = opt.optimizers[0].state[model.weight]
        runs[skip_on_device] = ({k: v.clone() for k, v in model.state_dict().items()},
                                {k: v.clone() for k, v in state.items()}, opt.lr)
    (w0, m0, lr0), (w1, m1, lr1) = runs[False], runs[True]
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and lr0 == lr1 == lr_factor(3, cfg)
    assert all(torch.equal(m0[k], m1[k]) for k in m0) and float(m1["step"]) == 2  # two real steps


RUN = [*TINY, "launch.nproc=2", "train.lr=1e6", "train.max_steps=12", "checkpoint.every_steps=2",
       "train.max_skipped_steps=4"]


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_diverging_two_rank_run_skips_then_stops_with_only_finite_checkpoints(tmp_path, fused):
    """lr=1e6: from step 3 the gradient norm is NaN. Both ranks skip steps 3-6 together (no hang), the 4th
    skip in a row stops the run with one line naming the step (exit 3), and every checkpoint is finite.
    fused: fused AdamW (CUDA's default, here on CPU) skips inside its kernel on the device vote (found_inf)."""
    r = run_cli("sft", *RUN, f"train.fused_optimizer={str(fused).lower()}", f"output_dir={tmp_path}", timeout=240)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    stops = [line for line in r.stderr.splitlines() if line.startswith("stopped:")]
    assert len(stops) == 1 and stops[0].startswith("stopped: step 6: 4 steps in a row skipped") and "train.lr" in stops[0]
    assert sum(line.startswith("warning: step") for line in r.stderr.splitlines()) == 4

    rows = metrics(tmp_path)
    assert [(row["step"], row["skipped"]) for row in rows] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert all("warning" in row for row in rows if row["skipped"])
    schedule = TrainConfig(max_steps=12, warmup_steps=1)  # the schedule advances through skipped steps too
    assert all(abs(row["lr"] / (1e6 * lr_factor(row["step"] - 1, schedule)) - 1) < 1e-9 for row in rows), rows

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert not (tmp_path / "hf").exists()
    model = AutoModelForCausalLM.from_config(_config(tmp_path))
    weights = {}
    for step in (2, 4):
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(tmp_path / "checkpoints" / f"step_{step}"))
        assert all(torch.isfinite(v).all() for v in state["model"].values()), step
        weights[step] = {k: v.clone() for k, v in state["model"].items()}
    # steps 3 and 4 were skipped: the step-4 checkpoint holds the step-2 weights
    assert all(torch.equal(weights[2][k], weights[4][k]) for k in weights[2])


def _config(out: Path):
    from automodel_mimo.config import load_config
    from automodel_mimo.models.build import build_hf_config
    from automodel_mimo.models.tokenizer import build_default_tokenizer

    cfg = load_config("sft", None, [*RUN, f"output_dir={out}"])
    return build_hf_config(cfg.model, build_default_tokenizer())
