"""Build the HF causal LM (random init from a config, or from_pretrained) and parallelize it.

Parallelization is nemo-automodel's: `parallelize_model` applies its TP plan for the model family over
the `tp` axis and FSDP2 over `dp_shard_cp` (and `dp_replicate`). We only add what the numerics
contract needs on top (gradient reduction as a SUM, see `_sum_gradient_reduction`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from automodel_mimo.config import ModelConfig, RunConfig, pad_multiple
from automodel_mimo.distributed.mesh import DTYPES, ParallelState
from automodel_mimo.errors import UserInputError
from automodel_mimo.losses.token import compile_logprobs
from automodel_mimo.models import packed_attention
from automodel_mimo.models.handle import ModelHandle, PipelineModelHandle
from automodel_mimo.models.facts import check_expert_split, check_pipeline_split, check_tp_divisibility
from automodel_mimo.models.moe import build_moe_model, is_moe, parallelize_moe
from automodel_mimo.models.tp_plan import with_tp_plan
from automodel_mimo.parallel.pipeline_parallel import PipelineDriver, build_pipeline


def build_hf_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The HF config of the model to train; random-init configs get the tokenizer's vocabulary and ids."""
    if cfg.pretrained:  # model.config is not used then (the CLI says so once)
        try:
            return AutoConfig.from_pretrained(cfg.pretrained)
        except (OSError, ValueError) as e:
            raise UserInputError(f"model.pretrained={cfg.pretrained}: cannot load its config ({e})") from None
    kwargs = dict(cfg.config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise UserInputError("model.config.model_type: missing; set it to an HF model type such as llama or qwen2")
    kwargs.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        kwargs.setdefault(name, getattr(tokenizer, name))
    try:
        hf_config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as e:
        raise UserInputError(f"model.config: {e}") from None
    if hf_config.vocab_size < len(tokenizer):
        raise UserInputError(
            f"model.config.vocab_size={hf_config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return hf_config


def build_model(cfg: ModelConfig, hf_config: PretrainedConfig, seed: int, packed: bool = False) -> nn.Module:
    """The full model on CPU, identical on every rank (same seed), before any sharding.

    Parameters (and so optimizer state) are fp32 master weights; `model.dtype` is the compute dtype,
    applied by the FSDP2 mixed-precision policy (distributed/mesh.py).
    """
    torch.manual_seed(seed)
    attn = packed_attention.NAME if packed else cfg.attn_implementation
    if cfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.pretrained, config=hf_config, dtype=torch.float32, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    if is_moe(model.config):  # nemo's MoE layer (router + experts) in the sparse layers: docs/moe.md
        model = build_moe_model(model)
    return model


def parallelize(model: nn.Module, state: ParallelState) -> nn.Module:
    """FSDP2 (+ TP) on one module: the whole model, or one pipeline stage's part."""
    from nemo_automodel.components.distributed.model_parallelizer import parallelize_model

    check_tp_divisibility(model.config, state.tp_size)
    check_expert_split(model.config, state.mesh_context.ep_size)
    if state.mesh_context.ep_size > 1:
        model = parallelize_moe(model, state.mesh_context)
    else:
        model = parallelize_model(model, with_tp_plan(model, _compile_safe_checkpointing(model, state)))
    _single_rank_compute_dtype(model, state)
    _sum_gradient_reduction(model)
    compile_layers(model, state)
    _plain_embedding_output(model, state)
    if state.mesh_context.strategy_config.enable_compile and state.device.type == "cuda":
        compile_logprobs()
    return model.to(state.device)


def layers_owner(model: nn.Module) -> nn.Module | None:
    """The module whose `.layers` are `model`'s transformer layers: a causal LM's (or pipeline stage's) `model.model`,
    or where another module says (`layers_owner`: a MIMO vision tower's encoder, mimo/modules.py)."""
    owner = getattr(model, "layers_owner", None) or getattr(model, "model", None)
    return owner if hasattr(owner, "layers") else None


def compile_layers(model: nn.Module, state: ParallelState) -> None:
    """train.compile: each transformer layer compiled in place (nemo-automodel's per-layer compile:
    nn.Module.compile, names unchanged, so checkpoints and refit names stay). nemo looks for the layers at
    model.model.layers or model.layers, else guesses with a warning: it is given their owner."""
    from nemo_automodel.components.distributed.model_parallelizer import compile_parallelized_model

    if state.mesh_context.strategy_config.enable_compile:
        compile_parallelized_model(layers_owner(model) or model, state.mesh_context)


def _plain_embedding_output(model: nn.Module, state: ParallelState) -> None:
    """Under TP the embedding's output is an AsyncCollectiveTensor (DTensor's to_local of a pending all-reduce). A
    compiled decoder layer given one drops the gradient to it (torch 2.13: the embedding's gradient was 0 in the
    compiled tp2 oracle, every other gradient exact; torch 2.11 kept it), so under compile the output is waited for
    eagerly, with a differentiable copy, before the first compiled layer sees it."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if not (state.mesh_context.strategy_config.enable_compile and state.tp_size > 1):
        return
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(lambda _m, _i, out: out.clone() if isinstance(out, AsyncCollectiveTensor) else out)


def _compile_safe_checkpointing(model: nn.Module, state: ParallelState):
    """The mesh context to parallelize with. On an unsharded mesh (one rank) nemo wraps attention and MLP for
    activation checkpointing with an SDPA-state context_fn that torch.compile refuses ("context_fn ... must
    generate a tuple of two TorchDispatchModes"); its sharded path wraps them without one when compiling. On
    one rank with both, wrap them that way here and let nemo skip checkpointing."""
    import dataclasses

    from nemo_automodel.components.distributed.fsdp2 import fsdp2_sharding_enabled
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    ctx = state.mesh_context
    if not (ctx.activation_checkpointing and ctx.strategy_config.enable_compile) or fsdp2_sharding_enabled(ctx.device_mesh):
        return ctx
    owner = layers_owner(model)
    if owner is None:
        raise UserInputError("train.compile with parallel.activation_checkpointing on one rank needs the model's "
                             f"transformer layers ({type(model).__name__} has none we know); set train.compile=false")
    layers = owner.layers
    for layer in layers.values() if isinstance(layers, nn.ModuleDict) else layers:
        for attr in ("self_attn", "mlp"):
            setattr(layer, attr, checkpoint_wrapper(getattr(layer, attr), checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return dataclasses.replace(ctx, activation_checkpointing=False)


def _single_rank_compute_dtype(model: nn.Module, state: ParallelState) -> None:
    """nemo skips FSDP2 on a one-rank mesh, and with it the mixed-precision cast, so model.dtype=bfloat16
    would silently train in fp32 on one GPU. Wrapping the decoder layers and the root with a one-rank FSDP2
    applies the same policy as every other layout (the collectives over one rank are copies)."""
    from torch.distributed.fsdp import fully_shard

    policy = state.mesh_context.strategy_config.mp_policy
    if any(isinstance(m, FSDPModule) for m in model.modules()) or policy.param_dtype in (None, torch.float32):
        return
    mesh = state.mesh["dp_shard_cp"]
    layers = getattr(getattr(model, "model", None), "layers", [])
    for layer in layers.values() if isinstance(layers, nn.ModuleDict) else layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def build_lm_handle(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, state: ParallelState) -> ModelHandle:
    """The run's causal LM behind its handle; built for packed attention when batches are packed rows
    (data.packing) or context-parallel shards (parallel.cp > 1)."""
    model = build_model(cfg.model, build_hf_config(cfg.model, tokenizer), cfg.seed,
                        packed=cfg.data.packing or cfg.parallel.cp > 1)
    return build_handle(cfg, model, state, tokenizer.pad_token_id)


def build_handle(cfg: RunConfig, model: nn.Module, state: ParallelState, pad_id: int) -> ModelHandle:
    """The model behind a ModelHandle: one parallelized module, or AutoPipeline stages (parallel.pp > 1)."""
    p = cfg.parallel
    if p.pp == 1:
        return ModelHandle(parallelize(model, state), state, pad_id, pad_multiple(p))
    check_pipeline_split(model.config.num_hidden_layers, p.pp, p.pp_schedule, p.layers_per_stage)
    config = model.config
    pipeline = build_pipeline(  # AutoPipeline wants the model on its device before the split
        model.to(state.device), state, schedule=p.pp_schedule, rows_per_step=cfg.train.micro_batch_size,
        pp_microbatch_size=p.pp_microbatch_size, layers_per_stage=p.layers_per_stage,
        seq_len=cfg.data.max_seq_len, compute_dtype=DTYPES[cfg.model.dtype],
        parallelize_fn=lambda part, **_: parallelize(part, state))
    driver = PipelineDriver(pipeline, cfg.train.micro_batch_size, pad_id, state.dp_cp_group, state.pp_group, state.device)
    return PipelineModelHandle(driver, config, state, pad_id, pad_multiple(p))


def _sum_gradient_reduction(model: nn.Module) -> None:
    """FSDP2 averages gradients over its data ranks; the losses are pre-divided by global token counts,
    so the reduction must be a plain sum (docs/numerics.md). Forcing SUM-type collectives keeps FSDP off
    PREMUL_SUM, which gloo lacks (and a factor of 1 needs no pre-multiplication anyway)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
