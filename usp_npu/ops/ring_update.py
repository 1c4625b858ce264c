"""ring_attention_update: merge one ring step's (out, max, sum) into the running result.

Layout "SBH": attn ``[S, B, H]`` (H = N * D), stats ``[B, N, S, K]``. Math (REFERENCE.md section 5):
``m = max(m_p, m_c); a = l_p e^(m_p - m); b = l_c e^(m_c - m); l = a + b; O = O_p a/l + O_c b/l``.
A row whose max is -inf on a side takes nothing from that side; on both sides it stays 0.
"""

from __future__ import annotations

import torch


def _composed_update(prev_out, prev_max, prev_sum, cur_out, cur_max, cur_sum):
    acc = prev_max.dtype
    m = torch.maximum(prev_max, cur_max)
    # where both maxima are -inf the row saw no key yet: use 0 so exp() gives 0, never NaN
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    a = prev_sum * torch.exp(prev_max - m_safe)
    b = cur_sum * torch.exp(cur_max - m_safe)
    total = a + b
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    wa, wb = a * inv, b * inv
    s, bsz, h = prev_out.shape
    n = prev_max.shape[1]
    # stats [B, N, S, K] -> per-row weights broadcast over [S, B, N, D]
    wa = wa[..., 0].permute(2, 0, 1).unsqueeze(-1)
    wb = wb[..., 0].permute(2, 0, 1).unsqueeze(-1)
    out = (
        prev_out.view(s, bsz, n, h // n).to(acc) * wa + cur_out.view(s, bsz, n, h // n).to(acc) * wb
    )
    return out.view(s, bsz, h), m, total


def ring_attention_update(
    prev_attn_out: torch.Tensor,
    prev_softmax_max: torch.Tensor,
    prev_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor,
    cur_softmax_max: torch.Tensor,
    cur_softmax_sum: torch.Tensor,
    actual_seq_qlen: torch.Tensor | None = None,
    input_layout: str = "SBH",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the merged ``(attn_out, softmax_max, softmax_sum)`` (new tensors)."""
    if input_layout != "SBH" or actual_seq_qlen is not None:
        raise ValueError("only input_layout='SBH' is supported by the composed formula")
    out, m, total = _composed_update(
        prev_attn_out,
        prev_softmax_max,
        prev_softmax_sum,
        cur_attn_out,
        cur_softmax_max,
        cur_softmax_sum,
    )
    return out.to(prev_attn_out.dtype), m, total


def ring_attention_update_(
    acc_attn_out: torch.Tensor,
    acc_softmax_max: torch.Tensor,
    acc_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor,
    cur_softmax_max: torch.Tensor,
    cur_softmax_sum: torch.Tensor,
    actual_seq_qlen: torch.Tensor | None = None,
    input_layout: str = "SBH",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-place variant: updates the ``acc_*`` accumulators (views allowed) and returns them."""
    out, m, total = ring_attention_update(
        acc_attn_out,
        acc_softmax_max,
        acc_softmax_sum,
        cur_attn_out,
        cur_softmax_max,
        cur_softmax_sum,
        actual_seq_qlen,
        input_layout,
    )
    acc_attn_out.copy_(out)
    acc_softmax_max.copy_(m)
    acc_softmax_sum.copy_(total)
    return acc_attn_out, acc_softmax_max, acc_softmax_sum
