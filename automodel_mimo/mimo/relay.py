"""The non-colocated encoder -> LLM bridge: point-to-point sends between disjoint rank ranges.

In a non-colocated layout (grid_spec.is_colocated is False) a rank holds either the encoder (with its
projector: the rows it sends are already in the LLM's hidden size, so LLM ranks hold nothing of the vision
module) or the LLM. The batch is mapped exactly as the colocated bridge maps it (bridge.py): with
`scale = max(dp) / min(dp)`, coarse dp block b is dp blocks b*scale .. b*scale+scale-1 ("slots") of the module
with more dp ranks, every rank receives block b's rows, encoder slots split the block's IMAGES (fan-in) and
LLM slots split its ROWS (fan-out). Per microbatch, encoder slot i holds the block's encoder rows E_i and LLM
slot j needs L_j (both ranges of the block's batch-major rows, tokens_per_image per image); piece (i, j) is
E_i ∩ L_j. The LLM slots' ranges partition the block's rows, so every encoder row reaches exactly one LLM slot
and its gradient comes back exactly once.

Who talks to whom (a module's dp block = its ranks of one dp index; its lead = the block's lowest rank, i.e.
tp = cp = 0 and, under LLM pp, the first stage):
  rows:     the encoder block's lead -> every rank of the LLM block (every tp, cp rank and pp stage: they all
            build the spliced input; activations are replicated over tp, and cp shards the spliced sequence);
  grads:    the LLM block's lead (its gradient is full: summed over cp; under pp broadcast from the first
            stage) -> every rank of the encoder block (each tp rank runs the encoder's backward);
  results:  the LLM block's lead -> every rank of every encoder block of the coarse block, as one object
            (metrics, logprobs, next tokens), so encoder ranks return what the callers expect.
Training steps run one microbatch at a time in a 1F1B order across the modules (mimo/cross_schedule.py, from
the per-microbatch ops below); inference (logprobs, next tokens: no gradients) sends every microbatch's rows at
once (send_rows / recv_rows). Transfers are fp32, zero-size pieces are skipped (both sides know every size from
the batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from automodel_mimo.distributed.grid_spec import GridSpec

Ranges = tuple[list[range], list[range]]  # (encoder slots' rows, LLM slots' rows) of one microbatch


def pieces(ranges: Ranges) -> list[tuple[int, int, int, int]]:
    """(encoder slot, LLM slot, start, stop): the non-empty overlaps of the slots' row ranges."""
    out = []
    for i, e in enumerate(ranges[0]):
        for j, lm in enumerate(ranges[1]):
            lo, hi = max(e.start, lm.start), min(e.stop, lm.stop)
            if lo < hi:
                out.append((i, j, lo, hi))
    return out


def _run(ops: list[dist.P2POp]) -> None:
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


