"""Which tokens each CP rank holds (REFERENCE.md section 3), and moving between full and shard.

One rule covers all three algorithms with (u, r) = (cp, 1), (1, cp) or (u, cp / u):

- causal: cut the sequence into ``2r`` chunks; ring rank ``j`` takes ``[chunk_j ; chunk_(2r-1-j)]``
  (the load-balanced zigzag), then cuts that ``u`` ways and Ulysses rank ``w`` keeps piece ``w``.
  With r = 1 this is the contiguous split; with u = 1 it is the ring's zigzag.
- general: contiguous, ``chunk(cp)[cp_rank]``.

After the Ulysses all-to-all (gather along the sequence in group order) each ring rank again
holds exactly its ``[chunk_j ; chunk_(2r-1-j)]``, which is what the ring schedule expects.
Split input_ids, labels (shifted BEFORE splitting) and position ids with the same function.

Packed sequences (``cu_seqlens``, see :mod:`usp_npu.packing` and ``docs/packed.md``): the same
rule applied to every document (causal ring: each document zigzagged into ``2r`` chunks, the
ring rank's pieces of all documents in document order), or contiguous (general, or r = 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_npu.packing import CuSeqlens, normalize_cu_seqlens, packed_token_indices
from usp_npu.parallel_state import ContextParallelMesh, get_mesh


def token_indices(seq_length: int, cp_rank: int, u: int, r: int, causal: bool) -> torch.Tensor:
    """Positions (int64, ascending within each chunk) of the tokens CP rank ``cp_rank`` holds."""
    cp = u * r
    positions = torch.arange(seq_length)
    if not causal:
        if seq_length % cp:
            raise ValueError(f"sequence length {seq_length} is not divisible by {cp} CP ranks")
        return positions.chunk(cp)[cp_rank]
    if seq_length % (2 * r) or (seq_length // r) % u:
        raise ValueError(
            f"sequence length {seq_length} cannot be split causally for ring degree {r} and "
            f"Ulysses degree {u} (needs seq % {2 * r} == 0 and (seq / {r}) % {u} == 0)"
        )
    ring_rank, ulysses_rank = divmod(cp_rank, u)
    chunks = positions.chunk(2 * r)
    ring_share = torch.cat([chunks[ring_rank], chunks[2 * r - 1 - ring_rank]])
    return ring_share.chunk(u)[ulysses_rank]


def _rank_indices(
    mesh: ContextParallelMesh, total: int, cp_rank: int, cu: tuple[int, ...] | None
) -> torch.Tensor:
    cfg = mesh.config
    u, r, causal = cfg.ulysses_degree, cfg.ring_degree, cfg.causal
    if cu is None:
        return token_indices(total, cp_rank, u, r, causal)
    return packed_token_indices(cu, cp_rank, u, r, causal)


def _resolve(cu_seqlens, mesh):
    # Before cu_seqlens existed the third positional argument was the mesh: keep such calls working.
    if isinstance(cu_seqlens, ContextParallelMesh):
        return None, cu_seqlens
    return cu_seqlens, mesh or get_mesh()


def split_sequence(
    x: torch.Tensor,
    seq_dim: int,
    cu_seqlens: CuSeqlens | None = None,
    mesh: ContextParallelMesh | None = None,
) -> torch.Tensor:
    """This rank's shard of the full-sequence tensor ``x`` along ``seq_dim`` (a new tensor).

    ``cu_seqlens``: cumulative document lengths of a packed ``x`` (leading 0, last = the
    length of ``x`` along ``seq_dim``), the same on every rank: the packed split of
    ``docs/packed.md``. Differentiable (the gradient lands in this rank's positions). ``mesh``
    defaults to the current one.
    """
    cu_seqlens, mesh = _resolve(cu_seqlens, mesh)
    total = x.shape[seq_dim]
    cu = None if cu_seqlens is None else normalize_cu_seqlens(cu_seqlens, total)
    idx = _rank_indices(mesh, total, mesh.cp_rank, cu).to(x.device)
    return x.index_select(seq_dim, idx)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seq_dim: int, mesh: ContextParallelMesh, cu):
        ctx.seq_dim, ctx.mesh, ctx.cu = seq_dim, mesh, cu
        seq_dim = seq_dim % x.dim()
        pieces = [
            torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(mesh.cp_size)
        ]
        dist.all_gather(pieces, x.contiguous(), group=mesh.cp_group)
        total = x.shape[seq_dim] * mesh.cp_size
        order = torch.cat(
            [_rank_indices(mesh, total, rank, cu) for rank in range(mesh.cp_size)]
        ).to(x.device)
        gathered = torch.cat(pieces, dim=seq_dim)
        return torch.empty_like(gathered).index_copy_(seq_dim, order, gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gathered tensor is used identically on every CP rank (replicated), so each rank
        # keeps the gradient of its own positions; no communication.
        return split_sequence(grad, ctx.seq_dim, ctx.cu, ctx.mesh), None, None, None


def gather_sequence(
    x: torch.Tensor,
    seq_dim: int,
    cu_seqlens: CuSeqlens | None = None,
    mesh: ContextParallelMesh | None = None,
) -> torch.Tensor:
    """Inverse of :func:`split_sequence`: all-gather the CP shards back into sequence order.

    ``cu_seqlens``: the FULL sequence's cumulative document lengths given to
    :func:`split_sequence` (checked before the all-gather). Differentiable, for a result used
    identically on every CP rank (e.g. a replicated loss): the backward returns this rank's
    slice of the incoming gradient.
    """
    cu_seqlens, mesh = _resolve(cu_seqlens, mesh)
    cu = None
    if cu_seqlens is not None:
        total = x.shape[seq_dim] * mesh.cp_size
        cu = normalize_cu_seqlens(cu_seqlens, total)
        cfg = mesh.config
        # raises (on every rank, before the all-gather) when the split cannot hold cu
        packed_token_indices(cu, mesh.cp_rank, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
    if mesh.cp_size == 1:
        return x
    return _GatherSequence.apply(x, seq_dim, mesh, cu)
