"""Ring attention: the one ring loop every algorithm uses (Ulysses is its one-step case).

Rank ``i`` of ``R`` holds its queries and, at step ``t``, the K/V block that started on rank
``(i - t) mod R``. Before computing a block it posts the exchange of the one it holds, so the
next block travels while this one computes. Partial results merge through ``merge`` (the
fused ``ring_attention_update_`` or the composed formula) in fp32 (fp64 for fp64 inputs).

Backward (FlashAttention-2 decomposition): each block's gradient uses the FINAL output and
statistics, so the per-block pieces simply add up. K/V travel the same way as in the forward;
the dK/dV accumulator of a block travels behind it, collecting every other rank's piece, and
reaches the block's home rank after R - 1 hops, where the home rank adds its own piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from usp_npu.algorithms.schedule import BlockStep
from usp_npu.comm.ring import RingExchange
from usp_npu.kernels.base import BlockKernel, stats_dtype

MergeFn = Callable[..., object]


@dataclass
class RingPlan:
    """Everything but the tensors: the schedule, the kernel, the merge, the exchange."""

    steps: list[BlockStep]
    kernel: BlockKernel
    scale: float
    merge: MergeFn
    exchange: RingExchange | None  # None when the ring has one rank


def _accumulators(out, smax, ssum, acc_dtype):
    """Fresh contiguous fp32/fp64 copies of the first block's result (never aliases the kernel's)."""

    def fresh(x):
        return torch.empty(x.shape, dtype=acc_dtype, device=x.device).copy_(x)

    return fresh(out), fresh(smax), fresh(ssum)


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


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        kernel, steps = plan.kernel, plan.steps
        acc_dtype = stats_dtype(q.dtype)
        kv = torch.stack([k, v]) if plan.exchange is not None else (k, v)
        rng_states = []
        for t, step in enumerate(steps):
            pending = plan.exchange.start(kv, "ring_kv") if t + 1 < len(steps) else None
            rng = None
            if not step.empty:  # a packed general step may pair no document at all
                o, m, s, rng = kernel.forward(
                    q[step.q_rows],
                    kv[0][step.kv_rows],
                    kv[1][step.kv_rows],
                    scale=plan.scale,
                    mask=step.mask,
                    **step.varlen(),
                )
            rng_states.append(rng)
            if len(steps) == 1:
                out, smax, ssum = o, m, s
            elif t == 0:  # the own block covers every query row
                out, smax, ssum = _accumulators(o, m, s, acc_dtype)
            elif not step.empty:
                _merge(plan.merge, step, out, smax, ssum, o, m, s)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.plan, ctx.rng_states = plan, rng_states
        ctx.save_for_backward(q, k, v, out, smax, ssum)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, smax, ssum = ctx.saved_tensors
        plan, steps = ctx.plan, ctx.plan.steps
        acc_dtype = stats_dtype(q.dtype)
        dout = dout.contiguous()
        if len(steps) == 1:
            step = steps[0]
            dq, dk, dv = plan.kernel.backward(
                dout,
                q,
                k,
                v,
                out,
                smax,
                ssum,
                scale=plan.scale,
                mask=step.mask,
                rng_state=ctx.rng_states[0],
                **step.varlen(),
            )
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None

        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        kv = torch.stack([k, v])
        home = travelling = None  # dK/dV of the own block; the accumulator in flight
        for t, step in enumerate(steps):
            pending_kv = plan.exchange.start(kv, "ring_kv") if t + 1 < len(steps) else None
            rows = step.q_rows
            if not step.empty:
                dq_c, dk_c, dv_c = plan.kernel.backward(
                    dout[rows],
                    q[rows],
                    kv[0][step.kv_rows],
                    kv[1][step.kv_rows],
                    out[rows],
                    smax[:, :, rows],
                    ssum[:, :, rows],
                    scale=plan.scale,
                    mask=step.mask,
                    rng_state=ctx.rng_states[t],
                    **step.varlen(),
                )
                dq[rows] += dq_c  # index tensors (packed rows) are unique: += is exact
            if t == 0:
                dkv = home = torch.zeros(kv.shape, dtype=acc_dtype, device=kv.device)
            elif travelling is None:  # step 1 starts the accumulator of the block it holds
                dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=kv.device)
            else:  # the accumulator of this block, from the rank that held it one step ago
                dkv = travelling.wait()
            if not step.empty:
                dkv[0, step.kv_rows] += dk_c
                dkv[1, step.kv_rows] += dv_c
            if t > 0:
                travelling = plan.exchange.start(dkv, "ring_dkv")
            if pending_kv is not None:
                kv = pending_kv.wait()
        home += travelling.wait()  # every other rank's piece of the own block, back home
        return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype), None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
) -> torch.Tensor:
    """Attention of local queries against the whole ring's keys, differentiable.

    ``q``: ``[L, B, Nq, D]``, ``k``/``v``: ``[L, B, Nkv, D]`` in the ring's split (REFERENCE.md
    section 3); returns ``[L, B, Nq, D]`` in ``q``'s dtype.
    """
    return _RingAttention.apply(q, k, v, plan)
