"""Unified sequence parallelism: Ulysses all-to-all around the ring, one code path.

Ulysses, ring and hybrid are (u, r) = (cp, 1), (1, cp) and (u, cp / u) of this function.
"""

from __future__ import annotations

import torch

from usp_npu.algorithms.kv_cache import KVRestore, ulysses_heads_to_sequence
from usp_npu.algorithms.ring import MergeFn, RingPlan, ring_attention
from usp_npu.algorithms.routes import build_route
from usp_npu.algorithms.schedule import ring_schedule
from usp_npu.comm.all_to_all import sequence_to_heads
from usp_npu.comm.stats import CommStats
from usp_npu.config import KVALLGATHER
from usp_npu.kernels.base import BlockKernel
from usp_npu.parallel_state import ContextParallelMesh


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
) -> torch.Tensor:
    """Context-parallel attention of this rank's shards, canonical layout.

    ``q``: ``[L, B, Nq, D]``, ``k``/``v``: ``[L, B, Nkv, D]`` as split by ``split_sequence``;
    ``mask``: full-sequence bool ``[S, S]`` (general mask type only). Returns ``[L, B, Nq, D]``.
    Shapes must have been validated (``attention.py``) before this runs any collective.
    ``blocking_comm`` waits for every ring exchange at once (no overlap; benchmarks use it to
    measure how much communication the overlap hides). ``kv_cache``: this layer's KV cache
    policy (``None`` | ``full`` | ``half``): the ring's when there is a ring, else Ulysses'.
    ``token_order`` (int64 ``[L * u]``, a permutation) lets the caller split the sequence its own
    way (Megatron's zigzag), provided each Ulysses group ends up with the tokens ``split_sequence``
    gives it: right after the all-to-all the ring rank's tokens are taken in this order, which
    must be ``split_sequence``'s, and the output is put back before the all-to-all back.
    """
    u, r = mesh.ulysses_size, mesh.ring_size
    restore = None
    if u > 1:  # scatter heads, gather the ring rank's sequence
        ulysses_policy = kv_cache if r == 1 else None
        q, k, v, restore = ulysses_heads_to_sequence(q, k, v, mesh, stats, ulysses_policy)
    if token_order is not None:  # index_select's backward scatters the gradients back
        q, k, v = (t.index_select(0, token_order) for t in (q, k, v))
        if restore is not None:  # the K/V the backward rebuilds must be permuted the same way
            rebuild = restore.rebuild
            restore = KVRestore(
                restore.keep,
                lambda *kept: tuple(t.index_select(0, token_order) for t in rebuild(*kept)),
            )
    steps = ring_schedule(
        mesh.ring_rank, r, q.shape[0], mesh.config.causal, mask, cu_seqlens, q.device
    )
    steps, route = build_route(mesh, steps, stats, blocking_comm)
    ring_cache = kv_cache if r > 1 else None
    if mesh.config.context_parallel_algo == KVALLGATHER and r > 1:
        ring_cache = "full"  # the gathered blocks are kept: the backward receives nothing
    plan = RingPlan(steps, kernel, scale, merge, route, ring_cache, restore)
    out = ring_attention(q, k, v, plan)
    if token_order is not None:
        out = out.index_select(0, torch.argsort(token_order))
    if u > 1:
        (out,) = sequence_to_heads([out], mesh.ulysses_group, stats)
    return out
