"""Which block each ring step computes (REFERENCE.md section 4).

Causal, load-balanced: rank ``i`` holds queries ``[half0 = chunk_i ; half1 = chunk_(2R-1-i)]`` and
so does every K/V block (block ``j`` = ``[chunk_j ; chunk_(2R-1-j)]``):

====================  =============  ==============  ===============================
step                  query rows     K/V rows        mask
====================  =============  ==============  ===============================
own block (j == i)    all            all             causal (top-left, square)
earlier (j < i)       all            first half      none
later (j > i)         second half    all             none
====================  =============  ==============  ===============================

Every step after the first is half a block of work, and no step computes masked-out scores.
General: every step is the full local queries x the full block, masked by the block's slice of
the full-sequence mask (or unmasked); the split is contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from usp_npu.kernels.base import CAUSAL, FULL, BlockMask


@dataclass(frozen=True)
class BlockStep:
    """One ring step: the K/V block that started on ring rank ``source``, restricted to rows."""

    source: int
    q_rows: slice
    kv_rows: slice
    mask: BlockMask


def ring_schedule(
    ring_rank: int,
    ring_size: int,
    local_len: int,
    causal: bool,
    mask: torch.Tensor | None = None,
) -> list[BlockStep]:
    """The ``ring_size`` steps of rank ``ring_rank``; ``local_len`` = tokens per ring rank.

    ``mask`` (general only): bool ``[S, S]`` over the ring's whole sequence (S = local_len *
    ring_size), True = masked.
    """
    everything = slice(0, local_len)
    steps = []
    for t in range(ring_size):
        src = (ring_rank - t) % ring_size
        if causal:
            half = local_len // 2
            if src == ring_rank:
                steps.append(BlockStep(src, everything, everything, CAUSAL))
            elif src < ring_rank:
                steps.append(BlockStep(src, everything, slice(0, half), FULL))
            else:
                steps.append(BlockStep(src, slice(half, local_len), everything, FULL))
        else:
            block = FULL
            if mask is not None:
                rows = slice(ring_rank * local_len, (ring_rank + 1) * local_len)
                cols = slice(src * local_len, (src + 1) * local_len)
                block = BlockMask(mask=mask[rows, cols])
            steps.append(BlockStep(src, everything, everything, block))
    return steps
