"""Ring attention: the one ring loop every algorithm uses (Ulysses is its one-step case).

Rank ``i`` of ``R`` holds its queries and, at step ``t``, the K/V block that started on rank
``(i - t) mod R``. Before computing a block it posts the exchange of the one it holds, so the
next block travels while this one computes. Partial results merge through ``merge`` (the
fused ``ring_attention_update_`` or the composed formula) in fp32 (fp64 for fp64 inputs).

Backward (FlashAttention-2 decomposition): each block's gradient uses the FINAL output and
statistics, so the per-block pieces simply add up. K/V travel the same way as in the forward;
the dK/dV accumulator of a block travels behind it, collecting every other rank's piece, and
reaches the block's home rank after R - 1 hops, where the home rank adds its own piece.

Which block arrives when, over which links, and how dK/dV get home is the plan's *route*
(``routes.py``: the plain ring, the double ring, or kvallgather's all-gather); the loop is the
same for all of them. KV cache (``plan.kv_cache``): ``full`` keeps every received block for the
backward, which then receives nothing; ``half`` keeps K and receives only V again.
``plan.restore`` (Ulysses KV cache) keeps what it chooses instead of ``k``/``v`` and rebuilds
them at the start of the backward.

``ring_forward``/``ring_backward`` are the loop without autograd, which the pipelined Ulysses
(``usp.py``) runs once per head chunk; ``_RingAttention`` wraps them for the unchunked case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from usp_npu.algorithms.kv_cache import KVRestore
from usp_npu.algorithms.routes import Route
from usp_npu.algorithms.schedule import BlockStep, Rows
from usp_npu.kernels.base import BlockKernel, stats_dtype

MergeFn = Callable[..., object]


@dataclass
class RingPlan:
    """Everything but the tensors: the schedule, the kernel, the merge, the route."""

    steps: list[BlockStep]
    kernel: BlockKernel
    scale: float
    merge: MergeFn
    route: Route | None  # None when the ring has one rank
    kv_cache: str | None = None  # None | "full" | "half": received blocks kept for the backward
    restore: KVRestore | None = None  # keep something else than k, v and rebuild them


def _accumulator(x: torch.Tensor, acc_dtype: torch.dtype, contiguous: bool) -> torch.Tensor:
    """A block kernel's fresh result, to be updated in place: the tensor itself when it already is
    an ``acc_dtype`` tensor (contiguous, when in-place merges need ``flatten`` views of it), else
    one copy that changes what must change (the kernel's layout or a narrower dtype)."""
    if x.dtype == acc_dtype and (x.is_contiguous() or not contiguous):
        return x
    return torch.empty(x.shape, dtype=acc_dtype, device=x.device).copy_(x)


def _add_rows(acc: torch.Tensor, rows: Rows, piece: torch.Tensor) -> None:
    """``acc[rows] += piece`` in place: ``add_`` on a slice's view (``+=`` on an index would
    write the rows back with a second copy), ``index_add_`` for packed index rows (unique)."""
    if isinstance(rows, slice):
        acc[rows].add_(piece)
    else:
        acc.index_add_(0, rows, piece.to(acc.dtype))


def _merge(merge: MergeFn, step: BlockStep, out, smax, ssum, o, m, s) -> None:
    """Merge one step's ``(o, m, s)`` into the accumulators' rows ``step.q_rows``, in place."""
    rows = step.q_rows
    if step.cu_q is None:
        merge(out[rows].flatten(2), smax[:, :, rows], ssum[:, :, rows], o.flatten(2), m, s)
        return
    # Packed (batch 1): the TND merge, attn [T, N, D] and token-major stats [T, N, K] (views of
    # the [1, N, T, K] accumulators), with the step's per-document prefix sums.
    acc = (out[rows][:, 0], smax[0, :, rows].transpose(0, 1), ssum[0, :, rows].transpose(0, 1))
    seq = torch.tensor(step.cu_q, dtype=torch.int64, device=out.device)
    cur = (o[:, 0], m[0].transpose(0, 1), s[0].transpose(0, 1))
    merge(*acc, *cur, actual_seq_qlen=seq, input_layout="TND")
    if not isinstance(rows, slice):  # gathered rows were merged in a copy: write them back
        out[rows] = acc[0].unsqueeze(1)
        smax[0, :, rows], ssum[0, :, rows] = acc[1].transpose(0, 1), acc[2].transpose(0, 1)


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan):
    """Forward of the ring loop, no autograd: ``(out, softmax_max, softmax_sum, rng_states,
    cache)``; ``out`` in ``q``'s dtype, the statistics merged over every block, ``cache`` the
    received blocks the KV cache policy keeps for the backward."""
    kernel, steps = plan.kernel, plan.steps
    acc_dtype = stats_dtype(q.dtype)
    route = plan.route
    kv = route.first(k, v) if route is not None else (k, v)
    rng_states, cache = [], []
    for t, step in enumerate(steps):
        more = t + 1 < len(steps)
        if more:
            route.send(t, kv)
        rng = None
        if not step.empty:  # a packed general step may pair no document at all
            o, m, s, rng = kernel.forward(
                q[step.q_rows], kv[0][step.kv_rows], kv[1][step.kv_rows],
                scale=plan.scale, mask=step.mask, **step.varlen(),
            )  # fmt: skip
        rng_states.append(rng)
        if len(steps) == 1:
            out, smax, ssum = o, m, s
        elif t == 0:  # the own block covers every query row: it initialises the accumulators
            out, smax, ssum = (_accumulator(x, acc_dtype, True) for x in (o, m, s))
        elif not step.empty:
            _merge(plan.merge, step, out, smax, ssum, o, m, s)
        if more:
            kv = route.receive(t)  # a fresh buffer per block: safe to keep
            if plan.kv_cache == "full":
                cache.append(kv)
            elif plan.kv_cache == "half":  # a copy: a view would keep V's memory alive
                cache.append(kv[0].clone())
    return out.to(q.dtype), smax, ssum, rng_states, cache


