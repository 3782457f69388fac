"""Mixture-of-experts causal LMs: the HF model with nemo-automodel's MoE layer in its sparse layers.

The model is transformers' Qwen3-MoE (attention, norms, RoPE: the HF path every dense model takes, so packed and
context-parallel attention work unchanged) whose `Qwen3MoeSparseMoeBlock`s are replaced by nemo's `MoE` (its
`Gate` and `GroupedExperts`), initialized from the HF block's weights. nemo's MoE parallelizer then shards the
experts over the expert view's `ep` axis (`apply_ep`) and FSDP2 wraps them over `ep_shard` (docs/moe.md).

Backends (`backend()`): the experts run as one grouped GEMM over tokens sorted by expert ("torch_mm":
torch._grouped_mm, CUDA and CPU alike; nemo's per-expert loop syncs the host once per expert, 3.9x slower per step
on 2 x H200), the dispatcher is the all-gather one ("torch"): no DeepEP or Transformer Engine. Its weighted SwiGLU is a
`torch.compile`d function, which on CPU compiles C++ in every process (~15 s, again for new token counts); without
CUDA the experts use the same math eagerly (`weighted_swiglu`).

Load balancing (docs/moe.md, docs/numerics.md): a sequence-wise auxiliary loss. For every sequence s,
f_si = E / (k T_s) * (tokens of s routed to expert i), P_si = mean over s's tokens of the router probability of i,
aux = coeff * sum_s sum_i f_si P_si / (sequences of the global batch). Sequences are whole in every layout but
context parallelism, where the per-sequence sums are all-reduced over cp: the value and its gradient are the
same for any dp, cp, pp, microbatching or packing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from automodel_mimo.distributed.autograd_collectives import gather_rows, keep_my_rows
from automodel_mimo.models.facts import MOE_TYPES
from automodel_mimo.models.moe_local_dispatch import use_local_dispatch
from automodel_mimo.parallel.context_parallel import sum_over_cp

SEGMENTS = "moe_segments"  # [B, S] sequence index of each token within its row, -1 for padding


def is_moe(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) in MOE_TYPES and (getattr(config, "num_experts", 0) or 0) > 0


def backend():
    from nemo_automodel.components.models.common import BackendConfig

    return BackendConfig(attn="sdpa", linear="torch", rms_norm="torch", rope_fusion=False, experts="torch_mm",
                         dispatcher="torch", enable_hf_state_dict_adapter=False)


def moe_config(config: PretrainedConfig):
    """nemo's MoEConfig of a Qwen3-MoE config (nemo's own qwen3_moe mapping); nemo's aux loss is off: ours is
    computed by `BalancedMoE` under the global-token contract."""
    from nemo_automodel.components.moe.config import MoEConfig

    return MoEConfig(dim=config.hidden_size, inter_dim=config.intermediate_size, moe_inter_dim=config.moe_intermediate_size,
                     n_routed_experts=config.num_experts, n_shared_experts=0, n_activated_experts=config.num_experts_per_tok,
                     n_expert_groups=0, n_limited_groups=0, train_gate=True, gate_bias_update_factor=0.0,
                     score_func="softmax", route_scale=1.0, aux_loss_coeff=0.0, norm_topk_prob=config.norm_topk_prob,
                     expert_bias=False, router_bias=False, expert_activation="swiglu", softmax_before_topk=True,
                     dtype=torch.float32)


def _balanced_moe_class():
    from nemo_automodel.components.moe.layers import MoE

    class BalancedMoE(MoE):
        """nemo's MoE (router + experts) that also adds the sequence-wise balance loss and counts expert load.

        `segments` (set per forward by the inner model's pre-hook), `cp_group` and `aux_scale` (coeff /
        global sequence count, set by the handle before a step) and `tp_group` (set when parallelized with tp and
        ep) come from outside; `stats` collects this step's aux loss and per-expert token counts (this rank's
        share)."""

        def setup(self, aux_coeff: float) -> None:
            self.aux_coeff, self.segments, self.cp_group, self.aux_scale = aux_coeff, None, None, 0.0
            self.tp_group = None
            self.reset_stats()

        def reset_stats(self) -> None:
            # on the model's device: the step's sums stay there until RouterBalance.metrics reads them once
            device = self.gate.weight.device
            self.aux_sum = torch.zeros((), dtype=torch.float64, device=device)
            self.load = torch.zeros(self.n_routed_experts, dtype=torch.float64, device=device)

        def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cp_mesh=None) -> torch.Tensor:
            shape = x.shape
            x = x.reshape(-1, self.dim)
            segments = self.segments
            if segments is None or segments.numel() != x.shape[0]:  # e.g. generation: every token counts
                segments = torch.zeros(shape[:-1], dtype=torch.long, device=x.device)
            valid = segments.reshape(-1) >= 0
            weights, indices, _ = self.gate(x, valid, None)
            y = self._routed(x, valid, weights, indices)
            if self.training:
                y = self._with_balance_loss(y, x, indices, segments, valid)
            return y.view(shape)

        def _routed(self, x, valid, weights, indices):
            """The experts' output for every token. Under tp every tp rank holds the same tokens (and ran the
            router on all of them): each sends its 1/tp of them into the ep dispatch, so every token reaches its
            experts once, and the outputs are gathered back over tp. Backward: each rank's token slice gets its
            gradient there and the slices are gathered over tp, so the replicated input, routing weights and
            router get the whole gradient on every tp rank, as any replicated activation under TP does."""
            group = self.tp_group
            if group is None:
                return self.experts(x, valid, weights, indices)
            n, tp = x.shape[0], dist.get_world_size(group)
            pad = -n % tp  # padding tokens: not valid, routed nowhere
            x, valid, weights, indices = (_pad_rows(t, pad) for t in (x, valid, weights, indices))
            mine = valid.chunk(tp)[dist.get_rank(group)], indices.chunk(tp)[dist.get_rank(group)]
            y = self.experts(keep_my_rows(x, group), mine[0], keep_my_rows(weights, group), mine[1])
            return gather_rows(y, group)[:n]

        def _with_balance_loss(self, y, x, indices, segments, valid):
            probs = F.linear(x, self.gate.weight.to(x.dtype)).float().softmax(-1)  # the Gate's own scores
            n_experts, k = self.n_routed_experts, indices.shape[-1]
            rows, width = segments.shape
            cp = 1 if self.cp_group is None else dist.get_world_size(self.cp_group)
            slots = width * cp  # more than any row's sequence count, identical on every cp rank
            # padding tokens go to a spare slot past every sequence, dropped after the sums (no boolean indexing:
            # its output size would have to be read on the host)
            key = (torch.arange(rows, device=x.device)[:, None] * slots + segments.clamp(min=0)).reshape(-1)
            key = torch.where(valid, key, rows * slots)
            routed = F.one_hot(indices, n_experts).sum(1).float() * valid[:, None]  # [T, E], 0 for padding
            counts = torch.zeros(rows * slots + 1, 1 + n_experts, device=x.device).index_add_(
                0, key, torch.cat([torch.ones_like(routed[:, :1]), routed], 1))[:-1]
            psum = torch.zeros(rows * slots + 1, n_experts, device=x.device).index_add(0, key, probs)[:-1]
            if cp > 1:
                dist.all_reduce(counts, group=self.cp_group)
                psum = sum_over_cp(psum, self.cp_group)
            tokens = counts[:, :1].clamp(min=1)
            f = counts[:, 1:] * n_experts / (k * tokens)
            aux = (f * psum / tokens).sum() * self.aux_scale
            if torch._C._current_graph_task_id() == -1:  # not an activation-checkpointing recompute (in backward)
                self.aux_sum += aux.detach().double()
                self.load += routed.sum(0).double()
            return AddAuxGrad.apply(y, aux) if self.aux_scale else y

    return BalancedMoE


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros((rows, *tensor.shape[1:]))]) if rows else tensor


class AddAuxGrad(torch.autograd.Function):
    """Identity on the layer output; in backward the auxiliary loss gets gradient 1 (it is already divided by the
    global sequence count, like the main loss by the global token count), as nemo's MoEAuxLossAutoScaler."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


