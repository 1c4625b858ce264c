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

Packed sequences (``cu_seqlens``) use the same rule per document: Megatron's THD split
(TransformerEngine's ``thd_get_partitioned_indices``) cuts every document into ``2 cp`` chunks and
CP rank ``c`` holds chunks ``c`` and ``2 cp - 1 - c`` of every document, in document order. Ulysses
group ``j`` then holds, of every document, the chunks that are ``split_sequence``'s packed ring
chunks ``j`` and ``2 r - 1 - j``: again only the order differs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from usp_npu.packing import CuSeqlens, normalize_cu_seqlens, packed_token_indices
from usp_npu.parallel_state import ContextParallelMesh, get_mesh
from usp_npu.sharding import token_indices

#: ``positions(seq_length, cp_rank, cp_size)`` -> int64 positions CP rank ``cp_rank`` holds,
#: in the order it holds them; for a packed sequence it is also called with ``cu_seqlens=``
#: (a tuple of ints, see :func:`token_order_for`)
SplitPositions = Callable[..., torch.Tensor]


def zigzag_positions(
    seq_length: int, cp_rank: int, cp_size: int, cu_seqlens: CuSeqlens | None = None
) -> torch.Tensor:
    """Megatron-core's split: chunks ``c`` and ``2cp-1-c`` of 2cp, of the sequence or each document.

    Without ``cu_seqlens``: ``get_batch_on_this_cp_rank``. With ``cu_seqlens`` (the packed
    sequence's cumulative document lengths, padded ones: Megatron's ``cu_seqlens_q_padded``):
    the THD split of ``get_thd_batch_on_this_cp_rank`` (TransformerEngine's
    ``thd_get_partitioned_indices``), every document zigzagged, documents in order. With
    ``cp_size`` 1 Megatron does not split: every position, in order.
    """
    bounds = (0, seq_length) if cu_seqlens is None else normalize_cu_seqlens(cu_seqlens, seq_length)
    if cp_size == 1:
        return torch.arange(seq_length)
    parts = []
    for a, b in itertools.pairwise(bounds):
        if (b - a) % (2 * cp_size):
            raise ValueError(
                f"sequence length {b - a} is not divisible by 2 x context-parallel size "
                f"{cp_size} (Megatron's load-balanced split)"
                if cu_seqlens is None
                else f"document length {b - a} is not divisible by 2 x context-parallel size "
                f"{cp_size} (Megatron's THD split): pad every document to a multiple of "
                f"{2 * cp_size} (usp_npu.pad_packed(cu_seqlens, {2 * cp_size}); Megatron's "
                "cu_seqlens_q_padded)"
            )
        chunks = torch.arange(a, b).chunk(2 * cp_size)
        parts += [chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]]
    return torch.cat(parts)


def token_order_for(
    positions: SplitPositions,
    seq_length: int,
    mesh: ContextParallelMesh | None = None,
    device: torch.device | str = "cpu",
    cu_seqlens: CuSeqlens | None = None,
) -> torch.Tensor | None:
    """The ``token_order`` that makes attention exact for a sequence split by ``positions``.

    ``seq_length`` is the full sequence length. ``cu_seqlens``: the sequence is packed (give
    the same ``cu_seqlens`` to :func:`usp_npu.context_parallel_attention`): the target is then
    ``split_sequence``'s packed split, and ``positions`` is called with ``cu_seqlens=`` too.
    Returns None when the split already is ``split_sequence``'s order on this ring rank (nothing
    to permute). Raises ValueError when this rank's Ulysses group does not hold the tokens
    ``split_sequence`` would give it (no local permutation can fix that split), or when the
    packed split cannot hold ``cu_seqlens``. Pure arithmetic, no communication.
    """
    mesh = mesh or get_mesh()
    cfg = mesh.config
    u, r, cp = cfg.ulysses_degree, cfg.ring_degree, mesh.cp_size
    first = mesh.ring_rank * u  # CP index of the first member of this rank's Ulysses group
    members = range(first, first + u)
    if cu_seqlens is None:
        gathered = torch.cat([positions(seq_length, c, cp) for c in members])
        wanted = torch.cat([token_indices(seq_length, c, u, r, cfg.causal) for c in members])
    else:
        cu = normalize_cu_seqlens(cu_seqlens, seq_length)
        gathered = torch.cat([positions(seq_length, c, cp, cu_seqlens=cu) for c in members])
        wanted = torch.cat([packed_token_indices(cu, c, u, r, cfg.causal) for c in members])
    if gathered.numel() != wanted.numel() or not torch.equal(
        gathered.sort().values, wanted.sort().values
    ):
        raise ValueError(
            f"this split gives Ulysses group {mesh.ring_rank} (CP ranks {first}..{first + u - 1}) "
            f"other tokens than usp_npu.split_sequence does for {cfg.context_parallel_algo} with "
            f"u={u}, r={r}, {cfg.attention_mask_type} mask"
            + ("" if cu_seqlens is None else " (packed: cu_seqlens)")
            + "; split the inputs with usp_npu.split_sequence instead"
        )
    if torch.equal(gathered, wanted):
        return None
    where = torch.empty(seq_length, dtype=torch.int64)
    where[gathered] = torch.arange(gathered.numel())
    return where[wanted].to(device)
