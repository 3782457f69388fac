"""Sharded checkpoints (torch DCP) written atomically, exact resume, and the HF safetensors export.

Layout of `<output_dir>/checkpoints/step_<N>/`:
  model + optimizer   DCP shards (resharded on load, so a checkpoint resumes under another layout)
  reference/          RL only: the frozen reference policy's weights, DCP shards like the model's
  trainer_state.pt    step, LR-scheduler state and the loop's `extra` values
  rng_rank<R>.pt      each rank's torch / CUDA RNG state
Everything is written into `step_<N>.partial/` and renamed to `step_<N>/` by rank 0 once every rank has
finished; a crash mid-save leaves only a `.partial` directory, which resume ignores and the next save of
that step replaces. The data position needs no file: batches depend on (seed, step) only. Nothing is
written from non-finite weights (a world vote first: distributed/nonfinite.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from automodel_mimo.distributed.nonfinite import require_finite_weights
from automodel_mimo.faults import fault_point
from automodel_mimo.models.handle import ModelHandle
from automodel_mimo.optim import PartOptimizers

_STEP_DIR = re.compile(r"^step_(\d+)$")


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
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def _train_state(self, handle: ModelHandle, optimizers: PartOptimizers) -> dict:
        # Keys are the unsplit model's parameter names, so any layout (pp1/pp2, dp, tp) can load them.
        return {"model": handle.state_dict(), "optim": optimizers.state_dict()}

    # ------------------------------------------------------------ save
    def save(self, step: int, handle: ModelHandle, optimizers: PartOptimizers, reference=None,
             extra: dict | None = None) -> Path:
        """Collective: every rank calls it. Returns the final directory. `reference`: a ReferenceWeights
        (policies/reference.py) saved beside the model; `extra`: small values the loop needs on resume."""
        final, partial = self.root / f"step_{step}", self.root / f"step_{step}.partial"
        require_finite_weights(handle.parameters(), f"checkpoint step_{step}")
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
        fault_point("before_checkpoint_rename", step)
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ resume
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.pt").is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def load(self, path: Path, handle: ModelHandle, optimizers: PartOptimizers) -> int:
        """Restore model, optimizer, scheduler and RNG in place; returns the step the checkpoint was taken at."""
        state = self._train_state(handle, optimizers)
        dcp.load(state, checkpoint_id=str(path))
        handle.load_state_dict(state["model"])
        optimizers.load_state_dict(state["optim"])
        trainer = torch.load(path / "trainer_state.pt", weights_only=False)
        optimizers.load_scheduler_state(trainer["scheduler"])
        rng = path / f"rng_rank{dist.get_rank()}.pt"
        if rng.is_file():  # absent when resuming with more ranks than were saved
            _set_rng_state(torch.load(rng, weights_only=False))
        return int(trainer["step"])

    def load_reference(self, path: Path, handle: ModelHandle, reference) -> None:
        """The reference weights saved at `path` into `reference`; the handle's own weights are unchanged."""
        with reference.swapped_in():
            state = {"model": handle.state_dict()}
            dcp.load(state, checkpoint_id=str(path / "reference"))
            handle.load_state_dict(state["model"])
            reference.capture()

    def extra(self, path: Path) -> dict:
        """The `extra` values saved at `path`."""
        return torch.load(path / "trainer_state.pt", weights_only=False).get("extra", {})


def export_hf(handle: ModelHandle, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path | None:
    """Collective: gather full weights; rank 0 writes an HF folder (safetensors, config, tokenizer) atomically."""
    require_finite_weights(handle.parameters(), f"the HF export {out_dir}")
    state = handle.full_state_dict()
    out = Path(out_dir)
    if dist.get_rank() == 0:
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        config = handle.config
        config.use_cache = True
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        config.use_cache = False
    dist.barrier()
    return out
