"""Refit: stream the trainer's weights into the generator, bucket by bucket.

Setup (once): `build_stream_plan` lists every trainer rank's parameters by weight group (a group: the
parameters the same ranks hold, e.g. one pipeline stage of an LM; a MIMO model's encoder + projector, and each
of its LLM's stages, `handle.weight_groups()`), orders the groups into a `Manifest` in the generator's naming, each
group once, marks each entry with its source (the lowest global rank holding its group) and cuts it into
buckets that never mix groups. The generator validates the manifest once against its own parameters.

Each refit: `gathered_buckets` runs on EVERY trainer rank: for each bucket of its groups, all ranks of the
group gather the bucket's sharded parameters (FSDP/TP DTensors) to full tensors together; only one bucket
of full tensors exists at a time, never the whole model. Bytes that travel (`send_weights`, a broadcast
transport) are packed by the source into one of two alternating flat buffers, and the generator side
(`verified`) checks each bucket's index and checksum. A generator in the source rank's own process reads
the gathered tensors directly (`WeightStream.__iter__`): no flat buffer, no checksum, since no bytes move;
its one pass over the bytes is its own copy into its weights. Either way the stream raises unless every
manifest entry arrived exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from automodel_mimo.generation.bucketing import (
    Bucket,
    StreamIntegrityError,
    buffer_bytes,
    named_tensors,
    pack,
    plan_buckets,
    unpack,
)
from automodel_mimo.generation.manifest import Manifest, ManifestEntry
from automodel_mimo.generation.transport import BroadcastTransport, world_routes

DEFAULT_BUCKET_BYTES = 512 << 20


@dataclass
class StreamPlan:
    manifest: Manifest
    buckets: list[Bucket]
    bucket_bytes: int
    own_names: frozenset[str] | None = None  # the entries of this trainer rank's groups (its parameters)

    @property
    def sources(self) -> list[int]:
        return sorted({b.source for b in self.buckets})


def _groups(handle, local: dict[str, torch.Tensor]) -> dict[tuple, list[str]]:
    """This rank's generator names by weight group key (sortable; ranks with equal keys hold the same parameters):
    the handle's own grouping (`weight_groups`: name -> key) or one group per pipeline stage."""
    key_of = handle.weight_groups() if hasattr(handle, "weight_groups") else None
    group = getattr(handle, "stage_group", None)
    stage = (dist.get_rank(group) if group is not None else 0,)
    out: dict[tuple, list[str]] = {}
    for name in local:
        out.setdefault(key_of[name] if key_of is not None else stage, []).append(name)
    return out


