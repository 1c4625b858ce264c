"""The block-kernel interface: the one thing a new device has to implement.

A *block* is one (query rows x key rows) tile of attention that the ring schedule hands to a
kernel. Every tensor uses the library's canonical internal layout, ``[S, B, N, D]`` ("SBND"):
sequence first, so that sequence halves are contiguous slices, and so that ``reshape(S, B, N * D)``
is exactly torch_npu's SBH layout at no cost.

Shapes, for a block of ``sq`` query rows and ``sk`` key rows:

- ``q``: ``[sq, B, Nq, D]``; ``k``, ``v``: ``[sk, B, Nkv, D]`` with ``Nq % Nkv == 0`` (GQA/MQA).
- ``out``: ``[sq, B, Nq, D]`` in the dtype of ``q``.
- ``softmax_max``, ``softmax_sum``: ``[B, Nq, sq, K]`` in :func:`stats_dtype` (fp32, or fp64 for
  fp64 inputs); ``K`` lanes hold identical values (``K = 8`` on NPU, ``1`` elsewhere).
  ``max`` is the row maximum of ``scale * q k^T`` over visible keys and ``sum`` the sum of
  ``exp(x - max)``; a kernel that only knows the log-sum-exp reports ``(lse, 1)``.
  A row that sees no key at all has ``max = -inf`` and ``sum = 0`` and an output of zeros.

Packed sequences: ``forward``/``backward`` also take ``cu_seqlens_q``/``cu_seqlens_kv`` (keyword,
default None): cumulative per-document lengths (leading 0, last = ``sq`` / ``sk``) of the block's
query and key rows, the same number of documents; document ``d`` is query rows
``cu_seqlens_q[d]:cu_seqlens_q[d+1]`` against key rows ``cu_seqlens_kv[d]:cu_seqlens_kv[d+1]``
only, ``mask`` (full or causal) applying inside each document (batch 1). Without them the kernel
runs its plain path; a kernel may treat one document spanning the whole block as plain.

``forward`` also returns an opaque ``rng_state`` (None without dropout: kernels that support
dropout, such as the NPU one, put the seed/offset/numels of the block there) which the caller
keeps per block and hands back to ``backward`` so the same dropout mask is replayed.

The backward is the FlashAttention-2 decomposition: it receives the FINAL output and the FINAL
merged statistics of each query row (over every block of the ring), so that the per-block
``(dq, dk, dv)`` it returns are exact additive pieces of the full gradient.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class BlockMask:
    """What hides keys from queries inside one block.

    ``causal``: lower-triangular, anchored top-left (query row ``i`` sees keys ``0..i``); the ring
    only asks for it on square blocks. ``mask``: bool ``[sq, sk]``, True = masked out (the
    torch_npu convention). Both unset means full attention.
    """

    causal: bool = False
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.causal and self.mask is not None:
            raise ValueError("BlockMask takes either causal=True or an explicit mask, not both")

    @property
    def is_full(self) -> bool:
        return not self.causal and self.mask is None


FULL = BlockMask()
CAUSAL = BlockMask(causal=True)


class BlockKernel(Protocol):
    """Per-block attention; see the module docstring for layouts and semantics."""

    name: str
    #: lanes in the last dimension of the statistics (8 on NPU, 1 elsewhere)
    stat_lanes: int

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        mask: BlockMask,
        cu_seqlens_q: Sequence[int] | None = None,
        cu_seqlens_kv: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """Return ``(out, softmax_max, softmax_sum, rng_state)`` for this block."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        softmax_max: torch.Tensor,
        softmax_sum: torch.Tensor,
        *,
        scale: float,
        mask: BlockMask,
        rng_state: object = None,
        cu_seqlens_q: Sequence[int] | None = None,
        cu_seqlens_kv: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(dq, dk, dv)`` of this block given the final ``out`` and statistics.

        ``dout``/``out`` are ``[sq, B, Nq, D]``; ``dk``/``dv`` match ``k``/``v`` (GQA groups summed).
        Gradients come back in the input dtype or wider; the caller accumulates in
        :func:`stats_dtype`.
        """
        ...


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics and of merge/gradient accumulators for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_block_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape contract shared by every kernel (cheap; raises ValueError)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"block tensors must be [S, B, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")


def documents(
    cu_q: Sequence[int] | None, cu_kv: Sequence[int] | None, sq: int, sk: int
) -> list[tuple[slice, slice]] | None:
    """Per-document ``(query rows, key rows)`` of a varlen block, or None for a plain block.

    None also when one document spans the whole block, so that such a call takes exactly the
    plain path (a single packed document gives bit-identical results to an unpacked one).
    Raises ValueError when the lists do not describe the block.
    """
    if cu_q is None and cu_kv is None:
        return None
    if cu_q is None or cu_kv is None or len(cu_q) != len(cu_kv) or len(cu_q) < 2:
        raise ValueError(
            f"cu_seqlens_q {cu_q} and cu_seqlens_kv {cu_kv} must both be given, with the same "
            "number of documents"
        )
    if cu_q[0] != 0 or cu_kv[0] != 0 or cu_q[-1] != sq or cu_kv[-1] != sk:
        raise ValueError(
            f"cu_seqlens_q {list(cu_q)} / cu_seqlens_kv {list(cu_kv)} must run from 0 to the "
            f"block's {sq} query / {sk} key rows"
        )
    if len(cu_q) == 2:
        return None
    return [
        (slice(qa, qb), slice(ka, kb))
        for (qa, qb), (ka, kb) in zip(
            itertools.pairwise(cu_q), itertools.pairwise(cu_kv), strict=True
        )
    ]
