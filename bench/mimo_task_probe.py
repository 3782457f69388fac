"""Learnability probe for synthetic:shapes: tiny SigLIP tower + MLP projector + tiny Llama, plain PyTorch.

Single process, no parallelism: the data path is the real one (load_image_dataset -> tokenize_mimo_dataset
-> mimo_rows -> collate_mimo), the model is HF SiglipVisionModel + projector + LlamaForCausalLM with the
projected patch rows spliced over the placeholder embeddings. Prints held-out greedy exact-match accuracy
against wall time, and writes the curve as JSON lines with --out.

  PYTHONPATH=$PWD python bench/mimo_task_probe.py --threads 2
  PYTHONPATH=$PWD python bench/mimo_task_probe.py --blind   # images zeroed: what the text alone gives
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from automodel_mimo.data.batching import global_batch_indices
from automodel_mimo.data.images import ImageProcessor, load_image_dataset
from automodel_mimo.data.mimo_batching import collate_mimo, mimo_rows
from automodel_mimo.data.mimo_tokenize import tokenize_mimo_dataset
from automodel_mimo.data.synthetic import grade_exact
from automodel_mimo.models.tokenizer import build_default_tokenizer, image_token_id


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--num-eval", type=int, default=500)
    p.add_argument("--text-only-fraction", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--llm-hidden", type=int, default=128)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-seq-len", type=int, default=80)
    p.add_argument("--blind", action="store_true", help="zero every image (the text-only baseline)")
    p.add_argument("--out", default=None, help="write the curve here as JSON lines")
    return p.parse_args()


class Mimo(torch.nn.Module):
    """vision tower -> projector -> LLM, projected rows spliced over the placeholder embeddings in order."""

    def __init__(self, args: argparse.Namespace, vocab_size: int, pad_id: int, placeholder_id: int) -> None:
        super().__init__()
        self.placeholder_id = placeholder_id
        self.vision = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
            num_hidden_layers=args.vision_layers, num_attention_heads=4, num_channels=3,
            image_size=args.image_size, patch_size=args.patch_size, vision_use_head=False))
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(args.vision_hidden, args.llm_hidden), torch.nn.GELU(),
            torch.nn.Linear(args.llm_hidden, args.llm_hidden))
        self.llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=args.llm_hidden, intermediate_size=3 * args.llm_hidden,
            num_hidden_layers=args.llm_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=args.max_seq_len + 32, tie_word_embeddings=False, pad_token_id=pad_id))

    def embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        slots = input_ids == self.placeholder_id
        if len(pixel_values) == 0:
            assert not slots.any(), "placeholders without images"
            return embeds
        rows = self.projector(self.vision(pixel_values=pixel_values).last_hidden_state)  # (N_img, P, H), batch-major
        rows = rows.reshape(-1, rows.shape[-1])
        assert int(slots.sum()) == len(rows), f"{int(slots.sum())} placeholders for {len(rows)} encoder rows"
        return embeds.masked_scatter(slots[..., None], rows.to(embeds.dtype))  # fills slots in row-major order

    def forward(self, batch: dict) -> torch.Tensor:
        embeds = self.embeddings(batch["input_ids"], batch["pixel_values"])
        return self.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"]).logits


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def accuracy(model: Mimo, eval_ds, processor: ImageProcessor, tokenizer, blind: bool, max_new: int = 18) -> dict:
    """Greedy exact match (KV cache) over all rows and over image rows; prompts grouped by length: no padding."""
    model.eval()
    stop = set(tokenizer.all_special_ids)
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(eval_ds["prompt_ids"]):
        groups.setdefault(len(prompt), []).append(i)
    correct = {True: 0, False: 0}  # keyed by "row has an image"
    words = [0, 0]  # image rows whose first word (the colour) / the rest (the place) is right
    for indices in groups.values():
        rows = eval_ds[indices]
        ids = torch.tensor(rows["prompt_ids"])
        pixels = torch.cat([processor(images) for images in rows["images"]])
        if blind:
            pixels = torch.zeros_like(pixels)
        result = model.llm(inputs_embeds=model.embeddings(ids, pixels), use_cache=True)
        out = []
        for _ in range(max_new):
            token = result.logits[:, -1].argmax(-1)
            out.append(token)
            result = model.llm(input_ids=token[:, None], past_key_values=result.past_key_values, use_cache=True)
        out = torch.stack(out, 1).tolist()
        for seq, ref, images in zip(out, rows["reference"], rows["images"]):
            seq = seq[:next((k for k, t in enumerate(seq) if t in stop), len(seq))]
            answer = tokenizer.decode(seq)
            correct[bool(images)] += grade_exact(answer, ref)
            if images:
                for k, (got, want) in enumerate(zip((answer.strip().split(" ", 1) + [""])[:2], ref.split(" ", 1))):
                    words[k] += got == want
    model.train()
    n_image = sum(n > 0 for n in eval_ds["num_images"])
    return {"eval_accuracy": sum(correct.values()) / len(eval_ds),
            "eval_accuracy_image_rows": correct[True] / max(1, n_image),
            "colour_ok": words[0] / max(1, n_image), "place_ok": words[1] / max(1, n_image)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_default_tokenizer()
    placeholder_id = image_token_id(tokenizer)
    tokens_per_image = (args.image_size // args.patch_size) ** 2
    processor = ImageProcessor(args.image_size)
    t0 = time.perf_counter()
    raw = load_image_dataset("synthetic:shapes", seed=args.seed, num_train=args.num_train, num_eval=args.num_eval,
                             image_size=args.image_size, text_only_fraction=args.text_only_fraction)
    data = {split: tokenize_mimo_dataset(ds, tokenizer, placeholder_id=placeholder_id, tokens_per_image=tokens_per_image,
                                         max_seq_len=args.max_seq_len, use_chat_template=True, truncate=False,
                                         split_name=split)
            for split, ds in raw.items()}
    train_rows = mimo_rows(data["train"][:], processor)  # preprocess once: the probe times the model, not PIL
    print(f"data ready in {time.perf_counter() - t0:.1f}s: {len(train_rows)} train / {len(data['eval'])} eval rows, "
          f"{tokens_per_image} placeholders per image", flush=True)

    model = Mimo(args, len(tokenizer), tokenizer.pad_token_id, placeholder_id)
    n_params = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("vision", "projector", "llm")}
    print(f"parameters: {n_params}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))

    curve = []
    train_s = 0.0
    cpu0 = time.process_time()  # CPU seconds of this process: a load-independent cost (<= threads x wall when idle)
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        indices = global_batch_indices(step - 1, len(train_rows), args.batch, args.seed)
        batch = collate_mimo([train_rows[i] for i in indices], tokenizer.pad_token_id)
        if args.blind:
            batch["pixel_values"] = torch.zeros_like(batch["pixel_values"])
        loss = loss_fn(model(batch), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, data["eval"], processor, tokenizer, args.blind)
            point = {"step": step, "loss": round(loss.item(), 4), **acc, "train_s": round(train_s, 1),
                     "cpu_s": round(time.process_time() - cpu0, 1), "load1": os.getloadavg()[0], "wall_s": round(time.perf_counter() - t0, 1)}
            curve.append(point)
            print(json.dumps(point), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps({**vars(args), **p}) + "\n" for p in curve)


if __name__ == "__main__":
    main()
