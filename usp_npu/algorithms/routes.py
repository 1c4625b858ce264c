"""How K/V blocks reach each ring step and how their dK/dV get home: the ring loop's transport.

The one ring loop (``ring.py``) asks its route, at every step ``t`` of its schedule, to post the
transfers that step starts (``send``), for the block of step ``t + 1`` (``receive``), and in the
backward for the dK/dV accumulator of step ``t``'s block (``dkv_buffer`` / ``pass_dkv``) and for
the own block's finished gradient (``finish_dkv``). Three routes:

- :class:`PlainRoute`: the ring. The block of step ``t`` started on ring rank ``i - t``; its
  accumulator travels one hop behind it and reaches home after ``R - 1`` hops.
- :class:`DoubleRingRoute` (``--cp-window-size w``, LoongTrain / MindSpeed): the ring ranks are
  cut into ``R / w`` windows of ``w`` consecutive ranks. Round ``o`` of ``R / w``: the window
  passes blocks around its inner ring (``w - 1`` hops) while, posted at the round's start, the
  outer ring (same position, next window) carries the round's first block to the next window:
  both rings overlap the computation. See :func:`double_ring_order`.
- :class:`AllGatherRoute` (``kvallgather_cp_algo``): K/V are all-gathered once; every block is
  local; dK/dV accumulate per block and are reduce-scattered home at the end.

Sends per rank and per direction equal the plain ring's ``R - 1`` blocks of K/V (forward, and
backward unless cached) and ``R - 1`` dK/dV accumulators; the double ring splits them into
``R - R/w`` inner and ``R/w - 1`` outer ones.
"""

from __future__ import annotations

from typing import Protocol

import torch

from usp_npu.comm.allgather import all_gather_blocks, reduce_scatter_blocks
from usp_npu.comm.ring import PendingRecv, RingExchange
from usp_npu.comm.stats import CommStats
from usp_npu.config import KVALLGATHER
from usp_npu.parallel_state import ContextParallelMesh


def double_ring_order(ring_rank: int, ring_size: int, window: int) -> list[int]:
    """Source ring rank of the block each step holds: ``t = o * w + s`` holds the block that
    started in window ``W - o`` at position ``p - s`` (``W, p = divmod(ring_rank, w)``)."""
    rounds = ring_size // window
    win, pos = divmod(ring_rank, window)
    return [
        ((win - o) % rounds) * window + (pos - s) % window
        for o in range(rounds)
        for s in range(window)
    ]