# ---------------------------------------------------------------- building


def build_moe_model(hf_model: nn.Module) -> nn.Module:
    """Swap every HF sparse MoE block of `hf_model` for nemo's MoE holding the same weights (in place)."""
    config = hf_model.config
    cls, cfg, be = _balanced_moe_class(), moe_config(config), backend()
    for layer in hf_model.model.layers:
        block = layer.mlp
        if not hasattr(block, "experts"):
            continue  # a dense layer (mlp_only_layers, decoder_sparse_step)
        moe = cls(cfg, be)
        moe.setup(float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0))
        with torch.no_grad():
            moe.gate.weight.copy_(block.gate.weight)
            moe.experts.gate_and_up_projs.copy_(block.experts.gate_up_proj.transpose(1, 2))
            moe.experts.down_projs.copy_(block.experts.down_proj.transpose(1, 2))
        if not torch.cuda.is_available():
            moe.experts.expert_activation_grouped = weighted_swiglu
        use_local_dispatch(moe.experts)
        layer.mlp = moe
    # the inner model's forward receives every model kwarg (also as a pipeline stage, whose patched forward
    # calls decoder layers without them): hand the token -> sequence map to its MoE layers from there
    hf_model.model.register_forward_pre_hook(_hand_segments, with_kwargs=True)
    hf_model.model.moe_config = cfg  # nemo's MoE parallelizer reads it (experts divisible by ep)
    return hf_model


