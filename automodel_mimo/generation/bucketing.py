"""Buckets: the manifest cut into flat byte buffers of at most `bucket_bytes`, and their pack/unpack.

A bucket holds consecutive manifest entries of one weight group (one source rank), each at a 16-byte aligned offset (so a
byte slice can be viewed as any dtype), followed by a 16-byte trailer: the bucket's index and an int64
checksum of its payload. Sender and receiver compute the same plan from the same manifest, so only
the bytes travel. A parameter larger than `bucket_bytes` gets a bucket of its own, sized to fit it
(never split: one tensor is always one contiguous copy), so the largest buffer is
max(bucket_bytes, largest parameter + trailer).

The checksum is the wrapping int64 sum of the payload read as int64 words: any single corrupted word
changes it, it is order-free (so any device reduction order gives the same value) and costs one read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from automodel_mimo.generation.manifest import Manifest, ManifestEntry

ALIGN = 16
TRAILER_BYTES = 16  # int64 bucket index, int64 checksum


class StreamIntegrityError(RuntimeError):
    """A refit bucket arrived corrupted, out of order, twice, or not at all."""


@dataclass(frozen=True)
class Slot:
    entry: ManifestEntry
    offset: int


@dataclass(frozen=True)
class Bucket:
    index: int
    source: int
    slots: tuple[Slot, ...]
    payload_bytes: int  # multiple of ALIGN

    @property
    def size(self) -> int:
        return self.payload_bytes + TRAILER_BYTES


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(manifest: Manifest, bucket_bytes: int) -> list[Bucket]:
    """Consecutive manifest entries of one group (so of one source), greedily filled up to `bucket_bytes` per
    buffer: every rank holding a bucket's first entry holds all of them (the gathers are collective)."""
    capacity = bucket_bytes - TRAILER_BYTES
    if capacity < ALIGN:
        raise ValueError(f"bucket_bytes={bucket_bytes} is too small: it must exceed {TRAILER_BYTES + ALIGN}")
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    used, source, group = 0, None, None

    def close():
        nonlocal slots, used
        if slots:
            buckets.append(Bucket(len(buckets), source, tuple(slots), used))
        slots, used = [], 0

    for entry in manifest.entries:
        size = _aligned(entry.nbytes)
        if slots and ((entry.source, entry.group) != (source, group) or used + size > capacity):
            close()
        source, group = entry.source, entry.group
        slots.append(Slot(entry, used))
        used += size
    close()
    return buckets


def buffer_bytes(buckets: list[Bucket]) -> int:
    return max((b.size for b in buckets), default=TRAILER_BYTES)


def checksum(payload: torch.Tensor) -> torch.Tensor:
    """Wrapping int64 sum of a uint8 payload whose length is a multiple of 8 (a 1-element tensor)."""
    return payload.view(torch.int64).sum(dtype=torch.int64).reshape(1)


def pack(bucket: Bucket, tensors: list[torch.Tensor], buf: torch.Tensor) -> torch.Tensor:
    """Copy `tensors` (one per slot, full shapes) into `buf` and write the trailer; returns buf[:size]."""
    out = buf[:bucket.size]
    for slot, t in zip(bucket.slots, tensors, strict=True):
        e = slot.entry
        _check_shape(e, t)
        out[slot.offset:slot.offset + e.nbytes].view(e.dtype).view(e.shape).copy_(t)
        pad = _aligned(e.nbytes) - e.nbytes
        if pad:  # padding bytes are part of the checksummed payload: keep them deterministic
            out[slot.offset + e.nbytes:slot.offset + e.nbytes + pad].zero_()
    trailer = out[bucket.payload_bytes:].view(torch.int64)
    trailer[0] = bucket.index
    trailer[1:] = checksum(out[:bucket.payload_bytes])
    return out


def named_tensors(bucket: Bucket, tensors: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for a bucket's unpacked tensors (one per slot), shapes checked against the manifest."""
    for slot, t in zip(bucket.slots, tensors, strict=True):
        _check_shape(slot.entry, t)
    return [(s.entry.name, t) for s, t in zip(bucket.slots, tensors)]


def _check_shape(entry: ManifestEntry, t: torch.Tensor) -> None:
    if tuple(t.shape) != entry.shape:
        raise StreamIntegrityError(f"{entry.name}: trainer tensor shape {list(t.shape)} != manifest {list(entry.shape)}")


def unpack(bucket: Bucket, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Verify the trailer of a received bucket, then return (name, view into buf) for each slot."""
    trailer = buf[bucket.payload_bytes:bucket.size].view(torch.int64)
    got_index, sent_sum = int(trailer[0]), int(trailer[1])
    if got_index != bucket.index:
        raise StreamIntegrityError(f"expected bucket {bucket.index}, received bucket {got_index} "
                                   f"(out of order or duplicated); its entries: {_names(bucket)}")
    computed = int(checksum(buf[:bucket.payload_bytes]))
    if computed != sent_sum:
        raise StreamIntegrityError(f"bucket {bucket.index} failed its checksum (sent {sent_sum}, computed {computed}); "
                                   f"its entries: {_names(bucket)}")
    return [(s.entry.name, buf[s.offset:s.offset + s.entry.nbytes].view(s.entry.dtype).view(s.entry.shape))
            for s in bucket.slots]


def _names(bucket: Bucket) -> list[str]:
    return [s.entry.name for s in bucket.slots]
