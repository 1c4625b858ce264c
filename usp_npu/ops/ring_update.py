"""ring_attention_update: merge one ring step's (out, max, sum) into the running result.

Layouts (``K`` in {1, 8} identical lanes: lane 0 is read, all ``K`` are written):

- ``"SBH"``: attn ``[S, B, H]`` (``H = N * D``), stats ``[B, N, S, K]``.
- ``"TND"``: attn ``[T, N, D]``, stats ``[T, N, K]`` (token-major: stats row ``(t, n)`` belongs
  to attn row ``(t, n)``); ``actual_seq_qlen`` = int64 prefix sums from 0 to ``T`` (the math is
  per row, so it is only validated).

Math per row (REFERENCE.md section 5), in fp32 (fp64 when the statistics are fp64)::

    m = max(m_p, m_c); a = l_p e^(m_p - m); b = l_c e^(m_c - m); l = a + b
    O = O_p a / l + O_c b / l

A side whose max is -inf contributes nothing; both sides -inf give ``(0, -inf, 0)``, never NaN.
Beyond torch_npu: ``prev`` attn may be wider than ``cur`` attn (fp32 accumulator, bf16 step);
outputs take ``prev``'s dtype. Views are fine as long as the head dim of attn (and the ``K = 8``
lanes of stats) is contiguous.

Backends, chosen per call: ``torch_npu.npu_ring_attention_update`` for ``npu`` tensors, the
compiled ``torch.ops.usp_npu`` op (``csrc/``) for CPU and meta tensors, else the composed PyTorch
formula :func:`ring_attention_update_reference`.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from usp_npu.ops._extension import extension_available, extension_error

__all__ = [
    "LAYOUTS",
    "extension_available",
    "resolve_ring_update",
    "ring_attention_update",
    "ring_attention_update_",
    "ring_attention_update_reference",
]

LAYOUTS = ("SBH", "TND")
_LANES = (1, 8)
_ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FLAG = "--use-fused-ring-attention-update"

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
SeqLens = torch.Tensor | Sequence[int] | None


@dataclass(frozen=True)
class _Geometry:
    """Row grid of one merge: ``heads`` N, ``head_dim`` D, ``lanes`` K."""

    heads: int
    head_dim: int
    lanes: int


def _check_inputs(
    prev_out: torch.Tensor,
    prev_max: torch.Tensor,
    prev_sum: torch.Tensor,
    cur_out: torch.Tensor,
    cur_max: torch.Tensor,
    cur_sum: torch.Tensor,
    seq: torch.Tensor | None,
    layout: str,
) -> _Geometry:
    """Raise ValueError unless the six tensors form a valid merge (see the module docstring)."""
    name = "ring_attention_update"
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: input_layout must be 'SBH' or 'TND', got {layout!r}")
    if prev_out.dim() != 3 or prev_out.shape != cur_out.shape:
        raise ValueError(
            f"{name}: prev/cur attn_out must be 3-D with equal shapes, got "
            f"{tuple(prev_out.shape)} and {tuple(cur_out.shape)}"
        )
    stats = (prev_max, prev_sum, cur_max, cur_sum)
    want = "[B, N, S, K]" if layout == "SBH" else "[T, N, K]"
    ndim = 4 if layout == "SBH" else 3
    if any(s.dim() != ndim or s.shape != prev_max.shape for s in stats):
        raise ValueError(
            f"{name}: the four softmax statistics must share one {layout} shape {want}, got "
            f"{[tuple(s.shape) for s in stats]}"
        )
    if any(s.dtype != prev_max.dtype for s in stats):
        raise ValueError(f"{name}: the four softmax statistics must share one dtype")
    lanes = prev_max.shape[-1]
    if lanes not in _LANES:
        raise ValueError(f"{name}: the last statistics dim K must be 1 or 8, got {lanes}")
    p, c, s = prev_out.dtype, cur_out.dtype, prev_max.dtype
    if p not in _ATTN_DTYPES or c not in _ATTN_DTYPES:
        raise ValueError(f"{name}: attn_out dtypes must be fp32/bf16/fp16/fp64, got {p}, {c}")
    if c != p and c.itemsize >= p.itemsize:
        raise ValueError(
            f"{name}: cur_attn_out ({c}) must have prev_attn_out's dtype ({p}) or a narrower one "
            "(the accumulator may be wider, never narrower)"
        )
    if s not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: softmax statistics must be float32 (or float64), got {s}")
    if (s == torch.float64) != (p == torch.float64):
        raise ValueError(
            f"{name}: float64 statistics go with a float64 prev_attn_out and vice versa; got "
            f"statistics {s} and prev_attn_out {p}"
        )
    if layout == "SBH":
        s_len, bsz, hidden = prev_out.shape
        nb, heads, ns, _ = prev_max.shape
        if (nb, ns) != (bsz, s_len) or heads == 0 or hidden % heads:
            raise ValueError(
                f"{name}: SBH statistics {tuple(prev_max.shape)} must be [B, N, S, K] with "
                f"B={bsz}, S={s_len} and N dividing H={hidden}"
            )
        head_dim = hidden // heads
        if seq is not None:
            raise ValueError(f"{name}: actual_seq_qlen is only used with input_layout='TND'")
    else:
        t, heads, head_dim = prev_out.shape
        if tuple(prev_max.shape[:2]) != (t, heads):
            raise ValueError(
                f"{name}: TND statistics {tuple(prev_max.shape)} must be [T, N, K] with T={t}, "
                f"N={heads}"
            )
        if seq is not None and (
            seq.dim() != 1 or seq.numel() == 0 or seq.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError(
                f"{name}: actual_seq_qlen must be a 1-D int64 tensor of prefix sums starting at "
                f"0, got shape {tuple(seq.shape)} dtype {seq.dtype}"
            )
    for a in (prev_out, cur_out):
        if a.shape[2] > 1 and a.stride(2) != 1:
            raise ValueError(
                f"{name}: the innermost attn_out dim ({'H' if layout == 'SBH' else 'D'}) must be "
                f"contiguous (stride 1), got strides {a.stride()}"
            )
    if lanes > 1 and any(x.stride(-1) != 1 for x in stats):
        raise ValueError(
            f"{name}: the K=8 lanes of the statistics must be contiguous (stride 1), got strides "
            f"{[x.stride() for x in stats]}"
        )
    devices = {x.device for x in (prev_out, cur_out, *stats)}
    if len(devices) > 1:
        raise ValueError(
            f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )
    return _Geometry(heads=heads, head_dim=head_dim, lanes=lanes)


def _is_concrete(t: torch.Tensor) -> bool:
    """A real CPU tensor whose values can be read (not meta, not fake, not being traced)."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return True
    return not is_fake(t)


