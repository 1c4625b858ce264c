"""Bytes each rank sends, per collective, per peer: the one source of the byte formulas.

A :class:`Transfer` is one rank's send to one peer in one *phase* of one layer's forward or
backward. Phases follow the code path (``algorithms/usp.py``):

- ``a2a_in`` / ``a2a_out`` (forward) and ``a2a_dout`` / ``a2a_dqkv`` (backward): the Ulysses
  all-to-alls; each rank sends ``1/u`` of the packed buffer to each of its ``u - 1`` peers.
- ``ring`` step ``t``: what must arrive while the block of step ``t`` computes. Forward and
  backward send the K/V block for step ``t + 1`` at step ``t``; the backward's dK/dV accumulator
  of step ``t`` travels during step ``t + 1`` (and the last one after the loop, step ``r``).

- ``ag_kv`` / ``rs_dkv``: ``--use-ulysses-allgather-kv``'s K/V all-gather and dK/dV
  reduce-scatter over the Ulysses group; ``kv_gather`` / ``kv_reduce_scatter``: kvallgather's
  over the ring group (before and after the loops, not overlapped).

The per-algorithm pieces are functions in :data:`CONTRIBUTIONS`; an option that changes what
travels (double ring, K/V cache, K/V all-gather) is one function there or a field of
:class:`RankShape`. :func:`counted_by_kind` gives the totals the communication layer counts
(``CommStats``), and ``usp_npu.comm.volume.expected_bytes`` is their sum for one rank: this
module is the only place the byte formulas live.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from usp_npu.config import KVALLGATHER, ContextParallelConfig
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
    K/V replication the all-to-all needs; ``kv_heads_local`` before it), the ring's view after
    the all-to-all, and the options that change what travels."""

    local: int
    q_heads: int
    kv_heads: int
    u: int
    r: int
    kv_cache: str | None = None  # this layer's KV cache policy (None | full | half)
    kv_heads_local: int = 0  # K/V heads per tp rank before any replication
    window: int = 1  # --cp-window-size: double ring when > 1
    kvallgather: bool = False  # kvallgather_cp_algo: the ring's K/V all-gathered once
    allgather_kv: bool = False  # --use-ulysses-allgather-kv: K/V all-gathered, not all-to-all'd

    @property
    def ring_len(self) -> int:  # tokens per ring rank
        return self.local * self.u

    @property
    def ring_q_heads(self) -> int:
        return self.q_heads // self.u

    @property
    def ring_kv_heads(self) -> int:
        return self.kv_heads if self.allgather_kv else self.kv_heads // self.u


def rank_shape(
    shape: ModelShape, cfg: ContextParallelConfig, tp: int, layer_number: int | None = None
) -> RankShape:
    """One rank's view of ``shape`` under ``cfg``; ``layer_number`` picks the KV cache policy
    (``--context-parallel-cache-interval``; ``None`` = a cached layer)."""
    u, cp = cfg.ulysses_degree, cfg.context_parallel_size
    q = shape.heads // tp
    kv = local_kv = (shape.kv_heads or shape.heads) // tp
    if u > 1 and kv % u and not cfg.use_ulysses_allgather_kv:
        kv = u  # comm/all_to_all.replicate_kv_heads: one copy per Ulysses rank
    return RankShape(
        shape.seq // cp, q, kv, u, cfg.ring_degree, cfg.kv_cache_policy(layer_number),
        kv_heads_local=local_kv, window=cfg.cp_window_size,
        kvallgather=cfg.context_parallel_algo == KVALLGATHER,
        allgather_kv=cfg.use_ulysses_allgather_kv,
    )  # fmt: skip


@dataclass(frozen=True)
class Transfer:
    """One send. It may travel from the start of ring step ``step`` until the end of step
    ``step + span - 1`` (the double ring's outer ring spans a round); all-to-all and
    all-gather phases are not overlapped (``step`` 0, ``span`` 1)."""

    kind: str  # the CommStats kind
    direction: str  # forward | backward
    phase: str  # a2a_in | ag_kv | kv_gather | ring | a2a_out | a2a_dout | a2a_restore | ...
    step: int  # ring step during which it starts travelling (0 outside the ring)
    src: int
    dst: int
    nbytes: int
    span: int = 1  # ring steps it may take without delaying the ring


