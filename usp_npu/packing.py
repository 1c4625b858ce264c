"""Packed sequences: several documents in one sequence, attention reset at each boundary.

``cu_seqlens`` is the flash-attn / TransformerEngine / Hugging Face convention: the cumulative
document lengths of the FULL packed sequence, a leading 0, the last entry = S, strictly
increasing, e.g. ``[0, 3, 8, 12]`` for documents of 3, 5 and 4 tokens. (torch_npu's
``actual_seq_qlen`` is the same list without the leading 0; the NPU kernel converts.)

This module holds the pieces every other one shares: checking ``cu_seqlens``, which tokens a
CP rank holds (the packed split), and the user-side helpers that build ``cu_seqlens`` from
position ids or EOD tokens and pad documents the split cannot hold.

The packed split (``docs/packed.md``):

- causal with ring degree ``r > 1``: every document is cut into ``2r`` equal chunks; ring rank
  ``i`` holds, document after document, ``[doc chunk i ; doc chunk 2r-1-i]`` (TE THD order),
  then that is cut contiguously into ``u`` Ulysses pieces. Needs every document length
  divisible by ``2r`` and the ring rank's share divisible by ``u``.
- general mask, or ``r = 1``: the packed sequence is cut contiguously into ``cp`` equal parts
  (documents may straddle ranks).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "CuSeqlens",
    "check_split",
    "cu_seqlens_from_eod",
    "cu_seqlens_from_position_ids",
    "normalize_cu_seqlens",
    "packed_token_indices",
    "pad_packed",
    "positions_from_cu_seqlens",
    "split_multiple",
]

#: what the public API takes as ``cu_seqlens``
CuSeqlens = Sequence[int] | torch.Tensor


def normalize_cu_seqlens(cu_seqlens: CuSeqlens, total: int | None = None) -> tuple[int, ...]:
    """Validate ``cu_seqlens`` and return it as a tuple of Python ints.

    ``total``: the full sequence length the last entry must equal (None: not checked).
    Raises ValueError naming ``cu_seqlens`` and what to fix.
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex():
            raise ValueError(
                "cu_seqlens must be a 1-D integer tensor or a list of ints, got a "
                f"{cu_seqlens.dim()}-D {cu_seqlens.dtype} tensor"
            )
        if cu_seqlens.dtype == torch.bool:
            raise ValueError("cu_seqlens must hold integers, got a bool tensor")
        values = [int(x) for x in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (str, bytes)) or not isinstance(cu_seqlens, Sequence):
        raise ValueError(
            f"cu_seqlens must be a list of ints or a 1-D integer tensor, got {type(cu_seqlens)}"
        )
    else:
        values = list(cu_seqlens)
        bad = [x for x in values if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise ValueError(f"cu_seqlens must hold Python ints, got {bad[0]!r} in {values}")
    if len(values) < 2 or values[0] != 0:
        raise ValueError(
            f"cu_seqlens must start at 0 and hold at least one document, got {values}: use "
            "cumulative lengths with a leading 0, e.g. [0, len0, len0 + len1, ...]"
        )
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(
            f"cu_seqlens must be strictly increasing (no empty documents), got {values}"
        )
    if total is not None and values[-1] != total:
        raise ValueError(
            f"cu_seqlens ends at {values[-1]} but the full sequence has {total} tokens: its last "
            "entry must equal the packed sequence length S (cu_seqlens describes the FULL "
            "sequence, the same on every CP rank)"
        )
    return tuple(values)


def split_multiple(ulysses: int, ring: int, causal: bool) -> int:
    """The multiple ``pad_packed`` needs so that the packed split holds every document.

    Causal with ``ring > 1``: ``ring * lcm(2, ulysses)`` per document (every document splits
    into ``2r`` chunks and every ring share into ``u`` pieces). Otherwise the whole sequence must
    be a multiple of ``cp`` (pad with ``per_document=False``).
    """
    if causal and ring > 1:
        return ring * math.lcm(2, ulysses)
    return ulysses * ring


def check_split(cu: tuple[int, ...], ulysses: int, ring: int, causal: bool) -> None:
    """Raise ValueError (naming ``pad_packed``) when the packed split cannot hold ``cu``."""
    cp, total = ulysses * ring, cu[-1]
    if causal and ring > 1:
        lengths = [b - a for a, b in itertools.pairwise(cu)]
        bad = [n for n in lengths if n % (2 * ring)]
        share = total // ring
        if bad or share % ulysses:
            m = split_multiple(ulysses, ring, causal)
            what = (
                f"document lengths {bad[:4]} are not divisible by 2 x ring degree = {2 * ring}"
                if bad
                else f"each ring rank's {share} tokens do not split into {ulysses} Ulysses parts"
            )
            raise ValueError(
                f"cu_seqlens cannot be split for the causal ring (ring degree {ring}, Ulysses "
                f"degree {ulysses}): {what}. Pad every document with "
                f"usp_npu.pad_packed(cu_seqlens, {m}) before splitting"
            )
    elif total % cp:
        raise ValueError(
            f"cu_seqlens: the packed sequence of {total} tokens is not divisible by {cp} CP "
            f"ranks; pad it with usp_npu.pad_packed(cu_seqlens, {cp}, per_document=False)"
        )


def packed_token_indices(
    cu: tuple[int, ...], cp_rank: int, ulysses: int, ring: int, causal: bool
) -> torch.Tensor:
    """Positions (int64) of the tokens CP rank ``cp_rank`` holds in the packed split."""
    check_split(cu, ulysses, ring, causal)
    total = cu[-1]
    if not causal or ring == 1:
        return torch.arange(total).chunk(ulysses * ring)[cp_rank]
    ring_rank, ulysses_rank = divmod(cp_rank, ulysses)
    parts = []
    for a, b in itertools.pairwise(cu):
        chunks = torch.arange(a, b).chunk(2 * ring)
        parts += [chunks[ring_rank], chunks[2 * ring - 1 - ring_rank]]
    return torch.cat(parts).chunk(ulysses)[ulysses_rank]


# ----------------------------------------------------------------------------- user helpers


def _one_row(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(
            f"{name} must be [S] or [1, S] (one packed sequence), got shape {tuple(x.shape)}"
        )
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` of a Hugging Face packed batch: a document starts where positions are 0.

    ``position_ids``: ``[S]`` or ``[1, S]`` integers restarting at 0 for every document (as
    ``DataCollatorWithFlattening`` makes them). Returns int64 ``[num_docs + 1]`` on the CPU.
    """
    pos = _one_row(position_ids, "position_ids").cpu()
    if pos.numel() == 0 or int(pos[0]) != 0:
        raise ValueError("position_ids must start at 0 (the first document's first token)")
    starts = torch.nonzero(pos == 0).flatten()
    return torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int64)


def cu_seqlens_from_eod(input_ids: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """``cu_seqlens`` of a Megatron/MindSpeed EOD-packed sequence (``--reset-attention-mask``).

    A document ends WITH its EOD token (the EOD belongs to the document before it); a last
    document without a final EOD runs to the end. ``input_ids``: ``[S]`` or ``[1, S]``.
    Returns int64 ``[num_docs + 1]`` on the CPU.
    """
    ids = _one_row(input_ids, "input_ids").cpu()
    s = ids.numel()
    if s == 0:
        raise ValueError("input_ids is empty")
    ends = torch.nonzero(ids == int(eod_token_id)).flatten() + 1
    ends = ends[ends < s]  # an EOD as the last token closes the last document
    return torch.cat([torch.tensor([0]), ends, torch.tensor([s])]).to(torch.int64)


def pad_packed(
    cu_seqlens: CuSeqlens, multiple: int, *, per_document: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a packed sequence so the packed split can hold it.

    ``per_document=True`` (the causal ring): every document gets padding tokens at its END up
    to a multiple of ``multiple`` (use :func:`split_multiple`, e.g. ``2r`` for the ring, as the
    split's error message says). Padding at the end of a document is never seen by that
    document's real tokens under a causal mask. ``per_document=False`` (general mask or
    Ulysses only): one padding document is appended so that S is a multiple of ``multiple``.

    Returns ``(padded_cu_seqlens, index)``, both int64 on the CPU: ``index[j]`` is the position in
    the unpadded sequence of padded position ``j``, or ``-1`` for a padding token. Pad inputs,
    labels and position ids with it::

        keep = index >= 0
        src = index.clamp(min=0)
        ids_p = torch.where(keep, ids[..., src], pad_id)
        labels_p = torch.where(keep, labels[..., src], -100)   # padding is never a target
        pos_p = padded position within each document, e.g. from padded_cu_seqlens

    (labels must be shifted before padding, as before splitting.)
    """
    cu = normalize_cu_seqlens(cu_seqlens)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"pad_packed: multiple must be a positive int, got {multiple!r}")
    pieces, new_cu = [], [0]
    if per_document:
        for a, b in itertools.pairwise(cu):
            n = b - a
            padded = -(-n // multiple) * multiple
            pieces += [torch.arange(a, b), torch.full((padded - n,), -1)]
            new_cu.append(new_cu[-1] + padded)
    else:
        total = cu[-1]
        padded = -(-total // multiple) * multiple
        pieces = [torch.arange(total), torch.full((padded - total,), -1)]
        new_cu = [*cu, padded] if padded > total else list(cu)
    return torch.tensor(new_cu, dtype=torch.int64), torch.cat(pieces).to(torch.int64)


def positions_from_cu_seqlens(cu_seqlens: CuSeqlens) -> torch.Tensor:
    """Position ids restarting at 0 in every document (int64 ``[S]``), e.g. after padding."""
    cu = normalize_cu_seqlens(cu_seqlens)
    return torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(cu)])
