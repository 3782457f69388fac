"""MimoHandle: a vision encoder + projector and an HF causal LM, each parallelized on its own grid, behind the
ModelHandle interface (models/handle.py), so policies, algorithms, checkpoints and exports drive it as they drive
an LM.

Colocated layouts: every module spans all ranks with its own (dp, tp, cp) factorization. Each module is
parallelized by nemo-automodel's `parallelize_model` (FSDP2, SUM gradient reduction, TP) on its own
MeshContext (distributed/grids.py); the vision tower's TP plan is ours (mimo/modules.py).

Data: every rank receives the rows of its dp block of the module with the FEWEST dp ranks (the coarse
grid, `data_block()`); that block is `scale` slots of the finer module (bridge.py). The LLM splits rows
(fan-out: each LLM slot takes its share of the block's rows); an encoder splits IMAGES (fan-in: each
encoder slot encodes an even, contiguous share of the block's images, whichever rows they belong to), so
the encoder's dp can exceed the number of LLM rows of a microbatch and uneven images per row still spread
evenly. Rows are padded or packed (data/microbatches.py; a packed row's images follow its placeholders).
One microbatch:
  1. the encoder runs on its images -> (images, tokens_per_image, llm hidden), batch-major;
  2. the bridge moves those rows to this rank's LLM rows (fan-in: the slots' shares in slot order are the
     block's images in batch-major order);
  3. the LLM's text embeddings get the placeholder positions overwritten, in order, by those rows;
  4. under LLM cp the full spliced sequence is sharded (dual chunk swap) together with its positions, so
     RoPE sees global positions and the embedding gradient of every chunk reaches the bridge (which sums
     it over cp);
  5. the LLM runs on `inputs_embeds` and returns logits (vocab-sharded DTensor under TP), which become whole-
     row logprobs for the loss as for an LM (models/loss_view.py).
Under LLM pp > 1 the LLM is AutoPipeline stages and a step runs in three phases (mimo/pipeline.py): the encoder
and bridge on the whole step's images, the LLM's schedule on their detached result (spliced on the first
stage), then the encoder's backward from the gradient the first stage captured and broadcast.

Non-colocated layouts (`mimo.layout.<module>.offset`, disjoint rank ranges): a rank holds the encoder (+ projector)
or the LLM. The same data mapping, but the bridge is a `Relay` (mimo/relay.py): encoder ranks encode and send their
rows point-to-point, LLM ranks receive them as leaves, run the LLM as above and send the leaves' gradients and their
results (metrics, logprobs, next tokens) back (a training step: one micro batch at a time, the encoder one ahead of
the LLM, mimo/cross_schedule.py), so every method returns on encoder ranks what callers expect for
the rows those ranks stand for (`language_row_range`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from automodel_mimo.distributed.equal_steps import equal_step_count, weightless
from automodel_mimo.distributed.grad_norm import global_grad_norm
from automodel_mimo.distributed.grid_spec import LANGUAGE, GridSpec, is_colocated
from automodel_mimo.distributed.grids import build_grids
from automodel_mimo.distributed.mesh import grid_expert_view
from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.mimo.bridge import Bridge, sum_grad_over_cp
from automodel_mimo.mimo.cross_schedule import Trace, encoder_1f1b, language_1f1b
from automodel_mimo.mimo.modules import VisionModule, vision_tp_plan
from automodel_mimo.mimo.pipeline import IMAGE_EMBEDS, build_language_pipeline, image_embeddings
from automodel_mimo.mimo.relay import Relay
from automodel_mimo.models import packed_attention
from automodel_mimo.models.handle import Handle, count_over, stage_full_state
from automodel_mimo.models.moe import SEGMENTS, from_hf_state, hf_named, is_moe, to_hf_state
from automodel_mimo.models.names import canonical_name
from automodel_mimo.models.loss_view import in_slots, row_logprobs, slot_shape, whole_rows
from automodel_mimo.parallel.context_parallel import as_single_segments, cp_attention, cp_indices, shard_batch

IMAGE_KEYS = ("pixel_values", "image_counts")


def image_share(n_images: int, scale: int, slot: int) -> range:
    """This encoder slot's images of a block's `n_images`: contiguous, sizes differ by at most one."""
    return range(slot * n_images // scale, (slot + 1) * n_images // scale)


def slot_range(n_rows: int, scale: int, slot: int) -> range:
    if n_rows % scale:
        raise UserInputError(f"a microbatch of {n_rows} rows cannot be split over {scale} dp slots of the finer module; "
                             f"make train.micro_batch_size a multiple of {scale}")
    size = n_rows // scale
    return range(slot * size, (slot + 1) * size)


def splice(embeds: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """Placeholder positions of `embeds` (row-major = batch-major order) overwritten by `rows`, in order."""
    mask = input_ids == placeholder_id
    n = int(mask.sum())
    if n != rows.shape[0]:
        raise UserInputError(f"{n} image placeholder tokens but {rows.shape[0]} encoder rows; every image needs "
                             "exactly tokens_per_image placeholders in its row")
    return embeds.masked_scatter(mask[..., None], rows.to(embeds.dtype))


def build_mimo_grids(layout: dict[str, dict], encoder_names: list[str], device: torch.device, dtype: str = "float32",
                     global_batch_size: int | None = None, compile: bool = False,
                     activation_checkpointing: bool = False) -> dict:
    """Validated grids of the encoders and the LLM (collective; every rank, same order); `compile`: train.compile,
    `activation_checkpointing`: parallel.activation_checkpointing (both for every module)."""
    missing = [n for n in [*encoder_names, LANGUAGE] if n not in layout]
    if missing:
        raise UserInputError(f"mimo.layout: no layout for module(s) {missing}")
    specs = [GridSpec.for_module(n, layout[n]) for n in [*encoder_names, LANGUAGE]]
    grids = build_grids(specs, device, dtype, global_batch_size, compile=compile,
                        activation_checkpointing=activation_checkpointing)
    ep = int(layout[LANGUAGE].get("ep", 1))
    if ep > 1:  # an MoE LLM's experts over the expert view of its grid, as an LM's (docs/moe.md)
        view = grid_expert_view(grids[LANGUAGE], ep)  # collective: every rank, the LLM's members or not
        if grids[LANGUAGE].member:  # non-colocated: an encoder-only rank holds no view
            grids[LANGUAGE].mesh_context.moe_mesh = view
    return grids


class MimoHandle(Handle):
    """The modules, their grids, states and bridges on this rank. Collective constructor."""

    stage_group = None  # the encoder is on every rank: parameter counts and norms are per module (below)

    def __init__(self, encoders: dict[str, VisionModule], language: nn.Module, layout: dict[str, dict],
                 device: torch.device, placeholder_id: int, tokens_per_image: int, pad_id: int = 0,
                 dtype: str = "float32", global_batch_size: int | None = None, grids: dict | None = None,
                 pipeline: dict | None = None, compile: bool = False, activation_checkpointing: bool = False):
        """`pipeline` (needed when layout.language.pp > 1): schedule, pp_microbatch_size, layers_per_stage,
        seq_len, micro_batch_size (rows of a coarse-block microbatch) — see mimo/pipeline.py. `compile`
        (train.compile): every module's transformer layers compiled in place (models/build.py `parallelize`);
        `activation_checkpointing` (parallel.activation_checkpointing): their activations recomputed in backward."""
        from automodel_mimo.models.build import parallelize

        if len(encoders) != 1:
            raise UserInputError(f"mimo.encoders: {len(encoders)} encoders; one image encoder is supported so far")
        names = [*encoders, LANGUAGE]
        if grids is None:  # grids (their process groups) can be shared by several models of one layout
            grids = build_mimo_grids(layout, list(encoders), device, dtype, global_batch_size, compile,
                                     activation_checkpointing)
        assert list(grids) == names and all(g.spec == GridSpec.for_module(n, layout[n]) for n, g in grids.items()), \
            "grids built for another layout"
        assert all(g.mesh_context.strategy_config.enable_compile == compile
                   and g.mesh_context.activation_checkpointing == activation_checkpointing for g in grids.values()), \
            "grids built with other compile / activation_checkpointing settings (build_mimo_grids(..., compile=...))"
        self.grids, self.names = grids, names
        self.colocated = is_colocated([g.spec for g in grids.values()], dist.get_world_size())
        # non-colocated: this rank holds one module (mimo/relay.py); the others' grids are non-members here
        self.states = {n: g.parallel_state() for n, g in self.grids.items() if g.member}
        self.language_state = self.states.get(LANGUAGE)
        self.on_language = grids[LANGUAGE].member
        if self.cp_size > 1 and language.config._attn_implementation != packed_attention.NAME:
            raise UserInputError("mimo.layout.language.cp > 1 needs the LLM built with packed attention "
                                 "(build_model(..., packed=True))")
        for n, m in encoders.items():  # nemo has no TP plan for vision towers: ours, read by parallelize_model
            self.grids[n].mesh_context.strategy_config.tp_plan = vision_tp_plan(m) if self.grids[n].size("tp") > 1 else None
        # each module's parts on this rank: the module, or the LLM's pipeline stages (two when interleaved)
        self.module_parts: dict[str, list[nn.Module]] = {n: [parallelize(m, self.states[n])] for n, m in encoders.items()
                                                         if n in self.states}
        self.encoder_name = names[0]
        self.vision_configs = {n: (m.llava_config, m.encoder.config) for n, m in encoders.items()}  # the export's
        self.bridge = (Bridge(self.grids[self.encoder_name], self.grids[LANGUAGE]) if self.colocated else
                       Relay(self.grids[self.encoder_name].spec, self.grids[LANGUAGE].spec, language.config.hidden_size, device))
        self.device, self.placeholder_id, self.tokens_per_image, self.pad_id = device, placeholder_id, tokens_per_image, pad_id
        self._config, self.driver = language.config, None
        self.schedule_trace = Trace()  # non-colocated: the last training step's cross-module schedule, in order
        if not self.on_language:
            return
        if self.language_state.pp_size == 1:
            self.module_parts[LANGUAGE] = [parallelize(language, self.language_state)]
        else:
            if pipeline is None:
                raise UserInputError("mimo.layout.language.pp > 1 needs the pipeline settings (MimoHandle(pipeline=...))")
            rows = pipeline["micro_batch_size"] // self.rows_multiple()  # the LLM's rows of one microbatch
            self.driver = build_language_pipeline(language, self.language_state, {"dtype": dtype, **pipeline}, rows,
                                                  pad_id, placeholder_id, lambda part: parallelize(part, self.language_state))
            self.module_parts[LANGUAGE] = list(self.driver.info.model_parts)

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Each module's first part on this rank (its only one unless the LLM is pipelined)."""
        return {n: ps[0] for n, ps in self.module_parts.items()}

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.driver.pp_group if self.driver is not None else None

    @property
    def router_state(self):
        """An MoE LLM's router metrics reduce over the LLM's grid."""
        return self.language_state

    def step_metrics(self) -> dict:
        """MoE router metrics, also summed (max for the imbalance) over the LLM's pipeline stages, which hold
        different MoE layers (the LM path's `stage_group`; a MIMO handle's is None: the encoder is on every rank).
        Non-colocated: the LLM ranks' global values, relayed to the encoder ranks (which hold no router)."""
        metrics = {} if self.router is None else self.router.metrics(self.pp_group)
        if self.colocated or not is_moe(self._config):
            return metrics
        if self.on_language:
            self.bridge.send_results(metrics)
            return metrics
        return self.bridge.recv_results()[0]  # every LLM slot sends the same global values

    @property
    def config(self):
        """The LLM's config (what generation and the export read)."""
        return self._config

    @property
    def parts(self) -> list[nn.Module]:
        return [p for ps in self.module_parts.values() for p in ps]

    @property
    def part_names(self) -> list[str]:
        return [n for n, ps in self.module_parts.items() for _ in ps]

    # ------------------------------------------------------------ layout
    def data_block(self) -> tuple[int, int]:
        """(index, count) of this rank's block of the global batch: the dp block of the coarsest module (a rank
        of the other module in a non-colocated layout: the block its dp slot belongs to, mimo/relay.py)."""
        coarse = min(self.grids.values(), key=lambda g: g.size("dp"))
        if coarse.member:
            return coarse.local_rank("dp"), coarse.size("dp")
        return self.bridge.block, coarse.size("dp")

    @property
    def data_group(self) -> dist.ProcessGroup:
        """The LLM's dp ranks: their rows (`loss_view`) partition the global batch. An encoder-only rank: the
        encoder's dp ranks, whose `loss_view`s (a coarse block's rows on its first slot) partition it too."""
        return self.grids[LANGUAGE if self.on_language else self.encoder_name].group("dp")

    @property
    def cp_size(self) -> int:
        """The LLM's cp (on every rank: encoder-only ranks build the same microbatches)."""
        return self.grids[LANGUAGE].size("cp")

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.language_state.cp_group if self.cp_size > 1 and self.on_language else None

    @property
    def pad_multiple(self) -> int:
        """Packed sequences are padded to whole load-balanced cp chunks of the LLM (2 * cp)."""
        return 2 * self.cp_size if self.cp_size > 1 else 1

    def rows_multiple(self) -> int:
        """A coarse-block microbatch's row count must be a multiple of this: the LLM slots' share of rows
        (fan-out); encoder slots split images, never rows."""
        return self.bridge.scale if self.bridge.direction == "fan_out" else 1

    def language_row_range(self, n_rows: int) -> range:
        """Rows of a coarse-block microbatch of `n_rows` rows whose logits this rank's LLM computes. An encoder-
        only rank stands for the LLM rows its coarse block feeds: all of them on the block's first encoder
        slot, none on the others (it receives their results, mimo/relay.py)."""
        b = self.bridge
        if not self.on_language:
            return range(n_rows) if b.slot == 0 else range(0)
        return slot_range(n_rows, b.scale, b.slot) if b.direction == "fan_out" else range(n_rows)

    generation_rows = language_row_range

    def loss_view(self, mb: dict) -> dict:
        """This rank's LLM rows of a coarse-block microbatch (text, side data; whole rows, before any cp
        sharding), with `loss_mask`. Side data already in that layout (computed from `logprobs()`, e.g. DPO's
        reference sums, GRPO's old and reference logprobs: fewer rows than the microbatch under a fan-out) passes
        as it is."""
        n = mb["input_ids"].shape[0]
        rows = self.language_row_range(n)
        out = {k: v if v.shape[0] != n else v[rows.start:rows.stop] for k, v in mb.items()
               if k not in IMAGE_KEYS and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] in (n, len(rows))}
        if "loss_mask" not in out:
            out["loss_mask"] = (out["labels"] != IGNORE_INDEX).float()
        return out

    def _encoder_images(self, counts: list[int]) -> tuple[range, list[int]]:
        """(images of a coarse-block microbatch this rank encodes, encoder rows per bridge slot in slot order)."""
        b, n, tpi = self.bridge, sum(counts), self.tokens_per_image
        if b.direction == "fan_in":
            shares = [image_share(n, b.scale, s) for s in range(b.scale)]
            return shares[b.slot], [len(r) * tpi for r in shares]
        slots = [slot_range(len(counts), b.scale, s) for s in range(b.scale)]  # the LLM slots' rows (one if equal)
        return range(n), [sum(counts[r.start:r.stop]) * tpi for r in slots]

    def _slot_ranges(self, mb: dict) -> tuple[list[range], list[range]]:
        """Encoder rows (batch-major) of a coarse-block microbatch held by each encoder slot and needed by each
        LLM slot, in slot order (one slot for the module with fewer dp ranks): the relay's pieces."""
        counts, tpi, b = mb["image_counts"].tolist(), self.tokens_per_image, self.bridge
        cum = [0]
        for c in counts:
            cum.append(cum[-1] + c * tpi)
        whole = [range(cum[-1])]
        if b.direction == "fan_in":
            return [range(r.start * tpi, r.stop * tpi) for r in (image_share(sum(counts), b.scale, s)
                                                                 for s in range(b.scale))], whole
        if b.direction == "fan_out":
            return whole, [range(cum[r.start], cum[r.stop]) for r in (slot_range(len(counts), b.scale, s)
                                                                      for s in range(b.scale))]
        return whole, whole

    # ------------------------------------------------------------ compute
    def check_batch(self, microbatches: list[dict]) -> None:
        """Collective: placeholders per row == image_counts * tokens_per_image and pixel rows == images, on
        every rank; any mismatch raises the same UserInputError everywhere (no rank enters a forward alone)."""
        problem = ""
        for i, mb in enumerate(microbatches):
            counts = mb["image_counts"]
            found = (mb["input_ids"] == self.placeholder_id).sum(1).cpu()
            expected = counts.cpu() * self.tokens_per_image
            if not torch.equal(found, expected):
                row = int((found != expected).nonzero()[0])
                problem = (f"row {row} of microbatch {i} has {int(found[row])} image placeholder tokens but "
                           f"{int(counts[row])} image(s) x tokens_per_image={self.tokens_per_image} = "
                           f"{int(expected[row])} encoder rows")
            elif mb["pixel_values"].shape[0] != int(counts.sum()):
                problem = f"microbatch {i}: {mb['pixel_values'].shape[0]} images in pixel_values, image_counts sum to {int(counts.sum())}"
            if problem:
                break
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        first = next((p for p in problems if p), None)
        if first:
            raise UserInputError(f"MIMO batch: {first}; every image needs exactly tokens_per_image placeholders in its row")

    def _equalized(self, microbatches: list[dict]) -> list[dict]:
        """Weight-0 dummies until every rank runs as many passes: every module's collectives span the world."""
        return equal_step_count(microbatches, weightless(microbatches[0]), dist.group.WORLD, self.device)

    def _bridged_rows(self, microbatches: list[dict]) -> list[torch.Tensor]:
        """This rank's LLM rows' encoder rows of each microbatch (batch-major): one encoder pass over this rank's
        images of all of them (one FSDP forward and, later, one backward), then the bridge per microbatch.
        Non-colocated (inference only: a training step receives its rows in `_language_1f1b`): received from
        the encoder ranks."""
        if not self.colocated:
            assert not torch.is_grad_enabled(), "a non-colocated training step receives its rows in _language_1f1b"
            return self.bridge.recv_rows([self._slot_ranges(mb) for mb in microbatches])
        shares = [self._encoder_images(mb["image_counts"].tolist()) for mb in microbatches]
        return [self.bridge(rows, slot_rows) for rows, (_, slot_rows) in zip(self._encoded(microbatches), shares)]

    def _encoded(self, microbatches: list[dict]) -> list[torch.Tensor]:
        """This rank's encoder slot's rows of each microbatch, [rows, llm hidden] (one encoder pass)."""
        shares = [self._encoder_images(mb["image_counts"].tolist()) for mb in microbatches]
        pixels = torch.cat([mb["pixel_values"][r.start:r.stop] for mb, (r, _) in zip(microbatches, shares)]).to(self.device)
        feats = self._encode(pixels)
        if feats.dim() == 3 and feats.shape[1] != self.tokens_per_image:  # same on every rank: no hang
            raise UserInputError(f"mimo.tokens_per_image={self.tokens_per_image}, but the encoder yields "
                                 f"{feats.shape[1]} rows per image; set mimo.tokens_per_image={feats.shape[1]}")
        assert feats.dim() == 3 and feats.shape[0] == pixels.shape[0], (
            f"encoder output {tuple(feats.shape)} is not batch-major (images={pixels.shape[0]}, tokens_per_image, hidden)")
        return [f.reshape(-1, f.shape[-1]) for f in feats.split([len(r) for r, _ in shares])]

    def _forward(self, mb: dict, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Logits of this rank's LLM rows (sharded over cp when cp > 1) and the LLM batch shard they belong to."""
        return self._language_forward(self.loss_view(mb), self._bridged_rows([mb])[0] if rows is None else rows)

    def _stage_batches(self, microbatches: list[dict], views: list[dict],
                       rows: list[torch.Tensor] | None = None) -> tuple[list[dict], list[torch.Tensor]]:
        """Phase 1 under LLM pp: per microbatch, the LLM's batch shard with its image embeddings (cp-sharded like
        the ids, detached: the pipeline's input) and those embeddings still attached to the encoder's graph
        (`rows`: the microbatches' encoder rows when already at hand, e.g. received by the cross-module schedule)."""
        state, attached, batches = self.language_state, [], []
        for view, rows in zip(views, self._bridged_rows(microbatches) if rows is None else rows):
            dense = image_embeddings(view["input_ids"], rows, self.placeholder_id)
            local = shard_batch({**view, "inputs_embeds": dense}, state.cp_size, state.cp_rank)
            attached.append(local.pop("inputs_embeds"))
            batches.append({**local, IMAGE_EMBEDS: attached[-1].detach()})
        return batches, attached

    def forward_backward(self, microbatches: list[dict], loss_fn, temperature: float = 1.0) -> list[dict]:
        """Forward (encoder, bridge, LLM), loss on whole-row logprobs of this rank's LLM rows, backward through
        both modules; gradients accumulate (FSDP reduces them after the last microbatch)."""
        self.check_batch(microbatches)
        self.train()
        metrics = []
        microbatches = self._equalized(self._balanced(microbatches))  # an MoE LLM: token -> sequence maps
        if not self.colocated:  # the cross-module 1F1B schedule (mimo/cross_schedule.py)
            return self._language_1f1b(microbatches, loss_fn, temperature) if self.on_language else \
                self._encoder_1f1b(microbatches)
        if self.driver is not None:
            return self._pipelined_forward_backward(microbatches, loss_fn, temperature)
        for i, mb in enumerate(microbatches):
            self.set_gradient_sync(i == len(microbatches) - 1)
            logits, shard = self._forward(mb)
            loss, m = loss_fn(*whole_rows(logits, shard, temperature, self.cp_group))
            loss.backward()
            metrics.append(m)
        return metrics

    # ------------------------------------------------------------ non-colocated: the two sides of the relay
    def _language_1f1b(self, microbatches: list[dict], loss_fn, temperature: float) -> list[dict]:
        """An LLM rank's training step: each microbatch runs once its rows arrive (under pp: one schedule step of
        the LLM's pipeline), its rows' gradient goes back at once (cross_schedule.py); then the metrics."""
        metrics, n = [], len(microbatches)

        def step(k: int, received: torch.Tensor) -> torch.Tensor:
            leaf = received.requires_grad_(True)
            # under cp each rank's gradient covers its sequence chunks: summed over cp before it is sent back
            rows = sum_grad_over_cp(leaf, self.cp_group) if self.cp_group is not None else leaf
            if self.driver is not None:  # one schedule step per microbatch: the LLM's FSDP reduces after the last
                metrics.extend(self._pipelined_forward_backward([microbatches[k]], loss_fn, temperature, [rows],
                                                                reduce=k == n - 1))
            else:
                self.set_gradient_sync(k == n - 1)
                logits, shard = self._forward(microbatches[k], rows)
                loss, m = loss_fn(*whole_rows(logits, shard, temperature, self.cp_group))
                loss.backward()
                metrics.append(m)
            return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)

        self.schedule_trace = Trace(self.schedule_trace.sync_cuda)
        language_1f1b(self.bridge, [self._slot_ranges(mb) for mb in microbatches], step, self.schedule_trace)
        self.bridge.send_results(_portable(metrics))
        return metrics

    def _encoder_1f1b(self, microbatches: list[dict]) -> list[dict]:
        """An encoder rank's training step: forward one microbatch ahead of the LLM, backward each as its gradient
        comes back (cross_schedule.py), the FSDP reduction in the last backward; the LLM slots' metrics."""
        parts = [p for p in self.module_parts[self.encoder_name] if isinstance(p, FSDPModule)]

        def backward(k: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
            for part in parts:
                part.set_requires_gradient_sync(k == len(microbatches) - 1)
            torch.autograd.backward(rows, grad.to(rows.dtype))

        self.schedule_trace = Trace(self.schedule_trace.sync_cuda)
        encoder_1f1b(self.bridge, [self._slot_ranges(mb) for mb in microbatches],
                     lambda k: self._encoded([microbatches[k]])[0], backward, self.schedule_trace)
        results = self.bridge.recv_results()
        return [m for slot in (results if self.bridge.slot == 0 else [_emptied(r) for r in results]) for m in slot]

    def _relay_back(self, result):
        """An LLM rank of a non-colocated layout, after an inference pass: `result` (logprobs, next tokens) to the
        encoder ranks; unchanged `result`. (A training step sends its gradients and metrics in _language_1f1b.)"""
        if self.colocated:
            return result
        self.bridge.send_results(_portable(result))
        return result

    def _encoder_only(self, microbatches: list[dict]) -> list:
        """An encoder rank of a non-colocated layout, in an inference pass: encode this slot's images of every
        microbatch, send the rows; the LLM slots' results, in slot order."""
        self.bridge.send_rows([self._slot_ranges(mb) for mb in microbatches], self._encoded(microbatches))
        results = self.bridge.recv_results()
        return results if self.bridge.slot == 0 else [_emptied(r) for r in results]

    def _pipelined_forward_backward(self, microbatches: list[dict], loss_fn, temperature: float,
                                    rows: list[torch.Tensor] | None = None, reduce: bool = True) -> list[dict]:
        """The three phases (mimo/pipeline.py). Only the last stage computes losses (pre-divided by the global
        token count every rank took from the data); the metrics are broadcast to every stage by the driver.
        `rows`: received encoder rows (non-colocated: one microbatch at a time, phase 3 ends at the leaf);
        `reduce=False`: the LLM's FSDP does not reduce yet (more microbatches follow before the optimizer)."""
        for part in self.module_parts.get(self.encoder_name, []):  # the encoder's one backward reduces its gradients
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(True)
        batches, attached = self._stage_batches(microbatches, [self.loss_view(mb) for mb in microbatches], rows)
        with cp_attention(self.cp_group):
            metrics, grads = self.driver.forward_backward_with_input_grads(
                batches, lambda logits, shard: loss_fn(*whole_rows(logits, shard, temperature, self.cp_group)),
                reduce=reduce)
        if any(a.requires_grad for a in attached):
            torch.autograd.backward(attached, [g[IMAGE_EMBEDS] for g in grads])
        return metrics

    def _captured(self, mb: dict, view: dict, capture_fn, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """capture_fn(logits, rows) of one microbatch's LLM rows through the pipeline, on every stage."""
        (batch,), _ = self._stage_batches([mb], [view])
        with cp_attention(self.cp_group):
            return self.driver.forward_capture(batch, capture_fn, row_shape, dtype)

    @torch.no_grad()
    def logprobs(self, microbatches: list[dict], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token logprobs of this rank's LLM rows, whole rows [B, S] or sequence slots [R, K, L]."""
        n = len(microbatches)
        self.eval()
        out = []
        microbatches = self._equalized(list(microbatches))
        if not self.on_language:
            out = [torch.cat(parts).to(self.device) for parts in zip(*self._encoder_only(microbatches))]
            self.reshard()
            self.train()
            return out[:n]
        for mb in microbatches:
            if self.driver is not None:
                view = self.loss_view(mb)
                out.append(self._captured(mb, view, lambda logits, b: in_slots(
                    row_logprobs(logits, b, temperature, self.cp_group), b), slot_shape(view), torch.float32))
                continue
            logits, shard = self._forward(mb)
            out.append(in_slots(row_logprobs(logits, shard, temperature, self.cp_group), shard))
        self._relay_back(out)
        self.reshard()
        self.train()
        return out[:n]

    @torch.no_grad()
    def next_tokens(self, batch: dict, lengths: torch.Tensor, banned: int | None = None) -> torch.Tensor:
        """Greedy next token of this rank's LLM rows (`generation_rows`) of a right-padded coarse-block batch
        with its images, read at each row's `lengths` - 1 (taken from the cp rank that holds that position)."""
        text = {k: v for k, v in batch.items() if k not in IMAGE_KEYS}
        if self.cp_size > 1:  # whole rows as one cp-shardable segment each (the builder's padded layout)
            text = as_single_segments(text, self.cp_size, self.pad_id)
        text["loss_mask"] = torch.zeros_like(text["input_ids"], dtype=torch.float32)
        mb = {**text, **{k: batch[k] for k in IMAGE_KEYS}}
        rows = self.generation_rows(batch["input_ids"].shape[0])
        if not self.on_language:
            return torch.cat(self._encoder_only([mb])).to(self.device)

        def pick(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            last = self.logits_at(logits, positions)
            if banned is not None:
                last[:, banned] = -torch.inf
            return last.argmax(-1)

        if self.driver is not None:  # the last stage picks, per pipeline microbatch, from its rows' lengths
            view = {**self.loss_view(mb), "lengths": lengths[rows.start:rows.stop]}
            return self._relay_back(self._captured(mb, view, lambda logits, b: pick(logits, b["lengths"] - 1), (), torch.long))
        logits, _ = self._forward(mb)
        return self._relay_back(pick(logits, lengths[rows.start:rows.stop] - 1))

    def logits_at(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [rows, V] of this rank's LLM rows at `positions` (one per row, in the full
        sequence), the same on every rank of the LLM's tp and cp groups. Under cp the rows' positions are
        spread over the cp ranks' chunks: the owner of each position contributes its logits, the others
        zeros, summed over cp (exact: one non-zero term). Under TP the vocabulary shards are gathered."""
        local = logits.to_local() if isinstance(logits, DTensor) else logits
        state, rows = self.language_state, torch.arange(len(positions), device=local.device)
        if state.cp_size == 1:
            picked = local[rows, positions]
        else:
            kept = torch.tensor(cp_indices([0, local.shape[1] * state.cp_size], state.cp_size, state.cp_rank),
                                device=local.device)  # full-sequence positions of this rank's shard, in its order
            hit = kept[None, :] == positions[:, None]
            owned = hit.any(1, keepdim=True)
            picked = torch.where(owned, local[rows, hit.long().argmax(1)], local.new_zeros(()))
            dist.all_reduce(picked, group=state.cp_group)
        if isinstance(logits, DTensor):
            vocab = [Shard(picked.dim() - 1) if p.is_shard() else p for p in logits.placements]  # vocab-sharded
            picked = DTensor.from_local(picked, logits.device_mesh, vocab).full_tensor()
        return picked  # a new tensor on every path (indexing copies): the caller may write into it

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder + projector. A rank without images still runs them (its FSDP/TP collectives are shared):
        on one blank image whose rows are then dropped (HF vision towers cannot reshape a batch of 0)."""
        encoder = self.module_parts[self.encoder_name][0]
        if pixels.shape[0] > 0:
            return encoder(pixels)
        c = encoder.config
        blank = torch.zeros(1, c.num_channels, c.image_size, c.image_size, device=self.device)
        return encoder(blank)[:0]

    def _language_forward(self, batch: dict, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The LLM runs on the full text ids; a hook on its input embedding splices the encoder rows into
        the full sequence's embeddings and then (cp > 1) keeps this cp rank's chunks — inside the LLM's own
        forward, which FSDP needs to run first (the embedding is one of its units). `batch` holds whole rows
        (cp > 1: cp-shardable segments, `cu_seqlens_padded`)."""
        llm, state = self.modules[LANGUAGE], self.language_state
        cp = state.cp_size
        full_ids = batch["input_ids"]

        def splice_then_shard(module, args, embeds):
            spliced = splice(embeds, full_ids, rows, self.placeholder_id)
            if cp == 1:
                return spliced
            return shard_batch({"input_ids": full_ids, "inputs_embeds": spliced, "cu_seqlens_padded": batch["cu_seqlens_padded"]},
                               cp, state.cp_rank)["inputs_embeds"]

        local = shard_batch(batch, cp, state.cp_rank)  # labels, loss mask, positions (no-op when cp == 1)
        # the padding mask stays here (unlike models/handle.py MODEL_INPUTS): without it SDPA's backward rounds
        # differently (<= 4e-7 relative, bench/padding_mask_rounding.py) and the embedded MIMO default's documented
        # CPU curve moved (0.987 -> 0.943 held-out at step 600, same seed; docs/benchmarks.md)
        inputs = {k: local[k] for k in ("attention_mask", "position_ids", SEGMENTS) if k in local}
        hook = llm.get_input_embeddings().register_forward_hook(splice_then_shard)
        try:
            with cp_attention(state.cp_group if cp > 1 else None):
                logits = llm(input_ids=full_ids, **inputs, use_cache=False).logits
        finally:
            hook.remove()
        return logits, local

    # ------------------------------------------------------------ parameters, gradients
    def named_parameters(self):
        """`<module>.<name>` (activation-checkpointing wrappers left out, as an LM's: models/names.py)."""
        for name, parts in self.module_parts.items():
            for part in parts:
                for n, p in part.named_parameters():
                    yield canonical_name(f"{name}.{n}"), p

    def serve_generator(self, export: Path, images: bool = True) -> Path:
        """The generator serves the LLaVA folder `export`, or (`images=False`: a backend without image inputs, vLLM
        here) the LLM alone, `export/language` (a causal-LM folder, write_hf): from then on `generator_parameters`
        and `weight_groups` name the LLM's parameters only, under that folder's names; the encoder is not sent."""
        self.text_only_generator = not images
        return export if images else export / LANGUAGE

    text_only_generator = False

    def _generated(self):
        """(module name, generator name, parameter) of this rank's parameters, in named_parameters' order: under
        the LLaVA folder's names and layout, or (text_only_generator) the LLM's under its causal-LM folder's."""
        from automodel_mimo.mimo.llava import to_llava

        for module, parts in self.module_parts.items():
            if self.text_only_generator and module != LANGUAGE:
                continue
            for part in parts:
                for n, p in part.named_parameters():
                    name, param = hf_named(canonical_name(f"{module}.{n}"), p)
                    generated = (name.removeprefix(LANGUAGE + ".") if self.text_only_generator
                                 else next(iter(to_llava({name: None}, self.encoder_name))))
                    yield module, generated, param

    def generator_parameters(self):
        """This rank's parameters under the names and layout of the folder the generator serves (write_hf): the
        LLaVA `hf/` (`<encoder>.encoder.*`, `<encoder>.projector.*`, `language.*` renamed), or the LLM's
        `hf/language` (`language.` dropped); an MoE language model's experts also in transformers' layout
        (`hf_named`)."""
        for _, name, param in self._generated():
            yield name, param

    def weight_groups(self) -> dict[str, tuple[int, int]]:
        """Refit groups (generation/weight_stream.py), generator name -> (module index, LLM pp stage): the encoder
        with its projector is one group (every encoder rank holds it whole), each LLM stage another, so the
        manifest lists every module once whatever ranks hold it."""
        stage = dist.get_rank(self.pp_group) if self.pp_group is not None else 0
        return {generated: (self.names.index(module), stage if module == LANGUAGE else 0)
                for module, generated, _ in self._generated()}

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of every module's gradients, identical on every rank: each module's squared norm is
        reduced over that module's grid (a DTensor norm covers its shards) into its slot of a world vector
        (every member holds the same value), combined over the world with MAX. NaN would vanish in a MAX
        reduction, inf survives it: any rank's inf/NaN reaches every rank (and the step is skipped)."""
        slots = torch.zeros(len(self.names), dtype=torch.float32, device=self.device)
        for i, name in enumerate(self.names):  # LLM stages: squares summed over pp; a module not here: 0
            if name not in self.module_parts:
                continue
            params = [p for part in self.module_parts[name] for p in part.parameters()]
            slots[i] = global_grad_norm(params, self.device, self.pp_group if name == LANGUAGE else None) ** 2
        slots = torch.nan_to_num(slots, nan=math.inf)
        dist.all_reduce(slots, op=dist.ReduceOp.MAX)
        return slots.sum().sqrt()

    # ------------------------------------------------------------ state (keys: <module>.<param>)
    def num_parameters(self) -> int:
        """Every module counted once: the encoder is whole on its ranks, the LLM's stages are summed over pp;
        per module, the MAX over the world (a non-colocated rank holds one module)."""
        counts = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        for i, name in enumerate(self.names):
            if name in self.module_parts:
                counts[i] = count_over([p for part in self.module_parts[name] for p in part.parameters()],
                                       None if self._whole(name) else self.pp_group, self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return int(counts.sum())

    # A pipelined LLM's stages hold parts of its state under the unsplit names: strict=False per stage, and the
    # union is the whole model, so a checkpoint saved under one LLM pp resumes under another.
    def state_dict(self) -> dict:
        return {f"{name}.{k}": v for name, parts in self.module_parts.items() for part in parts
                for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state: dict) -> None:
        for name, parts in self.module_parts.items():
            for part in parts:
                set_model_state_dict(part, prefixed(state, name + "."), options=StateDictOptions(strict=self._whole(name)))

    def full_state_dict(self) -> dict:
        """Full tensors on CPU (collective; rank 0 gets the values)."""
        if not self.colocated:
            return self._gathered_full_state()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        out = {}
        for name, parts in self.module_parts.items():
            full = get_model_state_dict(parts[0], options=options) if self._whole(name) else stage_full_state(parts, self.pp_group)
            out.update({f"{name}.{k}": v for k, v in full.items()})
        return out

    def _gathered_full_state(self) -> dict:
        """Non-colocated: each module's full tensors (per LLM stage) from the rank at dp = tp = cp = 0 of it, one
        object each, gathered on rank 0 (collective over the world)."""
        local = {}
        for name, parts in self.module_parts.items():
            grid = self.grids[name]
            full = {canonical_name(k): (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                    for part in parts for k, v in part.state_dict().items()}  # collective over the module's grid
            if all(grid.local_rank(d) == 0 for d in ("dp", "tp", "cp")):
                local.update({f"{name}.{k}": v for k, v in full.items()})
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, gathered, dst=0)
        return {k: v for state in gathered or [] for k, v in state.items()}

    def load_full_state_dict(self, state: dict) -> None:
        for name, parts in self.module_parts.items():
            for part in parts:
                set_model_state_dict(part, prefixed(state, name + "."),
                                     options=StateDictOptions(full_state_dict=True, strict=self._whole(name)))

    def _whole(self, name: str) -> bool:
        """Whether this rank holds the whole module `name` (not pipeline stages of it)."""
        return name != LANGUAGE or self.driver is None

    def hf_state(self, folder: str, field: str) -> dict:
        """A LLaVA folder's full tensors under `<module>.<name>` (mimo/llava.py names), e.g. a DPO reference."""
        from automodel_mimo.mimo.llava import llava_state

        state = llava_state(folder, self.encoder_name, field)
        return from_hf_state(state) if is_moe(self.config) else state  # an MoE LLM: nemo's expert names and layout

    def write_hf(self, state: dict, tokenizer, folder: Path) -> None:
        """Rank 0: `<folder>` is one transformers LLaVA folder (LlavaForConditionalGeneration + tokenizer,
        mimo/llava.py), loadable as model.pretrained; `<folder>/language` the LLM alone + tokenizer, for
        text-only tools (a causal-LM generator, serving the LLM without images)."""
        from transformers import AutoModelForCausalLM

        from automodel_mimo.mimo.llava import export_config, save_llava

        state, name = to_hf_state(state), self.encoder_name  # an MoE LLM's experts: transformers' names and layout
        config = export_config(*self.vision_configs[name], self.config, self.placeholder_id, self.tokens_per_image)
        save_llava(state, name, config, tokenizer, folder)
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.float32)
        llm.load_state_dict(prefixed(state, LANGUAGE + "."), assign=True, strict=True)
        llm.tie_weights()
        llm.save_pretrained(folder / LANGUAGE, safe_serialization=True)
        tokenizer.save_pretrained(folder / LANGUAGE)

    def destroy(self) -> None:
        self.bridge.destroy()


def _portable(result):
    """What an LLM rank sends to encoder ranks: tensors on the CPU, per-microbatch metrics as floats."""
    if isinstance(result, torch.Tensor):
        return result.detach().cpu()
    if isinstance(result, dict):
        return {k: float(v) for k, v in result.items()}
    return [_portable(r) for r in result]


def _emptied(result):
    """A received result for an encoder rank that stands for no rows: zero rows; metric shares 0 (min/max kept,
    they are reduced by min/max), so every rank of the data group reduces the same keys."""
    if isinstance(result, torch.Tensor):
        return result[:0]
    if isinstance(result, dict):
        return {k: v if k.endswith(("_min", "_max")) else 0.0 for k, v in result.items()}
    return [_emptied(r) for r in result]


def prefixed(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
