"""Deliberate crashes at named points, so tests can prove that a crash loses nothing.

Set AUTOMODEL_MIMO_FAULT=<point>:<step> (e.g. after_checkpoint:2); rank 0 then dies abruptly there, as
a node failure would, and the launcher stops the other ranks. With <point>:<step>:raise the last rank
raises an exception there instead, as a bug would (its traceback, then the launcher stops the others).
Unset, this is a no-op.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def fault_point(point: str, step: int) -> None:
    fault = os.environ.get("AUTOMODEL_MIMO_FAULT")
    if fault == f"{point}:{step}" and dist.get_rank() == 0:
        print(f"[fault] AUTOMODEL_MIMO_FAULT={point}:{step}: rank 0 exits now", file=sys.stderr, flush=True)
        os._exit(17)
    if fault == f"{point}:{step}:raise" and dist.get_rank() == dist.get_world_size() - 1:
        raise RuntimeError(f"[fault] AUTOMODEL_MIMO_FAULT={fault}: rank {dist.get_rank()} raises")
