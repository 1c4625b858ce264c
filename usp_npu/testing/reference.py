"""Dense single-device attention: the oracle every test compares against.

Written with nothing but softmax and matmul, independent of the block kernels.
"""

from __future__ import annotations

import torch


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the full sequence, canonical layout ``[S, B, N, D]`` (GQA: fewer K/V heads).

    ``mask``: bool ``[S, S]``, True = masked. Rows that see no key give zeros. Differentiable.
    """
    s, _, nq, d = q.shape
    groups = nq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    kx = k.repeat_interleave(groups, dim=2)
    vx = v.repeat_interleave(groups, dim=2)
    scores = scale * torch.einsum("sbnd,tbnd->bnst", q, kx)
    hidden = torch.zeros(s, k.shape[0], dtype=torch.bool, device=q.device)
    if causal:
        hidden |= torch.ones_like(hidden).triu(1)
    if mask is not None:
        hidden |= mask
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    return torch.einsum("bnst,tbnd->sbnd", probs, vx)
