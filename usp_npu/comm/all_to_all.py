"""Ulysses all-to-all on the canonical ``[S, B, N, D]`` layout: posted asynchronously, or as a
differentiable pair.

``heads_to_sequence``: each of the ``u`` ranks holds ``S/u`` tokens with all ``N`` heads; after it,
each holds all ``S`` tokens (in group order) with ``N/u`` heads. ``sequence_to_heads`` is the
inverse, and each is the other's backward. Several tensors (q, k, v) travel in ONE collective:
their per-rank head slices are packed side by side so latency is paid once.

Copies: the heads -> sequence direction packs once on the sender (each destination's heads must
be one contiguous slab) and the received buffer IS the result (views, no unpack). The sequence ->
heads direction needs no pack for contiguous tensors of the wanted dtype (the destination's
tokens already form one slab; each goes in its own collective) and unpacks once on the receiver,
straight into the caller's output.
``post_*`` return a :class:`PendingAllToAll` whose ``wait()`` finishes the exchange, so the
caller can compute while the collective is in flight (the pipelined Ulysses in ``usp.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from usp_npu.comm.p2p import post_receives_then_sends, wait_each
from usp_npu.comm.stats import CommStats


@dataclass
class PendingAllToAll:
    """One all-to-all in flight. ``recv``: ``[u, rows, B, W, D]`` (W = the packed head widths)."""

    works: list
    recv: torch.Tensor
    widths: list[int]
    to_sequence: bool

    def _finish(self) -> None:
        wait_each(self.works)

    def wait(self) -> list[torch.Tensor]:
        """heads -> sequence: views ``[S, B, w_i, D]`` of the receive buffer (no copy)."""
        return list(self.wait_packed().split(self.widths, dim=2))

    def wait_packed(self) -> torch.Tensor:
        """heads -> sequence: the whole contiguous ``[S, B, W, D]`` buffer, tensors side by side."""
        if not self.to_sequence:
            raise RuntimeError("sequence -> heads results are unpacked with wait_into()")
        self._finish()
        u, rows, b, width, d = self.recv.shape
        return self.recv.view(u * rows, b, width, d)

    def wait_into(self, outs: list[torch.Tensor]) -> None:
        """sequence -> heads: write each piece into ``outs[i]`` (``[S/u, B, u * w_i, D]`` views)."""
        self._finish()
        u = self.recv.shape[0]
        offset = 0
        for out, w in zip(outs, self.widths, strict=True):
            # recv[j] = my tokens with rank j's heads: rank j's heads come j-th in the output
            out.unflatten(2, (u, w)).copy_(
                self.recv[..., offset : offset + w, :].permute(1, 2, 0, 3, 4)
            )
            offset += w


def _exchange(recv: torch.Tensor, send: torch.Tensor, group, p2p: bool) -> list:
    """``recv[j]`` = what group rank ``j`` sent me, ``send[j]`` goes to rank ``j``: one
    ``all_to_all_single``, or with ``p2p`` a receive and a send per peer, every receive posted
    first (``p2p.py``: gloo's all-to-all posts each send before its receive and, across a slow
    link, can run the two directions one after the other)."""
    if not p2p:
        return [dist.all_to_all_single(recv, send, group=group, async_op=True)]
    members = dist.get_process_group_ranks(group or dist.group.WORLD)
    u, me = len(members), members.index(dist.get_rank())
    recv[me].copy_(send[me])  # my own share never leaves
    # the i-th next rank gets my i-th send while I receive from the i-th previous one: at every
    # position of the lists each rank has exactly one sender and one receiver
    sources = [(me - i) % u for i in range(1, u)]
    targets = [(me + i) % u for i in range(1, u)]
    return post_receives_then_sends(
        [(recv[j], members[j]) for j in sources], [(send[j], members[j]) for j in targets], group
    )


def _post(send: torch.Tensor, group, stats: CommStats | None, widths, to_sequence, blocking, p2p):
    recv = torch.empty_like(send)
    pending = PendingAllToAll(_exchange(recv, send, group, p2p), recv, list(widths), to_sequence)
    if blocking:
        pending._finish()
    if stats is not None:
        u = send.shape[0]
        me = dist.get_rank()  # peers by global rank: CommStats sorts them into link classes
        members = dist.get_process_group_ranks(group or dist.group.WORLD)
        peers = [g for g in members if g != me]
        stats.add("all_to_all", send.numel() * send.element_size() * (u - 1) // u, peers)
    return pending


def post_heads_to_sequence(
    tensors: list[torch.Tensor],
    group: dist.ProcessGroup,
    stats: CommStats | None = None,
    blocking: bool = False,
    p2p: bool = False,
) -> PendingAllToAll:
    """Start ``[S/u, B, N_i, D]`` -> ``[S, B, N_i/u, D]`` for all tensors in one collective.

    The one copy is the pack: ``send[j]`` = my tokens, rank j's heads of every tensor side by side.
    ``p2p``: point-to-point exchanges instead of the collective (``--ulysses-all-to-all p2p``).
    """
    u = dist.get_world_size(group)
    s, b, _, d = tensors[0].shape
    widths = [t.shape[2] // u for t in tensors]
    send = torch.empty((u, s, b, sum(widths), d), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t, w in zip(tensors, widths, strict=True):
        send[..., offset : offset + w, :].copy_(t.unflatten(2, (u, w)).permute(2, 0, 1, 3, 4))
        offset += w
    return _post(send, group, stats, widths, True, blocking, p2p)


def post_sequence_to_heads(
    tensors: list[torch.Tensor],
    group: dist.ProcessGroup,
    stats: CommStats | None = None,
    dtype: torch.dtype | None = None,
    blocking: bool = False,
    p2p: bool = False,
) -> PendingAllToAll | _Several:
    """Start ``[S, B, N_i/u, D]`` -> ``[S/u, B, N_i, D]``; finish with ``wait_into``.

    Contiguous tensors of ``dtype`` (default the first's) are sent as they are, one collective
    each; otherwise they are packed, and cast to ``dtype``, in one copy and one collective.
    """
    u = dist.get_world_size(group)
    total, b, _, d = tensors[0].shape
    dtype = dtype or tensors[0].dtype
    if all(t.is_contiguous() and t.dtype == dtype for t in tensors):
        # the destination's tokens already form one slab of each tensor: send them as they are,
        # one collective each, rather than pack them (a copy of everything) to save latency
        pending = [
            _post(
                t.view(u, total // u, b, t.shape[2], d),
                group,
                stats,
                [t.shape[2]],
                False,
                blocking,
                p2p,
            )
            for t in tensors
        ]
        return pending[0] if len(pending) == 1 else _Several(pending)
    widths = [t.shape[2] for t in tensors]
    send = torch.empty((u, total // u, b, sum(widths), d), dtype=dtype, device=tensors[0].device)
    offset = 0
    for t, w in zip(tensors, widths, strict=True):
        send[..., offset : offset + w, :].copy_(t.unflatten(0, (u, total // u)))
        offset += w
    return _post(send, group, stats, widths, False, blocking, p2p)


@dataclass
class _Several:
    """Several sequence -> heads exchanges in flight, finished together (``wait_into``)."""

    parts: list[PendingAllToAll]

    def _finish(self) -> None:
        for part in self.parts:
            part._finish()

    def wait_into(self, outs: list[torch.Tensor]) -> None:
        self._finish()
        for part, out in zip(self.parts, outs, strict=True):
            part.wait_into([out])


def _heads_out(tensors: list[torch.Tensor], u: int) -> list[torch.Tensor]:
    s, b, _, d = tensors[0].shape
    return [
        torch.empty((s // u, b, t.shape[2] * u, d), dtype=t.dtype, device=t.device) for t in tensors
    ]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, to_sequence: bool, group, stats, p2p, *tensors):
        ctx.to_sequence, ctx.group, ctx.stats, ctx.p2p = to_sequence, group, stats, p2p
        return tuple(_run(to_sequence, list(tensors), group, stats, p2p))

    @staticmethod
    def backward(ctx, *grads):
        back = _run(not ctx.to_sequence, list(grads), ctx.group, ctx.stats, ctx.p2p)
        return (None, None, None, None, *back)


def _run(to_sequence: bool, tensors, group, stats, p2p: bool) -> list[torch.Tensor]:
    if to_sequence:
        return post_heads_to_sequence(tensors, group, stats, p2p=p2p).wait()
    outs = _heads_out(tensors, dist.get_world_size(group))
    post_sequence_to_heads(tensors, group, stats, p2p=p2p).wait_into(outs)
    return outs


def heads_to_sequence(
    tensors: list[torch.Tensor],
    group: dist.ProcessGroup,
    stats: CommStats | None = None,
    p2p: bool = False,
) -> list[torch.Tensor]:
    """``[S/u, B, N_i, D]`` shards -> ``[S, B, N_i/u, D]``, one all-to-all for all tensors.

    Every ``N_i`` must be divisible by the group size ``u``; all tensors share S, B and D.
    ``p2p``: point-to-point exchanges instead of the collective (``--ulysses-all-to-all p2p``).
    """
    if dist.get_world_size(group) == 1:
        return list(tensors)
    return list(_AllToAll.apply(True, group, stats, p2p, *tensors))


def sequence_to_heads(
    tensors: list[torch.Tensor],
    group: dist.ProcessGroup,
    stats: CommStats | None = None,
    p2p: bool = False,
) -> list[torch.Tensor]:
    """Inverse of :func:`heads_to_sequence`: ``[S, B, N_i/u, D]`` -> ``[S/u, B, N_i, D]``."""
    if dist.get_world_size(group) == 1:
        return list(tensors)
    return list(_AllToAll.apply(False, group, stats, p2p, *tensors))


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