class Route(Protocol):
    """What the ring loop asks of a route; ``t`` is the step index in the schedule's order.

    Blocks are ``[2, L, B, N, D]`` (K and V stacked) or, for the half KV cache's backward, V
    alone; dK/dV accumulators are ``[2, L, B, N, D]`` in the accumulation dtype.
    """

    def first(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The block of step 0 (the own block)."""
        ...

    def send(self, t: int, block: torch.Tensor, what: str = "kv") -> None:
        """Post the transfers step ``t`` starts, given the block it holds."""
        ...

    def receive(self, t: int, what: str = "kv") -> torch.Tensor:
        """The block of step ``t + 1`` (waits for it)."""
        ...

    def dkv_buffer(self, t: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The accumulator step ``t`` adds its dK/dV piece into (fresh or received)."""
        ...

    def pass_dkv(self, t: int, dkv: torch.Tensor) -> None:
        """Hand the accumulator on after step ``t`` added its piece."""
        ...

    def finish_dkv(self) -> torch.Tensor:
        """The own block's finished dK/dV, after the last step."""
        ...


def _stack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.stack([k, v])


def _take(holder: object, name: str) -> torch.Tensor:
    """Wait for the transfer in ``holder.<name>`` and forget it: the route lives as long as the
    autograd graph, and must not keep a received block alive from the forward to the backward."""
    pending = getattr(holder, name)
    setattr(holder, name, None)
    return pending.wait()


class PlainRoute:
    """The ring: send to the next ring rank, receive from the previous one."""

    def __init__(self, mesh: ContextParallelMesh, stats: CommStats | None, blocking: bool):
        self.ring = RingExchange(mesh, stats, blocking)
        self._kv: PendingRecv | None = None
        self._dkv: PendingRecv | None = None
        self.home: torch.Tensor | None = None

    def first(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _stack(k, v)

    def send(self, t: int, block: torch.Tensor, what: str = "kv") -> None:
        self._kv = self.ring.start(block, f"ring_{what}")

    def receive(self, t: int, what: str = "kv") -> torch.Tensor:
        return _take(self, "_kv")

    def dkv_buffer(self, t: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t == 0:
            self.home = torch.zeros(like.shape, dtype=dtype, device=like.device)
            return self.home
        if t == 1:  # step 1 starts the accumulator of the block it holds
            return torch.zeros(like.shape, dtype=dtype, device=like.device)
        return _take(self, "_dkv")  # from the rank that held this block one step ago

    def pass_dkv(self, t: int, dkv: torch.Tensor) -> None:
        if t > 0:
            self._dkv = self.ring.start(dkv, "ring_dkv")

    def finish_dkv(self) -> torch.Tensor:
        """The own block's dK/dV: the home piece plus every other rank's, arrived."""
        home, self.home = self.home, None
        return home.add_(_take(self, "_dkv"))


class DoubleRingRoute(PlainRoute):
    """Inner ring inside windows of ``w`` ring ranks, outer ring across windows.

    dK/dV of a block follow it along the inner ring within each round. The chain of round 0
    (the home window) stops at its last holder and waits there ("parked"); the chain of every
    later round ends at the round's last holder, which adds the previous window's chain (received
    over the outer ring while the round computed) and sends the sum on over the outer ring. The
    last round's sum arrives, over the outer ring, at the rank that parked the round-0 chain of
    the same block: one inner hop takes their sum home. ``R - R/w`` inner and ``R/w - 1`` outer
    hops per block, the plain ring's ``R - 1`` in all, and only ring links.
    """

    def __init__(self, mesh: ContextParallelMesh, stats: CommStats | None, blocking: bool):
        self.inner = RingExchange(mesh, stats, blocking, link="inner")
        self.outer = RingExchange(mesh, stats, blocking, link="outer")
        self.w = self.inner.size
        self.rounds = self.outer.size
        self._inner_kv = self._outer_kv = None
        self._inner_dkv = self._outer_dkv = None
        self._parked: torch.Tensor | None = None
        self.home = None

    def send(self, t: int, block: torch.Tensor, what: str = "kv") -> None:
        o, s = divmod(t, self.w)
        if s == 0 and o + 1 < self.rounds:  # this round's first block goes to the next window
            self._outer_kv = self.outer.start(block, f"ring_outer_{what}")
        if s + 1 < self.w:
            self._inner_kv = self.inner.start(block, f"ring_inner_{what}")

    def receive(self, t: int, what: str = "kv") -> torch.Tensor:
        s = t % self.w
        return _take(self, "_inner_kv" if s + 1 < self.w else "_outer_kv")

    def dkv_buffer(self, t: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        o, s = divmod(t, self.w)
        if t == 0:
            self.home = torch.zeros(like.shape, dtype=dtype, device=like.device)
            return self.home
        if (o == 0 and s == 1) or (o > 0 and s == 0):  # first holder of the block this round
            acc = torch.zeros(like.shape, dtype=dtype, device=like.device)
        else:
            acc = _take(self, "_inner_dkv")
        if s == self.w - 1 and o >= 2:  # the chain of the previous window, over the outer ring
            acc += _take(self, "_outer_dkv")
        return acc

    def pass_dkv(self, t: int, dkv: torch.Tensor) -> None:
        o, s = divmod(t, self.w)
        if t == 0:
            return
        if s < self.w - 1:
            self._inner_dkv = self.inner.start(dkv, "ring_inner_dkv")
        elif o == 0:
            self._parked = dkv
        else:
            self._outer_dkv = self.outer.start(dkv, "ring_outer_dkv")

    def finish_dkv(self) -> torch.Tensor:
        parked, home, self._parked, self.home = self._parked, self.home, None, None
        done = parked.add_(_take(self, "_outer_dkv"))  # all but the home piece of one block
        return home.add_(self.inner.start(done, "ring_inner_dkv").wait())


class AllGatherRoute:
    """kvallgather: every block is local after one all-gather; dK/dV are reduce-scattered."""

    def __init__(
        self, mesh: ContextParallelMesh, stats: CommStats | None, sources: list[int]
    ) -> None:
        self.group, self.stats, self.sources = mesh.ring_group, stats, sources
        self.gathered: torch.Tensor | None = None
        self.dkv_all: torch.Tensor | None = None

    def first(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.gathered = all_gather_blocks(_stack(k, v), self.group, self.stats)
        return self.gathered[self.sources[0]]

    def send(self, t: int, block: torch.Tensor, what: str = "kv") -> None:
        pass  # nothing travels: the block of step t + 1 is already here

    def receive(self, t: int, what: str = "kv") -> torch.Tensor:
        return self.gathered[self.sources[t + 1]]

    def dkv_buffer(self, t: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.dkv_all is None:
            shape = (len(self.sources), *like.shape)
            self.dkv_all = torch.zeros(shape, dtype=dtype, device=like.device)
        return self.dkv_all[self.sources[t]]

    def pass_dkv(self, t: int, dkv: torch.Tensor) -> None:
        pass  # accumulated in place, sent once at the end

    def finish_dkv(self) -> torch.Tensor:
        dkv_all, self.dkv_all = self.dkv_all, None
        return reduce_scatter_blocks(dkv_all, self.group, self.stats)


def build_route(
    mesh: ContextParallelMesh,
    steps: list,
    stats: CommStats | None,
    blocking: bool = False,
) -> tuple[list, Route | None]:
    """The route for this mesh's algorithm and the schedule's steps in the order it visits them.

    ``steps``: the ring schedule (step ``t`` holds the block of ring rank ``ring_rank - t``);
    returned reordered for the double ring. ``None`` when the ring has one rank.
    """
    cfg = mesh.config
    if mesh.ring_size == 1:
        return steps, None
    if cfg.context_parallel_algo == KVALLGATHER:
        return steps, AllGatherRoute(mesh, stats, [s.source for s in steps])
    if cfg.cp_window_size > 1:
        by_source = {s.source: s for s in steps}
        order = double_ring_order(mesh.ring_rank, mesh.ring_size, cfg.cp_window_size)
        return [by_source[src] for src in order], DoubleRingRoute(mesh, stats, blocking)
    return steps, PlainRoute(mesh, stats, blocking)
