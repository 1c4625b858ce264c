"""How K/V cross the Ulysses group, and what the backward keeps of them (KV cache policy).

Forward, for Ulysses degree ``u > 1`` (canonical ``[S/u, B, N, D]`` shards in, ``[S, B, N/u, D]``
out, as ``comm/all_to_all.py``):

- default: K/V heads are replicated up to ``u`` when there are fewer (GQA), then q, k and v go
  through one all-to-all.
- ``--use-ulysses-allgather-kv``: only q goes through the all-to-all; K and V are all-gathered
  along the sequence (every rank receives every K/V head) and each rank keeps the K/V heads its
  query heads use. No replication.

Ulysses KV cache (``--context-parallel-kv-cache-policy``, pure Ulysses): instead of the K/V the
attention computed with (the all-to-all's output), the backward keeps the K/V from *before* the
communication (``full``: K and V; ``half``: K only, V kept as usual) and redoes their
communication when the backward starts (:class:`KVRestore`). With replicated K/V heads the
pre-communication tensors are ``u / Nkv`` times smaller; the price is the bytes sent again.
The ring's KV cache (keep received blocks) lives in the ring loop (``ring.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from usp_npu.comm.all_to_all import heads_to_sequence, replicate_kv_heads
from usp_npu.comm.allgather import all_gather_sequence
from usp_npu.comm.stats import CommStats
from usp_npu.parallel_state import ContextParallelMesh


@dataclass
class KVRestore:
    """What the ring function saves instead of its ``k``/``v``, and how to get them back.

    ``rebuild(*keep)`` runs at the start of the backward (no autograd) and returns ``(k, v)``
    exactly as the forward computed with them.
    """

    keep: tuple[torch.Tensor, ...]
    rebuild: Callable[..., tuple[torch.Tensor, torch.Tensor]]


def kv_head_range(nq: int, nkv: int, u: int, rank: int) -> slice:
    """The K/V heads that Ulysses rank ``rank``'s query heads use (``nq``/``nkv`` before the split).

    Rank ``j`` gets query heads ``[j nq/u, (j+1) nq/u)``; query head ``h`` uses K/V head
    ``h // (nq / nkv)``. The config's head rules guarantee whole K/V heads per rank.
    """
    per_rank, group = nq // u, nq // nkv
    return slice(rank * per_rank // group, ((rank + 1) * per_rank - 1) // group + 1)


def ulysses_heads_to_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mesh: ContextParallelMesh,
    stats: CommStats | None,
    policy: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVRestore | None]:
    """Scatter heads, gather the sequence (differentiable); the restore for ``policy``.

    ``q``: ``[S/u, B, Nq, D]``, ``k``/``v``: ``[S/u, B, Nkv, D]`` -> ``[S, B, Nq/u, D]`` and
    ``[S, B, n, D]`` (``n`` = the K/V heads this rank's query heads use).
    """
    group, u = mesh.ulysses_group, mesh.ulysses_size
    p2p = mesh.config.ulysses_p2p
    if mesh.config.use_ulysses_allgather_kv:
        heads = kv_head_range(q.shape[2], k.shape[2], u, mesh.ulysses_rank)

        def gather(x: torch.Tensor) -> torch.Tensor:
            # a copy of this rank's heads (no-op when it uses them all), so that the gathered
            # buffer with every K/V head is not kept alive for the backward
            return all_gather_sequence(x, group, stats)[:, :, heads].contiguous()

        (q_post,) = heads_to_sequence([q], group, stats, p2p)
        k_post, v_post = gather(k), gather(v)
    else:

        def gather(x: torch.Tensor) -> torch.Tensor:
            return heads_to_sequence([replicate_kv_heads(x, u)], group, stats, p2p)[0]

        kr, vr = replicate_kv_heads(k, u), replicate_kv_heads(v, u)
        if policy is None:  # one all-to-all for all three
            q_post, k_post, v_post = heads_to_sequence([q, kr, vr], group, stats, p2p)
        elif policy == "full":  # K/V apart from q, so q's buffer does not keep them alive
            (q_post,) = heads_to_sequence([q], group, stats, p2p)
            k_post, v_post = heads_to_sequence([kr, vr], group, stats, p2p)
        else:  # half: V stays with q, K apart
            q_post, v_post = heads_to_sequence([q, vr], group, stats, p2p)
            (k_post,) = heads_to_sequence([kr], group, stats, p2p)
    if policy is None:
        return q_post, k_post, v_post, None
    # rebuild runs inside the ring's backward, where autograd records nothing: the same
    # communication functions as the forward, without a graph
    pre_k, pre_v = k.detach(), v.detach()
    if policy == "full":
        restore = KVRestore((pre_k, pre_v), lambda kk, vv: (gather(kk), gather(vv)))
    else:
        restore = KVRestore((pre_k, v_post), lambda kk, vv: (gather(kk), vv))
    return q_post, k_post, v_post, restore
