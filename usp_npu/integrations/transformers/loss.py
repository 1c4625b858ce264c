"""``reduce_loss``: the CP group's token-weighted loss, differentiable."""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_npu.parallel_state import ContextParallelMesh, get_mesh

IGNORE_INDEX = -100


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: every rank holds the group's loss, and
    each rank's backward carries only the gradient of its own tokens' share (the attention's
    backward already routes the cross-rank pieces)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def reduce_loss(
    loss: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    mesh: ContextParallelMesh | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The CP group's token-weighted loss from this rank's loss, differentiable.

    ``loss`` is what the model returned for this rank's shard with labels ``shift_labels``:

    - ``num_items_in_batch=None``: the mean over this rank's valid labels (NaN on a rank whose
      labels are all ``ignore_index``). Returns the mean over every valid label of the CP group,
      exact for ranks holding different numbers of them; a rank with none contributes 0.
    - ``num_items_in_batch=N`` (passed to the model too): the sum over this rank's labels / N, with
      N the valid labels of the FULL batch(es), e.g. every micro-batch of a gradient-accumulation
      step counted before :func:`shard_batch`. Returns the sum over the CP group (= the sum of the
      full batch's losses / N); raises ValueError on every rank if N differs between ranks or is
      smaller than this batch's valid labels (counted per shard by mistake).

    Backward: each rank gets the gradient of its own share; sum the parameter gradients over the
    CP group afterwards (``all_reduce`` on ``mesh.cp_group``), as data parallelism does across
    replicas. The result's value is identical on every rank of the group.
    """
    mesh = mesh or get_mesh()
    group = mesh.cp_group
    count = (shift_labels != ignore_index).sum().to(torch.float64).reshape(1)
    if num_items_in_batch is None:
        stats = count.clone()
        if mesh.cp_size > 1:
            dist.all_reduce(stats, group=group)
        local_sum = torch.where(count[0] > 0, loss * count[0].to(loss.dtype), loss.new_zeros(()))
        total = local_sum if mesh.cp_size == 1 else _SumOverGroup.apply(local_sum, group)
        return total / stats[0].clamp_min(1).to(loss.dtype)
    n = torch.as_tensor(num_items_in_batch, dtype=torch.float64).reshape(1).cpu()
    spread = torch.cat([n, -n])  # max and -min of N over the group
    if mesh.cp_size > 1:
        dist.all_reduce(count, group=group)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=group)
    high, low, held = spread[0].item(), -spread[1].item(), count.item()
    if high != low:
        raise ValueError(
            f"num_items_in_batch differs between the ranks of the CP group ({low:.0f}..{high:.0f}):"
            " count the valid labels of the full batch(es), before shard_batch"
        )
    if high < held:
        raise ValueError(
            f"num_items_in_batch={high:.0f} is below the {held:.0f} valid labels this CP group "
            "holds: count the valid labels of the full batch(es), not of a shard"
        )
    return loss if mesh.cp_size == 1 else _SumOverGroup.apply(loss, group)
