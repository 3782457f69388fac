"""LMPolicy: the training-side worker of one causal LM — train steps, logprobs, reference logprobs,
greedy generation.

It owns the optimizer and LR schedule and talks to the model only through ModelHandle, so the same
policy drives a plain module and pipeline stages, with or without context parallelism. Every method is collective: all ranks call it
with their own data-parallel share of the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from automodel_mimo.config import TrainConfig
from automodel_mimo.data.packing import per_sequence, to_sequences
from automodel_mimo.distributed.equal_steps import equal_step_count, weightless
from automodel_mimo.distributed.grad_norm import clip_grads, global_grad_norm
from automodel_mimo.distributed.mesh import ParallelState
from automodel_mimo.distributed.nonfinite import skip_step
from automodel_mimo.losses import masked_nll, token_logprobs
from automodel_mimo.metrics import combine_metrics
from automodel_mimo.models.handle import ModelHandle
from automodel_mimo.optim import PartOptimizers
from automodel_mimo.parallel.context_parallel import cp_attention, gather_to_original_order
from policies.reference import ReferenceWeights

# loss_fn(logprobs, microbatch) -> (loss, metrics): logprobs [B, S] of whole rows (context-parallel shards
# gathered back in row order) and the microbatch with `loss_mask` in the same whole-row layout; for a packed
# microbatch (one with `seq_index`), one row per sequence slot [R*K, L] and its side data flattened to match.
LogprobLossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


class LMPolicy:
    def __init__(self, handle: ModelHandle, state: ParallelState, cfg: TrainConfig):
        self.handle, self.state, self.cfg = handle, state, cfg
        self.optimizer = PartOptimizers(handle.parts, cfg)
        self.reference: ReferenceWeights | None = None

    def sum_over_data_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(self.state.device, torch.float64)
        dist.all_reduce(value, group=self.state.dp_cp_group)
        return value

    # ------------------------------------------------------------ training
    def sft_forward_backward(self, microbatches: list[dict]) -> dict:
        """Accumulate gradients of the global-batch mean NLL; returns the global loss and token count."""
        local_tokens = sum(mb["loss_mask"].sum() for mb in microbatches)
        global_tokens = self.sum_over_data_ranks(torch.as_tensor(local_tokens)).clamp(min=1).float()

        def loss_fn(logits: torch.Tensor, mb: dict):
            loss = masked_nll(token_logprobs(logits, mb["labels"]), mb["loss_mask"], global_tokens)
            return loss, {"loss": loss.detach()}

        self.handle.train()
        with cp_attention(self.state.cp_group):  # microbatches arrive sharded over cp
            per_mb = self.handle.forward_backward(microbatches, loss_fn)
        local = torch.tensor([sum(float(m["loss"]) for m in per_mb),
                              sum(real_tokens(mb) for mb in microbatches)], dtype=torch.float64)
        loss, tokens = self.sum_over_data_ranks(local).tolist()
        # cp ranks share rows and each counts the whole row's tokens (cu_seqlens are not sharded)
        return {"loss": loss, "tokens": int(tokens) // self.state.cp_size, "loss_tokens": int(global_tokens)}

    def forward_backward(self, microbatches: list[dict], loss_fn: LogprobLossFn, temperature: float = 1.0) -> dict:
        """Accumulate gradients of loss_fn over this rank's microbatches; returns the metrics reduced over
        all data ranks (docs/numerics.md: shares summed, `*_min`/`*_max` by min/max).

        loss_fn sees whole rows: under cp, the per-token logprobs are gathered to the original order (their
        backward hands each rank its own slice) and `loss_mask` is replaced by its whole-row version; any
        other per-token side data (old / reference logprobs) must already be in whole-row order, as
        `logprobs()` returns it. Every cp rank then computes the same loss, so metrics are divided by cp.
        A packed microbatch (with `seq_index`) is seen as one sequence per row (data/packing.py
        `per_sequence`): logprobs and loss_mask [R*K, L], side data from slot layout [R, K, ...] flattened,
        so row-based losses (sequence sums, pairs 2i / 2i+1, per-sequence advantages) work unchanged.
        `temperature`: logprobs of logits / temperature (the distribution RL rollouts were sampled from).
        """
        group = self.state.cp_group if self.state.cp_size > 1 else None

        def on_logits(logits: torch.Tensor, mb: dict):
            lp = _scaled_logprobs(logits, mb["labels"], temperature)
            if group is not None:
                lp = gather_to_original_order(lp, mb["cu_seqlens_padded"], group)
                mb = {**mb, "loss_mask": self.whole_rows(mb["loss_mask"], mb)}
            if "seq_index" in mb:
                return loss_fn(to_sequences(lp, mb["seq_index"]), per_sequence(mb))
            return loss_fn(lp, mb)

        self.handle.train()
        with cp_attention(group):
            per_mb = self.handle.forward_backward(microbatches, on_logits)
        return self.reduce_metrics(per_mb)

    def reduce_metrics(self, per_mb: list[dict]) -> dict:
        """This rank's per-microbatch metric shares -> global values, identical on every rank."""
        local = combine_metrics(per_mb)
        keys = sorted(local)
        out = {}
        for op, pick in ((dist.ReduceOp.SUM, lambda k: not k.endswith(("_min", "_max"))),
                         (dist.ReduceOp.MIN, lambda k: k.endswith("_min")), (dist.ReduceOp.MAX, lambda k: k.endswith("_max"))):
            names = [k for k in keys if pick(k)]
            if not names:
                continue
            values = torch.tensor([local[k] for k in names], dtype=torch.float64, device=self.state.device)
            dist.all_reduce(values, op=op, group=self.state.dp_cp_group)
            if op == dist.ReduceOp.SUM:
                values = values / self.state.cp_size  # cp ranks computed the same whole-row shares
            out.update(zip(names, values.tolist()))
        return out

    def data_tokens(self, microbatches: list[dict]) -> int:
        """Non-padding tokens of the global batch (every dp rank's microbatches; cp ranks share rows)."""
        local = torch.tensor(sum(real_tokens(mb) for mb in microbatches), dtype=torch.float64)
        return int(self.sum_over_data_ranks(local)) // self.state.cp_size

    def whole_rows(self, values: torch.Tensor, mb: dict) -> torch.Tensor:
        """Per-token values of this rank's cp shard -> whole rows in original order (no gradient)."""
        if self.state.cp_size == 1:
            return values
        with torch.no_grad():
            return gather_to_original_order(values.float(), mb["cu_seqlens_padded"], self.state.cp_group)

    def sequence_mask(self, mb: dict) -> torch.Tensor:
        """`loss_mask` in the layout `logprobs()` returns: whole rows [B, S], or [R, K, L] sequence slots."""
        return _in_slots(self.whole_rows(mb["loss_mask"], mb), mb)

    def global_counts(self, microbatches: list[dict]) -> dict:
        """Global denominators over every microbatch of every dp x cp rank (each at least 1): loss-bearing
        `tokens`, `seqs` (sequences with a loss token), `pairs` ((chosen, rejected) sequences 2i, 2i+1 both
        with loss tokens) and `chosen_tokens` (loss tokens of those pairs' chosen sequences). Sequences are
        rows, or a packed microbatch's sequence slots."""
        counts = torch.zeros(4, dtype=torch.float64)
        for mb in microbatches:
            per_row = self.sequence_mask(mb).flatten(0, -2).sum(-1).double().cpu()
            pair = (per_row[0::2] > 0) & (per_row[1::2] > 0) if per_row.shape[0] % 2 == 0 else per_row[:0] > 0
            counts += torch.stack([per_row.sum(), (per_row > 0).sum(), pair.sum(), (per_row[0::2] * pair).sum()])
        # each cp rank counted the same whole rows
        total = self.sum_over_data_ranks(counts / self.state.cp_size)
        return dict(zip(("tokens", "seqs", "pairs", "chosen_tokens"), total.clamp(min=1).float()))

    def optimizer_step(self, loss: float | None = None) -> dict:
        """Global grad norm (before clipping), clip, step, advance the LR schedule; or, when the norm or `loss`
        is inf/NaN on any rank, skip the step on every rank (distributed/nonfinite.py: weights and moments
        unchanged, the schedule still advances). The gradients are zeroed either way."""
        params = self.handle.parameters()
        grad_norm = global_grad_norm(params, self.state.device, extra_group=self.handle.stage_group)
        skipped = skip_step(grad_norm, loss)
        lr = self.optimizer.lr
        if skipped:
            self.optimizer.skip()
        else:
            if self.cfg.grad_clip > 0:
                clip_grads(params, self.cfg.grad_clip, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad()
        return {"grad_norm": float(grad_norm), "lr": lr, "skipped": int(skipped)}

    def sft_train_step(self, microbatches: list[dict]) -> dict:
        self.optimizer.zero_grad()
        metrics = self.sft_forward_backward(microbatches)
        metrics.update(self.optimizer_step(metrics["loss"]))
        return metrics

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def logprobs(self, microbatches: list[dict], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token logprobs of each microbatch's labels, [B, S] fp32 whole rows (cp shards gathered back
        to the original order), 0 where labels are ignored; on every rank, for this rank's rows. For a
        packed microbatch, in sequence slots [R, K, L] (`sequence_mask` layout): side data for the loss.
        `temperature`: logprobs of logits / temperature."""
        group = self.state.cp_group if self.state.cp_size > 1 else None

        def capture(logits: torch.Tensor, mb: dict) -> torch.Tensor:
            lp = _scaled_logprobs(logits, mb["labels"], temperature)
            lp = gather_to_original_order(lp, mb["cu_seqlens_padded"], group) if group is not None else lp
            return _in_slots(lp, mb)

        def row_shape(mb: dict) -> tuple:
            return tuple(mb["seq_index"].shape[1:]) if "seq_index" in mb else (mb["input_ids"].shape[1] * self.state.cp_size,)

        n = len(microbatches)  # every data rank runs the same number of passes (FSDP collectives)
        padded = equal_step_count(list(microbatches), weightless(microbatches[0]), self.state.dp_cp_group, self.state.device)
        self.handle.eval()
        with cp_attention(group):
            out = [self.handle.forward_capture(mb, capture, row_shape(mb), torch.float32) for mb in padded]
        self.handle.reshard()  # parameters written after this pass (optimizer, swap) must not meet stale gathers
        self.handle.train()
        return out[:n]

    def init_reference(self, full_state: dict | None = None) -> ReferenceWeights:
        """Freeze the reference policy: the current weights, or `full_state` (full tensors, e.g. another
        checkpoint). Kept in CPU memory as this rank's shards; see policies/reference.py."""
        self.reference = (ReferenceWeights(self.handle) if full_state is None
                          else ReferenceWeights.from_full_state_dict(self.handle, full_state))
        return self.reference

    def reference_logprobs(self, microbatches: list[dict], temperature: float = 1.0) -> list[torch.Tensor]:
        """`logprobs()` under the reference weights (swapped in and back out)."""
        if self.reference is None:
            raise RuntimeError("reference_logprobs needs init_reference() first")
        with self.reference.swapped_in():
            return self.logprobs(microbatches, temperature)

    @torch.no_grad()
    def greedy_generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int) -> list[list[int]]:
        """Greedy continuations of this rank's prompts, stopping at any of `stop_ids`.

        Every rank runs the same number of forward passes (FSDP and TP collectives are shared): the loop
        ends when no rank has an unfinished prompt. No KV cache: each step re-runs the whole prefix, which
        is cheap for the short answers evaluated during training.
        """
        self.handle.eval()
        device = self.state.device
        width = max((len(p) for p in prompts), default=1)
        ids = torch.full((max(1, len(prompts)), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding keeps every prompt's last token in the last column
            ids[i, width - len(p):] = torch.as_tensor(p, device=device)
            mask[i, width - len(p):] = 1
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        done[len(prompts):] = True
        stops = torch.as_tensor(sorted(stop_ids), device=device)
        out = []
        for _ in range(max_new_tokens):
            unfinished = (~done).any().to(torch.int32)
            dist.all_reduce(unfinished, op=dist.ReduceOp.MAX)
            if not unfinished:
                break
            batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
            nxt = self.handle.forward_capture(batch, _last_position_argmax, (), torch.long)
            nxt = torch.where(done, pad_id, nxt)
            out.append(nxt)
            done |= torch.isin(nxt, stops)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        self.handle.reshard()  # as after logprobs(): a later in-place write (reference swap) must not meet gathers
        self.handle.train()
        tokens = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
        return [_until_stop(t, stop_ids) for t in tokens[: len(prompts)]]


def _scaled_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token logprobs of `labels` under logits / temperature (the distribution rollouts were sampled from)."""
    return token_logprobs(logits if temperature == 1.0 else logits / temperature, labels)


def _in_slots(values: torch.Tensor, mb: dict) -> torch.Tensor:
    """Whole-row per-token values as a packed microbatch's sequence slots [R, K, L]; unchanged if unpacked."""
    if "seq_index" not in mb:
        return values
    return to_sequences(values, mb["seq_index"]).view(mb["seq_index"].shape)


def real_tokens(batch: dict) -> float:
    """Non-padding tokens of a padded (attention_mask) or packed (cu_seqlens) batch."""
    if "cu_seqlens" in batch:
        return float(batch["cu_seqlens"][:, -1].sum())
    return float(batch["attention_mask"].sum())


def _last_position_argmax(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    last = logits[:, -1]
    if isinstance(last, DTensor):  # vocab-sharded under TP: gather one position only
        last = last.full_tensor()
    return last.argmax(-1)


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens
