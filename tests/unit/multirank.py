"""Run a function on N local ranks (gloo, CPU) and collect what each returns; for multi-rank tests."""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from automodel_mimo.launch.local import free_port


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # no rank tears gloo down while a peer is still in its last collective: seen as SIGABRT of rank 0 in CI
        # under load (test_resume_falls_back_past_damaged_checkpoints, its last collective then an early exit)
        dist.barrier()
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """fn(*args) on `world` gloo ranks; returns the list of per-rank results (rank order)."""
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world, start_method="spawn")
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(Path(out).glob("*.err")))
            raise AssertionError(f"a rank failed:\n{errors or e}") from None
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
