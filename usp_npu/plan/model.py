"""Time and memory of one attention layer per rank, forward + backward, on a :class:`Cluster`.

The layer runs as a sequence of phases that every rank enters together (``traffic.py``):

- an all-to-all phase takes packing copies at memory bandwidth + latency + the slower of its
  intra-node part (the busiest rank's bytes at the per-device bandwidth, or the busiest peer
  link) and its inter-node part (the busiest node's off-node bytes at the node's bandwidth). It
  is exposed, except that the pipelined Ulysses (``C`` head chunks, ``algorithms/usp.py``)
  overlaps chunk ``c``'s ring with the next chunk's exchange in and the previous chunk's exchange
  out: only one chunk's exchange in and one chunk's exchange out stay exposed (``_pipelined``);
- ring step ``t`` costs ``max(compute_t, transfer_t)``: the block kernel of step ``t`` (its
  FLOPs from ``ring_schedule`` at the device rate, plus a per-call overhead and, forward, the
  fused merge at memory bandwidth) runs while the next K/V block (and, backward, the previous
  dK/dV accumulator) travels. The backward's last dK/dV hop has nothing to hide behind. A
  transfer that may span several steps (the double ring's outer hop, posted at a round's start
  and needed at the next round's) only delays the ring when it outlasts the steps it spans;
  the double ring's steps compute in ``routes.double_ring_order``;
- kvallgather's all-gather / reduce-scatter and the Ulysses all-gather of K/V are exposed like
  the all-to-alls.

Memory: what the ring keeps for the backward (q, k, v after the all-to-all, the output, the
softmax statistics; the received K/V blocks under a ring KV cache policy, the gathered K/V of
kvallgather and of the Ulysses all-gather, the local K/V instead of the exchanged ones under a
Ulysses KV cache policy) plus the peak of the transient buffers (all-to-all send + receive, the
double-buffered K/V, dK/dV accumulators).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from usp_npu.algorithms.routes import double_ring_order
from usp_npu.algorithms.schedule import ring_schedule
from usp_npu.algorithms.usp import pipeline_chunks
from usp_npu.config import ContextParallelConfig
from usp_npu.kernels.base import CAUSAL
from usp_npu.plan.cluster import Cluster
from usp_npu.plan.placement import INTER, INTRA, link_class
from usp_npu.plan.traffic import RESEND, ModelShape, RankShape, Transfer, rank_shape

FORWARD_PHASES = ("a2a_in", "ag_kv", "kv_gather", "ring", "a2a_out")
BACKWARD_PHASES = ("a2a_dout", "a2a_restore", "ring", "kv_reduce_scatter", "rs_dkv", "a2a_dqkv")


@dataclass
class Prediction:
    """Seconds for one layer (forward + backward) on the slowest rank, and its parts."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    compute_s: float = 0.0  # kernel + merge + packing copies, never hidden
    comm_s: float = 0.0  # every transfer's own duration, hidden or not
    phases: list[dict] = field(default_factory=list)
    held_bytes: int = 0
    transient_bytes: int = 0
    pipeline_chunks: int = 1  # head chunks of the pipelined Ulysses

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def exposed_comm_s(self) -> float:
        return self.total_s - self.compute_s

    @property
    def memory_bytes(self) -> int:
        return self.held_bytes + self.transient_bytes


def transfer_time(transfers: list[Transfer], nodes: list[int], cluster: Cluster) -> float:
    """Seconds for a set of concurrent transfers to complete (0 when there are none)."""
    if not transfers:
        return 0.0
    per_rank: dict[int, int] = defaultdict(int)
    per_link: dict[tuple[int, int], int] = defaultdict(int)
    per_node: dict[int, int] = defaultdict(int)
    classes = set()
    for t in transfers:
        cls = link_class(nodes, t.src, t.dst)
        classes.add(cls)
        if cls == INTRA:
            per_rank[t.src] += t.nbytes
            per_link[t.src, t.dst] += t.nbytes
        else:
            per_node[nodes[t.src]] += t.nbytes
    intra = max(per_rank.values(), default=0) / cluster.intra_node_bandwidth
    if cluster.intra_node_link_bandwidth:
        intra = max(intra, max(per_link.values(), default=0) / cluster.intra_node_link_bandwidth)
    inter = max(per_node.values(), default=0) / cluster.inter_node_bandwidth
    latency = cluster.inter_node_latency if INTER in classes else cluster.intra_node_latency
    return latency + max(intra, inter)


