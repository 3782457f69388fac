"""Checkpoint integrity: every published checkpoint carries a manifest of its files (size, xxh3-64); resume
takes the newest checkpoint that still matches it, names what is wrong with each newer one, and says so
when none is usable (or stops, with checkpoint.resume_required)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from tests.unit.multirank import run_ranks

DAMAGE = ("overwrite 4 KiB", "truncate", "delete", "no manifest", "torn manifest")


def _damage(step_dir: Path, how: str) -> None:
    shard = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if how == "overwrite 4 KiB":
        with shard.open("r+b") as f:
            f.seek(shard.stat().st_size // 2)
            f.write(b"\xff" * 4096)
    elif how == "truncate":
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 3)
    elif how == "delete":
        shard.unlink()
    elif how == "no manifest":
        (step_dir / "manifest.json").unlink()
    elif how == "torn manifest":
        text = (step_dir / "manifest.json").read_text()
        (step_dir / "manifest.json").write_text(text[: len(text) // 2])


def _resume_choices(out_dir: str) -> dict:
    from automodel_mimo.algorithms.loop import resume_checkpoint
    from automodel_mimo.checkpoint import Checkpointer
    from automodel_mimo.config import RunConfig
    from automodel_mimo.errors import UserInputError
    from automodel_mimo.config import ParallelConfig
    from automodel_mimo.distributed.mesh import build_parallel_state
    from automodel_mimo.models.handle import ModelHandle
    from automodel_mimo.optim import PartOptimizers

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)  # 64 KiB of weights, 128 KiB of AdamW moments
    state = build_parallel_state(ParallelConfig(dp=dist.get_world_size()), torch.device("cpu"))
    handle, optimizers = ModelHandle(model, state), PartOptimizers([model], RunConfig().train)
    ckpt = Checkpointer(out_dir, keep_last=0)
    model(torch.ones(2, 128)).sum().backward()
    for step in (2, 4):
        optimizers.step()
        ckpt.save(step, handle, optimizers)
    root = Path(out_dir, "checkpoints")
    out = {"manifest": json.loads((root / "step_4" / "manifest.json").read_text())["files"],
           "files": sorted(p.relative_to(root / "step_4").as_posix() for p in (root / "step_4").rglob("*") if p.is_file())}
    if rank == 0:
        shutil.copytree(root / "step_4", root.parent / "pristine_4")
    for how in DAMAGE:
        if rank == 0:
            shutil.rmtree(root / "step_4")
            shutil.copytree(root.parent / "pristine_4", root / "step_4")
            _damage(root / "step_4", how)
        dist.barrier()
        out[how] = (ckpt.damage(root / "step_4"), ckpt.latest_intact().name)
    if rank == 0:
        _damage(root / "step_2", "overwrite 4 KiB")
        _damage(root / "step_4", "overwrite 4 KiB")
    dist.barrier()
    cfg = RunConfig(output_dir=out_dir)
    cfg.checkpoint.resume = True
    out["none usable"] = resume_checkpoint(cfg, ckpt)
    cfg.checkpoint.resume_required = True
    try:
        resume_checkpoint(cfg, ckpt)
    except UserInputError as e:
        out["required"] = str(e)
    return out


def test_resume_falls_back_past_damaged_checkpoints(tmp_path):
    per_rank = run_ranks(_resume_choices, 2, str(tmp_path))
    r = per_rank[0]
    # the manifest covers every file of the checkpoint (both ranks' shards and RNG states, the DCP metadata)
    assert sorted(r["manifest"]) == [f for f in r["files"] if f != "manifest.json"]
    assert {"rng_rank0.pt", "rng_rank1.pt", "trainer_state.pt", ".metadata"} <= set(r["manifest"])
    assert all(e["size"] > 0 and len(e["xxh3_64"]) == 16 for e in r["manifest"].values())
    for result in per_rank:
        overwrite, truncate, delete = (result[how] for how in DAMAGE[:3])
        assert overwrite[0].endswith(".distcp does not match its checksum") and overwrite[1] == "step_2", overwrite
        assert ".distcp has " in truncate[0] and "bytes, the manifest says" in truncate[0] and truncate[1] == "step_2"
        assert delete[0].endswith(".distcp is missing") and delete[1] == "step_2", delete
        assert result["no manifest"] == (None, "step_4")  # written before manifests: accepted (with a note)
        assert result["torn manifest"] == ("manifest.json is unreadable (JSONDecodeError)", "step_2")
        assert result["none usable"] is None
        assert "holds no usable checkpoint, and checkpoint.resume_required=true" in result["required"]

