"""train.compile for a run: whether the layers are compiled (unset: on when training an LM on CUDA), and what torch.compile
cannot compile (torch 2.13, measured on CPU; the failures are in dynamo's trace, before any kernel runs), which
keeps an unset train.compile off and makes train.compile=true one clear error (config/checks.py)."""

from __future__ import annotations

from automodel_mimo.config.schema import RunConfig


def compile_blocker(cfg: RunConfig) -> str | None:
    """Why this run's model cannot be compiled (the keys and the fix), or None."""
    from automodel_mimo.models.facts import MOE_TYPES

    key = "mimo.layout.language.ep" if cfg.mimo.layout else "parallel.ep"
    if cfg.language_ep > 1:  # fake tensors: "masked_fill ... expected predicate to be bool, got torch.int64"
        return (f"{key}={cfg.language_ep}: torch.compile cannot trace the experts' all-gather dispatch; set "
                f"train.compile=false (unset: off here) or {key}=1")
    if cfg.model.config.get("model_type") in MOE_TYPES and cfg.model.dtype == "float32":
        return ("model.dtype=float32 with a mixture-of-experts model: compiled experts run torch._grouped_mm, which "
                "torch.compile takes in bfloat16 only; set model.dtype=bfloat16 or train.compile=false (unset: off here)")
    return None


def compiles(cfg: RunConfig, device_type: str) -> bool:
    """train.compile resolved, for the LM's and the MIMO model's build alike: unset means on when training an LM on
    CUDA and nothing blocks it. A MIMO model stays eager unless asked: on one H200 its compiled step ran at 0.86-1.01x
    of eager (the tower's per-microbatch passes are host-bound and its compiled layers cost more host time;
    docs/benchmarks.md "MIMO on one GPU")."""
    if cfg.train.compile is not None:
        return cfg.train.compile
    return device_type == "cuda" and not cfg.mimo.layout and compile_blocker(cfg) is None
