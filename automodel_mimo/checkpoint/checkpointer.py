"""Sharded checkpoints (torch DCP) written atomically, exact resume, and the HF safetensors export.

Layout of `<output_dir>/checkpoints/step_<N>/`:
  model + optimizer   DCP shards (resharded on load, so a checkpoint resumes under another layout)
  reference/          RL only: the frozen reference policy's weights, DCP shards like the model's
  trainer_state.pt    step, LR-scheduler state and the loop's `extra` values
  rng_rank<R>.pt      each rank's torch / CUDA RNG state
  manifest.json       every other file's size and xxh3-64 checksum (checkpoint_manifest.py)
Everything is written into `step_<N>.partial/` and renamed to `step_<N>/` by rank 0 once every rank has
finished; a crash mid-save leaves only a `.partial` directory, which resume ignores and the next save of
that step replaces. The data position needs no file: batches depend on (seed, step) only. Nothing is
written from non-finite weights (a world vote first: distributed/nonfinite.py). The manifest is written
last, before the rename; resume takes the newest checkpoint whose files still match it and names what is
wrong with each newer one (a checkpoint without a manifest, from before manifests, is loaded with a note).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from automodel_mimo.checkpoint.listing import checkpoint_root, complete_checkpoints
from automodel_mimo.checkpoint.manifest import checkpoint_files, file_entry, file_problem, read_manifest, write_manifest
from automodel_mimo.distributed.nonfinite import require_finite_weights
from automodel_mimo.errors import UserInputError
from automodel_mimo.run.faults import fault_point
from automodel_mimo.models.handle import Handle
from automodel_mimo.optim import PartOptimizers



def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = checkpoint_root(output_dir)
        self.keep_last = keep_last

    def _train_state(self, handle: Handle, optimizers: PartOptimizers) -> dict:
        # Keys are the unsplit model's parameter names, so any layout (pp1/pp2, dp, tp) can load them.
        return {"model": handle.state_dict(), "optim": optimizers.state_dict()}

    # ------------------------------------------------------------ save
    def save(self, step: int, handle: Handle, optimizers: PartOptimizers, reference=None,
             extra: dict | None = None) -> Path:
        """Collective: every rank calls it. Returns the final directory. `reference`: a ReferenceWeights
        (policies/reference.py) saved beside the model; `extra`: small values the loop needs on resume."""
        final, partial = self.root / f"step_{step}", self.root / f"step_{step}.partial"
        require_finite_weights(handle.parameters(), f"checkpoint step_{step}")
        # AdamW's second moment can overflow to inf from a finite gradient (|g| > 1.8e19) while the weights stay
        # finite (the update becomes 0): a resumed run would silently stop learning those weights
        require_finite_weights(optimizers.state_tensors(), f"checkpoint step_{step}", "the optimizer state (moments)")
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._train_state(handle, optimizers), checkpoint_id=str(partial))
        if reference is not None:  # swapped into the parameters, so it saves (and reshards) like the model
            with reference.swapped_in():
                dcp.save({"model": handle.state_dict()}, checkpoint_id=str(partial / "reference"))
        torch.save(_rng_state(), partial / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save({"step": step, "scheduler": optimizers.scheduler_state(), "extra": extra or {}},
                       partial / "trainer_state.pt")
        dist.barrier()
        self._write_manifest(partial)
        fault_point("before_checkpoint_rename", step)
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            self._prune()
        dist.barrier()
        return final

    def _write_manifest(self, partial: Path) -> None:
        """Collective: rank 0 lists the files, every rank hashes its share of them, rank 0 writes the manifest."""
        rank, world = dist.get_rank(), dist.get_world_size()
        names = _from_rank0(checkpoint_files(partial) if rank == 0 else None)
        mine = {name: file_entry(partial / name) for name in names[rank::world]}
        shares = [None] * world if rank == 0 else None
        dist.gather_object(mine, shares, dst=0)
        if rank == 0:
            write_manifest(partial, {name: entry for share in shares for name, entry in share.items()})

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ resume
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, unverified (resume uses latest_intact)."""
        found = self.complete()
        return found[-1] if found else None

    def latest_intact(self) -> Path | None:
        """Collective: the newest complete checkpoint whose files match its manifest; each damaged newer one is
        passed over with a one-line note on rank 0."""
        for path in reversed(_from_rank0(self.complete() if dist.get_rank() == 0 else None)):
            problem = self.damage(path)
            if problem is None:
                return path
            _note(f"checkpoint {path} is damaged ({problem}); falling back to the one before it")
        return None

    def damage(self, path: Path) -> str | None:
        """Collective: what is wrong with checkpoint `path` against its manifest (every rank checks a share of
        the files), or None. A checkpoint without a manifest passes, with a note."""
        rank, world = dist.get_rank(), dist.get_world_size()
        manifest, error = _from_rank0(_read_manifest_or_error(path) if rank == 0 else None)
        if error is not None:
            return error
        if manifest is None:
            _note(f"checkpoint {path} has no manifest (written before checkpoints had one): loading it unverified")
            return None
        names = sorted(manifest)
        mine = [problem for name in names[rank::world] if (problem := file_problem(path, name, manifest[name]))]
        shares = [None] * world
        dist.all_gather_object(shares, mine)
        found = sorted(problem for share in shares for problem in share)
        if not found:
            return None
        return found[0] + (f", and {len(found) - 1} more" if len(found) > 1 else "")

    def load(self, path: Path, handle: Handle, optimizers: PartOptimizers) -> int:
        """Restore model, optimizer, scheduler and RNG in place; returns the step the checkpoint was taken at.
        A checkpoint that does not fit this run (another model) is a one-line UserInputError."""
        state = self._train_state(handle, optimizers)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # DCP gathers every rank's failure, so all ranks raise alike
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise UserInputError(f"checkpoint {path} cannot be loaded into this run ({type(e).__name__}: {first}); "
                                 "it was written for another model, or set checkpoint.resume=false") from None
        handle.load_state_dict(state["model"])
        optimizers.load_state_dict(state["optim"])
        trainer = torch.load(path / "trainer_state.pt", weights_only=False)
        optimizers.load_scheduler_state(trainer["scheduler"])
        rng = path / f"rng_rank{dist.get_rank()}.pt"
        if rng.is_file():  # absent when resuming with more ranks than were saved
            _set_rng_state(torch.load(rng, weights_only=False))
        return int(trainer["step"])

    def load_reference(self, path: Path, handle: Handle, reference) -> None:
        """The reference weights saved at `path` into `reference`; the handle's own weights are unchanged."""
        with reference.swapped_in():
            state = {"model": handle.state_dict()}
            dcp.load(state, checkpoint_id=str(path / "reference"))
            handle.load_state_dict(state["model"])
            reference.capture()

    def extra(self, path: Path) -> dict:
        """The `extra` values saved at `path`."""
        return torch.load(path / "trainer_state.pt", weights_only=False).get("extra", {})


def _from_rank0(value):
    """Rank 0's `value` on every rank (one broadcast)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _read_manifest_or_error(path: Path) -> tuple[dict | None, str | None]:
    try:
        return read_manifest(path), None
    except ValueError as e:
        return None, str(e)


def _note(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"note: {message}", file=sys.stderr, flush=True)
