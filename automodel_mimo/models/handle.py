"""ModelHandle: one model seen the same way whether it is one nn.Module, pipeline stages or a MIMO model.

Code above a handle (policies, algorithms, checkpointing, export) never asks "is this pipelined, context
parallel, packed, multimodal?". It hands a handle whole-row microbatches (padded or packed rows, text and
images) and gets back what a loss needs:

  forward_backward(mbs, loss_fn, temperature)  loss_fn(logprobs, view) per microbatch, gradients accumulated;
                                               logprobs/view are whole rows (or one sequence per row, packed)
  logprobs(mbs, temperature)                   per-token logprobs of the same layout, on every rank
  next_tokens(batch, lengths, banned)          greedy next token of each generated row, on every rank
  data_block() / data_group / loss_view(mb)    which rows of the global batch this rank holds, the group over
                                               which the rows a loss sees partition it, and those rows
  grad_norm(), parts, part_names               the optimizer's view (one optimizer per part)
  state_dict() / full_state_dict() / write_hf  checkpoints (unsplit names) and the Hugging Face export

The handle owns context parallelism (it shards each row over cp, runs attention under `cp_attention`, gathers
logprobs back to whole rows) and the packed view (`models/loss_view.py`). `ModelHandle` is one module;
`PipelineModelHandle` AutoPipeline parts driven by `parallel/pipeline_parallel.py`; the MIMO model's handle is
`mimo/handle.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from automodel_mimo.distributed.equal_steps import equal_step_count, weightless
from automodel_mimo.distributed.grad_norm import global_grad_norm
from automodel_mimo.distributed.mesh import ParallelState
from automodel_mimo.models.loss_view import in_slots, row_logprobs, slot_shape, whole_rows
from automodel_mimo.models.moe import SEGMENTS, RouterBalance, from_hf_state, hf_named, is_moe, to_hf_state
from automodel_mimo.models.names import canonical_name
from automodel_mimo.models.packed_attention import varlen_kwargs
from automodel_mimo.parallel.context_parallel import cp_attention, shard_batch

# loss_fn(logprobs, view) -> (loss to backpropagate, metrics of this microbatch): models/loss_view.py
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]
# capture_fn(logits, batch) -> one value row per batch row
CaptureFn = Callable[[torch.Tensor, dict], torch.Tensor]

# What the model is called with. No attention_mask: rows are right-padded (data/batching.py) and attention is
# causal, so no real token ever sees a pad; the mask would only change the pad positions' outputs, which carry no
# loss, and without it SDPA runs its causal kernel (cuDNN on Hopper: the padded step 1.20x faster, docs/benchmarks.md).
MODEL_INPUTS = ("input_ids", "position_ids", SEGMENTS)


def at_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, V] full-vocabulary logits of row b at positions[b]; a vocab-sharded DTensor (TP) is gathered for
    those positions only."""
    local = logits.to_local() if isinstance(logits, DTensor) else logits
    picked = local[torch.arange(local.shape[0], device=local.device), positions.to(local.device)]
    if isinstance(logits, DTensor):
        vocab = [Shard(picked.dim() - 1) if p.is_shard() else p for p in logits.placements]
        picked = DTensor.from_local(picked, logits.device_mesh, vocab).full_tensor()
    return picked


class Handle:
    """What every handle shares: the model's parts (modules holding parameters: the one module, this rank's
    pipeline stages, a MIMO model's modules) and what follows from them alone. Subclasses provide the data
    layout, the compute and the state of the interface above."""

    parts: list[nn.Module]
    stage_group: dist.ProcessGroup | None = None  # pipeline stages to sum gradient norms over
    part_names: list[str] | None = None  # prefixes of each part's state keys; None: names are unique already

    def train(self) -> "Handle":
        for part in self.parts:
            part.train()
        return self

    def eval(self) -> "Handle":
        for part in self.parts:
            part.eval()
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def num_parameters(self) -> int:
        """Whole-model parameter count (DTensor numel is global; pipeline stages are summed)."""
        return count_over(self.parameters(), self.stage_group, self.device)

    def reshard(self) -> None:
        """Drop the full parameters FSDP gathered for a forward. A forward without a backward (inference)
        leaves some gathered (the root, or every layer under pp), and the next forward would reuse them
        instead of the shards: call this before writing parameters in place (reference swap, refit)."""
        for part in self.parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    @property
    def router(self) -> RouterBalance | None:
        """A mixture-of-experts model's router side (balance loss, expert load); None for a dense model."""
        if not hasattr(self, "_router"):
            self._router = RouterBalance.of(self.parts, self.router_state)
        return self._router

    @property
    def router_state(self) -> ParallelState | None:
        """The parallel state of the model holding the MoE layers (its dp/cp groups reduce the router metrics)."""
        return getattr(self, "state", None)

    def _balanced(self, microbatches: list[dict]) -> list[dict]:
        """MoE: each microbatch with its token -> sequence map and the step's global sequence count set."""
        if self.router is None:
            return microbatches
        return self.router.prepare(microbatches, self.data_group, self.cp_group, self.loss_view)

    def step_metrics(self) -> dict:
        """Global metrics of the last forward_backward beyond the loss's own (MoE: router metrics)."""
        return {} if self.router is None else self.router.metrics(self.stage_group)

    def set_gradient_sync(self, enabled: bool) -> None:
        """FSDP reduce-scatters gradients only when enabled: on the last microbatch of a step."""
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(enabled)