def parallelize_moe(model: nn.Module, ctx) -> nn.Module:
    """nemo's MoE parallelizer (EP over ctx.moe_mesh's `ep`, FSDP2 of experts over `ep_shard`, the rest over the
    dense data ranks) as nemo's own dispatcher calls it, but without its context parallelism: the handle shards
    rows over cp and runs the packed attention itself (parallel/context_parallel.py), while nemo's `apply_cp`
    would swap in Transformer Engine attention (CUDA only)."""
    from nemo_automodel.components.distributed.config import MoEParallelizerConfig
    from nemo_automodel.components.moe.parallelizer import parallelize_model as parallelize_moe_model

    from automodel_mimo.models.tp_plan import tp_plan

    moe, strategy = MoEParallelizerConfig(), ctx.strategy_config
    reshard = strategy.reshard_after_forward if strategy.reshard_after_forward is not None else moe.reshard_after_forward
    tp = ctx.device_mesh["tp"]
    plan = strategy.tp_plan or (tp_plan(model, tp.size()) if tp.size() > 1 else None)
    parallelize_moe_model(
        model, world_mesh=ctx.device_mesh, moe_mesh=ctx.moe_mesh, activation_checkpointing=ctx.activation_checkpointing,
        ignore_router_for_ac=moe.ignore_router_for_ac, reshard_after_forward=reshard, lm_head_precision=moe.lm_head_precision,
        wrap_outer_model=moe.wrap_outer_model, mp_policy=strategy.mp_policy, tp_shard_plan=plan,
        sequence_parallel=strategy.sequence_parallel, **{**ctx.parallelize_axis_kwargs(), "cp_axis_name": None})
    if tp.size() > 1:  # each token into the ep dispatch once (BalancedMoE._routed)
        for layer in moe_layers([model]):
            layer.tp_group = tp.get_group()
    return model