def _as_seq(actual_seq_qlen: SeqLens) -> torch.Tensor | None:
    if actual_seq_qlen is None or isinstance(actual_seq_qlen, torch.Tensor):
        return actual_seq_qlen
    return torch.tensor([int(x) for x in actual_seq_qlen], dtype=torch.int64)


def _check_seq_values(seq: torch.Tensor | None, t: int) -> None:
    if seq is None or not _is_concrete(seq):
        return
    v = seq.tolist()
    if v[0] != 0 or v[-1] != t or any(x > y for x, y in itertools.pairwise(v)):
        raise ValueError(
            f"ring_attention_update: actual_seq_qlen must be non-decreasing prefix sums from 0 to "
            f"T={t}, got {v}"
        )


# ----------------------------------------------------------------------------- composed formula


def _composed(prev_out, prev_max, prev_sum, cur_out, cur_max, cur_sum, layout, geo) -> Triple:
    """The merge with plain torch ops (several passes). Returns new tensors."""
    m_p, l_p = prev_max[..., :1], prev_sum[..., :1]  # lane 0, [..., 1]
    m_c, l_c = cur_max[..., :1], cur_sum[..., :1]
    m = torch.maximum(m_p, m_c)
    neg_inf = float("-inf")
    # where both maxima are -inf the row saw no key yet: use 0 so exp() gives 0, never NaN
    m_safe = torch.where(m == neg_inf, torch.zeros_like(m), m)
    a = torch.where(m_p == neg_inf, torch.zeros_like(m), l_p * torch.exp(m_p - m_safe))
    b = torch.where(m_c == neg_inf, torch.zeros_like(m), l_c * torch.exp(m_c - m_safe))
    total = a + b
    inv = torch.where(total == 0, torch.zeros_like(total), 1.0 / total)
    wa, wb = a * inv, b * inv
    if layout == "SBH":  # [B, N, S, 1] -> [S, B, N, 1] against attn [S, B, N, D]
        wa, wb = wa.permute(2, 0, 1, 3), wb.permute(2, 0, 1, 3)
        shape4 = (geo.heads, geo.head_dim)
        p4, c4 = prev_out.unflatten(2, shape4), cur_out.unflatten(2, shape4)
    else:  # [T, N, 1] against attn [T, N, D]
        p4, c4 = prev_out, cur_out
    acc = prev_max.dtype
    out = (p4.to(acc) * wa + c4.to(acc) * wb).to(prev_out.dtype).reshape(prev_out.shape)
    lanes = prev_max.shape
    return out, m.expand(lanes).contiguous(), total.expand(lanes).contiguous()


