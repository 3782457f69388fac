"""Refit bandwidth of the weight-streaming path (no vLLM needed): manifest, gather, transport, verified
load into a receiver's own parameter tensors.

  python bench/refit_bandwidth.py --model 1b --model 8b             # GPU: colocated (in-process) + 2-rank NCCL
  python bench/refit_bandwidth.py --model tiny --dtype float32      # CPU: the same paths, gloo

Transports (--transport, repeatable; default in_process and broadcast):
- in_process: the receiver lives in the trainer's process and reads the trainer's tensors directly
  (WeightStream.__iter__): its copy into its own weights is the one pass over the bytes. Reported as a
  fraction of one device-to-device copy of the model's bytes measured in the same run.
- in_process_packed: the same consumer fed through flat buffers (pack, checksum, unpack), i.e. what
  bytes cost when they must travel: 6 passes over the bytes against the copy's 2.
- broadcast: rank 0 holds the trainer weights, rank 1 receives (NCCL on 2 GPUs, gloo on CPU); the
  fraction is against a plain broadcast of one buffer of the model's size between the same ranks.
- broadcast_same_gpu: the broadcast path between two processes on ONE GPU over NCCL (a colocated vLLM
  engine runs in its own process on the trainer's GPU); reports the error when NCCL refuses it.
- gloo_same_gpu: the same over gloo, which stages the CUDA buffers through host memory: the transport
  VLLMGenerator picks when the engine shares the trainer's GPU.
Median of --repeat timed refits after one warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from automodel_mimo.generation.transport import BroadcastTransport, world_routes  # noqa: E402
from automodel_mimo.generation.weight_stream import (  # noqa: E402
    WeightStream,
    broadcast_received,
    build_stream_plan,
    verified,
)

MODELS = {  # Llama-3.2-1B and Llama-3.1-8B shapes; tiny for CPU tests
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


class Weights:
    """Random weights with the model's names and shapes, allocated directly on the device."""

    def __init__(self, model: str, dtype: torch.dtype, device: torch.device, seed: int):
        from transformers import AutoModelForCausalLM, LlamaConfig

        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(LlamaConfig(**MODELS[model]))
        g = torch.Generator(device).manual_seed(seed)
        self.tensors = {n: torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).to(dtype)
                        for n, p in meta.named_parameters()}

    def generator_parameters(self):
        return iter(self.tensors.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copy_seconds(nbytes: int, device: torch.device, repeat: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), device, repeat)


def _broadcast_seconds(nbytes: int, device: torch.device, repeat: int) -> float:
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return _timed(lambda: dist.broadcast(buf, src=0), device, repeat)


def in_process(model: str, dtype: torch.dtype, bucket_bytes: int, repeat: int, packed: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sender = Weights(model, dtype, device, seed=0)
    receiver = Weights(model, dtype, device, seed=1).tensors
    plan = build_stream_plan(sender, dtype, bucket_bytes)
    nbytes = plan.manifest.nbytes

    def refit():
        stream = WeightStream(plan, sender.tensors)
        for name, tensor in verified(plan, stream.arrivals(packed=True)) if packed else stream:
            receiver[name].copy_(tensor)

    copy_s = _copy_seconds(nbytes, device, repeat)  # its buffers are freed before the refit runs
    refit_s = _timed(refit, device, repeat)
    assert all(torch.equal(receiver[n], t) for n, t in sender.tensors.items())
    kind = "in_process_packed" if packed else "in_process"
    return _result(kind, model, dtype, bucket_bytes, plan, nbytes, refit_s, copy_s, "d2d copy", device)


def in_process_packed(model: str, dtype: torch.dtype, bucket_bytes: int, repeat: int) -> dict:
    return in_process(model, dtype, bucket_bytes, repeat, packed=True)


def _result(kind, model, dtype, bucket_bytes, plan, nbytes, refit_s, base_s, base_name, device) -> dict:
    return {"transport": kind, "model": model, "dtype": str(dtype).removeprefix("torch."), "GB": nbytes / 1e9,
            "bucket_MB": bucket_bytes / 2**20, "buckets": len(plan.buckets), "refit_s": refit_s,
            "refit_GBps": nbytes / refit_s / 1e9, f"{base_name.replace(' ', '_')}_GBps": nbytes / base_s / 1e9,
            "fraction": base_s / refit_s, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _broadcast_rank(rank: int, port: int, model: str, dtype: torch.dtype, bucket_bytes: int, repeat: int, out: dict,
                    kind: str = "broadcast"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank if kind == "broadcast" else 0) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    if cuda:
        torch.cuda.set_device(device)
    nccl = cuda and kind != "gloo_same_gpu"
    dist.init_process_group("nccl" if nccl else "gloo", rank=rank, world_size=2, device_id=device if nccl else None)
    # rank 0 is the trainer (source), rank 1 the generator; the generator's weights start different
    weights = Weights(model, dtype, device, seed=rank)
    plan = build_stream_plan(weights if rank == 0 else _NoParams(), dtype, bucket_bytes)
    transport = BroadcastTransport(world_routes([0], [1]))

    def refit():
        if rank == 0:
            WeightStream(plan, weights.tensors, device).send(transport)
        else:
            for name, tensor in verified(plan, broadcast_received(plan, transport, device)):
                weights.tensors[name].copy_(tensor)

    nbytes = plan.manifest.nbytes
    base_s = _broadcast_seconds(nbytes, device, repeat)
    refit_s = _timed(refit, device, repeat)
    check = torch.stack([torch.stack([t.float().sum() for t in weights.tensors.values()]).sum()])
    gathered = [torch.empty_like(check) for _ in range(2)]
    dist.all_gather(gathered, check)
    assert torch.equal(gathered[0], gathered[1]), "receiver weights differ from the sender's"
    if rank == 1:
        out.update(_result(kind, model, dtype, bucket_bytes, plan, nbytes, refit_s, base_s, "plain broadcast", device))
    dist.destroy_process_group()


def _guarded_rank(rank: int, *args):
    """_broadcast_rank that reports its failure instead of dying (NCCL may refuse two ranks on one GPU)."""
    out = args[-2]
    try:
        _broadcast_rank(rank, *args)
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        out[f"error_rank{rank}"] = f"{type(e).__name__}: {str(e)[:300]}"


class _NoParams:
    """The generator rank owns no trainer parameters; the plan comes from rank 0's listing."""

    def generator_parameters(self):
        return iter(())


def broadcast(model: str, dtype: torch.dtype, bucket_bytes: int, repeat: int, kind: str = "broadcast") -> dict:
    from tests.unit.multirank import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_guarded_rank, args=(free_port(), model, dtype, bucket_bytes, repeat, out, kind),
                           nprocs=2, start_method="spawn")
        return {"transport": kind, "model": model, **dict(out)}


TRANSPORTS = {"in_process": in_process, "in_process_packed": in_process_packed, "broadcast": broadcast,
              **{kind: functools.partial(broadcast, kind=kind) for kind in ("broadcast_same_gpu", "gloo_same_gpu")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable; default 1b and 8b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--transport", action="append", choices=sorted(TRANSPORTS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # CPU smoke runs: no OMP thread wake-ups inside the timed copies
    bucket_bytes = int(args.bucket_mb * 2**20)
    for model in args.model or ["1b", "8b"]:
        for transport in args.transport or ["in_process", "broadcast"]:
            print(json.dumps(TRANSPORTS[transport](model, dtype, bucket_bytes, args.repeat)), flush=True)


if __name__ == "__main__":
    main()