def weighted_swiglu(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """nemo's weighted SwiGLU (gate half, then up half; times the routing weight), eager."""
    gate, up = y.chunk(2, -1)
    return (F.silu(gate) * up * weights).to(y.dtype)


def _hand_segments(model: nn.Module, args, kwargs):
    for layer in moe_layers([model]):
        layer.segments = kwargs.get(SEGMENTS)


def moe_layers(parts: list[nn.Module]) -> list[nn.Module]:
    return [m for part in parts for m in part.modules() if hasattr(m, "aux_scale")]


HF_EXPERTS = {"mlp.experts.gate_and_up_projs": "mlp.experts.gate_up_proj", "mlp.experts.down_projs": "mlp.experts.down_proj"}


def hf_named(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A parameter under transformers' Qwen3-MoE name and layout: nemo's experts are [E, in, out], transformers'
    [E, out, in] (a transposed view; a DTensor keeps its sharding); every other tensor as it is."""
    for ours, theirs in HF_EXPERTS.items():
        if name.endswith(ours):
            return name[: -len(ours)] + theirs, value.transpose(1, 2)
    return name, value


def to_hf_state(state: dict) -> dict:
    """A state dict under transformers' names and layout (the HF export; a no-op for dense models)."""
    return dict(hf_named(name, value) for name, value in state.items())


def from_hf_state(state: dict) -> dict:
    """`to_hf_state`'s inverse: an HF folder's tensors (e.g. a DPO reference) under the model's own names and layout."""
    out = dict(state)
    for name, value in state.items():
        for ours, theirs in HF_EXPERTS.items():
            if name.endswith(theirs):
                del out[name]
                out[name[: -len(theirs)] + ours] = value.transpose(1, 2)
    return out


# ---------------------------------------------------------------- sequences of a whole-row microbatch


def token_segments(mb: dict) -> torch.Tensor:
    """[B, S] sequence index of every token of a whole-row microbatch (before cp sharding), -1 for padding:
    a padded row is one sequence; a packed row's sequences come from `seq_index` (or `cu_seqlens`)."""
    ids = mb["input_ids"]
    segments = torch.full_like(ids, -1)
    if "seq_index" in mb:  # [R, K, L] row position of each token of slot k
        index = mb["seq_index"]
        slot = torch.arange(index.shape[1], device=ids.device)[None, :, None].expand_as(index)
        rows = torch.arange(index.shape[0], device=ids.device)[:, None, None].expand_as(index)
        keep = index >= 0
        segments[rows[keep], index[keep]] = slot[keep]
    elif "cu_seqlens" in mb:  # one segment per row (cp-ready padded rows): real tokens first
        real = mb["cu_seqlens"][:, -1]
        segments[torch.arange(ids.shape[1], device=ids.device)[None] < real[:, None]] = 0
    elif "attention_mask" in mb:
        segments[mb["attention_mask"].bool()] = 0
    else:
        segments.zero_()
    return segments


def sequence_count(mb: dict) -> int:
    """Sequences with at least one real token."""
    segments = token_segments(mb)
    rows = torch.arange(segments.shape[0], device=segments.device)[:, None].expand_as(segments)
    keys = rows[segments >= 0] * segments.shape[1] + segments[segments >= 0]
    return int(keys.unique().numel())


# ---------------------------------------------------------------- what a handle does for an MoE model


class RouterBalance:
    """The handle's side of the balance loss: marks each microbatch's sequences, sets the global sequence count
    before a step, and reduces the step's router metrics (aux loss, expert load) over every rank."""

    def __init__(self, layers: list[nn.Module], state):
        self.layers, self.state = layers, state

    @classmethod
    def of(cls, parts: list[nn.Module], state) -> "RouterBalance | None":
        layers = moe_layers(parts)
        return cls(layers, state) if layers else None

    def prepare(self, microbatches: list[dict], data_group, cp_group, rows_of=lambda mb: mb) -> list[dict]:
        """Each microbatch with its token -> sequence map (SEGMENTS); the aux scale coeff / global sequences.
        `rows_of(mb)`: the rows of `mb` this rank's model runs (a MIMO LLM slot's share under a fan-out), whose
        sequences the count over `data_group` takes."""
        out = [{**mb, SEGMENTS: token_segments(mb)} for mb in microbatches]
        local = torch.tensor([float(sum(sequence_count(rows_of(mb)) for mb in microbatches))], dtype=torch.float64,
                             device=self.state.device)
        dist.all_reduce(local, group=data_group)
        for layer in self.layers:
            layer.aux_scale = layer.aux_coeff / max(float(local), 1.0)
            layer.cp_group = cp_group
            layer.reset_stats()
        return out

    def metrics(self, stage_group) -> dict:
        """moe_aux_loss (summed over layers), moe_load_imbalance (max expert tokens / mean, worst layer; 1 is
        balanced) and moe_idle_experts (experts no token reached, summed over layers), over the global batch."""
        device = self.state.device
        aux = torch.stack([layer.aux_sum for layer in self.layers]).sum().reshape(1).to(device)
        load = torch.stack([layer.load for layer in self.layers]).to(device)
        dist.all_reduce(aux, group=self.state.dp_group)  # cp ranks hold every sequence's whole aux term
        dist.all_reduce(load, group=self.state.dp_cp_group)  # each token is counted on one rank
        imbalance = (load.max(1).values / load.mean(1).clamp(min=1e-9)).max().reshape(1)
        idle = (load == 0).sum().double().reshape(1)
        if stage_group is not None:  # pipeline stages hold different layers
            dist.all_reduce(aux, group=stage_group)
            dist.all_reduce(idle, group=stage_group)
            dist.all_reduce(imbalance, op=dist.ReduceOp.MAX, group=stage_group)
        return {"moe_aux_loss": float(aux), "moe_load_imbalance": float(imbalance), "moe_idle_experts": int(idle)}
