"""A non-colocated training step as one 1F1B schedule across the modules: the encoder is a stage before the LLM.

The encoder ranks run one microbatch ahead of the LLM ranks, so the encoder's forward of microbatch k+1 runs
while the LLM runs microbatch k, and the encoder's backward of k and forward of k+2 while the LLM runs k+1:

  encoder  F0 |s0| F1 |s1 g0| B0 F2 |s2 g1| B1 F3 |s3 g2| B2 |g3| B3
  LLM         |r0| step 0 |g0 r1| step 1 |g1 r2| step 2 |g2 r3| step 3 |g3|

(F/B: the encoder's forward / backward of a microbatch; step k: the LLM's forward + backward of microbatch k,
its whole pipeline schedule step under LLM pp; s/r: the rows of a microbatch sent / received; g: its embedding
gradient.) Every exchange `|...|` is one `batch_isend_irecv` on each side, and the k-th exchange of a rank
matches the k-th exchange of each of its peers op for op (rows of microbatch k, gradient of k-1), so the p2p
ops cannot deadlock under gloo or NCCL (a send never waits on a receive its peer posts only later). An exchange
with a receive is waited for (with every earlier one) before the computation that needs it; the first one (rows of microbatch 0 only)
is not, so the encoder goes on to microbatch 1 at once; every send is complete when the step returns.
Not overlapped: the encoder's first forward (the LLM waits for it), the LLM's last step (the encoder waits for
its gradient), the encoder's last backward, and the metrics sent at the end (relay.send_results).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist

from automodel_mimo.mimo.relay import Ranges, Relay


class Trace:
    """What a rank did in the last step, in order: (kind, microbatch, start, end), monotonic seconds. Kinds:
    encoder ranks `forward`, `wait` (for rows to go / a gradient to arrive), `backward`; LLM ranks `wait`,
    `step`. `sync_cuda` (for measuring: NCCL waits do not block the host) synchronizes the GPU before a wait
starts and before it ends, so a wait lasts until the data is on the GPU and excludes queued compute."""

    def __init__(self, sync_cuda: bool = False):
        self.events: list[tuple[str, int, float, float]] = []
        self.sync_cuda = sync_cuda

    @contextmanager
    def span(self, kind: str, k: int):
        sync = kind == "wait" and self.sync_cuda and torch.cuda.is_available()
        if sync:  # the compute queued before the wait is not waiting
            torch.cuda.synchronize()
        start = time.monotonic()
        yield
        if sync:
            torch.cuda.synchronize()
        self.events.append((kind, k, start, time.monotonic()))

    def order(self) -> list[tuple[str, int]]:
        return [(kind, k) for kind, k, _, _ in self.events]

    def seconds(self, kind: str) -> float:
        return sum(end - start for event, _, start, end in self.events if event == kind)


class _Exchanges:
    """Posts each exchange as one batch; `wait`: then waits for it and every earlier one (recorded as a `wait`
    span even when this rank had nothing to receive); `finish`: waits for what is left (the last sends)."""

    def __init__(self, trace: Trace):
        self.trace, self.pending = trace, []

    def post(self, ops: list[dist.P2POp], k: int, wait: bool) -> None:
        self.pending += dist.batch_isend_irecv(ops) if ops else []
        if wait:
            with self.trace.span("wait", k):
                self._wait()

    def finish(self, k: int) -> None:
        if self.pending:
            with self.trace.span("wait", k):
                self._wait()

    def _wait(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending = []


def encoder_1f1b(relay: Relay, ranges: list[Ranges], forward: Callable[[int], torch.Tensor],
                 backward: Callable[[int, torch.Tensor, torch.Tensor], None], trace: Trace) -> None:
    """An encoder rank: forward(k) -> this slot's rows of microbatch k (attached to the encoder's graph);
    backward(k, rows, grad) once the LLM's gradient of those rows is back. One microbatch in flight ahead."""
    n, rows, io = len(ranges), {}, _Exchanges(trace)

    def forward_and_send_ops(k: int) -> list[dist.P2POp]:
        if k >= n:
            return []
        with trace.span("forward", k):
            rows[k] = forward(k)
        return relay.row_send_ops(ranges[k], rows[k])

    io.post(forward_and_send_ops(0), 0, wait=False)  # warm-up: rows of microbatch 0 go, no wait
    sends = forward_and_send_ops(1)
    for k in range(n):
        receive, grad = relay.grad_recv_ops(ranges[k])
        io.post(sends + receive, k, wait=True)  # rows of k+1 go, the gradient of k comes
        with trace.span("backward", k):
            backward(k, rows.pop(k), grad)
        sends = forward_and_send_ops(k + 2)
    io.finish(n)


def language_1f1b(relay: Relay, ranges: list[Ranges], step: Callable[[int, torch.Tensor], torch.Tensor],
                  trace: Trace) -> None:
    """An LLM rank: step(k, rows) runs microbatch k on the received rows (a fresh [rows, hidden] fp32 tensor)
    and returns their gradient (sent back by the LLM slot's lead at once, with the next microbatch's receive)."""
    n, io = len(ranges), _Exchanges(trace)
    receive, rows = relay.row_recv_ops(ranges[0])
    io.post(receive, 0, wait=True)
    for k in range(n):
        with trace.span("step", k):
            grad = step(k, rows)
        receive, rows = relay.row_recv_ops(ranges[k + 1]) if k + 1 < n else ([], None)
        io.post(relay.grad_send_ops(ranges[k], grad) + receive, k + 1, wait=k + 1 < n)
    io.finish(n)