def step_pairs(shape: ModelShape, rs: RankShape, causal: bool) -> list[list[tuple[int, float]]]:
    """``[ring rank][step]`` -> (query rows, query x key pairs) of that step's block, from the
    ring's own schedule (``ring_schedule``, packed documents included; an empty step is (0, 0)).
    Over the ring ranks the pairs add up to the attention's whole score matrix (its causal /
    in-document part): every pair is computed once per head."""
    out = []
    for ring_rank in range(rs.r):
        steps = ring_schedule(ring_rank, rs.r, rs.ring_len, causal, cu_seqlens=shape.cu_seqlens)
        if rs.window > 1 and not rs.kvallgather:  # the double ring visits sources in its order
            by_source = {s.source: s for s in steps}
            steps = [by_source[src] for src in double_ring_order(ring_rank, rs.r, rs.window)]
        out.append([(0, 0.0) if s.empty else _pairs(s, rs.ring_len) for s in steps])
    return out


def _step_compute(
    shape: ModelShape, rs: RankShape, cfg: ContextParallelConfig, cluster: Cluster
) -> tuple[list[float], list[float]]:
    """Per ring step, forward and backward seconds of the slowest rank's block work."""
    fwd, bwd = [0.0] * rs.r, [0.0] * rs.r
    width = shape.batch * rs.ring_q_heads * shape.head_dim
    for per_step in step_pairs(shape, rs, cfg.causal):
        for t, (q_rows, pairs) in enumerate(per_step):
            if q_rows == 0:  # a packed step that pairs no document: no kernel call
                continue
            flops = 4.0 * pairs * width
            f = flops / cluster.device_flops + cluster.call_overhead
            if t > 0:  # fused merge: read both partial outputs, write one (fp32) + statistics
                f += 3 * q_rows * width * shape.accumulator_bytes / cluster.memory_bandwidth
            b = cluster.backward_flops_ratio * flops / cluster.device_flops + cluster.call_overhead
            fwd[t], bwd[t] = max(fwd[t], f), max(bwd[t], b)
    return fwd, bwd


def _block_len(rows, length: int) -> int:
    return len(range(length)[rows]) if isinstance(rows, slice) else int(rows.numel())


def _pairs(step, length: int) -> tuple[int, float]:
    """(query rows, query x key pairs computed) of one ring step: per document when packed,
    causal blocks counting their lower triangle."""
    if step.cu_q is None:
        spans = [(_block_len(step.q_rows, length), _block_len(step.kv_rows, length))]
    else:
        spans = [
            (step.cu_q[d + 1] - step.cu_q[d], step.cu_kv[d + 1] - step.cu_kv[d])
            for d in range(len(step.cu_q) - 1)
        ]
    causal = step.mask is CAUSAL
    pairs = sum(q * (q + 1) / 2 if causal else q * kv for q, kv in spans)
    return sum(q for q, _ in spans), pairs


def _packing_s(shape: ModelShape, rs: RankShape, cluster: Cluster, phase: str) -> float:
    """The all-to-all's pack and unpack copies (read + write, both sides) of this rank."""
    if rs.u == 1:
        return 0.0
    qkv = rs.q_heads + (0 if rs.allgather_kv else 2 * rs.kv_heads)
    heads = {"a2a_in": qkv, "a2a_dqkv": qkv, "a2a_restore": 2 * rs.kv_heads,
             "ag_kv": 2 * rs.kv_heads * rs.u, "rs_dkv": 2 * rs.kv_heads * rs.u,
             "kv_gather": 0, "kv_reduce_scatter": 0}.get(phase, rs.q_heads)  # fmt: skip
    nbytes = rs.local * shape.batch * heads * shape.head_dim * shape.element_bytes
    return 4 * nbytes / cluster.memory_bandwidth


