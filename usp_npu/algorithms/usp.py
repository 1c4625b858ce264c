"""Unified sequence parallelism: Ulysses all-to-all around the ring, one code path.

Ulysses, ring and hybrid are (u, r) = (cp, 1), (1, cp) and (u, cp / u) of this function.
"""

from __future__ import annotations

import torch

from usp_npu.algorithms.ring import MergeFn, RingPlan, ring_attention
from usp_npu.algorithms.schedule import ring_schedule
from usp_npu.comm.all_to_all import heads_to_sequence, replicate_kv_heads, sequence_to_heads
from usp_npu.comm.ring import RingExchange
from usp_npu.comm.stats import CommStats
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
    cu_seqlens: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Context-parallel attention of this rank's shards, canonical layout.

    ``q``: ``[L, B, Nq, D]``, ``k``/``v``: ``[L, B, Nkv, D]`` as split by ``split_sequence``;
    ``mask``: full-sequence bool ``[S, S]`` (general mask type only). Returns ``[L, B, Nq, D]``.
    Shapes must have been validated (``attention.py``) before this runs any collective.
    ``blocking_comm`` waits for every ring exchange at once (no overlap; benchmarks use it to
    measure how much communication the overlap hides).
    """
    u = mesh.ulysses_size
    if u > 1:
        # scatter heads, gather the ring rank's sequence: one all-to-all for q, k and v
        k, v = replicate_kv_heads(k, u), replicate_kv_heads(v, u)
        q, k, v = heads_to_sequence([q, k, v], mesh.ulysses_group, stats)
    steps = ring_schedule(
        mesh.ring_rank, mesh.ring_size, q.shape[0], mesh.config.causal, mask, cu_seqlens, q.device
    )
    exchange = RingExchange(mesh, stats, blocking_comm) if mesh.ring_size > 1 else None
    out = ring_attention(q, k, v, RingPlan(steps, kernel, scale, merge, exchange))
    if u > 1:
        (out,) = sequence_to_heads([out], mesh.ulysses_group, stats)
    return out
