"""Which checkpoints an output_dir holds, read from the file system alone (no torch): the Checkpointer's view, and
the CLI's check before any rank starts."""

from __future__ import annotations

import re
from pathlib import Path

from automodel_mimo.errors import UserInputError

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints (step_<N> with its trainer state), oldest first; `.partial` ones are not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.pt").is_file()]
    return [p for _, p in sorted(found)]


def check_resume_required(cfg) -> None:
    """Before any rank starts: checkpoint.resume_required with no complete checkpoint at all is one line now (a
    damaged one is found by the ranks' verification, loop.resume_checkpoint)."""
    c, root = cfg.checkpoint, checkpoint_root(cfg.output_dir)
    if c.resume and c.resume_required and not complete_checkpoints(root):
        raise UserInputError(f"checkpoint.resume=true: {root} holds no checkpoint, and checkpoint.resume_required=true; "
                             "point output_dir at the run to continue, or set checkpoint.resume_required=false to "
                             "start from step 0")
