"""Pipeline parallelism over nemo-automodel's AutoPipeline: loss adapter, last-stage capture, drivers, helpers.

How a batch crosses the schedule:
- The schedule splits every tensor it gets along dim 0 into microbatches and calls `loss_fn(output, target)`
  once per microbatch on the last stage. We pass as `target` the row ids of the batch, so the loss adapter
  (and the eval capturer) slice their side data (labels, masks, denominators, advantages, ...) by row.
  This is immune to the order and number of calls (shape inference may add calls), unlike a call counter.
- Only the last stage sees outputs: losses/metrics and captured values are broadcast from it over the pp
  group, so every stage returns the same thing.
- The schedule runs a fixed number of rows (`rows_per_step` = micro_batch_size): smaller batches get
  weight-0 rows; larger ones run as several steps, and every data-parallel rank runs the same number of
  steps (an all-reduced max, with weight-0 dummy steps) so FSDP collectives stay paired.
- First-stage inputs (`first_stage_inputs`, MIMO: the bridged image embeddings, one [T, H] per row) are split
  with the rows and reach the first stage as keyword arguments. `forward_backward_with_input_grads` makes each
  step's share a leaf and returns their gradients per microbatch, broadcast from the first stage to every
  stage, so the caller can continue the backward outside the pipeline (MIMO: into the encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from automodel_mimo.data.batching import pad_rows, split_rows
from automodel_mimo.distributed.equal_steps import equal_step_count, weightless
from automodel_mimo.metrics import combine_metrics

SCHEDULE_NAMES = {"1f1b": "1F1B", "interleaved1f1b": "Interleaved1F1B"}
ROW_IDS = "row_ids"

# loss_fn(output, microbatch) -> (loss, metrics); capture_fn(output, microbatch) -> tensor with one row per row
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]
CaptureFn = Callable[[torch.Tensor, dict], torch.Tensor]


# ---------------------------------------------------------------- CPU / gloo compatibility


@contextmanager
def cpu_pipeline_warmup():
    """AutoPipeline's neighbour warm-up (`_warmup_pipeline_stage_neighbors`) ends with
    `torch.cuda.synchronize(stage.device)`, its one CUDA-only call. On CPU stages that call is replaced by a
    no-op for the duration of `build` (the gloo sends before it have already completed); CUDA is untouched."""
    from nemo_automodel.components.distributed.pipelining import functional

    original = functional._warmup_pipeline_stage_neighbors

    def warmup(stage) -> None:
        if stage.device.type == "cuda":
            return original(stage)
        real_sync = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *args, **kwargs: None
        try:
            original(stage)
        finally:
            torch.cuda.synchronize = real_sync

    functional._warmup_pipeline_stage_neighbors = warmup
    try:
        yield
    finally:
        functional._warmup_pipeline_stage_neighbors = original


# ---------------------------------------------------------------- gradient reduction once per optimizer step


@contextmanager
def gradient_sync(stages, enabled: bool):
    """A schedule step ends with `perform_reduce_grad`, which turns FSDP's gradient sync on and reduce-scatters
    every stage's gradients. Over several schedule steps per optimizer step (gradient accumulation) only the last
    needs it: for the others the sync stays off (FSDP then keeps accumulating unsharded gradients and reduces them
    once, as the non-pipelined path does: models/handle.py `set_gradient_sync`), so data-parallel gradient traffic
    is paid once per optimizer step, not once per schedule step."""
    fsdp = [s.submod for s in stages or () if isinstance(s.submod, FSDPModule)]
    if enabled or not fsdp:
        yield
        return
    for module in fsdp:
        original = module.set_requires_gradient_sync
        module.set_requires_gradient_sync = lambda _on, *, recurse=True, _set=original: _set(False, recurse=recurse)
    try:
        yield
    finally:
        for module in fsdp:
            del module.set_requires_gradient_sync  # the class's method again
            module.set_requires_gradient_sync(True)


# ---------------------------------------------------------------- loss adapter and capturer


class PPLossAdapter:
    """The schedule's per-microbatch loss: slices the side data by the row ids it receives as target."""

    def __init__(self, loss_fn: LossFn, batch: dict):
        self.loss_fn, self.batch = loss_fn, batch
        self.metrics: dict[int, dict] = {}  # by first row id: a repeated call cannot double count

    def __call__(self, output: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        loss, metrics = self.loss_fn(output, _rows(self.batch, row_ids))
        self.metrics[int(row_ids[0])] = metrics  # row ids live on the host: reading one is no device sync
        return loss


class LastStageCapture:
    """Eval pseudo-loss: computes `capture_fn` on the last stage's output (e.g. per-token logprobs, next
    tokens), keeps it by row, returns a zero loss. Only the captured values leave the stage, not the logits."""

    def __init__(self, capture_fn: CaptureFn, batch: dict):
        self.capture_fn, self.batch = capture_fn, batch
        self.rows: dict[int, torch.Tensor] = {}

    def __call__(self, output: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        values = self.capture_fn(output, _rows(self.batch, row_ids))
        for i, row in enumerate(row_ids.tolist()):
            self.rows[row] = values[i]
        return output.new_zeros(())

    def stacked(self, n_rows: int) -> torch.Tensor:
        return torch.stack([self.rows[r] for r in range(n_rows)])


def _rows(batch: dict, row_ids: torch.Tensor) -> dict:
    """The rows `row_ids` (a host tensor) of every side-data tensor, wherever it lives."""
    on = {}
    for k, v in batch.items():
        if v.device not in on:
            on[v.device] = row_ids.to(v.device, non_blocking=True)
    return {k: v[on[v.device]] for k, v in batch.items()}


# ---------------------------------------------------------------- batches


# ---------------------------------------------------------------- broadcast from the last stage


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape, dtype, pp_group: dist.ProcessGroup,
                              last_stage_rank: int, device: torch.device) -> torch.Tensor:
    """The last stage's tensor on every stage (others pass None and the expected shape/dtype)."""
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    tensor = tensor.to(device).contiguous()
    dist.broadcast(tensor, src=last_stage_rank, group=pp_group)
    return tensor


def sum_metrics(metrics: list[dict]) -> dict:
    return dict(sorted(combine_metrics(metrics).items()))


def broadcast_metrics(metrics: dict | None, keys: list[str], pp_group, last_stage_rank: int, device) -> dict:
    values = None if metrics is None else torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    values = broadcast_from_last_stage(values, (len(keys),), torch.float64, pp_group, last_stage_rank, device)
    return dict(zip(keys, values.tolist()))


# ---------------------------------------------------------------- drivers


class PipelineDriver:
    """Runs batches through an AutoPipeline schedule: training steps and forward-only capture."""

    def __init__(self, pipeline, rows_per_step: int, pad_id: int, dp_group, pp_group, device: torch.device,
                 first_stage_inputs: tuple[str, ...] = ()):
        self.pipeline, self.rows_per_step, self.pad_id = pipeline, rows_per_step, pad_id
        self.dp_group, self.pp_group, self.device = dp_group, pp_group, device
        self.first_stage_inputs = first_stage_inputs
        ranks = dist.get_process_group_ranks(pp_group)
        self.first_stage_rank, self.last_stage_rank = ranks[0], ranks[-1]
        self._mode: str | None = None

    @property
    def info(self):
        return self.pipeline.info

    def _prepare(self, mode: str, seq_len: int) -> None:
        # Stage buffers are sized per sequence length and differ between eval (no grads) and train:
        # reset them on every length change and every mode switch, or the schedule deadlocks / mis-shapes.
        if mode != self._mode:
            self.pipeline._pp_current_seq_len = None
            self._mode = mode
        self.pipeline.update_seq_len(seq_len)

    def _run(self, batch: dict, adapter, train: bool) -> None:
        info = self.info
        schedule = info.schedule
        schedule._loss_fn = adapter
        args = (batch["input_ids"],) if info.has_first_stage else ()
        kwargs = {k: batch[k] for k in ("position_ids", "moe_segments") if k in batch}  # no mask: handle.MODEL_INPUTS
        if info.has_first_stage:
            kwargs.update({k: batch[k] for k in self.first_stage_inputs if k in batch})
        target = batch[ROW_IDS] if info.has_last_stage else None
        losses = [] if info.has_last_stage else None
        if train:
            schedule.step(*args, target=target, losses=losses, **kwargs)
        else:
            with torch.no_grad():
                schedule.eval(*args, target=target, losses=losses, **kwargs)

    def _chunks(self, batch: dict) -> list[tuple[dict, int]]:
        """(chunk of rows_per_step rows, its real row count) covering `batch`; short chunks get weight-0 rows."""
        n, step = batch["input_ids"].shape[0], self.rows_per_step
        return [(self._padded(split_rows(batch, start, start + step)), min(n - start, step))
                for start in range(0, n, step)]

    def _padded(self, chunk: dict) -> dict:
        chunk = pad_rows(chunk, self.rows_per_step, self.pad_id)
        # on the host: the loss adapter keys metrics by the first row id, and reading a device value would
        # stall the schedule on a sync at every pipeline microbatch
        chunk[ROW_IDS] = torch.arange(self.rows_per_step)
        return chunk

    def _equalized(self, chunks: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        """Weight-0 dummy steps until every data-parallel rank runs the same number of schedule steps."""
        dummy = self._padded(weightless(split_rows(chunks[0][0], 0, 1)))
        return equal_step_count(chunks, (dummy, 0), self.dp_group, self.device)

    def _side_data(self, chunk: dict) -> dict:
        """What the loss / capture slices by row: everything but the first stage's own inputs."""
        return {k: v for k, v in chunk.items() if k not in self.first_stage_inputs}

    def forward_backward(self, microbatches: list[dict], loss_fn: LossFn) -> list[dict]:
        """One schedule step per `rows_per_step` rows of each microbatch. Metrics come from the last stage."""
        return self._train(microbatches, loss_fn, with_input_grads=False)[0]

    def forward_backward_with_input_grads(self, microbatches: list[dict], loss_fn: LossFn,
                                          reduce: bool = True) -> tuple[list[dict], list[dict]]:
        """`forward_backward`, and for each microbatch the gradients of its `first_stage_inputs` (whole
        microbatch, its shape), identical on every stage: the first stage's, broadcast over the pp group.
        `reduce=False`: more calls follow before the optimizer step (MIMO non-colocated: one per microbatch), so
        FSDP keeps accumulating; the step's last call reduces."""
        return self._train(microbatches, loss_fn, with_input_grads=True, reduce=reduce)

    def _train(self, microbatches: list[dict], loss_fn: LossFn, with_input_grads: bool,
               reduce: bool = True) -> tuple[list[dict], list[dict]]:
        steps = [(i, chunk, real) for i, mb in enumerate(microbatches) for chunk, real in self._chunks(mb)]
        per_step, grads = [], [dict() for _ in microbatches]
        steps = self._equalized_steps(steps)
        for n, (i, chunk, real) in enumerate(steps):
            self._prepare("train", chunk["input_ids"].shape[1])
            leaves = {k: chunk[k].detach().requires_grad_(True) for k in self.first_stage_inputs if with_input_grads}
            adapter = PPLossAdapter(loss_fn, self._side_data(chunk))
            with gradient_sync(self.info.stages, n == len(steps) - 1 and reduce):
                self._run({**chunk, **leaves}, adapter, train=True)
            per_step.append(sum_metrics(list(adapter.metrics.values())) if self.info.has_last_stage else None)
            for k, leaf in leaves.items():  # a dummy step (i is None) has no rows to return
                if i is not None:  # no gradient: not the first stage, or the input did not reach the loss
                    grads[i].setdefault(k, []).append((leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))[:real])
        keys = _metric_keys(per_step, self.pp_group, self.last_stage_rank)
        metrics = [broadcast_metrics(m, keys, self.pp_group, self.last_stage_rank, self.device) for m in per_step]
        return metrics, [{k: self._from_first_stage(torch.cat(parts)) for k, parts in g.items()} for g in grads]

    def _from_first_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=self.first_stage_rank, group=self.pp_group)
        return tensor

    def _equalized_steps(self, steps: list[tuple]) -> list[tuple]:
        """Weight-0 dummy steps (microbatch index None) until every data rank runs as many schedule steps."""
        dummy = self._padded(weightless(split_rows(steps[0][1], 0, 1)))
        return equal_step_count(steps, (None, dummy, 0), self.dp_group, self.device)

    def forward_capture(self, batch: dict, capture_fn: CaptureFn, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """capture_fn's rows for the whole batch, on every stage."""
        outs = []
        for chunk, real in self._equalized(self._chunks(batch)):
            self._prepare("eval", chunk["input_ids"].shape[1])
            capture = LastStageCapture(capture_fn, self._side_data(chunk))
            self._run(chunk, capture, train=False)
            values = capture.stacked(self.rows_per_step) if self.info.has_last_stage else None
            values = broadcast_from_last_stage(values, (self.rows_per_step, *row_shape), dtype, self.pp_group,
                                               self.last_stage_rank, self.device)
            outs.append(values[:real])
        return torch.cat(outs)[: batch["input_ids"].shape[0]]


def _metric_keys(per_mb: list[dict | None], pp_group, last_stage_rank: int) -> list[str]:
    """Metric names as the last stage knows them (other stages have no metrics to read them from)."""
    keys = [sorted(per_mb[0]) if per_mb and per_mb[0] is not None else None]
    dist.broadcast_object_list(keys, src=last_stage_rank, group=pp_group)
    return keys[0] or []


def build_pipeline(model: nn.Module, state, *, schedule: str, rows_per_step: int, pp_microbatch_size: int,
                   layers_per_stage: int | None, seq_len: int, compute_dtype: torch.dtype, parallelize_fn):
    """AutoPipeline over `model`: split into stages, parallelize each part, build the schedule."""
    from nemo_automodel.components.distributed.pipelining.autopipeline import AutoPipeline

    ctx = state.mesh_context
    pipeline = AutoPipeline(
        world_mesh=ctx.device_mesh, moe_mesh=ctx.moe_mesh, **ctx.pipeline_axis_kwargs(),
        pp_schedule=SCHEDULE_NAMES[schedule], pp_microbatch_size=pp_microbatch_size, pp_batch_size=rows_per_step,
        layers_per_stage=layers_per_stage, device=state.device, dtype=compute_dtype, scale_grads_in_schedule=False,
        pp_seq_len=seq_len)

    def placeholder_loss(output, target):  # replaced per step by PPLossAdapter / LastStageCapture
        raise RuntimeError("pipeline schedule ran without a loss adapter")

    with cpu_pipeline_warmup():
        pipeline.build(model, loss_fn=placeholder_loss, parallelize_fn=parallelize_fn)
    return pipeline
