"""Block kernels (torch, reference) against dense attention, single process.

The backward is checked the way the ring uses it: the keys are split in two blocks, the blocks'
results merged, and each block's gradient computed from the FINAL output and statistics; the
pieces must add up to the dense gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from usp_npu import ops
from usp_npu.kernels import (
    CAUSAL,
    FULL,
    BlockMask,
    ReferenceBlockKernel,
    TorchBlockKernel,
    select_kernel,
)
from usp_npu.kernels.base import stats_dtype
from usp_npu.testing import dense_attention

TOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.bfloat16: 2.5e-2}
S, B, NQ, D, SCALE = 16, 2, 4, 8, 0.3


def _inputs(nkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, NQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(S, B, nkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(S, S, generator=g) < 0.5
    mask[3] = True  # a row that sees no key
    mask[5, : S // 2] = True  # a row that sees no key in the first block only
    return q, k, v, torch.randn(S, B, NQ, D, generator=g, dtype=torch.float64), mask


def _dense(q, k, v, dout, **mask_kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = dense_attention(*leaves, scale=SCALE, **mask_kw)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _err(a, b):
    return (a.double() - b).abs().max().item()


KERNELS = [TorchBlockKernel(), ReferenceBlockKernel()]


@pytest.mark.parametrize(
    "kernel,dtype,nkv",
    list(itertools.product(KERNELS, TOL, (4, 2, 1))),
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_causal_square_block(kernel, dtype, nkv):
    q, k, v, dout, _ = (x.to(dtype) if x.is_floating_point() else x for x in _inputs(nkv))
    want = _dense(*(x.double() for x in (q, k, v, dout)), causal=True)
    out, smax, ssum, _ = kernel.forward(q, k, v, scale=SCALE, mask=CAUSAL)
    assert smax.shape == ssum.shape == (B, NQ, S, kernel.stat_lanes)
    assert smax.dtype == stats_dtype(dtype)
    grads = kernel.backward(dout, q, k, v, out, smax, ssum, scale=SCALE, mask=CAUSAL)
    for got, ref in zip([out, *grads], want, strict=True):
        assert got.shape == ref.shape
        assert _err(got, ref) <= TOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize(
    "kernel,dtype,masked",
    list(itertools.product(KERNELS, TOL, (False, True))),
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_two_blocks_merged_then_backward_with_final_stats(kernel, dtype, masked):
    q, k, v, dout, mask = (x.to(dtype) if x.is_floating_point() else x for x in _inputs(2))
    want = _dense(*(x.double() for x in (q, k, v, dout)), mask=mask if masked else None)
    half = S // 2
    blocks = [slice(0, half), slice(half, S)]
    masks = [BlockMask(mask=mask[:, b]) if masked else FULL for b in blocks]
    parts = [
        kernel.forward(q, k[b], v[b], scale=SCALE, mask=m)
        for b, m in zip(blocks, masks, strict=True)
    ]
    acc = stats_dtype(dtype)
    out, smax, ssum = (
        x.to(acc, memory_format=torch.contiguous_format, copy=True) for x in parts[0][:3]
    )
    ops.ring_attention_update_(
        out.flatten(2), smax, ssum, parts[1][0].flatten(2), parts[1][1], parts[1][2]
    )
    assert torch.isfinite(out).all()
    out = out.to(dtype)
    dq = torch.zeros(q.shape, dtype=acc)
    dk, dv = torch.zeros(k.shape, dtype=acc), torch.zeros(v.shape, dtype=acc)
    for b, m in zip(blocks, masks, strict=True):
        dq_b, dk_b, dv_b = kernel.backward(
            dout, q, k[b], v[b], out, smax, ssum, scale=SCALE, mask=m
        )
        dq += dq_b
        dk[b] += dk_b
        dv[b] += dv_b
    for got, ref in zip([out, dq, dk, dv], want, strict=True):
        assert _err(got, ref) <= TOL[dtype] * max(1.0, ref.abs().max().item())
    if masked:
        assert (out[3] == 0).all()  # the row that sees nothing


def test_fully_masked_block_reports_empty_rows():
    q, k, v, _, _ = _inputs(2)
    hidden = torch.ones(S, S, dtype=torch.bool)
    for kernel in KERNELS:
        out, smax, ssum, _ = kernel.forward(q, k, v, scale=SCALE, mask=BlockMask(mask=hidden))
        assert (out == 0).all() and torch.isneginf(smax).all() and (ssum == 0).all(), kernel.name


def test_select_kernel():
    cpu = torch.device("cpu")
    assert select_kernel("auto", cpu, torch.float32, True).name == "torch"
    assert select_kernel("auto", cpu, torch.float64, False).name == "torch"
    assert select_kernel("reference", cpu, torch.bfloat16, False).name == "reference"
    with pytest.raises(ValueError, match="--attention-backend"):
        select_kernel("torch", torch.device("meta"), torch.float32, False)
    assert select_kernel("auto", torch.device("meta"), torch.float32, False).name == "reference"
    with pytest.raises(ValueError, match="BlockMask"):
        BlockMask(causal=True, mask=torch.zeros(2, 2, dtype=torch.bool))
