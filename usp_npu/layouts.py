"""Tensor layouts at the public boundary, and the canonical internal one.

Internally every algorithm works on ``[S, B, N, D]`` ("SBND"): the sequence first, so sequence
halves and Ulysses pieces are contiguous slices and ``reshape(S, B, N * D)`` is torch_npu's SBH.

Public layouts (torch_npu names): ``SBH`` = ``[S, B, N * D]`` (needs ``head_dim``), ``BSND`` =
``[B, S, N, D]``, ``BNSD`` = ``[B, N, S, D]``, ``TND`` = ``[T, N, D]`` (one packed sequence of T
tokens, flash-attn varlen / torch_npu TND; canonically ``[T, 1, N, D]``).
"""

from __future__ import annotations

import torch

LAYOUTS = ("SBH", "BSND", "BNSD", "TND")
_TO_CANONICAL = {"BSND": (1, 0, 2, 3), "BNSD": (2, 0, 1, 3)}
_FROM_CANONICAL = {"BSND": (1, 0, 2, 3), "BNSD": (1, 2, 0, 3)}
SEQ_DIM = {"SBH": 0, "BSND": 1, "BNSD": 2, "TND": 0}


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")


def to_canonical(x: torch.Tensor, layout: str, head_dim: int | None = None) -> torch.Tensor:
    """View ``x`` (in ``layout``) as ``[S, B, N, D]`` (no copy; may be non-contiguous)."""
    check_layout(layout)
    if layout == "SBH":
        if x.dim() != 3:
            raise ValueError(f"layout SBH expects [S, B, N*D] tensors, got shape {tuple(x.shape)}")
        if head_dim is None:
            raise ValueError("layout SBH needs head_dim= to know the number of heads")
        if x.shape[2] % head_dim:
            raise ValueError(f"hidden size {x.shape[2]} is not a multiple of head_dim {head_dim}")
        return x.view(x.shape[0], x.shape[1], x.shape[2] // head_dim, head_dim)
    if layout == "TND":
        if x.dim() != 3:
            raise ValueError(f"layout TND expects [T, N, D] tensors, got shape {tuple(x.shape)}")
        if head_dim is not None and x.shape[2] != head_dim:
            raise ValueError(f"head_dim={head_dim} but the TND tensors have D = {x.shape[2]}")
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"layout {layout} expects 4-D tensors, got shape {tuple(x.shape)}")
    if head_dim is not None and x.shape[3] != head_dim:
        raise ValueError(f"head_dim={head_dim} but the {layout} tensors have D = {x.shape[3]}")
    return x.permute(*_TO_CANONICAL[layout])


def from_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``[S, B, N, D]`` back to ``layout`` (contiguous)."""
    if layout == "SBH":
        return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    if layout == "TND":
        return x[:, 0].contiguous()
    return x.permute(*_FROM_CANONICAL[layout]).contiguous()
