"""The tensor-parallel plan a model is parallelized with: nemo-automodel's, resolved here for the two cases where
nemo's own resolution does not give exact gradients or does not apply.

- Replicated weights fed a tp-sharded input (Qwen3's q/k norms: each tp rank normalizes its own heads) are marked by
  nemo (`ReplicatedWithGradAllReduce`) for a gradient sum that nemo's training recipe runs at the optimizer boundary
  (`synchronize_tp_replica_gradients`); this repository's step does not run it, and its gradients are read after
  the backward (measured: dense Qwen3 and Qwen3-MoE under tp2, those gradients 36-100% off, every other one exact).
  torch's `SequenceParallel` over the heads dim makes such a weight a replicated DTensor fed a head-sharded input,
  so its gradient is summed over tp inside the backward.
- A mixture-of-experts model (models/moe.py) has no plan of its own in nemo, whose MoE parallelizer refuses its
  fallback plan (it names modules the model lacks): it gets the plan of its dense twin (Qwen3-MoE's attention and
  dense MLPs are Qwen3's), kept to the modules the model or stage has and never the router or experts (ep owns those).
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase

from torch import nn

from automodel_mimo.models.moe import is_moe

DENSE_TWIN = {"qwen3_moe": "transformers.models.qwen3.modeling_qwen3.Qwen3ForCausalLM"}  # same attention and MLP names


def with_tp_plan(model: nn.Module, ctx):
    """The mesh context nemo's dense parallelizer gets: unchanged unless `tp_plan` differs from what nemo resolves."""
    tp = ctx.device_mesh["tp"].size()
    if tp == 1 or ctx.strategy_config.tp_plan is not None:
        return ctx
    plan = tp_plan(model, tp, ctx.strategy_config.sequence_parallel)
    if plan is None:
        return ctx
    return dataclasses.replace(ctx, strategy_config=dataclasses.replace(ctx.strategy_config, tp_plan=plan))


def tp_plan(model: nn.Module, tp: int, sequence_parallel: bool = False) -> dict | None:
    """nemo's plan for `model` (an MoE model's: its dense twin's) with gradients summed in backward; None where that
    is nemo's own resolution unchanged."""
    from nemo_automodel.components.distributed.parallel_styles import ReplicatedWithGradAllReduce
    from nemo_automodel.components.distributed.parallelizer import _get_parallel_plan

    if is_moe(model.config):
        return {key: _summed_in_backward(style) for key, style in _dense_twin_plan(model, sequence_parallel).items()}
    plan = _get_parallel_plan(model, sequence_parallel=sequence_parallel, tp_shard_plan=None, tp_size=tp)
    if not any(isinstance(style, ReplicatedWithGradAllReduce) for style in plan.values()):
        return None
    return {key: _summed_in_backward(style) for key, style in plan.items()}


def _dense_twin_plan(model: nn.Module, sequence_parallel: bool) -> dict:
    from nemo_automodel.components.distributed.optimized_tp_plans import PARALLELIZE_FUNCTIONS
    from nemo_automodel.components.moe.tp_plan_validation import _is_unsafe_moe_tp_module_path as moe_owned

    plan = PARALLELIZE_FUNCTIONS[DENSE_TWIN[model.config.model_type]](model, sequence_parallel)
    names = [name for name, _ in model.named_modules() if not moe_owned(name)]
    return {key: style for key, style in plan.items() if not moe_owned(key) and any(fnmatchcase(n, key) for n in names)}


def _summed_in_backward(style):
    from nemo_automodel.components.distributed.parallel_styles import ReplicatedWithGradAllReduce
    from torch.distributed.tensor.parallel import SequenceParallel

    if isinstance(style, ReplicatedWithGradAllReduce):  # the input's dim 2 is the heads dim: [B, S, heads, head_dim]
        return SequenceParallel(sequence_dim=2, use_local_output=True)
    return style