Contribution = Callable[[ModelShape, RankShape, RankGroups], list[Transfer]]

#: the KV cache policy's backward resend of the K/V the forward exchanged: both, V only, none
RESEND = {None: 2, "half": 1, "full": 0}


def ulysses_transfers(shape: ModelShape, rs: RankShape, g: RankGroups) -> list[Transfer]:
    """q, k, v in the forward's first all-to-all, the output in another; the backward mirrors
    both. ``--use-ulysses-allgather-kv``: only q and the output are all-to-all'd; every rank
    sends its K and V shard (all K/V heads) to every Ulysses peer (``ag_kv``) and the backward
    reduce-scatters dK/dV (``rs_dkv``, in the input dtype). With a KV cache policy and no ring
    (``kv_cache.py``) the forward keeps the local K/V (``full``) or K (``half``) and the backward
    gathers them again (``a2a_restore``)."""
    if rs.u == 1:
        return []
    token = shape.batch * shape.head_dim * shape.element_bytes * rs.local
    kv_in_a2a = 0 if rs.allgather_kv else rs.kv_heads
    qkv, out = (rs.q_heads + 2 * kv_in_a2a) * token, rs.q_heads * token
    phases = [  # (kind, direction, phase, bytes of the whole buffer split over the u ranks)
        ("all_to_all", "forward", "a2a_in", qkv),
        ("all_to_all", "forward", "a2a_out", out),
        ("all_to_all", "backward", "a2a_dout", out),
        ("all_to_all", "backward", "a2a_dqkv", qkv),
    ]
    resend = 2 - RESEND[rs.kv_cache] if rs.r == 1 else 0
    if rs.allgather_kv:  # a gather sends the whole shard to each peer: u x the a2a's share
        shard = 2 * rs.kv_heads * token * rs.u
        phases += [("all_gather", "forward", "ag_kv", shard)]
        phases += [("reduce_scatter", "backward", "rs_dkv", shard)]
        if resend:
            phases.append(("all_gather", "backward", "a2a_restore", resend * shard // 2))
    elif resend:
        phases.append(("all_to_all", "backward", "a2a_restore", resend * rs.kv_heads * token))
    return [
        Transfer(kind, direction, phase, 0, g.rank, peer, buffer // rs.u)
        for kind, direction, phase, buffer in phases
        for peer in g.ulysses_ranks
        if peer != g.rank
    ]


def _ring_blocks(shape: ModelShape, rs: RankShape) -> tuple[int, int, int]:
    """Bytes of one K/V block (stacked), of what the backward re-sends of it (KV cache policy),
    and of its dK/dV accumulator (fp32, or fp64 for fp64 inputs)."""
    block = 2 * rs.ring_len * shape.batch * rs.ring_kv_heads * shape.head_dim  # stacked k, v
    kv = block * shape.element_bytes
    return kv, kv * RESEND[rs.kv_cache] // 2, block * shape.accumulator_bytes


def ring_transfers(shape: ModelShape, rs: RankShape, g: RankGroups) -> list[Transfer]:
    """The plain ring (``routes.PlainRoute``): K/V to the next ring rank at each step but the
    last, forward and backward (unless cached); the dK/dV accumulator of step ``t`` travels
    during step ``t + 1``, the last one after the loop (step ``r``)."""
    r = rs.r
    if r == 1 or rs.kvallgather or rs.window > 1:
        return []
    nxt = g.ring_ranks[(g.ring_rank + 1) % r]
    kv, again, dkv = _ring_blocks(shape, rs)
    out = []
    for t in range(r - 1):
        out.append(Transfer("ring_kv", "forward", "ring", t, g.rank, nxt, kv))
        if again:
            out.append(Transfer("ring_kv", "backward", "ring", t, g.rank, nxt, again))
    for t in range(1, r):  # sent after step t's gradients, waited during step t + 1
        out.append(Transfer("ring_dkv", "backward", "ring", t + 1, g.rank, nxt, dkv))
    return out


def double_ring_transfers(shape: ModelShape, rs: RankShape, g: RankGroups) -> list[Transfer]:
    """The double ring (``routes.DoubleRingRoute``), window ``w``, ``R / w`` rounds of ``w``
    steps. K/V: an inner hop at every step but a round's last; at a round's first step (but the
    last round's) the outer hop to the next window, which has the whole round to arrive
    (``span = w``). dK/dV: an inner hop after each step of a round but its last (round 0 starts
    at step 1); after the last step of rounds 1.. an outer hop that the next round hides (the
    last round's arrives after the loop, step ``R``), then one inner hop takes the sum home
    (step ``R + 1``)."""
    r, w = rs.r, rs.window
    if r == 1 or rs.kvallgather or w == 1:
        return []
    rounds = r // w
    win, pos = divmod(g.ring_rank, w)
    inner = g.ring_ranks[win * w + (pos + 1) % w]
    outer = g.ring_ranks[((win + 1) % rounds) * w + pos]
    kv, again, dkv = _ring_blocks(shape, rs)
    out = []
    for direction, nbytes in (("forward", kv), ("backward", again)):
        if not nbytes:
            continue
        for t in range(r):
            o, s = divmod(t, w)
            if s == 0 and o + 1 < rounds:
                out.append(
                    Transfer("ring_outer_kv", direction, "ring", t, g.rank, outer, nbytes, w)
                )
            if s + 1 < w:
                out.append(Transfer("ring_inner_kv", direction, "ring", t, g.rank, inner, nbytes))
    for t in range(1, r):
        o, s = divmod(t, w)
        if s < w - 1:
            out.append(Transfer("ring_inner_dkv", "backward", "ring", t + 1, g.rank, inner, dkv))
        elif o > 0:
            span = w if o + 1 < rounds else 1
            out.append(
                Transfer("ring_outer_dkv", "backward", "ring", t + 1, g.rank, outer, dkv, span)
            )
    out.append(Transfer("ring_inner_dkv", "backward", "ring", r + 1, g.rank, inner, dkv))
    return out


def kvallgather_transfers(shape: ModelShape, rs: RankShape, g: RankGroups) -> list[Transfer]:
    """kvallgather (``routes.AllGatherRoute``): the own K/V block to every ring peer before the
    loop (``kv_gather``, kept for the backward: no resend), and each peer's dK/dV accumulator
    reduce-scattered after the backward loop (``kv_reduce_scatter``)."""
    if rs.r == 1 or not rs.kvallgather:
        return []
    kv, _, dkv = _ring_blocks(shape, rs)
    peers = [p for p in g.ring_ranks if p != g.rank]
    return [Transfer("all_gather", "forward", "kv_gather", 0, g.rank, p, kv) for p in peers] + [
        Transfer("reduce_scatter", "backward", "kv_reduce_scatter", 0, g.rank, p, dkv)
        for p in peers
    ]


#: every piece of traffic; options that change what travels add a function here
CONTRIBUTIONS: tuple[Contribution, ...] = (
    ulysses_transfers,
    ring_transfers,
    double_ring_transfers,
    kvallgather_transfers,
)


def rank_transfers(shape: ModelShape, rs: RankShape, groups: RankGroups) -> list[Transfer]:
    """One rank's sends for one layer, forward + backward."""
    return [t for contribute in CONTRIBUTIONS for t in contribute(shape, rs, groups)]


def layer_transfers(
    shape: ModelShape,
    cfg: ContextParallelConfig,
    tp: int,
    world_size: int,
    layer_number: int | None = None,
) -> list[Transfer]:
    """Every rank's sends for one layer, forward + backward (``world_size`` = tp * cp * dp);
    ``layer_number`` picks the layer's KV cache policy (``None``: a cached layer)."""
    rs = rank_shape(shape, cfg, tp, layer_number)
    out = []
    for groups in rank_groups(world_size, tp, cfg.context_parallel_size, cfg.ulysses_degree):
        out += rank_transfers(shape, rs, groups)
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