def _memory(shape: ModelShape, rs: RankShape, cluster: Cluster) -> tuple[int, int]:
    """(bytes held for the backward, peak transient bytes) of one layer on one rank."""
    e, acc = shape.element_bytes, shape.accumulator_bytes
    token = rs.local * shape.batch * shape.head_dim
    # K/V the attention uses, one of K or V: the exchanged heads (replicated up to u), or with
    # the Ulysses all-gather every K/V head of the u ranks' tokens
    kv_used = (rs.kv_heads * rs.u if rs.allgather_kv else rs.kv_heads) * token * e
    kv_local = rs.kv_heads_local * token * e  # one of K or V before any exchange
    out = rs.q_heads * token * e
    stats = 2 * shape.batch * rs.q_heads * rs.local * cluster.stat_lanes * acc
    kv_block = 2 * rs.kv_heads * token * e  # the ring's K/V block (2 x ring_len x ring heads)
    if rs.u > 1 and rs.r == 1 and rs.kv_cache:  # Ulysses cache: keep the local K (and V)
        kept = 2 - RESEND[rs.kv_cache]
        held_kv = kept * kv_local + (2 - kept) * kv_used
    else:
        held_kv = 2 * kv_used
    if rs.r > 1 and rs.kvallgather:  # the gathered blocks stay for the backward
        held_kv += (rs.r - 1) * kv_block
    elif rs.r > 1 and rs.kv_cache:  # ring cache: the received K/V (full) or K (half) blocks
        held_kv += (rs.r - 1) * kv_block * (2 - RESEND[rs.kv_cache]) // 2
    held = rs.q_heads * token * e + held_kv + out + stats
    a2a = 0
    if rs.u > 1:  # send + receive buffers of the biggest exchange
        a2a = 2 * (rs.q_heads * token * e + (0 if rs.allgather_kv else 2 * kv_used))
        if rs.allgather_kv:
            a2a = max(a2a, 2 * kv_used)  # the gathered K and V
    ring_fwd = (kv_block + out * acc // e) if rs.r > 1 else 0  # in-flight K/V, fp32 output
    # backward: in-flight K/V, dQ accumulator, dK/dV home + travelling + current (fp32); the
    # double ring adds the parked and the outer-travelling chains; kvallgather accumulates
    # every block's dK/dV until the reduce-scatter
    dkv = 2 * rs.kv_heads * token * acc
    chains = 1
    if rs.r > 1:
        chains = rs.r if rs.kvallgather else (5 if rs.window > 1 else 3)
    ring_bwd = kv_block + rs.q_heads * token * acc + chains * dkv
    return held, max(a2a, ring_fwd, ring_bwd)


def _ring_time(
    ring: list[Transfer],
    compute: list[float],
    r: int,
    direction: str,
    nodes: list[int],
    cluster: Cluster,
    pred: Prediction,
) -> float:
    """Seconds of one direction's ring loop: step ``t`` takes ``max(compute_t, transfers that
    start at t and must arrive by t + 1)``; a transfer spanning ``k`` steps (double ring's
    outer hop) adds only what it needs beyond those ``k`` steps, at the last of them. Steps past
    the last compute (the backward's trailing dK/dV hops) are pure communication."""
    steps = max([r] + [t.step + 1 for t in ring])
    short: dict[int, list[Transfer]] = defaultdict(list)
    long: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    for t in ring:
        (short[t.step] if t.span == 1 else long[t.step, t.span]).append(t)
    times, comm_s = [], [0.0] * steps
    for t in range(steps):
        work = compute[t] if t < r else 0.0
        comm_s[t] = transfer_time(short[t], nodes, cluster)
        times.append(max(work, comm_s[t]))
        pred.compute_s += work
        pred.comm_s += comm_s[t]
    for (start, span), group in sorted(long.items()):
        need = transfer_time(group, nodes, cluster)
        end = min(start + span, steps)
        pred.comm_s += need
        comm_s[start] += need
        times[end - 1] += max(0.0, need - sum(times[start:end]))
    for t in range(steps):
        work = compute[t] if t < r else 0.0
        pred.phases.append(
            {"direction": direction, "phase": f"ring step {t}", "compute_s": work,
             "comm_s": comm_s[t]}
        )  # fmt: skip
    return sum(times)


#: per direction, the all-to-all that feeds the ring and the one that carries its result back:
#: the pair the pipelined Ulysses overlaps with the ring, head chunk by head chunk
PIPELINED = {"forward": ("a2a_in", "a2a_out"), "backward": ("a2a_dout", "a2a_dqkv")}


def pipeline_chunks_of(shape: ModelShape, rs: RankShape, cfg: ContextParallelConfig) -> int:
    """Head chunks the pipelined Ulysses runs with (``algorithms/usp.py``: its rule or the
    flag; 1 where the exchange runs whole: u = 1, the Ulysses all-gather of K/V, the Ulysses
    KV cache)."""
    if rs.u == 1 or rs.allgather_kv or (rs.kv_cache is not None and rs.r == 1):
        return 1
    q_shape = (rs.local, shape.batch, rs.q_heads, shape.head_dim)
    return pipeline_chunks(
        q_shape, rs.kv_heads, rs.u, shape.element_bytes, cfg.ulysses_pipeline_chunks
    )


def _pipelined(
    took: dict[str, float],
    first: str,
    last: str,
    chunks: int,
    direction: str,
    by_phase: dict,
    nodes: list[int],
    cluster: Cluster,
) -> float:
    """Seconds the pipeline saves (<= 0) against running ``first``, the ring and ``last``
    whole. With ``C`` chunks, chunk ``c``'s ring (``1/C`` of the heads) runs while chunk
    ``c + 1``'s ``first`` exchange and chunk ``c - 1``'s ``last`` exchange travel (one after the
    other: they share the links); only chunk 0's ``first`` and the last chunk's ``last`` are
    exposed. The packing copies stay on the compute side, unhidden."""
    if first not in took or last not in took:
        return 0.0

    def exchange(phase: str) -> float:  # one chunk's transfer: 1/C of the bytes, full latency
        group = [replace(t, nbytes=t.nbytes // chunks) for t in by_phase[direction, phase, 0]]
        return transfer_time(group, nodes, cluster)

    x_in, x_out = exchange(first), exchange(last)
    pack = sum(took[p] - transfer_time(by_phase[direction, p, 0], nodes, cluster)
               for p in (first, last))  # fmt: skip
    ring = took.get("ring", 0.0) / chunks
    steps = sum(
        max(ring, (x_in if c + 1 < chunks else 0.0) + (x_out if c > 0 else 0.0))
        for c in range(chunks)
    )
    whole = took[first] + took.get("ring", 0.0) + took[last]
    return pack + x_in + steps + x_out - whole


def predict(
    shape: ModelShape,
    cfg: ContextParallelConfig,
    tp: int,
    cluster: Cluster,
    nodes: list[int],
    transfers: list[Transfer],
    layer_number: int | None = None,
) -> Prediction:
    """Predicted time and memory of one layer; ``transfers`` from ``traffic.layer_transfers``
    for the same ``layer_number`` (its KV cache policy)."""
    rs = rank_shape(shape, cfg, tp, layer_number)
    fwd_c, bwd_c = _step_compute(shape, rs, cfg, cluster)
    by_phase: dict[tuple[str, str, int], list[Transfer]] = defaultdict(list)
    for t in transfers:
        by_phase[t.direction, t.phase, t.step].append(t)
    chunks = pipeline_chunks_of(shape, rs, cfg)
    pred = Prediction(pipeline_chunks=chunks)
    for direction, phases, compute in (
        ("forward", FORWARD_PHASES, fwd_c),
        ("backward", BACKWARD_PHASES, bwd_c),
    ):
        took: dict[str, float] = {}  # seconds of each phase that ran, exposed as a whole
        for phase in phases:
            if phase == "ring":
                took[phase] = _ring_time(
                    [t for t in transfers if t.direction == direction and t.phase == "ring"],
                    compute, rs.r, direction, nodes, cluster, pred,
                )  # fmt: skip
                continue
            group = by_phase.get((direction, phase, 0))
            if not group:  # no all-to-all in this phase
                continue
            work = _packing_s(shape, rs, cluster, phase)
            comm = transfer_time(group, nodes, cluster)
            took[phase] = work + comm
            pred.compute_s += work
            pred.comm_s += comm
            pred.phases.append(
                {"direction": direction, "phase": phase, "compute_s": work, "comm_s": comm}
            )
        total = sum(took.values())
        if chunks > 1:
            first, last = PIPELINED[direction]
            total += _pipelined(took, first, last, chunks, direction, by_phase, nodes, cluster)
        if direction == "forward":
            pred.forward_s = total
        else:
            pred.backward_s = total
    pred.held_bytes, pred.transient_bytes = _memory(shape, rs, cluster)
    return pred
