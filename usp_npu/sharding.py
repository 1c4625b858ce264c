"""Which tokens each CP rank holds (REFERENCE.md section 3), and moving between full and shard.

One rule covers all three algorithms with (u, r) = (cp, 1), (1, cp) or (u, cp / u):

- causal: cut the sequence into ``2r`` chunks; ring rank ``j`` takes ``[chunk_j ; chunk_(2r-1-j)]``
  (the load-balanced zigzag), then cuts that ``u`` ways and Ulysses rank ``w`` keeps piece ``w``.
  With r = 1 this is the contiguous split; with u = 1 it is the ring's zigzag.
- general: contiguous, ``chunk(cp)[cp_rank]``.

After the Ulysses all-to-all (gather along the sequence in group order) each ring rank again
holds exactly its ``[chunk_j ; chunk_(2r-1-j)]``, which is what the ring schedule expects.
Split input_ids, labels (shifted BEFORE splitting) and position ids with the same function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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


def _indices_for(mesh: ContextParallelMesh, seq_length: int, device: torch.device) -> torch.Tensor:
    cfg = mesh.config
    return token_indices(
        seq_length, mesh.cp_rank, cfg.ulysses_degree, cfg.ring_degree, cfg.causal
    ).to(device)


def split_sequence(
    x: torch.Tensor, seq_dim: int, mesh: ContextParallelMesh | None = None
) -> torch.Tensor:
    """This rank's shard of the full-sequence tensor ``x`` along ``seq_dim`` (a new tensor).

    Differentiable (the gradient lands in this rank's positions). ``mesh`` defaults to the current one.
    """
    mesh = mesh or get_mesh()
    idx = _indices_for(mesh, x.shape[seq_dim], x.device)
    return x.index_select(seq_dim, idx)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seq_dim: int, mesh: ContextParallelMesh) -> torch.Tensor:
        ctx.seq_dim, ctx.mesh = seq_dim, mesh
        seq_dim = seq_dim % x.dim()
        pieces = [
            torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(mesh.cp_size)
        ]
        dist.all_gather(pieces, x.contiguous(), group=mesh.cp_group)
        total = x.shape[seq_dim] * mesh.cp_size
        cfg = mesh.config
        order = torch.cat(
            [
                token_indices(total, rank, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
                for rank in range(mesh.cp_size)
            ]
        ).to(x.device)
        gathered = torch.cat(pieces, dim=seq_dim)
        return torch.empty_like(gathered).index_copy_(seq_dim, order, gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gathered tensor is used identically on every CP rank (replicated), so each rank
        # keeps the gradient of its own positions; no communication.
        return split_sequence(grad, ctx.seq_dim, ctx.mesh), None, None


def gather_sequence(
    x: torch.Tensor, seq_dim: int, mesh: ContextParallelMesh | None = None
) -> torch.Tensor:
    """Inverse of :func:`split_sequence`: all-gather the CP shards back into sequence order.

    Differentiable, for a result used identically on every CP rank (e.g. a replicated loss): the
    backward returns this rank's slice of the incoming gradient.
    """
    mesh = mesh or get_mesh()
    if mesh.cp_size == 1:
        return x
    return _GatherSequence.apply(x, seq_dim, mesh)
