"""Attention over a sequence split another way than :func:`usp_npu.split_sequence`.

A framework may split the sequence itself (Megatron-core cuts it into ``2 cp`` chunks and CP
rank ``c`` takes chunks ``c`` and ``2 cp - 1 - c``, whatever the algorithm). The attention stays
exact as long as every Ulysses group ends up holding the tokens that ``split_sequence`` would give
it: then the tokens gathered by the Ulysses all-to-all are only in another order, and one local
permutation (``token_order`` of :func:`usp_npu.context_parallel_attention`) puts them in the order
the ring schedule expects. :func:`token_order_for` computes that permutation.

For the causal split, Megatron's zigzag qualifies for every (u, r): Ulysses group ``j`` holds
Megatron chunks ``j u .. j u + u - 1`` and ``2 cp - (j + 1) u .. 2 cp - j u - 1``, which are
exactly the ring chunks ``j`` and ``2 r - 1 - j`` of ``split_sequence``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from usp_npu.parallel_state import ContextParallelMesh, get_mesh
from usp_npu.sharding import token_indices

#: ``positions(seq_length, cp_rank, cp_size)`` -> int64 positions CP rank ``cp_rank`` holds,
#: in the order it holds them
SplitPositions = Callable[[int, int, int], torch.Tensor]


def zigzag_positions(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Megatron-core's split (``get_batch_on_this_cp_rank``): chunks ``c`` and ``2cp-1-c`` of 2cp."""
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x context-parallel size "
            f"{cp_size} (Megatron's load-balanced split)"
        )
    chunks = torch.arange(seq_length).chunk(2 * cp_size)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])


def token_order_for(
    positions: SplitPositions,
    seq_length: int,
    mesh: ContextParallelMesh | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """The ``token_order`` that makes attention exact for a sequence split by ``positions``.

    ``seq_length`` is the full sequence length. Returns None when the split already is
    ``split_sequence``'s order on this ring rank (nothing to permute). Raises ValueError when this
    rank's Ulysses group does not hold the tokens ``split_sequence`` would give it (no local
    permutation can fix that split). Pure arithmetic, no communication.
    """
    mesh = mesh or get_mesh()
    cfg = mesh.config
    u, r, cp = cfg.ulysses_degree, cfg.ring_degree, mesh.cp_size
    first = mesh.ring_rank * u  # CP index of the first member of this rank's Ulysses group
    members = range(first, first + u)
    gathered = torch.cat([positions(seq_length, c, cp) for c in members])
    wanted = torch.cat([token_indices(seq_length, c, u, r, cfg.causal) for c in members])
    if gathered.numel() != wanted.numel() or not torch.equal(
        gathered.sort().values, wanted.sort().values
    ):
        raise ValueError(
            f"this split gives Ulysses group {mesh.ring_rank} (CP ranks {first}..{first + u - 1}) "
            f"other tokens than usp_npu.split_sequence does for {cfg.context_parallel_algo} with "
            f"u={u}, r={r}, {cfg.attention_mask_type} mask; split the inputs with "
            "usp_npu.split_sequence instead"
        )
    if torch.equal(gathered, wanted):
        return None
    where = torch.empty(seq_length, dtype=torch.int64)
    where[gathered] = torch.arange(gathered.numel())
    return where[wanted].to(device)
