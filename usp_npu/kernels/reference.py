"""Plain-math block kernel: any dtype (float64 included), any bool mask, GQA/MQA, any device.

Slow (materialises the score matrix) and exact: the backend of last resort and a readable
statement of what every other kernel must compute.
"""

from __future__ import annotations

import torch

from usp_npu.kernels.base import BlockMask, check_block_shapes, documents, stats_dtype


def _query_groups(x: torch.Tensor, nkv: int, dtype: torch.dtype) -> torch.Tensor:
    """Query-shaped [sq, B, Nq, D] -> [B, Nkv, g, sq, D] in ``dtype`` (g = Nq / Nkv)."""
    sq, b, nq, d = x.shape
    return x.to(dtype).permute(1, 2, 0, 3).reshape(b, nkv, nq // nkv, sq, d)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
    """[S, B, N, D] -> q [B, Nkv, g, sq, D], k/v [B, Nkv, 1, sk, D] in ``dtype``."""
    qg = _query_groups(q, k.shape[2], dtype)
    kg = k.to(dtype).permute(1, 2, 0, 3).unsqueeze(2)
    vg = v.to(dtype).permute(1, 2, 0, 3).unsqueeze(2)
    return qg, kg, vg


def _hidden(
    mask: BlockMask, sq: int, sk: int, device: torch.device, cu_q=None, cu_kv=None
) -> torch.Tensor | None:
    """Bool [sq, sk], True = masked, or None for full attention.

    Packed (``cu_q``/``cu_kv``): block-diagonal, ``mask`` applying inside each document. This
    kernel materialises the scores anyway, so the mask costs nothing extra here.
    """
    docs = documents(cu_q, cu_kv, sq, sk)
    if docs is not None:
        if mask.mask is not None:
            raise ValueError("a packed block takes a causal or full mask, not an explicit one")
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=device)
        for qs, ks in docs:
            inside = torch.zeros(
                qs.stop - qs.start, ks.stop - ks.start, dtype=torch.bool, device=device
            )
            hidden[qs, ks] = inside.fill_(True).triu(1) if mask.causal else inside
        return hidden
    if mask.causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)
    return mask.mask


def _scores(qg, kg, scale, hidden):
    scores = scale * qg @ kg.transpose(-1, -2)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    """[B, Nkv, g, S, D] -> [S, B, Nkv * g, D]."""
    b, nkv, g, s, d = x.shape
    return x.reshape(b, nkv * g, s, d).permute(2, 0, 1, 3)


class ReferenceBlockKernel:
    name = "reference"
    stat_lanes = 1

    def forward(
        self, q, k, v, *, scale: float, mask: BlockMask, cu_seqlens_q=None, cu_seqlens_kv=None
    ):
        check_block_shapes(q, k, v)
        acc = stats_dtype(q.dtype)
        qg, kg, vg = _grouped(q, k, v, acc)
        hidden = _hidden(mask, q.shape[0], k.shape[0], q.device, cu_seqlens_q, cu_seqlens_kv)
        scores = _scores(qg, kg, scale, hidden)
        row_max = scores.amax(-1, keepdim=True)
        # rows that see no key: max = -inf, sum = 0, out = 0 (never NaN)
        shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        p = torch.exp(scores - shift)
        row_sum = p.sum(-1, keepdim=True)
        out = (p @ vg) / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
        b, nq = q.shape[1], q.shape[2]
        stats_shape = (b, nq, q.shape[0], 1)
        return (
            _ungroup(out).to(q.dtype),
            row_max.reshape(stats_shape),
            row_sum.reshape(stats_shape),
            None,
        )

    def backward(
        self,
        dout,
        q,
        k,
        v,
        out,
        softmax_max,
        softmax_sum,
        *,
        scale,
        mask,
        rng_state=None,
        cu_seqlens_q=None,
        cu_seqlens_kv=None,
    ):
        check_block_shapes(q, k, v)
        acc = stats_dtype(q.dtype)
        qg, kg, vg = _grouped(q, k, v, acc)
        dog = _query_groups(dout, k.shape[2], acc)
        og = _query_groups(out, k.shape[2], acc)
        b, nkv, g, sq, _ = qg.shape
        m = softmax_max[..., :1].to(acc).reshape(b, nkv, g, sq, 1)
        s = softmax_sum[..., :1].to(acc).reshape(b, nkv, g, sq, 1)
        hidden = _hidden(mask, q.shape[0], k.shape[0], q.device, cu_seqlens_q, cu_seqlens_kv)
        scores = _scores(qg, kg, scale, hidden)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(scores - m) / torch.where(s > 0, s, torch.ones_like(s))
        dv = (p.transpose(-1, -2) @ dog).sum(2, keepdim=True)
        dp = dog @ vg.transpose(-1, -2)
        delta = (dog * og).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq = scale * ds @ kg
        dk = (scale * ds.transpose(-1, -2) @ qg).sum(2, keepdim=True)
        return _ungroup(dq), _ungroup(dk), _ungroup(dv)
