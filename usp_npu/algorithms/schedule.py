"""Which block each ring step computes (REFERENCE.md section 4), packed sequences included.

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

Packed (``cu_seqlens``, ``docs/packed.md``): the causal ring holds every document zigzagged
(``[doc chunk i ; doc chunk 2R-1-i]`` per document, in document order), so the same three
cases hold per document; "first half" and "second half" become the row sets made of each
document's first or second chunk (index tensors, or slices when contiguous), and a step carries
the per-document lengths of its query and K/V rows (``cu_q``, ``cu_kv``, local cumulative
lengths with a leading 0) for ONE varlen kernel call. General packed: contiguous blocks; a step
pairs the pieces of the documents that touch both the query block and the K/V block, and is
empty (no kernel call) when no document does.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from usp_npu.kernels.base import CAUSAL, FULL, BlockMask

Rows = slice | torch.Tensor


@dataclass(frozen=True)
class BlockStep:
    """One ring step: the K/V block that started on ring rank ``source``, restricted to rows.

    ``q_rows``/``kv_rows``: a slice, or an int64 index tensor (packed steps whose rows are not
    contiguous). ``cu_q``/``cu_kv``: None for an unpacked step; for a packed step the cumulative
    per-document lengths (leading 0) of the selected query and K/V rows: document ``d`` is query
    rows ``cu_q[d]:cu_q[d+1]`` against K/V rows ``cu_kv[d]:cu_kv[d+1]`` of the selection, and
    ``mask`` applies inside each document. ``(0,)`` = an empty step (nothing to compute).
    """

    source: int
    q_rows: Rows
    kv_rows: Rows
    mask: BlockMask
    cu_q: tuple[int, ...] | None = None
    cu_kv: tuple[int, ...] | None = None

    @property
    def empty(self) -> bool:
        return self.cu_q is not None and len(self.cu_q) < 2

    def varlen(self) -> dict:
        """Keyword arguments for the kernel: none for an unpacked step (the kernel's fast path)."""
        if self.cu_q is None:
            return {}
        return {"cu_seqlens_q": self.cu_q, "cu_seqlens_kv": self.cu_kv}


def ring_schedule(
    ring_rank: int,
    ring_size: int,
    local_len: int,
    causal: bool,
    mask: torch.Tensor | None = None,
    cu_seqlens: tuple[int, ...] | None = None,
    device: torch.device | None = None,
) -> list[BlockStep]:
    """The ``ring_size`` steps of rank ``ring_rank``; ``local_len`` = tokens per ring rank.

    ``mask`` (general only): bool ``[S, S]`` over the ring's whole sequence (S = local_len *
    ring_size), True = masked. ``cu_seqlens``: validated cumulative document lengths of the
    whole packed sequence (``normalize_cu_seqlens``), split as ``usp_npu.split_sequence`` does;
    ``device``: where index tensors of packed steps go (that of the tensors they index).
    """
    if cu_seqlens is not None:
        # cached: every layer of a step asks for the same schedule (steps are immutable)
        if causal and ring_size > 1:
            return list(_packed_causal(ring_rank, ring_size, cu_seqlens, device))
        return list(_packed_contiguous(ring_rank, ring_size, local_len, causal, cu_seqlens))
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


def _cumulative(lengths: list[int]) -> tuple[int, ...]:
    return (0, *itertools.accumulate(lengths))


def _rows(starts: list[int], length_each: list[int], device) -> Rows:
    """The rows ``start:start+n`` of every document: a slice when there is one, else an index."""
    if len(starts) == 1:
        return slice(starts[0], starts[0] + length_each[0])
    idx = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, length_each, strict=True)])
    return idx.to(device) if device is not None else idx


@functools.lru_cache(maxsize=64)
def _packed_causal(rank: int, size: int, cu: tuple[int, ...], device) -> tuple[BlockStep, ...]:
    """Every document zigzagged: the three causal cases per document, one step each."""
    chunk = [(b - a) // (2 * size) for a, b in itertools.pairwise(cu)]
    local = _cumulative([2 * c for c in chunk])  # each document holds two chunks here
    total = local[-1]
    everything = slice(0, total)
    first = _rows(list(local[:-1]), chunk, device)  # every document's chunk i
    second = _rows([s + c for s, c in zip(local, chunk, strict=False)], chunk, device)
    halves = _cumulative(chunk)
    steps = []
    for t in range(size):
        src = (rank - t) % size
        if src == rank:
            steps.append(BlockStep(src, everything, everything, CAUSAL, local, local))
        elif src < rank:
            steps.append(BlockStep(src, everything, first, FULL, local, halves))
        else:
            steps.append(BlockStep(src, second, everything, FULL, halves, local))
    return tuple(steps)


def _overlap(cu: tuple[int, ...], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(document, start, end) of each document's part inside ``[lo, hi)``."""
    return [
        (d, max(a, lo), min(b, hi))
        for d, (a, b) in enumerate(itertools.pairwise(cu))
        if a < hi and b > lo
    ]


@functools.lru_cache(maxsize=64)
def _packed_contiguous(
    rank: int, size: int, local_len: int, causal: bool, cu: tuple[int, ...]
) -> tuple[BlockStep, ...]:
    """Contiguous blocks (general mask, or one ring rank): pair the documents both blocks touch.

    The documents that touch both the query block and the K/V block are consecutive, and their
    parts are contiguous in both blocks, so a step is one slice of each. Causal only occurs with
    one ring rank (the whole sequence, every document square).
    """
    q_lo = rank * local_len
    q_docs = {d: (a, e) for d, a, e in _overlap(cu, q_lo, q_lo + local_len)}
    steps = []
    for t in range(size):
        src = (rank - t) % size
        kv_lo = src * local_len
        both = [(d, a, e) for d, a, e in _overlap(cu, kv_lo, kv_lo + local_len) if d in q_docs]
        if not both:
            steps.append(BlockStep(src, slice(0, 0), slice(0, 0), FULL, (0,), (0,)))
            continue
        q_parts = [q_docs[d] for d, _, _ in both]
        q_rows = slice(q_parts[0][0] - q_lo, q_parts[-1][1] - q_lo)
        kv_rows = slice(both[0][1] - kv_lo, both[-1][2] - kv_lo)
        cu_q = _cumulative([e - a for a, e in q_parts])
        cu_kv = _cumulative([e - a for _, a, e in both])
        steps.append(BlockStep(src, q_rows, kv_rows, CAUSAL if causal else FULL, cu_q, cu_kv))
    return tuple(steps)


def step_work(step: BlockStep, local_len: int) -> int:
    """(query, key) pairs a step computes per head (what the kernel is asked for, exactly).

    Unpacked steps count their rows (causal own block: the lower triangle); packed steps count
    per document, so the sum over a rank's steps is its attention work.
    """
    if step.cu_q is None:
        nq = len(range(local_len)[step.q_rows]) if isinstance(step.q_rows, slice) else 0
        nk = len(range(local_len)[step.kv_rows]) if isinstance(step.kv_rows, slice) else 0
        return nq * (nq + 1) // 2 if step.mask.causal else nq * nk
    work = 0
    for (qa, qb), (ka, kb) in zip(
        itertools.pairwise(step.cu_q), itertools.pairwise(step.cu_kv), strict=True
    ):
        nq, nk = qb - qa, kb - ka
        work += nq * (nq + 1) // 2 if step.mask.causal else nq * nk
    return work
