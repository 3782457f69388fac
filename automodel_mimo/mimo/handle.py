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
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
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
from automodel_mimo.models import packed_attention
from automodel_mimo.models.handle import Handle
from automodel_mimo.models.loss_view import in_slots, row_logprobs, whole_rows
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

    stage_group = None  # no pipeline stages (yet): every module is pp=1

    def __init__(self, encoders: dict[str, VisionModule], language: nn.Module, layout: dict[str, dict],
                 device: torch.device, placeholder_id: int, tokens_per_image: int, pad_id: int = 0,
                 dtype: str = "float32", global_batch_size: int | None = None, grids: dict | None = None):
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
        self.modules: dict[str, nn.Module] = {n: parallelize(m, self.states[n]) for n, m in encoders.items()}
        self.modules[LANGUAGE] = parallelize(language, self.language_state)
        self.encoder_name = names[0]
        self.bridge = Bridge(self.grids[self.encoder_name], self.grids[LANGUAGE])
        self.device, self.placeholder_id, self.tokens_per_image, self.pad_id = device, placeholder_id, tokens_per_image, pad_id

    @property
    def config(self):
        """The LLM's config (what generation and the export read)."""
        return self.modules[LANGUAGE].config

    @property
    def parts(self) -> list[nn.Module]:
        return list(self.modules.values())

    @property
    def part_names(self) -> list[str]:
        return list(self.modules)

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
        sharding), with `loss_mask`."""
        n = mb["input_ids"].shape[0]
        rows = self.language_row_range(n)
        out = {k: v[rows.start:rows.stop] for k, v in mb.items()
               if k not in IMAGE_KEYS and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n}
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

    def _forward(self, mb: dict) -> tuple[torch.Tensor, dict]:
        """Logits of this rank's LLM rows (sharded over cp when cp > 1) and the LLM batch shard they belong to."""
        images, slot_rows = self._encoder_images(mb["image_counts"].tolist())
        n_img = len(images)
        pixels = mb["pixel_values"][images.start:images.stop].to(self.device)
        feats = self._encode(pixels)
        if feats.dim() == 3 and feats.shape[1] != self.tokens_per_image:  # same on every rank: no hang
            raise UserInputError(f"mimo.tokens_per_image={self.tokens_per_image}, but the encoder yields "
                                 f"{feats.shape[1]} rows per image; set mimo.tokens_per_image={feats.shape[1]}")
        assert feats.dim() == 3 and feats.shape[0] == n_img, (
            f"encoder output {tuple(feats.shape)} is not batch-major (images={n_img}, tokens_per_image, hidden)")
        rows = self.bridge(feats.reshape(-1, feats.shape[-1]), slot_rows)
        return self._language_forward(self.loss_view(mb), rows)

    def forward_backward(self, microbatches: list[dict], loss_fn, temperature: float = 1.0) -> list[dict]:
        """Forward (encoder, bridge, LLM), loss on whole-row logprobs of this rank's LLM rows, backward through
        both modules; gradients accumulate (FSDP reduces them after the last microbatch)."""
        self.check_batch(microbatches)
        self.train()
        metrics = []
        microbatches = self._equalized(microbatches)
        for i, mb in enumerate(microbatches):
            self.set_gradient_sync(i == len(microbatches) - 1)
            logits, shard = self._forward(mb)
            loss, m = loss_fn(*whole_rows(logits, shard, temperature, self.cp_group))
            loss.backward()
            metrics.append(m)
        return metrics

    @torch.no_grad()
    def logprobs(self, microbatches: list[dict], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token logprobs of this rank's LLM rows, whole rows [B, S] or sequence slots [R, K, L]."""
        n = len(microbatches)
        self.eval()
        out = []
        for mb in self._equalized(list(microbatches)):
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
        logits, _ = self._forward({**text, **{k: batch[k] for k in IMAGE_KEYS}})
        rows = self.generation_rows(batch["input_ids"].shape[0])
        last = self.logits_at(logits, lengths[rows.start:rows.stop] - 1)
        if banned is not None:
            last[:, banned] = -torch.inf
        return last.argmax(-1)

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
        encoder = self.modules[self.encoder_name]
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
        for name, module in self.modules.items():
            for n, p in module.named_parameters():
                yield f"{name}.{n}", p

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of every module's gradients, identical on every rank: each module's squared norm is
        reduced over that module's grid (a DTensor norm covers its shards) into its slot of a world vector
        (every member holds the same value), combined over the world with MAX. NaN would vanish in a MAX
        reduction, inf survives it: any rank's inf/NaN reaches every rank (and the step is skipped)."""
        slots = torch.zeros(len(self.modules), dtype=torch.float32, device=self.device)
        for i, module in enumerate(self.modules.values()):
            slots[i] = global_grad_norm(module.parameters(), self.device) ** 2
        slots = torch.nan_to_num(slots, nan=math.inf)
        dist.all_reduce(slots, op=dist.ReduceOp.MAX)
        return slots.sum().sqrt()

    # ------------------------------------------------------------ state (keys: <module>.<param>)
    def state_dict(self) -> dict:
        return {f"{name}.{k}": v for name, m in self.modules.items() for k, v in get_model_state_dict(m).items()}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.modules.items():
            set_model_state_dict(m, prefixed(state, name + "."))

    def full_state_dict(self) -> dict:
        """Full tensors on CPU (collective)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        return {f"{name}.{k}": v for name, m in self.modules.items()
                for k, v in get_model_state_dict(m, options=options).items()}

    def load_full_state_dict(self, state: dict) -> None:
        for name, m in self.modules.items():
            set_model_state_dict(m, prefixed(state, name + "."), options=StateDictOptions(full_state_dict=True))

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