class Relay:
    """This rank's side of the encoder <-> LLM transfers. Creates no process group; every rank builds one."""

    def __init__(self, encoder: GridSpec, language: GridSpec, hidden: int, device: torch.device):
        e, lm = encoder.dim_size("dp"), language.dim_size("dp")
        self.direction = "equal" if e == lm else ("fan_in" if e > lm else "fan_out")
        self.scale = max(e, lm) // min(e, lm)
        self.rank = dist.get_rank()
        self.on_encoder = encoder.holds(self.rank)
        spec = encoder if self.on_encoder else language
        dp = spec.coords(self.rank)["dp"]
        fine = spec.dim_size("dp") > min(e, lm)
        self.block, self.slot = (dp // self.scale, dp % self.scale) if fine else (dp, 0)  # slot: in the finer module
        self.encoder_blocks = [sorted(b) for b in encoder.dp_blocks()]
        self.language_blocks = [sorted(b) for b in language.dp_blocks()]
        self.encoder_slots = self.scale if self.direction == "fan_in" else 1
        self.language_slots = self.scale if self.direction == "fan_out" else 1
        self.hidden, self.device = hidden, device

    def _encoder_ranks(self, i: int) -> list[int]:
        return self.encoder_blocks[self.block * self.encoder_slots + i]

    def _language_ranks(self, j: int) -> list[int]:
        return self.language_blocks[self.block * self.language_slots + j]

    def _is_lead(self) -> bool:
        ranks = self._encoder_ranks(self.slot) if self.on_encoder else self._language_ranks(self.slot)
        return self.rank == ranks[0]

    def _buffer(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.hidden, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------- one microbatch's ops (cross_schedule.py)
    def row_send_ops(self, r: Ranges, rows: torch.Tensor) -> list[dist.P2POp]:
        return self._send_ops(r, rows, 0, self._language_ranks)

    def row_recv_ops(self, r: Ranges) -> tuple[list[dist.P2POp], torch.Tensor]:
        return self._recv_ops(r, 1, lambda i, j: self._encoder_ranks(i)[0])

    def grad_send_ops(self, r: Ranges, grad: torch.Tensor) -> list[dist.P2POp]:
        return self._send_ops(r, grad, 1, self._encoder_ranks)

    def grad_recv_ops(self, r: Ranges) -> tuple[list[dist.P2POp], torch.Tensor]:
        return self._recv_ops(r, 0, lambda i, j: self._language_ranks(j)[0])

    # ---------------------------------------------------------------- every microbatch's rows at once (inference)
    def send_rows(self, ranges: list[Ranges], rows: list[torch.Tensor]) -> None:
        """Encoder side: this slot's rows of each microbatch (starting at its range's start) to the LLM slots."""
        _run([op for r, tensor in zip(ranges, rows) for op in self.row_send_ops(r, tensor)])

    def recv_rows(self, ranges: list[Ranges]) -> list[torch.Tensor]:
        """LLM side: this slot's rows of each microbatch, [rows, hidden] fp32."""
        posted = [self.row_recv_ops(r) for r in ranges]
        _run([op for ops, _ in posted for op in ops])
        return [buffer for _, buffer in posted]

    def _send_ops(self, r: Ranges, tensor: torch.Tensor, mine: int, to) -> list[dist.P2POp]:
        """The lead's sends of one microbatch's pieces (`tensor` starts at its slot's range); none elsewhere."""
        if not self._is_lead():
            return []
        ops, start = [], r[mine][self.slot].start
        for i, j, lo, hi in pieces(r):
            if (i, j)[mine] == self.slot:
                piece = tensor[lo - start:hi - start].detach().to(self.device, torch.float32).contiguous()
                ops += [dist.P2POp(dist.isend, piece, peer) for peer in to((j, i)[mine])]
        return ops

    def _recv_ops(self, r: Ranges, mine: int, source) -> tuple[list[dist.P2POp], torch.Tensor]:
        """The receives of one microbatch's pieces into one [rows of this slot, hidden] fp32 buffer."""
        own = r[mine][self.slot]
        buffer = self._buffer(len(own))
        ops = [dist.P2POp(dist.irecv, buffer[lo - own.start:hi - own.start], source(i, j))
               for i, j, lo, hi in pieces(r) if (i, j)[mine] == self.slot]
        return ops, buffer

    # ---------------------------------------------------------------- results to the encoder ranks
    def send_results(self, result) -> None:
        """LLM side (its lead sends): one object to every encoder rank of this coarse block."""
        if not self._is_lead():
            return
        for i in range(self.encoder_slots):
            for peer in self._encoder_ranks(i):
                dist.send_object_list([result], dst=peer)

    def recv_results(self) -> list:
        """Encoder side: each LLM slot's object, in slot order (= row order of the block)."""
        out = []
        for j in range(self.language_slots):
            box = [None]
            dist.recv_object_list(box, src=self._language_ranks(j)[0])
            out.append(box[0])
        return out

    def destroy(self) -> None:
        pass
