"""Bytes each rank sends, per collective, per peer: the one source of the byte formulas.

A :class:`Transfer` is one rank's send to one peer in one *phase* of one layer's forward or
backward. Phases follow the code path (``algorithms/usp.py``):

- ``a2a_in`` / ``a2a_out`` (forward) and ``a2a_dout`` / ``a2a_dqkv`` (backward): the Ulysses
  all-to-alls; each rank sends ``1/u`` of the packed buffer to each of its ``u - 1`` peers.
- ``ring`` step ``t``: what must arrive while the block of step ``t`` computes. Forward and
  backward send the K/V block for step ``t + 1`` at step ``t``; the backward's dK/dV accumulator
  of step ``t`` travels during step ``t + 1`` (and the last one after the loop, step ``r``).

The per-algorithm pieces are functions in :data:`CONTRIBUTIONS`; an option that changes what
travels (double ring, K/V cache, K/V all-gather) is one more function there.
:func:`counted_by_kind` gives the totals the communication layer counts (``CommStats``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from usp_npu.config import ContextParallelConfig
from usp_npu.plan.placement import RankGroups, link_class, rank_groups

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """One attention layer: global head counts (before tensor parallelism), full sequence."""

    heads: int
    head_dim: int
    seq: int
    kv_heads: int | None = None
    batch: int = 1
    dtype: str = "bfloat16"
    num_layers: int = 1
    #: packed documents (cumulative lengths, leading 0, last = seq): attention stays inside each
    #: document; the traffic is the same, the work per ring step is not
    cu_seqlens: tuple[int, ...] | None = None

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def accumulator_bytes(self) -> int:
        """fp32 accumulators (fp64 for fp64 inputs): ``kernels.base.stats_dtype``."""
        return 8 if self.dtype == "float64" else 4


@dataclass(frozen=True)
class RankShape:
    """What one rank holds: ``local`` tokens with ``q_heads`` / ``kv_heads`` (after tp and the
    K/V replication the all-to-all needs), and the ring's view after the all-to-all."""

    local: int
    q_heads: int
    kv_heads: int
    u: int
    r: int
    kv_cache: str | None = None  # this layer's KV cache policy (None | full | half)

    @property
    def ring_len(self) -> int:  # tokens per ring rank
        return self.local * self.u

    @property
    def ring_q_heads(self) -> int:
        return self.q_heads // self.u

    @property
    def ring_kv_heads(self) -> int:
        return self.kv_heads // self.u


def rank_shape(shape: ModelShape, cfg: ContextParallelConfig, tp: int) -> RankShape:
    u, cp = cfg.ulysses_degree, cfg.context_parallel_size
    q = shape.heads // tp
    kv = (shape.kv_heads or shape.heads) // tp
    if u > 1 and kv % u:  # comm/all_to_all.replicate_kv_heads: one copy per Ulysses rank
        kv = u
    return RankShape(shape.seq // cp, q, kv, u, cfg.ring_degree, cfg.kv_cache_policy(None))


@dataclass(frozen=True)
class Transfer:
    kind: str  # the CommStats kind: all_to_all | ring_kv | ring_dkv
    direction: str  # forward | backward
    phase: str  # a2a_in | a2a_out | a2a_dout | a2a_dqkv | ring
    step: int  # ring step during which it travels (0 for the all-to-alls)
    src: int
    dst: int
    nbytes: int


Contribution = Callable[[ModelShape, RankShape, RankGroups], list[Transfer]]


def ulysses_transfers(shape: ModelShape, rs: RankShape, g: RankGroups) -> list[Transfer]:
    """q, k, v in the forward's first all-to-all(s), the output in another; the backward mirrors
    both. With a KV cache policy and no ring (``kv_cache.py``) the forward keeps the local K/V
    (``full``) or K (``half``) and the backward gathers them again (``a2a_restore``)."""
    if rs.u == 1:
        return []
    token = shape.batch * shape.head_dim * shape.element_bytes * rs.local
    qkv, out = (rs.q_heads + 2 * rs.kv_heads) * token, rs.q_heads * token
    phases = [
        ("forward", "a2a_in", qkv),
        ("forward", "a2a_out", out),
        ("backward", "a2a_dout", out),
        ("backward", "a2a_dqkv", qkv),
    ]
    resend = {"full": 2, "half": 1}.get(rs.kv_cache, 0) if rs.r == 1 else 0
    if resend:
        phases.append(("backward", "a2a_restore", resend * rs.kv_heads * token))
    return [
        Transfer("all_to_all", direction, phase, 0, g.rank, peer, buffer // rs.u)
        for direction, phase, buffer in phases
        for peer in g.ulysses_ranks
        if peer != g.rank
    ]


def ring_transfers(shape: ModelShape, rs: RankShape, g: RankGroups) -> list[Transfer]:
    """K/V to the next ring rank before each step but the last, forward and backward; the dK/dV
    accumulator behind it in the backward (fp32, or fp64 for fp64 inputs)."""
    r = rs.r
    if r == 1:
        return []
    nxt = g.ring_ranks[(g.ring_rank + 1) % r]
    block = 2 * rs.ring_len * shape.batch * rs.ring_kv_heads * shape.head_dim  # stacked k, v
    kv, dkv = block * shape.element_bytes, block * shape.accumulator_bytes
    # KV cache policy: the backward re-sends everything (None), V only (half) or nothing (full)
    again = {None: kv, "half": kv // 2, "full": 0}[rs.kv_cache]
    out = []
    for t in range(r - 1):
        out.append(Transfer("ring_kv", "forward", "ring", t, g.rank, nxt, kv))
        if again:
            out.append(Transfer("ring_kv", "backward", "ring", t, g.rank, nxt, again))
    for t in range(1, r):  # sent after step t's gradients, waited during step t + 1
        out.append(Transfer("ring_dkv", "backward", "ring", t + 1, g.rank, nxt, dkv))
    return out


#: every piece of traffic; options that change what travels add a function here
CONTRIBUTIONS: tuple[Contribution, ...] = (ulysses_transfers, ring_transfers)


def layer_transfers(
    shape: ModelShape, cfg: ContextParallelConfig, tp: int, world_size: int
) -> list[Transfer]:
    """Every rank's sends for one layer, forward + backward (``world_size`` = tp * cp * dp)."""
    rs = rank_shape(shape, cfg, tp)
    out = []
    for groups in rank_groups(world_size, tp, cfg.context_parallel_size, cfg.ulysses_degree):
        for contribute in CONTRIBUTIONS:
            out += contribute(shape, rs, groups)
    return out


def bytes_by_class(
    transfers: list[Transfer], nodes: list[int], direction: str | None = None
) -> dict[int, dict[str, dict[str, int]]]:
    """``{rank: {kind: {link class: bytes}}}``, optionally for one direction only."""
    out: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for t in transfers:
        if direction is not None and t.direction != direction:
            continue
        cls = link_class(nodes, t.src, t.dst)
        per = out[t.src][t.kind]
        per[cls] = per.get(cls, 0) + t.nbytes
    return {rank: {k: dict(v) for k, v in kinds.items()} for rank, kinds in out.items()}


def counted_by_kind(transfers: list[Transfer], rank: int) -> dict[str, int]:
    """What ``CommStats.sent`` of ``rank`` holds after one forward + backward."""
    out: dict[str, int] = defaultdict(int)
    for t in transfers:
        if t.src == rank:
            out[t.kind] += t.nbytes
    return dict(out)