def ring_attention_update_reference(
    prev_attn_out: torch.Tensor,
    prev_softmax_max: torch.Tensor,
    prev_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor,
    cur_softmax_max: torch.Tensor,
    cur_softmax_sum: torch.Tensor,
    actual_seq_qlen: SeqLens = None,
    input_layout: str = "SBH",
) -> Triple:
    """The merge composed of plain PyTorch ops (any device); the fallback and the test oracle.

    Same contract as :func:`ring_attention_update`; returns new tensors: attn ``prev``'s shape
    and dtype, statistics contiguous with ``prev``'s shape.
    """
    seq = _as_seq(actual_seq_qlen)
    args = (prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max)
    geo = _check_inputs(*args, cur_softmax_sum, seq, input_layout)
    if input_layout == "TND":
        _check_seq_values(seq, prev_attn_out.shape[0])
    return _composed(*args, cur_softmax_sum, input_layout, geo)


def _composed_update_(
    acc_attn_out: torch.Tensor,
    acc_softmax_max: torch.Tensor,
    acc_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor,
    cur_softmax_max: torch.Tensor,
    cur_softmax_sum: torch.Tensor,
    actual_seq_qlen: SeqLens = None,
    input_layout: str = "SBH",
) -> Triple:
    """In-place merge with the composed formula (what ``fused=False`` resolves to)."""
    out, m, total = ring_attention_update_reference(
        acc_attn_out,
        acc_softmax_max,
        acc_softmax_sum,
        cur_attn_out,
        cur_softmax_max,
        cur_softmax_sum,
        actual_seq_qlen,
        input_layout,
    )
    acc_attn_out.copy_(out)
    acc_softmax_max.copy_(m)
    acc_softmax_sum.copy_(total)
    return acc_attn_out, acc_softmax_max, acc_softmax_sum


# ----------------------------------------------------------------------------- backends

_warned = {"fallback": False}


def _warn_fallback() -> None:
    if not _warned["fallback"]:
        _warned["fallback"] = True
        warnings.warn(
            "usp_npu: the C++ ring_attention_update extension is not available "
            f"({extension_error()}); merging ring steps with the slower composed PyTorch formula",
            RuntimeWarning,
            stacklevel=3,
        )


