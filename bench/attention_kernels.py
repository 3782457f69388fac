"""Attention kernels on packed and full rows, one layer's forward + backward, side by side (GPU).

  PYTHONPATH=$PWD python bench/attention_kernels.py [--heads 16 --kv-heads 8] [--out FILE]

Packed rows (documents of log-normal length, median ~600 tokens, as bench/packing_throughput.py) run through
every kernel that can attend causally inside each document and not across them:
- varlen_fa2: torch.nn.attention.varlen (what models/varlen_attention.py uses today);
- njt_cudnn / njt_flash / njt_efficient: SDPA on a jagged nested tensor (one sequence per document) with
  that backend forced (torch picks the ragged cuDNN / flash / mem-efficient kernel);
- flex_doc: compiled flex_attention with a document-causal BlockMask;
- sdpa_mask: SDPA with the explicit [T, T] boolean block-causal mask (the CPU path of packed_attention.py).
Full rows (one 4096-token sequence per row) through SDPA is_causal with each backend forced (the unpacked path).
Each variant's output and input gradients are checked against sdpa_mask (bf16 tolerance); time = median of
CUDA-event-timed iterations after warm-up; TFLOP/s counts causal work only (fwd 2*H*D*sum(L^2), bwd 2.5x fwd).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def doc_lengths(rows: int, row_len: int, seed: int = 0) -> list[list[int]]:
    """Per row, document lengths filling it exactly (log-normal, median 600, capped at the row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        docs, left = [], row_len
        while left > 0:
            n = int(torch.exp(torch.log(torch.tensor(600.0)) + 0.8 * torch.randn(1, generator=g)).item())
            n = max(16, min(n, left))
            docs.append(n)
            left -= n
        out.append(docs)
    return out


def causal_flops(lengths: list[int], heads: int, dim: int) -> float:
    fwd = 2.0 * heads * dim * sum(n * n for n in lengths)  # QK^T and PV, half of the square each
    return 3.5 * fwd


def timed(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def packed_inputs(docs, heads, kv_heads, dim, device):
    """q [N, H, D], k/v [N, Hkv, D] (leaves), cu_seqlens int32 and the lengths."""
    lengths = [n for row in docs for n in row]
    total = sum(lengths)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(total, heads, dim, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(total, kv_heads, dim, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(total, kv_heads, dim, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu, lengths


def packed_kernels(rows: int, row_len: int):
    """name -> fn(q, k, v, cu, lengths) -> out [N, H, D]"""
    def varlen(q, k, v, cu, lengths):  # the library's call (the causal flag's form differs across torch releases)
        from automodel_mimo.models.varlen_attention import _run
        return _run(q, k, v, cu, cu, max(lengths), max(lengths), None)

    def njt(backend):
        def fn(q, k, v, cu, lengths):
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            nq, nk, nv = (torch.nested.nested_tensor_from_jagged(x, offsets=cu.long()).transpose(1, 2)
                          for x in (q, k, v))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(nq, nk, nv, is_causal=True)
            return out.transpose(1, 2).values()
        return fn

    def sdpa_mask(q, k, v, cu, lengths):
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device))
        qb, kb, vb = (x.view(rows, row_len, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        sb = seg.view(rows, row_len)
        causal = torch.ones(row_len, row_len, dtype=torch.bool, device=q.device).tril()
        mask = ((sb[:, :, None] == sb[:, None, :]) & causal)[:, None]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)

    flex_cache = {}

    def flex(q, k, v, cu, lengths):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if "fn" not in flex_cache:
            flex_cache["fn"] = torch.compile(flex_attention)
            seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                          torch.tensor(lengths, device=q.device))

            def doc_causal(b, h, qi, ki):
                return (seg[qi] == seg[ki]) & (ki <= qi)
            n = q.shape[0]
            flex_cache["mask"] = create_block_mask(doc_causal, None, None, n, n, device=q.device)
        qb, kb, vb = (x.transpose(0, 1)[None] for x in (q, k, v))
        out = flex_cache["fn"](qb, kb, vb, block_mask=flex_cache["mask"], enable_gqa=True)
        return out[0].transpose(0, 1)

    return {"varlen_fa2": varlen, "njt_cudnn": njt(SDPBackend.CUDNN_ATTENTION),
            "njt_flash": njt(SDPBackend.FLASH_ATTENTION), "njt_efficient": njt(SDPBackend.EFFICIENT_ATTENTION),
            "flex_doc": flex, "sdpa_mask": sdpa_mask}


def full_kernels():
    def dense(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return fn
    return {"cudnn": dense(SDPBackend.CUDNN_ATTENTION), "flash": dense(SDPBackend.FLASH_ATTENTION),
            "efficient": dense(SDPBackend.EFFICIENT_ATTENTION)}


def run_variant(fn, leaves, grad, iters, warmup):
    def step():
        for x in leaves:
            x.grad = None
        fn().backward(grad)
    seconds = timed(step, iters, warmup)
    out = fn()
    out.backward(grad)
    return seconds, out.detach().float(), [x.grad.float() for x in leaves]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--row-len", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda")
    result = {"shape": vars(args), "torch": torch.__version__, "packed": {}, "full": {}}

    docs = doc_lengths(args.rows, args.row_len)
    q, k, v, cu, lengths = packed_inputs(docs, args.heads, args.kv_heads, args.dim, device)
    grad = torch.randn_like(q)
    flops = causal_flops(lengths, args.heads, args.dim)
    result["documents"] = len(lengths)
    ref = None
    kernels = packed_kernels(args.rows, args.row_len)
    for name in ["sdpa_mask"] + [n for n in kernels if n != "sdpa_mask"]:
        try:
            s, out, grads = run_variant(lambda: kernels[name](q, k, v, cu, lengths), (q, k, v), grad, args.iters, args.warmup)
        except Exception as e:  # a kernel this build lacks is a result too
            result["packed"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        ref = ref or (out, grads)
        result["packed"][name] = {"ms": s * 1e3, "tflops": flops / s / 1e12, "out_rel": rel(out, ref[0]),
                                  "grad_rel": max(rel(a, b) for a, b in zip(grads, ref[1]))}
        print(name, result["packed"][name], flush=True)

    shape = (args.rows, args.heads, args.row_len, args.dim)
    g = torch.Generator(device=device).manual_seed(1)
    fq = torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    kv_shape = (args.rows, args.kv_heads, args.row_len, args.dim)
    fk = torch.randn(*kv_shape, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    fv = torch.randn(*kv_shape, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    fgrad = torch.randn_like(fq)
    fflops = causal_flops([args.row_len] * args.rows, args.heads, args.dim)
    ref = None
    for name, fn in full_kernels().items():
        try:
            s, out, grads = run_variant(lambda: fn(fq, fk, fv), (fq, fk, fv), fgrad, args.iters, args.warmup)
        except Exception as e:
            result["full"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        ref = ref or (out, grads)
        result["full"][name] = {"ms": s * 1e3, "tflops": fflops / s / 1e12, "out_rel": rel(out, ref[0]),
                                "grad_rel": max(rel(a, b) for a, b in zip(grads, ref[1]))}
        print("full", name, result["full"][name], flush=True)
    print(json.dumps(result))
    if args.out:
        json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
