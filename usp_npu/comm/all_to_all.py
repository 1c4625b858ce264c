"""Ulysses all-to-all on the canonical ``[S, B, N, D]`` layout, differentiable.

``heads_to_sequence``: each of the ``u`` ranks holds ``S/u`` tokens with all ``N`` heads; after it,
each holds all ``S`` tokens (in group order) with ``N/u`` heads. ``sequence_to_heads`` is the
inverse, and each is the other's backward. Several tensors (q, k, v) travel in ONE collective:
their per-rank head slices are packed side by side so latency is paid once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_npu.comm.stats import CommStats


def _exchange(buf: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None) -> torch.Tensor:
    """all_to_all_single over dim 0 of a contiguous ``[u, ...]`` buffer."""
    out = torch.empty_like(buf)
    dist.all_to_all_single(out, buf, group=group)
    if stats is not None:
        u = buf.shape[0]
        me = dist.get_rank()  # peers by global rank: CommStats sorts them into link classes
        members = dist.get_process_group_ranks(group or dist.group.WORLD)
        peers = [g for g in members if g != me]
        stats.add("all_to_all", buf.numel() * buf.element_size() * (u - 1) // u, peers)
    return out


def _heads_to_sequence(tensors, group, stats):
    u = dist.get_world_size(group)
    s, b = tensors[0].shape[:2]
    # [S/u, B, N, D] -> [u, S/u, B, N/u, D] per tensor, packed along the head axis
    widths = [t.shape[2] // u for t in tensors]
    packed = torch.cat(
        [
            t.unflatten(2, (u, w)).permute(2, 0, 1, 3, 4)
            for t, w in zip(tensors, widths, strict=True)
        ],
        dim=3,
    )
    recv = _exchange(packed.contiguous(), group, stats)  # recv[j] = rank j's tokens, my heads
    recv = recv.reshape(u * s, b, sum(widths), recv.shape[-1])
    return list(recv.split(widths, dim=2))


def _sequence_to_heads(tensors, group, stats):
    u = dist.get_world_size(group)
    total, b = tensors[0].shape[:2]
    widths = [t.shape[2] for t in tensors]
    packed = torch.cat([t.unflatten(0, (u, total // u)) for t in tensors], dim=3)
    recv = _exchange(packed.contiguous(), group, stats)  # recv[j] = my tokens, rank j's heads
    outs = []
    for piece in recv.split(widths, dim=3):
        outs.append(piece.permute(1, 2, 0, 3, 4).reshape(total // u, b, u * piece.shape[3], -1))
    return outs


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, to_sequence: bool, group, stats, *tensors):
        ctx.to_sequence, ctx.group, ctx.stats = to_sequence, group, stats
        fn = _heads_to_sequence if to_sequence else _sequence_to_heads
        return tuple(fn(list(tensors), group, stats))

    @staticmethod
    def backward(ctx, *grads):
        fn = _sequence_to_heads if ctx.to_sequence else _heads_to_sequence
        grads = [g.contiguous() for g in grads]
        return (None, None, None, *fn(grads, ctx.group, ctx.stats))


def heads_to_sequence(
    tensors: list[torch.Tensor], group: dist.ProcessGroup, stats: CommStats | None = None
) -> list[torch.Tensor]:
    """``[S/u, B, N_i, D]`` shards -> ``[S, B, N_i/u, D]``, one all-to-all for all tensors.

    Every ``N_i`` must be divisible by the group size ``u``; all tensors share S, B and D.
    """
    if dist.get_world_size(group) == 1:
        return list(tensors)
    return list(_AllToAll.apply(True, group, stats, *tensors))


def sequence_to_heads(
    tensors: list[torch.Tensor], group: dist.ProcessGroup, stats: CommStats | None = None
) -> list[torch.Tensor]:
    """Inverse of :func:`heads_to_sequence`: ``[S, B, N_i/u, D]`` -> ``[S/u, B, N_i, D]``."""
    if dist.get_world_size(group) == 1:
        return list(tensors)
    return list(_AllToAll.apply(False, group, stats, *tensors))


def replicate_kv_heads(x: torch.Tensor, ulysses_degree: int) -> torch.Tensor:
    """Repeat each K/V head so the all-to-all can hand every rank one (only when u > heads).

    ``[S, B, Nkv, D]`` -> ``[S, B, u, D]`` when ``u % Nkv == 0`` and ``u > Nkv``; unchanged when
    ``Nkv % u == 0``. Each query head still meets its own K/V head after the exchange, and the
    backward sums the copies' gradients (autograd of repeat_interleave).
    """
    nkv = x.shape[2]
    if nkv % ulysses_degree == 0:
        return x
    if ulysses_degree % nkv:
        raise ValueError(
            f"{nkv} K/V heads and Ulysses degree {ulysses_degree}: one must divide the other"
        )
    return x.repeat_interleave(ulysses_degree // nkv, dim=2)