def _npu_module_op() -> Callable[..., Triple] | None:
    """``torch_npu.npu_ring_attention_update`` if torch_npu is imported and has it."""
    mod = sys.modules.get("torch_npu")
    return getattr(mod, "npu_ring_attention_update", None) if mod is not None else None


def _npu_can_run(prev_out: torch.Tensor, prev_max: torch.Tensor) -> bool:
    """The device op wants 8 lanes of fp32 statistics and fp32/bf16/fp16 attn; TND on Atlas
    A2/A3 also N <= 256 and D <= 768 a multiple of 64 (else: the composed formula)."""
    if prev_max.shape[-1] != 8 or prev_max.dtype != torch.float32:
        return False
    if prev_max.dim() == 3:  # TND [T, N, 8] statistics
        n, d = prev_out.shape[1], prev_out.shape[2]
        return n <= 256 and d <= 768 and d % 64 == 0
    return True


def _npu_update(op, prev_out, prev_max, prev_sum, cur_out, cur_max, cur_sum, seq, layout):
    """Call the device op (cur attn cast up to prev's dtype, which the device op requires)."""
    if cur_out.dtype != prev_out.dtype:
        cur_out = cur_out.to(prev_out.dtype)
    kwargs = {"input_layout": layout}
    if layout == "TND":  # our statistics are token-major [T, N, K]
        if seq is None:  # the device op wants the prefix sums: one document
            seq = torch.tensor([0, prev_out.shape[0]], dtype=torch.int64, device=prev_out.device)
        kwargs.update(actual_seq_qlen=seq, input_softmax_layout="TND")
    return op(prev_out, prev_max, prev_sum, cur_out, cur_max, cur_sum, **kwargs)


def _backend(device: torch.device) -> str:
    """'npu', 'ext' or 'composed' for tensors on ``device``."""
    if device.type == "npu" and _npu_module_op() is not None:
        return "npu"
    if device.type in ("cpu", "meta") and extension_available():
        return "ext"
    return "composed"


def ring_attention_update(
    prev_attn_out: torch.Tensor,
    prev_softmax_max: torch.Tensor,
    prev_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor,
    cur_softmax_max: torch.Tensor,
    cur_softmax_sum: torch.Tensor,
    actual_seq_qlen: SeqLens = None,
    input_layout: str = "SBH",
) -> Triple:
    """Return the merged ``(attn_out, softmax_max, softmax_sum)`` as new tensors.

    Args:
        prev_attn_out: SBH ``[S, B, H]`` / TND ``[T, N, D]``; fp32, bf16, fp16 or fp64.
        prev_softmax_max, prev_softmax_sum: SBH ``[B, N, S, K]`` / TND ``[T, N, K]``, K in
            {1, 8}; fp32 (fp64 with fp64 attn).
        cur_attn_out: like ``prev_attn_out``, same dtype or narrower.
        cur_softmax_max, cur_softmax_sum: like the ``prev`` statistics.
        actual_seq_qlen: TND only, int64 prefix sums ``[0, ..., T]`` (validated, not needed).
        input_layout: ``"SBH"`` or ``"TND"``.

    Returns:
        ``attn_out`` (``prev``'s shape and dtype) and the statistics (``prev``'s shape).

    Raises:
        ValueError: inconsistent shapes, dtypes, layout, K, or a non-contiguous innermost dim.
    """
    seq = _as_seq(actual_seq_qlen)
    args = (prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max)
    geo = _check_inputs(*args, cur_softmax_sum, seq, input_layout)
    backend = _backend(prev_attn_out.device)
    if backend == "npu" and _npu_can_run(prev_attn_out, prev_softmax_max):
        return _npu_update(_npu_module_op(), *args, cur_softmax_sum, seq, input_layout)
    if backend == "ext":
        return torch.ops.usp_npu.ring_attention_update(
            *args, cur_softmax_sum, actual_seq_qlen=seq, input_layout=input_layout
        )
    if prev_attn_out.device.type == "cpu":
        _warn_fallback()
    if input_layout == "TND":
        _check_seq_values(seq, prev_attn_out.shape[0])
    return _composed(*args, cur_softmax_sum, input_layout, geo)


