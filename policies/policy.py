"""Policy: the training-side worker of one model behind a ModelHandle (a causal LM, its pipeline stages, or a
MIMO model) — train steps, logprobs, reference logprobs, greedy generation.

It owns the optimizer (optim/handle_optimizer.py) and talks to the model only through the handle, which owns
the layout: pipeline stages, context parallelism, packed rows, the MIMO bridge. Every method is collective:
all ranks call it, each with its own block of the same global batch (`handle.data_block()`), as whole-row
microbatches (data/microbatches.py).

Global denominators (docs/numerics.md): token, sequence and pair counts are taken over the rows each rank's
loss sees (`handle.loss_view`), summed over `handle.data_group` (the ranks among which those rows partition
the global batch), so every loss share is pre-divided by the same global count on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from automodel_mimo.config import TrainConfig
from automodel_mimo.losses import masked_nll
from automodel_mimo.metrics import combine_metrics
from automodel_mimo.models.handle import ModelHandle
from automodel_mimo.models.loss_view import in_slots
from automodel_mimo.optim import HandleOptimizer
from policies.reference import ReferenceWeights

# loss_fn(logprobs, view) -> (loss, metrics): whole rows [B, S] (or one sequence per row [R*K, L] for a packed
# microbatch), `view` the microbatch in the same layout (models/loss_view.py)
LogprobLossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


class Policy:
    def __init__(self, handle: ModelHandle, cfg: TrainConfig):
        self.handle, self.cfg = handle, cfg
        self.optimizer = HandleOptimizer(handle, cfg)
        self.reference: ReferenceWeights | None = None

    def sum_over_data_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """A per-rank quantity of this rank's loss rows, summed over the ranks that hold distinct rows."""
        value = value.detach().to(self.handle.device, torch.float64)
        dist.all_reduce(value, group=self.handle.data_group)
        return value

    # ------------------------------------------------------------ counting
    def sequence_mask(self, mb: dict) -> torch.Tensor:
        """`loss_mask` of this rank's loss rows in the layout `logprobs()` returns: whole rows [B, S], or
        sequence slots [R, K, L] for a packed microbatch."""
        view = self.handle.loss_view(mb)
        return in_slots(view["loss_mask"], view)

    def global_counts(self, microbatches: list[dict]) -> dict:
        """Global denominators over every microbatch of every data rank (each at least 1): loss-bearing
        `tokens`, `seqs` (sequences with a loss token), `pairs` ((chosen, rejected) sequences 2i, 2i+1 both
        with loss tokens) and `chosen_tokens` (loss tokens of those pairs' chosen sequences). Sequences are
        rows, or a packed microbatch's sequence slots. Also `data_tokens` (an int: non-padding tokens).
        One device-to-host copy for all microbatches: each sync here is time the GPU waits for the host."""
        views = [self.handle.loss_view(mb) for mb in microbatches]
        per_mb = [in_slots(v["loss_mask"], v).flatten(0, -2).sum(-1).double() for v in views]
        real = [real_tokens(v).double().to(self.handle.device).view(1) for v in views]
        flat = torch.cat([*per_mb, *real]) if views else torch.zeros(0, dtype=torch.float64)
        host = flat.cpu().split([len(r) for r in per_mb] + [len(views)])
        counts = torch.zeros(5, dtype=torch.float64)
        for per_row in host[:-1]:
            chosen, rejected = (per_row[0::2], per_row[1::2]) if per_row.shape[0] % 2 == 0 else (per_row[:0], per_row[:0])
            pair = (chosen > 0) & (rejected > 0)  # an odd row count holds no pairs (SFT rows, packed slots)
            counts[:4] += torch.stack([per_row.sum(), (per_row > 0).sum(), pair.sum(), (chosen * pair).sum()])
        counts[4] = host[-1].sum()
        total = self.sum_over_data_ranks(counts)
        out = dict(zip(("tokens", "seqs", "pairs", "chosen_tokens"), total[:4].clamp(min=1).float()))
        return {**out, "data_tokens": int(total[4])}

    def reduce_metrics(self, per_mb: list[dict], on_host: bool = True) -> dict:
        """This rank's per-microbatch metric shares -> global values, identical on every rank (docs/numerics.md:
        shares summed over the data ranks, `*_min`/`*_max` by min/max). on_host=False: 0-d device tensors, read
        nowhere yet (no host sync: the optimizer step can be queued behind the backward; `host_values`)."""
        if on_host:
            local = combine_metrics(per_mb)
        else:
            local = {k: _on_device([m[k] for m in per_mb if k in m], k, self.handle.device)
                     for k in sorted({k for m in per_mb for k in m})}
        keys = sorted(local)
        out = {}
        for op, pick in ((dist.ReduceOp.SUM, lambda k: not k.endswith(("_min", "_max"))),
                         (dist.ReduceOp.MIN, lambda k: k.endswith("_min")), (dist.ReduceOp.MAX, lambda k: k.endswith("_max"))):
            names = [k for k in keys if pick(k)]
            if names:
                values = (torch.tensor([local[k] for k in names], dtype=torch.float64, device=self.handle.device)
                          if on_host else torch.stack([local[k] for k in names]))
                dist.all_reduce(values, op=op, group=self.handle.data_group)
                out.update(zip(names, values.tolist() if on_host else values.unbind()))
        return out

    # ------------------------------------------------------------ training
    def forward_backward(self, microbatches: list[dict], loss_fn: LogprobLossFn, temperature: float = 1.0,
                         on_host: bool = True) -> dict:
        """Accumulate gradients of loss_fn over this rank's microbatches; the metrics reduced over all data
        ranks, and the handle's own step metrics (e.g. an MoE router's). `temperature`: logprobs of logits /
        temperature (the distribution RL rollouts were sampled from). on_host: see reduce_metrics."""
        metrics = self.reduce_metrics(self.handle.forward_backward(microbatches, loss_fn, temperature), on_host)
        return {**metrics, **self.handle.step_metrics()}

    def sft_forward_backward(self, microbatches: list[dict], on_host: bool = True) -> dict:
        """Gradients of the global-batch mean NLL; the global loss and token counts."""
        counts = self.global_counts(microbatches)

        def loss_fn(logprobs: torch.Tensor, view: dict):
            loss = masked_nll(logprobs, view["loss_mask"], counts["tokens"])
            return loss, {"loss": loss.detach()}

        metrics = self.forward_backward(microbatches, loss_fn, on_host=on_host)
        return {**metrics, "loss": metrics["loss"], "tokens": counts["data_tokens"], "loss_tokens": int(counts["tokens"])}

    def optimizer_step(self, loss: float | torch.Tensor | None = None, on_host: bool = True) -> dict:
        return self.optimizer.optimizer_step(loss, on_host)

    def sft_train_step(self, microbatches: list[dict]) -> dict:
        """One SFT step. Its metrics stay on the device until the optimizer step is queued and are then read in
        one copy: a read after the backward would idle the GPU while the host launches the norm, clip and
        optimizer kernels (docs/benchmarks.md)."""
        self.optimizer.zero_grad()
        metrics = self.sft_forward_backward(microbatches, on_host=False)
        metrics.update(self.optimizer_step(metrics["loss"], on_host=False))
        return host_values(metrics)

    # ------------------------------------------------------------ inference
    def logprobs(self, microbatches: list[dict], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token logprobs of each microbatch's labels (this rank's loss rows), fp32, 0 where labels are
        ignored: whole rows [B, S], or sequence slots [R, K, L] for a packed microbatch (`sequence_mask`
        layout): side data for a later loss."""
        return self.handle.logprobs(microbatches, temperature)

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
    def greedy_generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int,
                        extra: dict | None = None, banned: int | None = None,
                        rows: int | None = None) -> tuple[range, list[list[int]]]:
        """Greedy continuations of a batch of prompts (every rank of a data block passes the same ones; MIMO
        batches carry their images in `extra`), `banned` never generated. Returns the rows whose tokens this
        rank computed (`handle.generation_rows`: all of them for an LM) and their answers, cut at any stop id.

        Rows are right-padded to prompt + max_new_tokens and each new token is written at its row's own length,
        so positions start at 0 in every row. Every rank runs the same number of forward passes (the layout's
        collectives are shared): the loop ends when no rank has an unfinished row. No KV cache: each step
        re-runs the whole sequence, cheap for the short answers evaluated during training. `rows` pads the batch
        with prompt-less rows (a MIMO fan-out splits rows evenly over the LLM's dp slots)."""
        handle, device = self.handle, self.handle.device
        rows = rows or max(1, len(prompts))
        extra = {k: v.to(device) for k, v in (extra or {}).items()}
        width = max((len(p) for p in prompts), default=1) + max(1, max_new_tokens)
        ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        lengths = torch.ones(rows, dtype=torch.long, device=device)  # a row without a prompt: one pad token
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, device=device)
            lengths[i] = len(p)
        positions = torch.arange(width, device=device).expand(rows, width).contiguous()
        mine = handle.generation_rows(rows)
        done = torch.tensor([r >= len(prompts) for r in mine], dtype=torch.bool, device=device)
        stops = torch.as_tensor(sorted(stop_ids), device=device)
        out = []
        for _ in range(max_new_tokens):
            unfinished = (~done).any().to(torch.int32)
            dist.all_reduce(unfinished, op=dist.ReduceOp.MAX)
            if not unfinished:
                break
            batch = {"input_ids": ids, "attention_mask": (positions < lengths[:, None]).long(), "position_ids": positions,
                     **extra}
            nxt = torch.where(done, pad_id, handle.next_tokens(batch, lengths, banned))
            out.append(nxt)
            live = torch.nonzero(~done).flatten()  # rows still generating take the token (a stop token too)
            mine_lengths = lengths[mine.start:mine.stop]
            ids[mine.start + live, mine_lengths[live]] = nxt[live]
            lengths[mine.start + live] += 1  # other rows belong to sibling ranks: never read here
            done |= torch.isin(nxt, stops)
        handle.reshard()  # as after logprobs(): a later in-place write (reference swap) must not meet gathers
        handle.train()
        tokens = torch.stack(out, 1).tolist() if out else [[] for _ in mine]
        return mine, [until_stop(t, stop_ids) for t in tokens]


def real_tokens(batch: dict) -> torch.Tensor:
    """Non-padding tokens of a padded (attention_mask) or packed (cu_seqlens) batch, as a 0-d tensor (no sync)."""
    if "cu_seqlens" in batch:
        return batch["cu_seqlens"][:, -1].sum()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel())


def until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


def _on_device(values: list, key: str, device: torch.device) -> torch.Tensor:
    """Per-microbatch shares of one metric combined as combine_metrics does, as a 0-d float64 device tensor
    (Python numbers go over without a host sync: non-blocking copy)."""
    stacked = torch.stack([v.detach().to(device, torch.float64).reshape(()) if isinstance(v, torch.Tensor)
                           else torch.tensor(float(v), dtype=torch.float64).to(device, non_blocking=True) for v in values])
    if key.endswith("_min"):
        return stacked.min()
    return stacked.max() if key.endswith("_max") else stacked.sum()


def host_values(metrics: dict) -> dict:
    """`metrics` with every device tensor read into a Python number, all in one device-to-host copy."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].detach().double().reshape(()) for k in keys]).tolist() if keys else []
    out = {**metrics, **dict(zip(keys, values))}
    if "skipped" in out:
        out["skipped"] = int(out["skipped"])
    return out
