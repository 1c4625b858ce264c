"""Emulated ``npu_ring_attention_update``: the softmax-statistics merge of two partial results."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from usp_npu.testing.npu_emulation.fusion_attention import _LANES, _segments, _unpack_tnd

# documented limits of the TND layout on Atlas A2/A3 (torch_npu npu_ring_attention_update)
TND_MAX_HEADS = 256
TND_MAX_HEAD_DIM = 768
TND_HEAD_DIM_MULTIPLE = 64


def _prefix_sums(cum: object, t: int) -> list[tuple[int, int]]:
    if cum is None:
        raise ValueError("TND with input_softmax_layout='' needs actual_seq_qlen")
    vals = [int(c) for c in (cum.tolist() if isinstance(cum, torch.Tensor) else cum)]
    pairs = list(itertools.pairwise(vals))
    if not vals or vals[0] != 0 or any(x > y for x, y in pairs) or vals[-1] > t:
        raise ValueError(f"actual_seq_qlen must be prefix sums from 0 up to T={t}: {vals}")
    return _segments(pairs, t)


# fmt: off
def npu_ring_attention_update(
    prev_attn_out: torch.Tensor, prev_softmax_max: torch.Tensor, prev_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor, cur_softmax_max: torch.Tensor, cur_softmax_sum: torch.Tensor, *,
    actual_seq_qlen: torch.Tensor | Sequence[int] | None = None, input_layout: str = "SBH",
    input_softmax_layout: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # fmt: on
    """Emulated ``torch_npu.npu_ring_attention_update``: merge two partial attention results.

    ``m = max(m_p, m_c); a = l_p e^(m_p - m); b = l_c e^(m_c - m); l = a + b;
    O = O_p a / l + O_c b / l``, in the statistics dtype. SBH: attn ``[S, B, H]``, stats
    ``[B, N, S, 8]``. TND: attn ``[T, N, D]``, stats ``[T, N, 8]``, per document head-major
    (``input_softmax_layout=""``, needs ``actual_seq_qlen``: int64 prefix sums starting at 0)
    or token-major (``"TND"``). A row with ``-inf`` max on both sides stays ``(0, -inf, 0)``.
    TND is refused, as on Atlas A2/A3, unless N <= 256 and D <= 768 is a multiple of 64.
    """
    if input_layout not in ("SBH", "TND") or input_softmax_layout not in ("", "TND"):
        raise ValueError(
            f"input_layout must be 'SBH' or 'TND' and input_softmax_layout '' or 'TND'; got "
            f"{input_layout!r}, {input_softmax_layout!r}"
        )
    if prev_attn_out.shape != cur_attn_out.shape or prev_attn_out.dim() != 3:
        raise ValueError(f"attn_out shapes must be equal and 3-D: {tuple(prev_attn_out.shape)}")
    stats = (prev_softmax_max, prev_softmax_sum, cur_softmax_max, cur_softmax_sum)
    if any(s.shape != prev_softmax_max.shape for s in stats) or stats[0].shape[-1] != _LANES:
        raise ValueError(f"the four statistics must share one shape ending in {_LANES}")
    if input_layout == "TND":
        n, d = prev_attn_out.shape[1], prev_attn_out.shape[2]
        if n > TND_MAX_HEADS or d > TND_MAX_HEAD_DIM or d % TND_HEAD_DIM_MULTIPLE:
            raise ValueError(
                f"TND takes N <= {TND_MAX_HEADS} and D <= {TND_MAX_HEAD_DIM}, a multiple of "
                f"{TND_HEAD_DIM_MULTIPLE} (Atlas A2/A3); got N={n}, D={d}"
            )
    m = torch.maximum(prev_softmax_max, cur_softmax_max)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = prev_softmax_sum * torch.exp(prev_softmax_max - m_safe)
    b = cur_softmax_sum * torch.exp(cur_softmax_max - m_safe)
    total = a + b
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    x, n = prev_attn_out.shape, prev_softmax_max.shape[1]
    if input_layout == "SBH":
        if prev_softmax_max.dim() != 4 or prev_softmax_max.shape[::2] != (x[1], x[0]) or x[2] % n:
            raise ValueError(f"SBH stats {tuple(prev_softmax_max.shape)} do not fit attn {x}")
        wa, wb = ((w * inv)[..., 0].permute(2, 0, 1).unsqueeze(-1) for w in (a, b))
        shape4 = (x[0], x[1], n, x[2] // n)  # [S, B, N, D]; weights [S, B, N, 1]
    else:
        if prev_softmax_max.dim() != 3 or prev_softmax_max.shape[:2] != x[:2]:
            raise ValueError(f"TND stats {tuple(prev_softmax_max.shape)} do not fit attn {x}")
        segs = [(0, x[0])] if input_softmax_layout == "TND" else _prefix_sums(actual_seq_qlen, x[0])
        wa, wb = (_unpack_tnd(w * inv, segs, input_softmax_layout).unsqueeze(-1) for w in (a, b))
        shape4 = x  # weights [T, N, 1]
    prev4, cur4 = (t.reshape(shape4).to(wa.dtype) for t in (prev_attn_out, cur_attn_out))
    out = (prev4 * wa + cur4 * wb).reshape(x).to(prev_attn_out.dtype)
    return out, m, total