def ring_attention_update_(
    acc_attn_out: torch.Tensor,
    acc_softmax_max: torch.Tensor,
    acc_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor,
    cur_softmax_max: torch.Tensor,
    cur_softmax_sum: torch.Tensor,
    actual_seq_qlen: SeqLens = None,
    input_layout: str = "SBH",
) -> Triple:
    """In-place :func:`ring_attention_update`: writes into the ``acc_*`` tensors and returns them.

    The accumulators may be strided views (``out[s0:s1]``, ``stats[:, :, s0:s1]``); on the CPU
    extension nothing is allocated. Same shapes, dtypes and errors as the out-of-place op.
    """
    seq = _as_seq(actual_seq_qlen)
    args = (acc_attn_out, acc_softmax_max, acc_softmax_sum, cur_attn_out, cur_softmax_max)
    backend = _backend(acc_attn_out.device)
    if backend == "ext":
        _check_inputs(*args, cur_softmax_sum, seq, input_layout)
        torch.ops.usp_npu.ring_attention_update_(
            *args, cur_softmax_sum, actual_seq_qlen=seq, input_layout=input_layout
        )
        return acc_attn_out, acc_softmax_max, acc_softmax_sum
    if backend == "npu" and _npu_can_run(acc_attn_out, acc_softmax_max):
        _check_inputs(*args, cur_softmax_sum, seq, input_layout)
        out, m, total = _npu_update(_npu_module_op(), *args, cur_softmax_sum, seq, input_layout)
        acc_attn_out.copy_(out)
        acc_softmax_max.copy_(m)
        acc_softmax_sum.copy_(total)
        return acc_attn_out, acc_softmax_max, acc_softmax_sum
    if acc_attn_out.device.type == "cpu":
        _warn_fallback()
    return _composed_update_(*args, cur_softmax_sum, seq, input_layout)


def _fused_status(device_type: str) -> tuple[bool, str]:
    """Whether a fused merge exists for ``device_type``, and if not, why (with what to do)."""
    if device_type == "npu":
        if _npu_module_op() is not None:
            return True, ""
        return False, (
            "torch_npu is not imported or has no npu_ring_attention_update (torch_npu 2.14 has it)"
        )
    if device_type in ("cpu", "meta"):
        if extension_available():
            return True, ""
        return False, f"the C++ extension is not available: {extension_error()}"
    return False, (
        f"there is no fused ring_attention_update for device type {device_type!r} (only the "
        "CPU extension and torch_npu provide one)"
    )


def resolve_ring_update(fused: bool | None, device: torch.device | str) -> Callable[..., Triple]:
    """The in-place merge ``f(acc_out, acc_max, acc_sum, cur_out, cur_max, cur_sum)`` to use.

    Args:
        fused: ``None`` = auto (the fused op where one exists for ``device``, else the composed
            formula); ``True`` = the fused op or a ValueError (``--use-fused-ring-attention-update``
            was asked for); ``False`` = the composed formula.
        device: where the ring's tensors live (a ``torch.device`` or a string such as
            ``"npu:0"``, accepted even before torch_npu registers the device type).

    Returns:
        :func:`ring_attention_update_` or the composed in-place merge; both return the
        accumulators.
    """
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if fused is False:
        return _composed_update_
    ok, why = _fused_status(device_type)
    if ok:
        return ring_attention_update_
    if fused:
        raise ValueError(
            f"{_FLAG} was given but {why}. Build the extension with "
            "`pip install --no-build-isolation -e .` (or set USP_NPU_EXTENSION_PATH to a "
            f"CMake-built libusp_npu_ops.so), or drop {_FLAG} to use the composed formula."
        )
    if device_type == "cpu":
        _warn_fallback()
    return _composed_update_