def build_stream_plan(handle, dtype: torch.dtype, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> StreamPlan:
    """The manifest and bucket plan (collective over the world when torch.distributed is initialized).

    `handle`: a ModelHandle (or anything with `generator_parameters()`, an optional `stage_group` and an optional
    `weight_groups()`). Each group is listed once, by the lowest rank holding it, in key order.
    """
    local = local_parameters(handle)
    shapes = {name: tuple(p.shape) for name, p in local.items()}
    mine = (dist.get_rank() if dist.is_initialized() else 0,
            {key: [(n, shapes[n]) for n in names] for key, names in _groups(handle, local).items()})
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    groups: dict[tuple, tuple[int, list]] = {}
    for rank, held in everyone:
        for key, names in held.items():
            if key not in groups or rank < groups[key][0]:
                groups[key] = (rank, names)
    entries = [ManifestEntry(name, shape, dtype, source, index)
               for index, key in enumerate(sorted(groups)) for source, names in [groups[key]] for name, shape in names]
    manifest = Manifest(tuple(entries))
    own = frozenset(n for names in mine[1].values() for n, _ in names)
    return StreamPlan(manifest, plan_buckets(manifest, bucket_bytes), bucket_bytes, own)


def local_parameters(handle) -> dict[str, torch.Tensor]:
    """This rank's parameters under the generator's names and layout (sharded ones as DTensors): the handle's
    `generator_parameters()`, transformers' naming of its HF export (an MoE model's experts renamed and transposed,
    a MIMO model's under LLaVA's names)."""
    return dict(handle.generator_parameters())


def coverage_problems(plan: StreamPlan, params: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `params` (this rank's, full shapes: a DTensor's shape is global) from being exactly this rank's
    groups' manifest entries: missing, extra or mis-shaped names."""
    if plan.own_names is None:
        return []
    expected = {e.name: e.shape for e in plan.manifest.entries if e.name in plan.own_names}
    problems = [f"{n}: missing from the trainer's parameters" for n in expected if n not in params]
    problems += [f"{n}: not in the manifest" for n in params if n not in expected]
    problems += [f"{n}: trainer shape {list(params[n].shape)} != manifest {list(shape)}"
                 for n, shape in expected.items() if n in params and tuple(params[n].shape) != shape]
    return problems


def check_coverage(plan: StreamPlan, params: dict[str, torch.Tensor]) -> None:
    """Before a refit gathers or sends anything: every rank's parameters (every module, each on its own grid)
    cover its groups' manifest entries exactly, at the manifest's shapes. Collective over the world when
    torch.distributed is initialized, so that every rank raises together instead of some hanging in a gather."""
    mine = coverage_problems(plan, params)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    bad = {rank: p for rank, p in enumerate(everyone) if p}
    if bad:
        lines = [f"rank {rank}: {p}" for rank, ps in bad.items() for p in ps[:8]]
        raise StreamIntegrityError("refit refused before sending anything: the trainer's parameters do not match the "
                                   "weight manifest\n  " + "\n  ".join(lines))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter; a DTensor whose local shard already is whole (one-rank mesh, or
    replicated) is not gathered again (no copy)."""
    if not isinstance(t, DTensor):
        return t
    if t.device_mesh.size() == 1 or all(p.is_replicate() for p in t.placements):
        return t.to_local()
    return t.full_tensor()


@torch.no_grad()
def gathered_buckets(plan: StreamPlan, params: dict[str, torch.Tensor]) -> Iterator[tuple[Bucket, list | None]]:
    """Every trainer rank iterates this in step (the gathers are collective over a group's ranks): each bucket
    of this rank's groups with its full tensors at the manifest dtype, (bucket, None) for other groups'.
    Call it after `check_coverage` (WeightStream does): a gather of a parameter missing on one rank would hang."""
    for bucket in plan.buckets:
        names = [s.entry.name for s in bucket.slots]
        if names[0] not in params:  # another group's bucket (a bucket holds one group)
            yield bucket, None
            continue
        yield bucket, [_full(params[n]).to(dtype=s.entry.dtype) for n, s in zip(names, bucket.slots)]


@torch.no_grad()
def packed_buckets(plan: StreamPlan, params: dict[str, torch.Tensor],
                   device: torch.device | None = None) -> Iterator[tuple[Bucket, torch.Tensor | None]]:
    """Every trainer rank iterates this in step: it yields each bucket with its packed bytes on the
    bucket's source rank (None on other ranks). Buffers alternate, so the consumer must be done with a
    buffer (e.g. its broadcast waited for) before asking for the bucket after next."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = device or next(iter(params.values())).device
    buffers = None
    for bucket, tensors in gathered_buckets(plan, params):
        if tensors is None or rank != bucket.source:
            yield bucket, None
            continue
        if buffers is None:
            size = buffer_bytes([b for b in plan.buckets if b.source == rank])
            buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
        yield bucket, pack(bucket, tensors, buffers[bucket.index % 2])
        del tensors


def send_weights(plan: StreamPlan, params: dict[str, torch.Tensor], transport: BroadcastTransport,
                 device: torch.device | None = None) -> None:
    """Trainer side of a broadcast refit (every trainer rank calls it: the gathers are collective).
    Double buffering: bucket i+1 is gathered and packed while bucket i's broadcast is in flight."""
    in_flight: deque = deque()
    for bucket, buf in packed_buckets(plan, params, device):
        if buf is None:
            continue
        in_flight.append(transport.broadcast(buf, bucket.source))
        if len(in_flight) == 2:  # the next pack reuses the buffer of the older broadcast
            in_flight.popleft().wait()
    for work in in_flight:
        work.wait()


def verified(plan: StreamPlan, received: Iterable[tuple[Bucket, torch.Tensor | list]],
             clone: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each arrived bucket; at the end, raises unless every manifest entry arrived
    exactly once. A bucket arrives as bytes (a flat buffer: its index and checksum are checked first) or,
    in process, as its list of gathered tensors. `clone` copies tensors out of a (reused) byte buffer for
    consumers that keep references (vLLM buffers a layer's weights until the layer is complete)."""
    arrived = [0] * len(plan.buckets)
    for bucket, data in received:
        arrived[bucket.index] += 1
        if isinstance(data, list):  # the trainer's own tensors: nothing was copied, nothing to clone
            yield from named_tensors(bucket, data)
            continue
        for name, tensor in unpack(bucket, data):
            yield name, tensor.clone() if clone else tensor
    wrong = [b for b, n in zip(plan.buckets, arrived) if n != 1]
    if wrong:
        lost = [s.entry.name for b in wrong for s in b.slots]
        raise StreamIntegrityError(f"refit coverage: {len(wrong)} bucket(s) did not arrive exactly once "
                                   f"(counts {[arrived[b.index] for b in wrong]}); entries affected: {lost}")


def broadcast_received(plan: StreamPlan, transport: BroadcastTransport,
                       device: torch.device) -> Iterator[tuple[Bucket, torch.Tensor]]:
    """Generator side of a broadcast refit: two receive buffers, the next bucket's receive posted before
    the current one is handed on (the consumer must finish with a bucket before asking for the next)."""
    if not plan.buckets:
        return
    buffers = [torch.empty(buffer_bytes(plan.buckets), dtype=torch.uint8, device=device) for _ in range(2)]

    def post(bucket):
        buf = buffers[bucket.index % 2][:bucket.size]
        return buf, transport.broadcast(buf, bucket.source)

    pending = post(plan.buckets[0])
    for i, bucket in enumerate(plan.buckets):
        buf, work = pending
        work.wait()
        if i + 1 < len(plan.buckets):
            pending = post(plan.buckets[i + 1])
        yield bucket, buf


def stage_transport(plan: StreamPlan, generator_rank: int = 0) -> BroadcastTransport:
    """Routes from every other source rank (pipeline stage leaders) to the generator's trainer rank.
    Collective over the trainer's world, once at setup (empty without pipeline parallelism)."""
    return BroadcastTransport(world_routes([s for s in plan.sources if s != generator_rank], [generator_rank]))


@dataclass
class WeightStream:
    """One refit as seen from one trainer rank (every trainer rank builds one and takes part).

    On the rank that holds the generator, iterating gives the verified (name, tensor) stream: its own
    buckets as the gathered tensors (in process), other stages' buckets received over `transport` (see
    `stage_transport`). Every other rank calls `participate`.
    """

    plan: StreamPlan
    params: dict[str, torch.Tensor]
    device: torch.device | None = None
    transport: BroadcastTransport | None = None
    _checked: bool = field(default=False, init=False)  # check_coverage already ran for this refit

    def check(self) -> None:
        """`check_coverage` once per refit, before anything is gathered. Called early by a caller whose
        generator in another process would otherwise start waiting for buckets (the other ranks run it first
        thing in `participate`), so a refused refit raises on every rank instead of leaving that process
        waiting; every way of streaming calls it, and it checks only the first time."""
        if not self._checked:
            check_coverage(self.plan, self.params)
            self._checked = True

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The verified stream for a consumer in this (the source's) process: its own buckets as the
        gathered tensors themselves (valid during the refit only: consumers copy them)."""
        return verified(self.plan, self.arrivals(packed=False))

    def arrivals(self, packed: bool = True) -> Iterator[tuple[Bucket, torch.Tensor | list]]:
        """Every bucket on the generator's rank in manifest order: this rank's own ones packed (a flat
        buffer, `packed`) or as gathered tensors, other stages' received over `transport`. A buffer is
        reused: finish with a bucket before asking for the next but one."""
        self.check()
        received = None
        own = (packed_buckets(self.plan, self.params, self.device) if packed
               else gathered_buckets(self.plan, self.params))
        for bucket, data in own:
            if bucket.source == self.rank:
                yield bucket, data
                continue
            if self.transport is None or bucket.source not in self.transport.routes:
                raise StreamIntegrityError(f"refit: bucket {bucket.index} comes from rank {bucket.source} and no "
                                           f"transport route from it was given (see stage_transport)")
            if received is None:
                device = self.device or next(iter(self.params.values())).device
                received = torch.empty(buffer_bytes(self.plan.buckets), dtype=torch.uint8, device=device)
            self.transport.broadcast(received[:bucket.size], bucket.source).wait()
            yield bucket, received[:bucket.size]

    def send(self, transport: BroadcastTransport) -> None:
        """Every bucket over `transport` to a generator in another process (see generator_link). When this
        rank is the only source, double buffered; under pipeline parallelism this rank relays: each bucket
        as it arrives (its own packed, other stages' received over `self.transport`), each broadcast waited
        for before the next bucket, whose buffer may be the same."""
        self.check()
        if self.plan.sources == [self.rank]:
            send_weights(self.plan, self.params, transport, self.device)
            return
        for bucket, buf in self.arrivals(packed=True):
            transport.broadcast(buf, bucket.source).wait()

    def participate(self) -> None:
        """A rank without the generator: its share of the gathers, and as a stage leader its buckets."""
        self.check()
        if self.transport is not None:
            send_weights(self.plan, self.params, self.transport, self.device)
            return
        for _ in gathered_buckets(self.plan, self.params):
            pass
