"""Unified sequence parallelism: Ulysses all-to-all around the ring, one code path.

Ulysses, ring and hybrid are (u, r) = (cp, 1), (1, cp) and (u, cp / u) of this function.

Pipelining (u > 1). The heads are cut into ``C`` chunks that run one after another, each through
the whole algorithm (all-to-all in, the ring of ``r`` blocks, all-to-all out). While chunk ``i``
computes, chunk ``i + 1``'s input all-to-all and chunk ``i - 1``'s output all-to-all are in
flight, so only the first chunk's input and the last chunk's output exchange are exposed: ``1/C``
of the traffic instead of all of it. The backward runs the same pipeline on dO in and dQ/dK/dV
out. Each head's computation, and the order of its blocks and merges, is the same for every
``C``, so the result is bit-identical to ``C = 1``.

Chunk rule (:func:`pipeline_chunks`): ``C`` must divide the query and K/V heads each rank gets
after the all-to-all (``Nq/u`` and ``Nkv'/u``, ``Nkv'`` = K/V heads after GQA replication, which
is never widened for the pipeline's sake). Among those divisors take the largest ``C <= 4``
whose input all-to-all still carries at least 1 MiB per chunk: beyond 4 chunks less than 1/16
more of the traffic would be hidden, and below ~1 MiB the fixed cost of one more collective and
one more kernel call per chunk (tens of microseconds) is comparable to the transfer it hides.
``--ulysses-pipeline-chunks`` / ``chunks=`` overrides the rule (1 = no pipelining).
``--use-ulysses-allgather-kv`` and the Ulysses KV cache (``kv_cache.py``) change what crosses
the Ulysses group and what the backward keeps, and a caller's ``token_order`` sits between the
exchange and the ring; with them the exchange runs whole, unpipelined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from usp_npu.algorithms.kv_cache import KVRestore, ulysses_heads_to_sequence
from usp_npu.algorithms.ring import (
    MergeFn,
    RingPlan,
    ring_attention,
    ring_backward,
    ring_forward,
)
from usp_npu.algorithms.routes import build_route
from usp_npu.algorithms.schedule import ring_schedule
from usp_npu.comm.all_to_all import (
    post_heads_to_sequence,
    post_sequence_to_heads,
    replicate_kv_heads,
    sequence_to_heads,
)
from usp_npu.comm.stats import CommStats
from usp_npu.config import KVALLGATHER
from usp_npu.kernels.base import BlockKernel
from usp_npu.parallel_state import ContextParallelMesh

#: most head chunks the rule picks, and the least input all-to-all bytes per chunk it accepts
MAX_PIPELINE_CHUNKS = 4
MIN_CHUNK_BYTES = 1 << 20


def pipeline_chunks(
    q_shape: tuple[int, ...],
    kv_heads: int,
    ulysses_degree: int,
    element_size: int,
    override: int | None = None,
) -> int:
    """Head chunks of the pipelined Ulysses for local ``q`` of ``q_shape`` ``[L, B, Nq, D]`` and
    ``kv_heads`` K/V heads (after replication), each ``element_size`` bytes. See the module
    docstring for the rule; ``override`` is checked (ValueError naming the flag) and returned.
    """
    local, batch, nq, dim = q_shape
    u = ulysses_degree
    if u == 1:
        return 1
    common = math.gcd(nq // u, kv_heads // u)
    if override is not None:
        if override < 1 or common % override:
            raise ValueError(
                f"--ulysses-pipeline-chunks {override} must divide the {nq // u} query and "
                f"{kv_heads // u} K/V heads each rank holds after the all-to-all "
                f"(divisors of {common}); use one of them or leave it unset"
            )
        return override
    head_bytes = local * batch * dim * element_size
    best = 1
    for c in range(1, min(common, MAX_PIPELINE_CHUNKS) + 1):
        if common % c == 0 and (nq + 2 * kv_heads) // c * head_bytes >= MIN_CHUNK_BYTES:
            best = c
    return best


@dataclass
class _UlyssesPlan:
    rings: list[RingPlan]  # one per chunk: a route holds the state of one ring loop
    group: dist.ProcessGroup
    stats: CommStats | None
    chunks: int
    blocking: bool
    p2p: bool  # --ulysses-all-to-all p2p


def _head_chunk(x: torch.Tensor, c: int, chunks: int) -> torch.Tensor:
    width = x.shape[2] // chunks
    return x[:, :, c * width : (c + 1) * width]


class _PipelinedUlysses(torch.autograd.Function):
    """all-to-all in -> ring -> all-to-all out, per head chunk, with the exchanges overlapped."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _UlyssesPlan):
        chunks, group = plan.chunks, plan.group

        def post_in(c):
            parts = [_head_chunk(x, c, chunks) for x in (q, k, v)]
            return post_heads_to_sequence(parts, group, plan.stats, plan.blocking, plan.p2p)

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        saved, rng_states, per_chunk = [], [], 0
        incoming, outgoing = post_in(0), None
        for c in range(chunks):
            q_c, k_c, v_c = incoming.wait()  # views of one receive buffer
            if c + 1 < chunks:
                incoming = post_in(c + 1)
            out_c, smax, ssum, rng, cache = ring_forward(q_c, k_c, v_c, plan.rings[c])
            out_c = out_c.contiguous()  # the send buffer (a copy only of a one-step kernel layout)
            previous = outgoing
            outgoing = post_sequence_to_heads(
                [out_c], group, plan.stats, blocking=plan.blocking, p2p=plan.p2p
            )
            if previous is not None:
                previous.wait_into([_head_chunk(out, c - 1, chunks)])
            chunk_saved = [q_c, k_c, v_c, out_c, smax, ssum, *cache]
            saved += chunk_saved
            per_chunk = len(chunk_saved)
            rng_states.append(rng)
        outgoing.wait_into([_head_chunk(out, chunks - 1, chunks)])
        ctx.plan, ctx.rng_states, ctx.per_chunk, ctx.kv_shape = plan, rng_states, per_chunk, k.shape
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        plan, chunks, per_chunk = ctx.plan, ctx.plan.chunks, ctx.per_chunk
        saved = ctx.saved_tensors
        dq = torch.empty(dout.shape, dtype=saved[0].dtype, device=dout.device)
        dk, dv = (torch.empty(ctx.kv_shape, dtype=dq.dtype, device=dout.device) for _ in range(2))

        def post_in(c):
            return post_heads_to_sequence(
                [_head_chunk(dout, c, chunks)], plan.group, plan.stats, plan.blocking, plan.p2p
            )

        incoming, outgoing = post_in(0), None
        for c in range(chunks):
            (dout_c,) = incoming.wait()
            if c + 1 < chunks:
                incoming = post_in(c + 1)
            q_c, k_c, v_c, out_c, smax, ssum, *cache = saved[c * per_chunk : (c + 1) * per_chunk]
            grads = ring_backward(
                dout_c, q_c, k_c, v_c, out_c, smax, ssum, ctx.rng_states[c], cache, plan.rings[c]
            )
            previous = outgoing
            # dq, dk, dv go back as they are, or packed in one copy where a cast or layout is due
            outgoing = post_sequence_to_heads(
                list(grads), plan.group, plan.stats, q_c.dtype, plan.blocking, plan.p2p
            )
            if previous is not None:
                previous.wait_into([_head_chunk(x, c - 1, chunks) for x in (dq, dk, dv)])
        outgoing.wait_into([_head_chunk(x, chunks - 1, chunks) for x in (dq, dk, dv)])
        return dq, dk, dv, None


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mesh: ContextParallelMesh,
    kernel: BlockKernel,
    scale: float,
    merge: MergeFn,
    mask: torch.Tensor | None = None,
    stats: CommStats | None = None,
    blocking_comm: bool = False,
    kv_cache: str | None = None,
    cu_seqlens: tuple[int, ...] | None = None,
    token_order: torch.Tensor | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """Context-parallel attention of this rank's shards, canonical layout.

    ``q``: ``[L, B, Nq, D]``, ``k``/``v``: ``[L, B, Nkv, D]`` as split by ``split_sequence``;
    ``mask``: full-sequence bool ``[S, S]`` (general mask type only). Returns ``[L, B, Nq, D]``.
    Shapes must have been validated (``attention.py``) before this runs any collective.
    ``blocking_comm`` waits for every exchange at once (no overlap; benchmarks use it to
    measure how much communication the overlap hides). ``kv_cache``: this layer's KV cache
    policy (``None`` | ``full`` | ``half``): the ring's when there is a ring, else Ulysses'.
    ``token_order`` (int64 ``[L * u]``, a permutation) lets the caller split the sequence its own
    way (Megatron's zigzag), provided each Ulysses group ends up with the tokens ``split_sequence``
    gives it: right after the all-to-all the ring rank's tokens are taken in this order, which
    must be ``split_sequence``'s, and the output is put back before the all-to-all back.
    ``chunks``: head chunks of the pipelined Ulysses (default: the config's
    ``ulysses_pipeline_chunks``, else :func:`pipeline_chunks`).
    """
    u, r = mesh.ulysses_size, mesh.ring_size
    cfg = mesh.config
    p2p = cfg.ulysses_p2p

    def ring_plan(local_len: int, restore=None) -> RingPlan:
        steps = ring_schedule(mesh.ring_rank, r, local_len, cfg.causal, mask, cu_seqlens, q.device)
        steps, route = build_route(mesh, steps, stats, blocking_comm)
        ring_cache = kv_cache if r > 1 else None
        if cfg.context_parallel_algo == KVALLGATHER and r > 1:
            ring_cache = "full"  # the gathered blocks are kept: the backward receives nothing
        return RingPlan(steps, kernel, scale, merge, route, ring_cache, restore)

    # The all-gathered K/V and the Ulysses KV cache change what crosses the Ulysses group and
    # what the backward keeps: they run the exchange whole, unpipelined (kv_cache.py)
    # (and a caller's token order, applied between the exchange and the ring)
    whole = cfg.use_ulysses_allgather_kv or (kv_cache is not None and r == 1)
    if u == 1 or whole or token_order is not None:
        restore = None
        if u > 1:  # scatter heads, gather the ring rank's sequence
            policy = kv_cache if r == 1 else None
            q, k, v, restore = ulysses_heads_to_sequence(q, k, v, mesh, stats, policy)
        if token_order is not None:  # index_select's backward scatters the gradients back
            q, k, v = (t.index_select(0, token_order) for t in (q, k, v))
            if restore is not None:  # the K/V the backward rebuilds must be permuted the same way
                rebuild = restore.rebuild
                restore = KVRestore(
                    restore.keep,
                    lambda *kept: tuple(t.index_select(0, token_order) for t in rebuild(*kept)),
                )
        out = ring_attention(q, k, v, ring_plan(q.shape[0], restore))
        if token_order is not None:
            out = out.index_select(0, torch.argsort(token_order))
        if u > 1:
            (out,) = sequence_to_heads([out], mesh.ulysses_group, stats, p2p)
        return out
    # GQA: each rank needs whole K/V heads; replicate only when there are fewer than u of them
    k, v = replicate_kv_heads(k, u), replicate_kv_heads(v, u)
    if chunks is None:
        chunks = cfg.ulysses_pipeline_chunks
    chunks = pipeline_chunks(tuple(q.shape), k.shape[2], u, q.element_size(), chunks)
    rings = [ring_plan(q.shape[0] * u) for _ in range(chunks)]
    plan = _UlyssesPlan(rings, mesh.ulysses_group, stats, chunks, blocking_comm, p2p)
    return _PipelinedUlysses.apply(q, k, v, plan)
