"""GPU kernels for packed attention: torch's varlen flash attention (`torch.nn.attention.varlen`).

Packed rows flatten into one batch of sequences described by cumulative lengths, so no mask exists at all
(the SDPA path in packed_attention.py needs a [T, T] boolean mask per row). Under context parallelism a
rank's queries are runs of consecutive positions (its two load-balanced chunks of every sequence); each run
attends causally to its sequence's keys up to the run's last position. Flash attention aligns the causal
mask to the bottom right when there are more keys than queries, which is exactly that, so every run is one
varlen "sequence" whose keys are gathered (in original order) from the all-gathered K/V. Plans are built
once per batch (every layer sees the same position_ids tensor) and cached.
"""

from __future__ import annotations

import inspect
import weakref

import torch


def _find_kernel():
    """(varlen_attn, causal kwargs, has enable_gqa) or None; the causal flag changed form across torch releases."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


KERNEL = _find_kernel()


def available(query: torch.Tensor, position_ids: torch.Tensor) -> bool:
    return (KERNEL is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and position_ids.shape == query.shape[::2])


class _PlanCache:
    """The plan of the last position_ids tensor seen (held weakly: a new batch is a new tensor)."""

    def __init__(self):
        self.ref, self.plan = None, None

    def get(self, position_ids: torch.Tensor, build):
        if self.ref is None or self.ref() is not position_ids:
            self.ref, self.plan = weakref.ref(position_ids), build()
        return self.plan


_cache = _PlanCache()


def _run(query, key, value, cu_q, cu_k, max_q: int, max_k: int, scale, kernel=None):
    """query [Nq, H, D], key/value [Nk, Hkv, D] -> [Nq, H, D] through the varlen kernel (GQA expanded if needed)."""
    fn, causal, has_gqa = kernel or KERNEL
    groups = query.shape[1] // key.shape[1]
    extra = {}
    if groups > 1 and has_gqa:
        extra["enable_gqa"] = True
    elif groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return fn(query, key, value, cu_q, cu_k, max_q, max_k, scale=scale, **causal, **extra)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B*T, H, D]"""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B * T, H, D)


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions -> int32 cumulative sequence lengths over the flattened rows (a sequence starts at 0)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def packed_attention(query, key, value, position_ids, scale, kernel=None, cu: torch.Tensor | None = None):
    """Packed rows [B, H, T, D] (sequences start at position 0) -> [B, T, H, D]. `cu`: the rows' cu_seqlens when
    the caller computed them (models/packed_attention.py varlen_kwargs); the row length T bounds every sequence."""
    B, H, T, D = query.shape
    if cu is None:
        def build():
            cu = cu_seqlens(position_ids)
            return cu, int((cu[1:] - cu[:-1]).max())

        cu, max_len = _cache.get(position_ids, build)
    else:
        max_len = T
    return _run(_flat(query), _flat(key), _flat(value), cu, cu, max_len, max_len, scale, kernel).view(B, T, H, D)


def cp_plan(local_positions: torch.Tensor, all_positions: list[torch.Tensor], segments: torch.Tensor):
    """Query runs of this rank and, for each, the indices of its keys in the flattened gathered K/V.

    local_positions [B, Tl]; all_positions: every cp rank's [B, Tl] (gather order = K/V order);
    segments [B, Tl]: sequence index of each local token (the same layout on every rank).
    """
    B, Tl = local_positions.shape
    gathered = torch.cat(all_positions, -1).cpu()  # [B, cp*Tl]
    width = gathered.shape[1]
    seg_k = segments.cpu().repeat(1, len(all_positions))
    pos, seg = local_positions.cpu(), segments.cpu()
    cu_q, cu_k, key_index = [0], [0], []
    for b in range(B):
        order = torch.argsort(seg_k[b] * (width + 1) + gathered[b])  # gathered tokens by (sequence, position)
        seg_start = torch.searchsorted(seg_k[b][order], seg[b].unique(), right=False)
        first = {int(s): int(i) for s, i in zip(seg[b].unique(), seg_start)}
        p, s = pos[b].tolist(), seg[b].tolist()
        t = 0
        while t < Tl:  # a run: same sequence, consecutive positions
            end = t + 1
            while end < Tl and s[end] == s[t] and p[end] == p[end - 1] + 1:
                end += 1
            n_keys = p[end - 1] + 1  # the sequence's keys at positions 0 .. last query position
            key_index.append(order[first[s[t]]:first[s[t]] + n_keys] + b * width)
            cu_q.append(cu_q[-1] + end - t)
            cu_k.append(cu_k[-1] + n_keys)
            t = end
    device = local_positions.device
    lengths_q = [b - a for a, b in zip(cu_q[:-1], cu_q[1:])]
    lengths_k = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
    return (torch.tensor(cu_q, dtype=torch.int32, device=device), torch.tensor(cu_k, dtype=torch.int32, device=device),
            torch.cat(key_index).to(device), max(lengths_q), max(lengths_k))


def cp_attention(query, keys, values, local_positions, all_positions, segments, scale, kernel=None):
    """query [B, H, Tl, D] local; keys/values [B, Hkv, cp*Tl, D] all-gathered (rank-major) -> [B, Tl, H, D]."""
    cu_q, cu_k, index, max_q, max_k = _cache.get(
        local_positions, lambda: cp_plan(local_positions, all_positions, segments))
    B, H, Tl, D = query.shape
    k, v = _flat(keys).index_select(0, index), _flat(values).index_select(0, index)
    return _run(_flat(query), k, v, cu_q, cu_k, max_q, max_k, scale, kernel).view(B, Tl, H, D)