def ring_backward(dout, q, k, v, out, smax, ssum, rng_states, cache, plan: RingPlan):
    """Backward of :func:`ring_forward` (no autograd): ``(dq, dk, dv)`` in the kernel's dtype
    (one step) or the accumulation dtype. ``dout`` contiguous, like ``out``."""
    steps = plan.steps
    acc_dtype = stats_dtype(q.dtype)
    if len(steps) == 1:
        step = steps[0]
        return plan.kernel.backward(
            dout, q, k, v, out, smax, ssum, scale=plan.scale, mask=step.mask,
            rng_state=rng_states[0], **step.varlen(),
        )  # fmt: skip
    dq = None
    route, policy = plan.route, plan.kv_cache
    kv = torch.stack([k, v])
    # what travels again in the backward: K and V, only V (half cache), or nothing (full)
    moving = None if policy == "full" else (kv if policy is None else kv[1])
    for t, step in enumerate(steps):
        more = t + 1 < len(steps)
        if moving is not None and more:
            route.send(t, moving)
        if t == 0 or policy is None:
            bk, bv = (kv[0], kv[1]) if t == 0 else (moving[0], moving[1])
        elif policy == "full":
            bk, bv = cache[t - 1][0], cache[t - 1][1]
        else:
            bk, bv = cache[t - 1], moving
        rows = step.q_rows
        dkv = route.dkv_buffer(t, kv, acc_dtype)  # this block's accumulator
        if not step.empty:
            dq_c, dk_c, dv_c = plan.kernel.backward(
                dout[rows], q[rows], bk[step.kv_rows], bv[step.kv_rows], out[rows],
                smax[:, :, rows], ssum[:, :, rows],
                scale=plan.scale, mask=step.mask, rng_state=rng_states[t], **step.varlen(),
            )  # fmt: skip
            if t == 0:  # the own block covers every query row: its piece initialises dq
                dq = _accumulator(dq_c, acc_dtype, False)
            else:
                _add_rows(dq, rows, dq_c)
            _add_rows(dkv[0], step.kv_rows, dk_c)
            _add_rows(dkv[1], step.kv_rows, dv_c)
        route.pass_dkv(t, dkv)
        if moving is not None and more:
            moving = route.receive(t)
    home = route.finish_dkv()  # every rank's piece of the own block, back home
    return dq, home[0], home[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        out, smax, ssum, rng_states, cache = ring_forward(q, k, v, plan)
        ctx.plan, ctx.rng_states = plan, rng_states
        kept = (k, v) if plan.restore is None else plan.restore.keep
        ctx.n_kept = len(kept)
        ctx.save_for_backward(q, out, smax, ssum, *kept, *cache)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, smax, ssum, *rest = ctx.saved_tensors
        kept, cache = rest[: ctx.n_kept], rest[ctx.n_kept :]
        plan = ctx.plan
        k, v = kept if plan.restore is None else plan.restore.rebuild(*kept)
        dq, dk, dv = ring_backward(
            dout.contiguous(), q, k, v, out, smax, ssum, ctx.rng_states, cache, plan
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
) -> torch.Tensor:
    """Attention of local queries against the whole ring's keys, differentiable.

    ``q``: ``[L, B, Nq, D]``, ``k``/``v``: ``[L, B, Nkv, D]`` in the ring's split (REFERENCE.md
    section 3); returns ``[L, B, Nq, D]`` in ``q``'s dtype.
    """
    return _RingAttention.apply(q, k, v, plan)
