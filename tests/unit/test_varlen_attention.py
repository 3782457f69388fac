"""The varlen attention plans (models/varlen_attention.py) against the dense boolean-mask SDPA path.

The kernel itself is CUDA-only; here a reference varlen kernel (per sequence SDPA, causal mask aligned to
the bottom right like flash attention) checks that the plans cut packed rows and CP shards into the right
query runs and key ranges. bench/packed_kernel_check.py runs the same checks with the real kernel on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel_mimo.data.packing import collate_packed, pack
from automodel_mimo.models import varlen_attention
from automodel_mimo.models.packed_attention import block_causal_mask, cp_mask, segment_ids
from automodel_mimo.parallel.context_parallel import cp_indices


def reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False):
    outs = []
    for i in range(len(cu_q) - 1):
        q = query[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        k = key[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(query.shape[1] // key.shape[1], 0)
        v = value[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(query.shape[1] // key.shape[1], 0)
        nq, nk = q.shape[1], k.shape[1]
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)  # bottom-right causal
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)


REFERENCE = (reference_varlen, {"window_size": (-1, 0)}, True)


def packed_qkv(lengths, size, multiple, device="cpu", dtype=torch.float32, heads=4, kv_heads=2, dim=8):
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    batch = collate_packed(rows, pack(lengths, size, multiple), size, multiple, 0, device=device)
    B, S = batch["position_ids"].shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, h, S, dim, generator=g, device=device).to(dtype) for h in (heads, kv_heads, kv_heads))
    return batch, q, k, v


def dense(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)
    return out.transpose(1, 2)


def check_packed(kernel, device="cpu", dtype=torch.float32) -> float:
    batch, q, k, v = packed_qkv([1, 7, 30, 13, 2, 20, 9], 40, 1, device, dtype)
    got = varlen_attention.packed_attention(q, k, v, batch["position_ids"], None, kernel=kernel)
    # the plan passed in (packed_attention.varlen_kwargs: cu_seqlens, the row length bounding every sequence)
    planned = varlen_attention.packed_attention(q, k, v, batch["position_ids"], None, kernel=kernel,
                                                cu=varlen_attention.cu_seqlens(batch["position_ids"]))
    ref = dense(q.float(), k.float(), v.float(), block_causal_mask(batch["position_ids"]))
    return max(float((out.float() - ref).norm() / ref.norm()) for out in (got, planned))


def check_cp(kernel, cp: int, device="cpu", dtype=torch.float32) -> float:
    """Every cp rank's output, computed from simulated shards, equals the full dense attention there."""
    batch, q, k, v = packed_qkv([1, 7, 30, 13, 2, 20, 9], 48, 2 * cp, device, dtype)
    full = dense(q.float(), k.float(), v.float(), block_causal_mask(batch["position_ids"]))
    index = [torch.stack([torch.as_tensor(cp_indices(row.tolist(), cp, r)) for row in batch["cu_seqlens_padded"]]).to(device)
             for r in range(cp)]
    shard = [lambda x, i=i: x.gather(2, i[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])) for i in index]
    positions = [batch["position_ids"].gather(1, i) for i in index]
    keys = torch.cat([s(k) for s in shard], 2)
    values = torch.cat([s(v) for s in shard], 2)
    worst = 0.0
    for r in range(cp):
        segments = segment_ids(positions[0])
        got = varlen_attention.cp_attention(shard[r](q), keys, values, positions[r], positions, segments, None, kernel=kernel)
        ref = full.gather(1, index[r][:, :, None, None].expand(-1, -1, *full.shape[2:]))
        dense_cp = dense(shard[r](q).float(), keys.float(), values.float(), cp_mask(positions[r], positions, segments))
        worst = max(worst, float((got.float() - ref).norm() / ref.norm()), float((dense_cp - ref).norm() / ref.norm()))
    return worst


def test_packed_plan_matches_block_causal_sdpa():
    assert check_packed(REFERENCE) < 1e-6


def test_cp_plan_matches_full_attention():
    for cp in (2, 3):
        assert check_cp(REFERENCE, cp) < 1e-6
