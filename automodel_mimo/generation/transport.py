"""How packed refit buckets travel from a trainer source rank to the generator.

- In-process (colocated, one process holds both ends): the receiver reads the sender's packed buffer
  directly; packing is the device-to-device copy, unpacking into the generator's parameters the second.
- Broadcast: one torch.distributed process group per source rank, holding that source and the
  generator rank(s) (gloo on CPU, nccl on GPU). The group is either a subgroup of the trainer's world
  (`dist.new_group`) or a standalone group built from a TCPStore (`standalone_group`), which is how a
  generator living in another process that is not part of the trainer's world (vLLM's engine process,
  later a Ray actor) joins. Broadcasts are asynchronous so the sender packs the next bucket while the
  current one is on the wire.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


def standalone_group(host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                     timeout_s: float = 600.0) -> dist.ProcessGroup:
    """A process group outside the default world: rank 0 hosts the TCPStore at host:port."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"unknown backend {backend!r}: use gloo or nccl")


@dataclass
class Route:
    """One source's broadcast group and that source's rank inside it."""

    group: dist.ProcessGroup
    root: int


class BroadcastTransport:
    """`routes[source]`: the group that carries the buckets of that source (global trainer rank)."""

    def __init__(self, routes: dict[int, Route]):
        self.routes = routes

    def broadcast(self, buf: torch.Tensor, source: int):
        """Send (on the source) or receive into buf (elsewhere); returns a work handle to wait on."""
        route = self.routes[source]
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = route.root, 0
        return route.group.broadcast([buf], opts)


def generator_link(host: str, port: int, rank: int, sources: list[int], backend: str = "gloo") -> BroadcastTransport:
    """The link between the trainer's generator rank (rank 0 here, hosting the store) and a generator end in
    another process (rank 1): one standalone 2-member group that carries every source's buckets; buckets of
    other pipeline stages are relayed by the trainer's generator rank (WeightStream.send)."""
    route = Route(standalone_group(host, port, rank, 2, backend), 0)
    return BroadcastTransport({source: route for source in sources})


def world_routes(sources: list[int], generator_ranks: list[int]) -> dict[int, Route]:
    """Routes over subgroups of the trainer's world (collective: every world rank calls it, in one order)."""
    routes = {}
    for source in sorted(set(sources)):
        members = sorted({source, *generator_ranks})
        group = dist.new_group(members)
        if dist.get_rank() in members:
            routes[source] = Route(group, members.index(source))
    return routes
