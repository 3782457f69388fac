"""MIMO oracle helpers: tiny SigLIP + projector + Llama, random batches that follow the MIMO batch contract
(input_ids with placeholder tokens, labels, attention_mask, pixel_values batch-major, image_counts), and a
single-process reference step written independently of the library's MIMO code."""

from __future__ import annotations

import torch

from automodel_mimo.config import ModelConfig
from automodel_mimo.data.batching import collate
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.mimo.modules import build_vision_module
from automodel_mimo.models.build import build_model
from tests.unit.oracle import VOCAB, assert_tensors_close, full_grads, full_params, tiny_llama_config

PLACEHOLDER = VOCAB - 1
IMAGE = 16
TOKENS_PER_IMAGE = (IMAGE // 8) ** 2  # SigLIP patches of 8 pixels
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=IMAGE, patch_size=8, vision_use_head=False)
# images per row: text-only rows, and microbatches of 2 rows whose first or second half has no image
IMAGE_COUNTS = [1, 0, 2, 1, 0, 0, 1, 2]


def build_modules(packed: bool = False, layers: int = 2) -> tuple[dict, torch.nn.Module]:
    vision = build_vision_module(VISION, tiny_llama_config(), seed=11)
    llm = build_model(ModelConfig(config={"model_type": "llama"}), tiny_llama_config(num_hidden_layers=layers), seed=7,
                      packed=packed)
    return {"vision": vision}, llm


def mimo_rows(seed: int = 0, counts: list[int] = IMAGE_COUNTS) -> list[dict]:
    """Prompt text, tokens_per_image placeholders per image, response text; row 1 has no loss token,
    row 3 (one image) neither, so its image gets no gradient."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, k in enumerate(counts):
        prompt = torch.randint(1, PLACEHOLDER, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        response = torch.randint(1, PLACEHOLDER, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        ids = torch.cat([prompt, torch.full((k * TOKENS_PER_IMAGE,), PLACEHOLDER), response])
        labels = torch.full_like(ids, IGNORE_INDEX)
        start = len(ids) - len(response)
        labels[start - 1:-1] = ids[start:]
        if i in (1, 3):
            labels[:] = IGNORE_INDEX
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(),
                     "pixel_values": torch.randn(k, 3, IMAGE, IMAGE, generator=g)})
    return rows


def mimo_collate(rows: list[dict]) -> dict:
    batch = collate(rows, pad_id=0)
    batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
    batch["image_counts"] = torch.tensor([r["pixel_values"].shape[0] for r in rows])
    return batch


def reference_token_logprobs(vision, llm, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder -> projector -> splice -> LLM on a whole mimo_collate batch, one process: per-token logprobs of
    the labels [B, S] and the loss mask."""
    # LLaVA's features: the last layer's hidden states, before the tower's post-layernorm (unused: no gradient)
    feats = vision.projector(vision.encoder(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1])
    embeds = llm.get_input_embeddings()(batch["input_ids"])
    mask = batch["input_ids"] == PLACEHOLDER
    embeds = embeds.masked_scatter(mask[..., None], feats.reshape(-1, feats.shape[-1]))
    logits = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    valid = batch["labels"] != IGNORE_INDEX
    return logp * valid, valid


def named_mimo_parameters(vision, llm) -> list:
    return [(f"vision.{n}", p) for n, p in vision.named_parameters()] + [(f"language.{n}", p) for n, p in llm.named_parameters()]


def finish_reference_step(named: list, loss: torch.Tensor, optimizer: str, lr: float, eps: float, weight_decay: float,
                          grad_clip: float) -> dict:
    """backward, gradients, global-norm clip, one SGD / AdamW step (decay on matrices only)."""
    loss.backward()
    grads = full_grads(named)
    params = [p for _, p in named]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(groups, lr=lr, eps=eps)
    opt.step()
    return {"loss": float(loss), "grad_norm": float(norm), "grads": grads, "params": full_params(named)}


def reference_mimo_step(rows: list[dict], optimizer: str, lr: float, eps: float, weight_decay: float,
                        grad_clip: float, layers: int = 2) -> dict:
    """Whole batch, one process: encoder -> projector -> splice -> LLM, token-mean NLL, clip, step."""
    encoders, llm = build_modules(layers=layers)
    vision = encoders["vision"]
    logp, valid = reference_token_logprobs(vision, llm, mimo_collate(rows))
    loss = -logp.sum() / valid.sum()
    return finish_reference_step(named_mimo_parameters(vision, llm), loss, optimizer, lr, eps, weight_decay, grad_clip)


def assert_step_close(got: dict, ref: dict, what: str) -> None:
    """rel err < TOL for every gradient and post-step weight, except the gradients that are zero in exact
    math (SigLIP's key biases: the softmax ignores them) and those zero-initialized biases after the step:
    their rounding noise is compared in absolute terms, below 1e-6 x the largest gradient (weight) norm."""
    floor = 1e-6 * max(float(g.norm()) for g in ref["grads"].values())
    zero = {n for n, g in ref["grads"].items() if float(g.norm()) < floor}
    assert all(float(got["grads"][n].norm()) < floor for n in zero), {n: float(got["grads"][n].norm()) for n in zero}
    weight_floor = 1e-6 * max(float(p.norm()) for p in ref["params"].values())
    assert all(float((got["params"][n] - ref["params"][n]).norm()) < weight_floor for n in zero)
    for kind in ("grads", "params"):
        assert_tensors_close({n: g for n, g in got[kind].items() if n not in zero},
                             {n: g for n, g in ref[kind].items() if n not in zero}, f"{what} {kind}")


def compiled_layers(model) -> dict[str, int]:
    """Per module of a MimoHandle on this rank: its layers compiled in place (nn.Module.compile, train.compile)."""
    return {name: sum(getattr(m, "_compiled_call_impl", None) is not None for part in parts for m in part.modules())
            for name, parts in model.module_parts.items()}
