"""Where a step's CUDA memory goes: the caching allocator's trace of one step, summarized by call site.

Used by bench/sft_throughput.py --memory-trace. A step that reserves more than another at equal allocated peaks
(fragmentation) pays in driver calls: each `segment_alloc` is a cudaMalloc, each `segment_free` a cudaFree (a
retry frees every cached block, and both synchronize the device). The summary names the Python sites whose
allocations made the driver calls and the sites of the large allocations, so two variants can be compared.
"""

from __future__ import annotations

import gzip
import pickle
from collections import defaultdict

import torch

# the first frame from one of these is the site of an allocation (the innermost frames are torch's own plumbing)
SITE_FILES = ("automodel_mimo", "policies/", "nemo_automodel", "transformers/", "bench/", "fsdp/", "torch/optim",
              "torch/nn/functional", "torch/_tensor", "autograd", "checkpoint")
LARGE = 64 * 2**20


def site(frames: list[dict]) -> str:
    """'file:line function' of the first frame in SITE_FILES (the innermost frame if none is)."""
    for f in frames:
        if any(s in f["filename"] for s in SITE_FILES):
            return f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
    f = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
    return f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"


def by_site(events: list[dict], top: int = 10) -> list:
    """[count, GiB, site] of `events`, the most bytes first."""
    acc: dict[str, list] = defaultdict(lambda: [0, 0])
    for e in events:
        key = site(e.get("frames", []))
        acc[key][0] += 1
        acc[key][1] += e["size"]
    rows = sorted(acc.items(), key=lambda kv: -kv[1][1])[:top]
    return [[n, round(b / 2**30, 2), k] for k, (n, b) in rows]


def segments_state(segments: list[dict]) -> dict:
    """Reserved, allocated and the free bytes stranded inside segments that still hold a live block."""
    reserved = sum(s["total_size"] for s in segments)
    allocated = sum(s["allocated_size"] for s in segments)
    stranded = sum(s["total_size"] - s["allocated_size"] for s in segments if s["allocated_size"])
    return {"segments": len(segments), "reserved_gib": round(reserved / 2**30, 2),
            "allocated_gib": round(allocated / 2**30, 2), "free_in_live_segments_gib": round(stranded / 2**30, 2)}


def memory_trace(step, dump: str | None = None) -> dict:
    """Run `step` once under the allocator's history recorder and summarize it (optionally gzip-pickle the trace)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snap["device_traces"] for e in trace]
    if dump:
        with gzip.open(dump, "wb") as f:
            pickle.dump(snap, f)
    actions = defaultdict(int)
    for e in events:
        actions[e["action"]] += 1
    mallocs = [e for e in events if e["action"] == "segment_alloc"]
    frees = [e for e in events if e["action"] == "segment_free"]
    large = [e for e in events if e["action"] == "alloc" and e["size"] >= LARGE]
    return {"actions": dict(actions),
            "cudaMalloc": {"count": len(mallocs), "gib": round(sum(e["size"] for e in mallocs) / 2**30, 2),
                           "by_site": by_site(mallocs)},
            "cudaFree": {"count": len(frees), "gib": round(sum(e["size"] for e in frees) / 2**30, 2),
                         "by_site": by_site(frees)},
            "large_allocs_by_site": by_site(large, top=14),
            "after_step": segments_state(snap["segments"])}
