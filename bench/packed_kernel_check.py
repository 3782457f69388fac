"""GPU check of the packed attention kernels: varlen flash vs the boolean-mask SDPA reference.

  PYTHONPATH=$PWD python bench/packed_kernel_check.py

1. The attention alone, packed rows and simulated cp2/cp3 shards (tests/unit/test_varlen_attention.py's
   checks, run with the real CUDA kernel instead of the CPU reference kernel).
2. A small Llama in bf16 runs the same packed rows (odd lengths, a one-token sequence, trailing padding)
   through the varlen path and with it switched off (explicit block-causal mask): logits, loss and every
   gradient compared (docs/numerics.md: rel err < 1e-2 in bf16), also with the plan passed as attention kwargs
   (`packed_attention.varlen_kwargs`, what the handle does). Exits 1 if any check fails.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from automodel_mimo.data.packing import collate_packed, pack
from automodel_mimo.losses import masked_nll, token_logprobs
from automodel_mimo.models import packed_attention, varlen_attention
from tests.unit.test_varlen_attention import check_cp, check_packed


def run(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs).logits
    loss = masked_nll(token_logprobs(logits, batch["labels"]), batch["loss_mask"], batch["loss_mask"].sum())
    loss.backward()
    return logits.float().detach(), loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def main() -> int:
    assert torch.cuda.is_available(), "needs a GPU"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=1024, attn_implementation=packed_attention.NAME)
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
    lengths = [1, 37, 255, 300, 511, 64, 129, 2]
    rows = []
    for n in lengths:
        ids = torch.randint(1, 1000, (n,))
        rows.append({"input_ids": ids.tolist(), "labels": ids[1:].tolist() + [-100]})
    batch = collate_packed(rows, pack(lengths, 512), 512, 1, 0, device="cuda")
    assert varlen_attention.KERNEL is not None, "this torch has no torch.nn.attention.varlen"
    kernel = varlen_attention.KERNEL
    errs = {"attention_packed": check_packed(kernel, "cuda", torch.bfloat16),
            "attention_cp2": check_cp(kernel, 2, "cuda", torch.bfloat16),
            "attention_cp3": check_cp(kernel, 3, "cuda", torch.bfloat16)}
    fast = run(model, batch)
    planned = run(model, batch, **packed_attention.varlen_kwargs(model, batch))  # the plan the handle passes
    varlen_attention.KERNEL = None  # the boolean-mask SDPA path
    ref = run(model, batch)
    varlen_attention.KERNEL = kernel
    errs.update({"logits": rel(fast[0], ref[0]), "loss": rel(fast[1], ref[1]),
                 "worst_grad": max(rel(fast[2][n], ref[2][n]) for n in ref[2]),
                 "planned_logits": rel(planned[0], ref[0]), "planned_vs_cached": rel(planned[0], fast[0]),
                 "planned_worst_grad": max(rel(planned[2][n], ref[2][n]) for n in ref[2])})
    print(json.dumps({"packed_kernel_check": errs, "torch": torch.__version__}))
    return 0 if max(errs.values()) < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
