"""The oracle (docs/numerics.md): a parallel layout must reproduce the single-process result of the same global
batch — loss, every gradient, post-step weights — to fp32 rounding. Shared by every layout test."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, Qwen2Config

from automodel_mimo.config import TrainConfig
from automodel_mimo.losses import IGNORE_INDEX

TOL = 1e-5
VOCAB = 64


TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)


def tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    return Qwen2Config(**{**TINY, **overrides})


def random_rows(n: int, seed: int = 0, min_len: int = 6, max_len: int = 20) -> list[dict]:
    """Rows of random length with random prompt lengths (non-uniform loss masks); row 1 has no loss token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        labels = torch.full((length,), IGNORE_INDEX)
        labels[prompt - 1:-1] = ids[prompt:]
        if i == 1:
            labels[:] = IGNORE_INDEX
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def full_grads(named_params) -> dict[str, torch.Tensor]:
    return {n: full(p.grad) for n, p in named_params if p.grad is not None}  # unused parameters have none


def full_params(named_params) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in named_params}


def assert_tensors_close(got: dict, ref: dict, what: str, tol: float = TOL) -> None:
    assert got.keys() == ref.keys(), f"{what}: parameter names differ: {set(got) ^ set(ref)}"
    bad = {n: rel_err(got[n], ref[n]) for n in ref if rel_err(got[n], ref[n]) > tol}
    assert not bad, f"{what}: relative error above {tol}: {bad}"


def train_config(optimizer: str, grad_clip: float, global_batch_size: int, micro_batch_size: int) -> TrainConfig:
    # Adam's first update is ~ g / (|g| + eps): with a tiny eps it turns the rounding noise of gradients that
    # are zero in exact math (e.g. key biases, which softmax ignores) into +-lr steps. A larger eps keeps
    # the update a smooth function of the gradient, so the weight check measures the layout, not noise.
    return TrainConfig(optimizer=optimizer, lr=1e-2, eps=1e-4, grad_clip=grad_clip, global_batch_size=global_batch_size,
                       micro_batch_size=micro_batch_size, max_steps=10, warmup_steps=0, lr_decay="constant",
                       weight_decay=0.01 if optimizer == "adamw" else 0.0)


def reference_sft_step(model: torch.nn.Module, rows: list[dict], cfg: TrainConfig) -> dict:
    """Plain single-process SFT step, written independently of the library's loss code."""
    from automodel_mimo.data.batching import collate

    batch = collate(rows, pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits, -1)
    mask = batch["labels"] != IGNORE_INDEX
    picked = logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    loss = -(picked * mask).sum() / mask.sum()
    loss.backward()
    grads = full_grads(model.named_parameters())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (torch.optim.SGD(groups, lr=cfg.lr) if cfg.optimizer == "sgd"
           else torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps))
    opt.step()
    return {"loss": float(loss), "grad_norm": float(norm), "grads": grads, "params": full_params(model.named_parameters())}
