"""The ring's point-to-point exchange: send to the next ring rank, receive from the previous.

Each call posts both directions asynchronously and returns a handle; the caller computes the
current block meanwhile and waits only when it needs the next one (double buffering).
Without the overlap option both are posted by ``p2p.post_receives_then_sends`` (one
``batch_isend_irecv`` on NCCL/HCCL, deadlock-free). The receive is posted before the send (on
gloo also with two communicators): gloo announces a posted receive to the sender in the same
TCP stream as its bulk data, so a send posted first can hold the peer's announcement behind
megabytes of payload and turn a two-way exchange into two one-way ones (``p2p.py``).
With ``--use-cp-send-recv-overlap`` the link ``i -> i+1`` uses the first communicator when ``i``
is even and the second when odd, so a rank's send and receive run on different communicators;
both ends of a link derive the same choice from the sender's index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from usp_npu.comm.p2p import post_receives_then_sends, wait_each
from usp_npu.comm.stats import CommStats
from usp_npu.parallel_state import ContextParallelMesh


@dataclass
class PendingRecv:
    """An exchange in flight; ``wait()`` returns the received tensor."""

    works: list
    buffer: torch.Tensor
    peers: tuple[int, int]  # (next, previous) global ranks, for the error message
    stats: CommStats | None = None

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            wait_each(self.works)  # idempotent: a second wait() returns at once
        except RuntimeError as err:
            raise RuntimeError(
                f"usp_npu ring exchange (send to rank {self.peers[0]}, receive from rank "
                f"{self.peers[1]}) failed or timed out; a peer rank probably failed before this "
                "step (look for its own error). The limit is initialize_context_parallel(timeout=)."
                f" Cause: {err}"
            ) from err
        if self.stats is not None:
            self.stats.ring_wait_s += time.perf_counter() - start
        return self.buffer


def _link(mesh: ContextParallelMesh, link: str):
    """(ranks, group, overlap group) of one of this rank's rings: ``ring`` (the whole ring) or,
    with a double ring, ``inner`` (its window) / ``outer`` (its position across windows)."""
    if link == "ring":
        return mesh.ring_ranks, mesh.ring_group, mesh.ring_overlap_group
    if link == "inner":
        return mesh.ring_inner_ranks, mesh.ring_inner_group, mesh.ring_inner_overlap_group
    if link == "outer":
        return mesh.ring_outer_ranks, mesh.ring_outer_group, mesh.ring_outer_overlap_group
    raise ValueError(f"unknown ring link {link!r}")


class RingExchange:
    """Next/previous peers of this rank on one of its rings, and the send/recv they use.

    ``link``: ``ring`` (the ring group), ``inner`` or ``outer`` (double ring, see
    ``parallel_state.double_ring_rank_lists``).
    """

    def __init__(
        self,
        mesh: ContextParallelMesh,
        stats: CommStats | None = None,
        blocking: bool = False,
        link: str = "ring",
    ):
        ranks, first, second = _link(mesh, link)
        i = ranks.index(mesh.rank)
        size = len(ranks)
        self.size = size
        self.next_rank = ranks[(i + 1) % size]
        self.prev_rank = ranks[(i - 1) % size]
        self.stats = stats
        self.split_groups = second is not None
        self.send_group = first if (second is None or i % 2 == 0) else second
        self.recv_group = first if (second is None or ((i - 1) % size) % 2 == 0) else second
        # Two communicators, separate calls: NCCL/HCCL set up a pair's communicator on its first
        # call, so there even ranks send first to break the cycle; gloo needs no set-up and takes
        # the receive first (module docstring).
        self.recv_first = not self.split_groups or i % 2 == 1 or dist.get_backend(first) == "gloo"
        #: wait for each exchange before returning it (no overlap: for measuring what overlap hides)
        self.blocking = blocking

    def start(self, tensor: torch.Tensor, kind: str) -> PendingRecv:
        """Send ``tensor`` (contiguous) to the next rank; receive the same shape from the previous."""
        pending = self._post(tensor, kind)
        if self.blocking:
            pending.wait()
        return pending

    def _post(self, tensor: torch.Tensor, kind: str) -> PendingRecv:
        recv = torch.empty_like(tensor)
        if self.stats is not None:
            self.stats.add(kind, tensor.numel() * tensor.element_size(), (self.next_rank,))
        if not self.split_groups:
            works = post_receives_then_sends(
                [(recv, self.prev_rank)], [(tensor, self.next_rank)], self.send_group
            )
            return PendingRecv(works, recv, (self.next_rank, self.prev_rank), self.stats)
        posts = [
            lambda: dist.irecv(recv, self.prev_rank, group=self.recv_group),
            lambda: dist.isend(tensor, self.next_rank, group=self.send_group),
        ]
        works = [post() for post in (posts if self.recv_first else posts[::-1])]
        return PendingRecv(works, recv, (self.next_rank, self.prev_rank), self.stats)
