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
from automodel_mimo.distributed.grid_spec import LANGUAGE, GridSpec
from automodel_mimo.distributed.grids import build_grids
from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.mimo.bridge import Bridge
from automodel_mimo.mimo.modules import VisionModule, vision_tp_plan
from automodel_mimo.mimo.pipeline import IMAGE_EMBEDS, build_language_pipeline, image_embeddings
from automodel_mimo.models import packed_attention
from automodel_mimo.models.handle import Handle, count_over, stage_full_state
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
                     global_batch_size: int | None = None) -> dict:
    """Validated grids of the encoders and the LLM (collective; every rank, same order)."""
    missing = [n for n in [*encoder_names, LANGUAGE] if n not in layout]
    if missing:
        raise UserInputError(f"mimo.layout: no layout for module(s) {missing}")
    specs = [GridSpec.for_module(n, layout[n]) for n in [*encoder_names, LANGUAGE]]
    return build_grids(specs, device, dtype, global_batch_size)


class MimoHandle(Handle):
    """The modules, their grids, states and bridges on this rank. Collective constructor."""

    stage_group = None  # the encoder is on every rank: parameter counts and norms are per module (below)

    def __init__(self, encoders: dict[str, VisionModule], language: nn.Module, layout: dict[str, dict],
                 device: torch.device, placeholder_id: int, tokens_per_image: int, pad_id: int = 0,
                 dtype: str = "float32", global_batch_size: int | None = None, grids: dict | None = None,
                 pipeline: dict | None = None):
        """`pipeline` (needed when layout.language.pp > 1): schedule, pp_microbatch_size, layers_per_stage,
        seq_len, micro_batch_size (rows of a coarse-block microbatch) — see mimo/pipeline.py."""
        from automodel_mimo.models.build import parallelize

        if len(encoders) != 1:
            raise UserInputError(f"mimo.encoders: {len(encoders)} encoders; one image encoder is supported so far")
        names = [*encoders, LANGUAGE]
        if grids is None:  # grids (their process groups) can be shared by several models of one layout
            grids = build_mimo_grids(layout, list(encoders), device, dtype, global_batch_size)
        assert list(grids) == names and all(g.spec == GridSpec.for_module(n, layout[n]) for n, g in grids.items()), \
            "grids built for another layout"
        self.grids = grids
        self.states = {n: g.parallel_state() for n, g in self.grids.items()}
        self.language_state = self.states[LANGUAGE]
        if self.language_state.cp_size > 1 and language.config._attn_implementation != packed_attention.NAME:
            raise UserInputError("mimo.layout.language.cp > 1 needs the LLM built with packed attention "
                                 "(build_model(..., packed=True))")
        for n, m in encoders.items():  # nemo has no TP plan for vision towers: ours, read by parallelize_model
            self.grids[n].mesh_context.strategy_config.tp_plan = vision_tp_plan(m) if self.grids[n].size("tp") > 1 else None
        # each module's parts on this rank: the module, or the LLM's pipeline stages (two when interleaved)
        self.module_parts: dict[str, list[nn.Module]] = {n: [parallelize(m, self.states[n])] for n, m in encoders.items()}
        self.encoder_name = names[0]
        self.bridge = Bridge(self.grids[self.encoder_name], self.grids[LANGUAGE])
        self.device, self.placeholder_id, self.tokens_per_image, self.pad_id = device, placeholder_id, tokens_per_image, pad_id
        self._config, self.driver = language.config, None
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
        """(index, count) of this rank's block of the global batch: the dp block of the coarsest module."""
        coarse = min(self.grids.values(), key=lambda g: g.size("dp"))
        return coarse.local_rank("dp"), coarse.size("dp")

    @property
    def data_group(self) -> dist.ProcessGroup:
        """The LLM's dp ranks: their rows (`loss_view`) partition the global batch."""
        return self.grids[LANGUAGE].group("dp")

    @property
    def cp_size(self) -> int:
        return self.language_state.cp_size

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.language_state.cp_group if self.cp_size > 1 else None

    @property
    def pad_multiple(self) -> int:
        """Packed sequences are padded to whole load-balanced cp chunks of the LLM (2 * cp)."""
        return 2 * self.cp_size if self.cp_size > 1 else 1

    def rows_multiple(self) -> int:
        """A coarse-block microbatch's row count must be a multiple of this: the LLM slots' share of rows
        (fan-out); encoder slots split images, never rows."""
        return self.bridge.scale if self.bridge.direction == "fan_out" else 1

    def language_row_range(self, n_rows: int) -> range:
        """Rows of a coarse-block microbatch of `n_rows` rows whose logits this rank's LLM computes."""
        b = self.bridge
        return slot_range(n_rows, b.scale, b.slot) if b.direction == "fan_out" else range(n_rows)

    generation_rows = language_row_range

    def loss_view(self, mb: dict) -> dict:
        """This rank's LLM rows of a coarse-block microbatch (text, side data; whole rows, before any cp
        sharding), with `loss_mask`. Side data that already has this rank's rows only (under fan-out: what
        `logprobs()` returned, e.g. GRPO's old and reference logprobs) is taken as it is."""
        n = mb["input_ids"].shape[0]
        rows = self.language_row_range(n)
        out = {}
        for k, v in mb.items():
            if k in IMAGE_KEYS or not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if v.shape[0] == n:
                out[k] = v[rows.start:rows.stop]
            elif v.shape[0] == len(rows):
                out[k] = v
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
        images of all of them (one FSDP forward and, later, one backward), then the bridge per microbatch."""
        shares = [self._encoder_images(mb["image_counts"].tolist()) for mb in microbatches]
        pixels = torch.cat([mb["pixel_values"][r.start:r.stop] for mb, (r, _) in zip(microbatches, shares)]).to(self.device)
        feats = self._encode(pixels)
        if feats.dim() == 3 and feats.shape[1] != self.tokens_per_image:  # same on every rank: no hang
            raise UserInputError(f"mimo.tokens_per_image={self.tokens_per_image}, but the encoder yields "
                                 f"{feats.shape[1]} rows per image; set mimo.tokens_per_image={feats.shape[1]}")
        assert feats.dim() == 3 and feats.shape[0] == pixels.shape[0], (
            f"encoder output {tuple(feats.shape)} is not batch-major (images={pixels.shape[0]}, tokens_per_image, hidden)")
        parts = feats.split([len(r) for r, _ in shares])
        return [self.bridge(f.reshape(-1, f.shape[-1]), slot_rows) for f, (_, slot_rows) in zip(parts, shares)]

    def _forward(self, mb: dict) -> tuple[torch.Tensor, dict]:
        """Logits of this rank's LLM rows (sharded over cp when cp > 1) and the LLM batch shard they belong to."""
        return self._language_forward(self.loss_view(mb), self._bridged_rows([mb])[0])

    def _stage_batches(self, microbatches: list[dict], views: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
        """Phase 1 under LLM pp: per microbatch, the LLM's batch shard with its image embeddings (cp-sharded like
        the ids, detached: the pipeline's input) and those embeddings still attached to the encoder's graph."""
        state, attached, batches = self.language_state, [], []
        for view, rows in zip(views, self._bridged_rows(microbatches)):
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
        microbatches = self._equalized(microbatches)
        if self.driver is not None:
            return self._pipelined_forward_backward(microbatches, loss_fn, temperature)
        for i, mb in enumerate(microbatches):
            self.set_gradient_sync(i == len(microbatches) - 1)
            logits, shard = self._forward(mb)
            loss, m = loss_fn(*whole_rows(logits, shard, temperature, self.cp_group))
            loss.backward()
            metrics.append(m)
        return metrics

    def _pipelined_forward_backward(self, microbatches: list[dict], loss_fn, temperature: float) -> list[dict]:
        """The three phases (mimo/pipeline.py). Only the last stage computes losses (pre-divided by the global
        token count every rank took from the data); the metrics are broadcast to every stage by the driver."""
        for part in self.module_parts[self.encoder_name]:  # the encoder's one backward reduces its gradients
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(True)
        batches, attached = self._stage_batches(microbatches, [self.loss_view(mb) for mb in microbatches])
        with cp_attention(self.cp_group):
            metrics, grads = self.driver.forward_backward_with_input_grads(
                batches, lambda logits, shard: loss_fn(*whole_rows(logits, shard, temperature, self.cp_group)))
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
        for mb in self._equalized(list(microbatches)):
            if self.driver is not None:
                view = self.loss_view(mb)
                out.append(self._captured(mb, view, lambda logits, b: in_slots(
                    row_logprobs(logits, b, temperature, self.cp_group), b), slot_shape(view), torch.float32))
                continue
            logits, shard = self._forward(mb)
            out.append(in_slots(row_logprobs(logits, shard, temperature, self.cp_group), shard))
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

        def pick(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            last = self.logits_at(logits, positions)
            if banned is not None:
                last[:, banned] = -torch.inf
            return last.argmax(-1)

        if self.driver is not None:  # the last stage picks, per pipeline microbatch, from its rows' lengths
            view = {**self.loss_view(mb), "lengths": lengths[rows.start:rows.stop]}
            return self._captured(mb, view, lambda logits, b: pick(logits, b["lengths"] - 1), (), torch.long)
        logits, _ = self._forward(mb)
        return pick(logits, lengths[rows.start:rows.stop] - 1)

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
        inputs = {k: local[k] for k in ("attention_mask", "position_ids") if k in local}
        hook = llm.get_input_embeddings().register_forward_hook(splice_then_shard)
        try:
            with cp_attention(state.cp_group if cp > 1 else None):
                logits = llm(input_ids=full_ids, **inputs, use_cache=False).logits
        finally:
            hook.remove()
        return logits, local

    # ------------------------------------------------------------ parameters, gradients
    def named_parameters(self):
        for name, parts in self.module_parts.items():
            for part in parts:
                for n, p in part.named_parameters():
                    yield f"{name}.{n}", p

    def generator_name(self, name: str) -> str:
        """`<encoder>.encoder.*`, `<encoder>.projector.*`, `language.*` -> the LLaVA names of the `hf/` folder
        (write_hf), which the generator serves: the refit manifest speaks the export's names."""
        from automodel_mimo.mimo.llava import to_llava

        return next(iter(to_llava({canonical_name(name): None}, self.encoder_name)))

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of every module's gradients, identical on every rank: each module's squared norm is
        reduced over that module's grid (a DTensor norm covers its shards) into its slot of a world vector
        (every member holds the same value), combined over the world with MAX. NaN would vanish in a MAX
        reduction, inf survives it: any rank's inf/NaN reaches every rank (and the step is skipped)."""
        slots = torch.zeros(len(self.module_parts), dtype=torch.float32, device=self.device)
        for i, (name, parts) in enumerate(self.module_parts.items()):  # LLM stages: squares summed over pp
            params = [p for part in parts for p in part.parameters()]
            slots[i] = global_grad_norm(params, self.device, self.pp_group if name == LANGUAGE else None) ** 2
        slots = torch.nan_to_num(slots, nan=math.inf)
        dist.all_reduce(slots, op=dist.ReduceOp.MAX)
        return slots.sum().sqrt()

    # ------------------------------------------------------------ state (keys: <module>.<param>)
    def num_parameters(self) -> int:
        """Every module counted once: the encoder is whole on every rank, the LLM's stages are summed over pp."""
        return sum(count_over([p for part in parts for p in part.parameters()],
                              None if self._whole(name) else self.pp_group, self.device)
                   for name, parts in self.module_parts.items())

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
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        out = {}
        for name, parts in self.module_parts.items():
            full = get_model_state_dict(parts[0], options=options) if self._whole(name) else stage_full_state(parts, self.pp_group)
            out.update({f"{name}.{k}": v for k, v in full.items()})
        return out

    def load_full_state_dict(self, state: dict) -> None:
        for name, parts in self.module_parts.items():
            for part in parts:
                set_model_state_dict(part, prefixed(state, name + "."),
                                     options=StateDictOptions(full_state_dict=True, strict=self._whole(name)))

    def _whole(self, name: str) -> bool:
        """Whether this rank holds the whole module `name` (not pipeline stages of it)."""
        return name != LANGUAGE or self.driver is None

    def write_hf(self, state: dict, tokenizer, folder: Path) -> None:
        """Rank 0: `<folder>` is one transformers LLaVA folder (LlavaForConditionalGeneration + tokenizer,
        mimo/llava.py), loadable as model.pretrained; `<folder>/language` the LLM alone + tokenizer, for
        text-only tools (a causal-LM generator, serving the LLM without images)."""
        from transformers import AutoModelForCausalLM

        from automodel_mimo.mimo.llava import export_config, save_llava

        name = self.encoder_name
        config = export_config(self.modules[name], self.config, self.placeholder_id, self.tokens_per_image)
        save_llava(state, name, config, tokenizer, folder)
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.float32)
        llm.load_state_dict(prefixed(state, LANGUAGE + "."), assign=True, strict=True)
        llm.tie_weights()
        llm.save_pretrained(folder / LANGUAGE, safe_serialization=True)
        tokenizer.save_pretrained(folder / LANGUAGE)

    def destroy(self) -> None:
        self.bridge.destroy()


def prefixed(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