class ModelHandle(Handle):
    """One causal LM: a parallelized module (FSDP2, TP) on this rank's ParallelState."""

    def __init__(self, module: nn.Module, state: ParallelState, pad_id: int = 0, pad_multiple: int = 1):
        self.parts: list[nn.Module] = [module]
        self.state, self.device, self.pad_id = state, state.device, pad_id
        self.pad_multiple = pad_multiple  # packed sequences' padding: 2 * cp (x tp under sequence parallelism)

    @property
    def config(self):
        return self.parts[0].config

    # ------------------------------------------------------------ data layout
    def data_block(self) -> tuple[int, int]:
        """(index, count) of this rank's block of the global batch."""
        return self.state.dp_rank, self.state.dp_size

    @property
    def data_group(self) -> dist.ProcessGroup:
        """The ranks whose `loss_view`s partition the global batch (tp and cp ranks hold the same rows)."""
        return self.state.dp_group

    @property
    def cp_size(self) -> int:
        return self.state.cp_size

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.state.cp_group if self.state.cp_size > 1 else None

    def loss_view(self, mb: dict) -> dict:
        """The rows of a whole-row microbatch whose loss this rank computes (all of them for an LM)."""
        return mb

    def generation_rows(self, n_rows: int) -> range:
        """Rows of a generation batch whose next tokens this rank computes."""
        return range(n_rows)

    def rows_multiple(self) -> int:
        """A microbatch's row count must be a multiple of this (a MIMO fan-out splits rows over LLM slots)."""
        return 1

    def _shard(self, mb: dict) -> dict:
        return shard_batch(mb, self.state.cp_size, self.state.cp_rank)  # no-op without cp

    # ------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's own names (activation-checkpointing wrappers left out: see models/names.py)."""
        for part in self.parts:
            for name, param in part.named_parameters():
                yield canonical_name(name), param

    def generator_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`named_parameters` under transformers' names and layout (what an HF-format generator loads): the same
        for dense models; an MoE model's expert tensors renamed and transposed (views)."""
        for name, param in self.named_parameters():
            yield hf_named(name, param)

    def serve_generator(self, export: Path, images: bool = True) -> Path:
        """The folder the generator loads from the HF export `export`; `images=False`: a generator without image
        inputs. A causal LM: the export itself, either way."""
        return export

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of every gradient, identical on every rank."""
        return global_grad_norm(self.parameters(), self.device, extra_group=self.stage_group)

    # ------------------------------------------------------------ compute
    def _logits(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        inputs.update(varlen_kwargs(self.parts[0], inputs, self.cp_size))
        return self.parts[0](**inputs, use_cache=False).logits

    def _equalized(self, microbatches: list[dict]) -> list[dict]:
        """Weight-0 dummies until every data rank runs as many passes (FSDP's collectives are paired)."""
        return equal_step_count(microbatches, weightless(microbatches[0]), self.state.dp_cp_group, self.device)

    def forward_backward(self, microbatches: list[dict], loss_fn: LossFn, temperature: float = 1.0) -> list[dict]:
        """Forward, loss and backward of each microbatch in turn; gradients accumulate in the parameters.
        FSDP reduce-scatters gradients only after the last microbatch (earlier ones accumulate unsharded)."""
        self.train()
        metrics = []
        microbatches = self._equalized(self._balanced(microbatches))
        with cp_attention(self.cp_group):
            for i, mb in enumerate(microbatches):
                self.set_gradient_sync(i == len(microbatches) - 1)
                shard = self._shard(mb)
                loss, m = loss_fn(*whole_rows(self._logits(shard), shard, temperature, self.cp_group))
                loss.backward()
                metrics.append(m)
        return metrics

    @torch.no_grad()
    def forward_capture(self, batch: dict, capture_fn: CaptureFn, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """capture_fn(logits, batch): one row of `row_shape`/`dtype` per batch row, on every rank."""
        return capture_fn(self._logits(batch), batch)

    @torch.no_grad()
    def logprobs(self, microbatches: list[dict], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token logprobs of each microbatch's labels (logits / temperature), fp32, 0 where labels are
        ignored: [B, S] whole rows, or sequence slots [R, K, L] for a packed microbatch; on every rank."""
        n = len(microbatches)
        self.eval()
        out = []
        with cp_attention(self.cp_group):
            for mb in self._equalized(list(microbatches)):
                shard = self._shard(mb)

                def capture(logits: torch.Tensor, batch: dict) -> torch.Tensor:
                    return in_slots(row_logprobs(logits, batch, temperature, self.cp_group), batch)

                out.append(self.forward_capture(shard, capture, slot_shape(mb), torch.float32))
        self.reshard()  # parameters written after this pass (optimizer, swap) must not meet stale gathers
        self.train()
        return out[:n]

    @torch.no_grad()
    def next_tokens(self, batch: dict, lengths: torch.Tensor, banned: int | None = None) -> torch.Tensor:
        """Greedy next token of every row of a right-padded batch, read at each row's last real token
        (`lengths` - 1), `banned` never chosen; on every rank. Rows are not sharded over cp: a generation
        step is one short pass per token."""

        def pick(logits: torch.Tensor, b: dict) -> torch.Tensor:
            last = at_positions(logits, b["lengths"] - 1)
            if banned is not None:
                last[:, banned] = -torch.inf
            return last.argmax(-1)

        return self.forward_capture({**batch, "lengths": lengths}, pick, (), torch.long)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Sharded model state keyed by the unsplit model's names (DCP save/load of it reshards freely)."""
        merged = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))

    def full_state_dict(self) -> dict:
        """Full tensors on CPU (collective: every rank calls it; rank 0 gets the values)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.parts[0], options=options)

    def load_full_state_dict(self, state: dict) -> None:
        """Copy full (unsharded) tensors into this rank's shards; every rank passes the same values."""
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def hf_state(self, folder: str, field: str) -> dict:
        """The full tensors of the HF folder `folder` (named by config `field`) under this handle's state keys
        (`load_full_state_dict`'s), e.g. a DPO reference: the causal LM's own."""
        state = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        # an MoE model: nemo's expert names and layout (a non-strict load would skip transformers' expert tensors)
        return from_hf_state(state) if is_moe(self.config) else state

    def write_hf(self, state: dict, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
        """Rank 0: the causal LM with `state` (full tensors) and the tokenizer, as a transformers folder."""
        config = self.config
        config.use_cache = True
        state = {k: v.contiguous() for k, v in to_hf_state(state).items()}  # MoE: transformers' expert layout
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        config.use_cache = False


class PipelineModelHandle(ModelHandle):
    """AutoPipeline parts of this rank's stage(s), driven through the schedule."""

    def __init__(self, driver, config, state: ParallelState, pad_id: int = 0, pad_multiple: int = 1):
        super().__init__(None, state, pad_id, pad_multiple)
        self.driver = driver
        self.parts = list(driver.info.model_parts)
        self.stage_group = driver.pp_group
        self._config = config

    @property
    def config(self):
        return self._config

    def forward_backward(self, microbatches: list[dict], loss_fn: LossFn, temperature: float = 1.0) -> list[dict]:
        self.train()
        with cp_attention(self.cp_group):
            return self.driver.forward_backward(
                [self._shard(mb) for mb in self._balanced(microbatches)],
                lambda logits, shard: loss_fn(*whole_rows(logits, shard, temperature, self.cp_group)))

    @torch.no_grad()
    def forward_capture(self, batch: dict, capture_fn: CaptureFn, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return self.driver.forward_capture(batch, capture_fn, row_shape, dtype)

    def full_state_dict(self) -> dict:
        return stage_full_state(self.parts, self.driver.pp_group)


def count_over(params, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """Elements of `params`, summed over `group` (pipeline stages hold different parameters)."""
    count = torch.tensor(float(sum(p.numel() for p in params)), device=device)
    if group is not None:
        dist.all_reduce(count, group=group)
    return int(count)


def stage_full_state(parts: list[nn.Module], pp_group: dist.ProcessGroup) -> dict:
    """Full tensors of a pipelined model on rank 0 (collective): each stage gathers its own over dp/tp, then the
    stage leaders (the ranks in rank 0's pp group) send theirs to rank 0, one object per stage."""
    local = {}
    for part in parts:
        for name, value in part.state_dict().items():
            local[canonical_name(name)] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
    if 0 not in dist.get_process_group_ranks(pp_group):
        return {}
    gathered = [None] * dist.get_world_size(pp_group) if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0, group=pp_group)
    merged = {}
    for stage_state in gathered or []:
        merged.update(stage_state)
    return merged
