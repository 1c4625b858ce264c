"""All-gather along the sequence and its adjoint, reduce-scatter (kvallgather, all-gather KV).

Tensors are ``[L, ...]`` shards in the canonical sequence-first layout; the group's shards are
stacked in group order, so ``[n, L, ...]`` (or, flattened, ``[n * L, ...]``) is the gathered
sequence in the same order the Ulysses all-to-all gathers it. Bytes are counted as ``(n - 1)``
shards sent per rank, one to each peer (the all-to-all's convention), so ``CommStats`` can sort
them into link classes; a backend that runs the collective as a ring moves the same bytes per
rank, over other links.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_npu.comm.stats import CommStats

# torch >= 2.13 names them *_single; older releases *_tensor / *_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _peers(group: dist.ProcessGroup) -> list[int]:
    """The group's other members, by global rank (``CommStats`` sorts them into link classes)."""
    me = dist.get_rank()
    return [g for g in dist.get_process_group_ranks(group or dist.group.WORLD) if g != me]


def all_gather_blocks(
    x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None = None
) -> torch.Tensor:
    """``[...]`` on each of the ``n`` ranks -> ``[n, ...]`` (rank ``j``'s tensor at index ``j``)."""
    n = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x, group=group)  # the flat form: gloo checks dim 0 = n * x.shape[0]
    out = out.unflatten(0, (n, x.shape[0]))
    if stats is not None:
        stats.add("all_gather", x.numel() * x.element_size() * (n - 1), _peers(group))
    return out


def reduce_scatter_blocks(
    x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None = None
) -> torch.Tensor:
    """``[n, ...]`` on each rank -> ``[...]``: the sum over ranks of their index-``rank`` slice."""
    n = x.shape[0]
    x = x.contiguous()
    out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x.flatten(0, 1), group=group)
    if stats is not None:
        stats.add("reduce_scatter", out.numel() * out.element_size() * (n - 1), _peers(group))
    return out


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, stats, x):
        ctx.group, ctx.stats = group, stats
        gathered = all_gather_blocks(x, group, stats)
        return gathered.flatten(0, 1)

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        # every rank used the whole gathered sequence: the gradient of my shard is the sum of
        # every rank's gradient for it
        return None, None, reduce_scatter_blocks(grad.unflatten(0, (n, -1)), ctx.group, ctx.stats)


def all_gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None = None
) -> torch.Tensor:
    """Differentiable ``[L, ...]`` -> ``[n * L, ...]`` in group order; backward reduce-scatters."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllGatherSequence.apply(group, stats, x)
