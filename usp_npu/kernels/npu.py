"""The Ascend block kernel: ``torch_npu.npu_fusion_attention`` and its grad.

Implements :class:`usp_npu.kernels.base.BlockKernel` on the torch_npu fused attention ops.
``torch_npu`` is imported when a block is computed, never at ``import usp_npu`` time: without
the CANN toolkit the import fails (and can break ``import torch``), so nothing else may need it.
Tests put :mod:`usp_npu.testing.npu_emulation` in its place.

Layouts: the canonical block ``[S, B, N, D]`` goes to the op either as ``SBH``
(``reshape(S, B, N * D)``, free for contiguous tensors) or as ``BNSD`` (a permute and a copy:
MindSpeed's ``--megatron-cp-in-bnsd``, faster on the device). Statistics stay in the op's own
form, fp32 ``[B, N, S, 8]``, whatever the layout: the ring merges them as they are.

Masks (:class:`~usp_npu.kernels.base.BlockMask`):

- full: ``atten_mask=None``, ``sparse_mode=0``.
- causal (top-left anchored): the compressed 2048x2048 ``triu(diagonal=1)`` bool mask, built once
  per device and cached, with ``sparse_mode=3`` (bottom-right causal) on square blocks, which is
  what the ring asks for and what the device is tuned for, and ``sparse_mode=2`` (top-left) on
  the rare non-square block, so the meaning of ``causal`` never changes with the shape.
- explicit ``[sq, sk]`` bool mask: passed as is with ``sparse_mode=1``. When some row is masked
  completely, ``inner_precise=2`` turns on the device's invalid-row handling, without which such
  a row is computed as if nothing were masked.

Packed blocks (``cu_seqlens_q``/``cu_seqlens_kv``, several documents): the op runs in ``TND``
(``[T, N, D]``, batch 1) with ``actual_seq_qlen``/``actual_seq_kvlen`` = the cumulative lengths
WITHOUT the leading 0; causal = the compressed mask with ``sparse_mode=3`` (every document of an
own block is square), full = no mask, ``sparse_mode=0``. The op's TND statistics ``[T, N, 8]`` are
stored per document head-major (``(N, s_doc, 8)`` blocks one after the other: the default
``softmax_layout``, which every TND-capable torch_npu has); this kernel converts them to the
canonical ``[1, N, T, 8]`` (token-major per head) after the forward and back before the grad, so
the ring's TND merge reads them token-major (``input_softmax_layout="TND"``). One document
spanning the whole block takes the plain path above. The device takes at most
``MAX_TND_DOCUMENTS`` (1024) documents per call; a block with more is computed in groups.

Dropout: ``keep_prob < 1`` makes the op draw its mask from (seed, offset); the forward returns
them as :class:`NpuRngState`, which the caller keeps per block and hands back to ``backward`` so
the grad replays the same mask. The backward gets the FINAL output and statistics of the ring
(FlashAttention-2 decomposition), so the per-block gradients add up exactly.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from usp_npu.kernels.base import BlockMask, check_block_shapes, documents

__all__ = ["NpuBlockKernel", "NpuRngState"]

_LAYOUTS = ("SBH", "BNSD")
#: documents per TND call the device takes (torch_npu docs: actual_seq_qlen holds up to 1K
#: entries in the varlen case); blocks with more are computed in several calls
MAX_TND_DOCUMENTS = 1024
_COMPRESSED = 2048
_FWD_ARGS = ("atten_mask", "scale", "keep_prob", "sparse_mode", "inner_precise")
_BWD_ARGS = (
    "atten_mask", "softmax_max", "softmax_sum", "attention_in", "scale_value", "keep_prob",
    "seed", "offset", "numels", "sparse_mode", "inner_precise",
)  # fmt: skip
_causal_masks: dict[tuple[str, int | None], torch.Tensor] = {}
_checked_ops: dict[int, tuple[ModuleType, dict[str, bool]]] = {}


@dataclass(frozen=True)
class NpuRngState:
    """The dropout RNG state of one block as ``npu_fusion_attention`` returns it."""

    seed: int
    offset: int
    numels: int


def _torch_npu() -> ModuleType:
    """Import torch_npu now, or explain how to get it (RuntimeError)."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or OSError for a missing CANN library
        raise RuntimeError(
            f"the 'npu' attention backend needs torch_npu, which could not be imported ({exc}). "
            "On an Ascend host install the CANN toolkit (and `source "
            "/usr/local/Ascend/ascend-toolkit/set_env.sh`), then the torch_npu wheel matching "
            "your torch version (`pip install torch-npu==<torch version>`, torch_npu >= 2.1). "
            "On CPU or CUDA use `--attention-backend torch` instead."
        ) from exc


def _check_ops(mod: ModuleType) -> dict[str, bool]:
    """Fail clearly when this torch_npu's attention ops lack the arguments used here.

    Returns, per op, whether its signature could be verified (builtins may have none: then a
    TypeError from the call is taken as the sign of an old torch_npu).
    """
    cached = _checked_ops.get(id(mod))
    if cached is not None and cached[0] is mod:  # identity, not just id(): ids get reused
        return cached[1]
    verified = {}
    for name, needed in (
        ("npu_fusion_attention", _FWD_ARGS),
        ("npu_fusion_attention_grad", _BWD_ARGS),
    ):
        op = getattr(mod, name, None)
        if op is None:
            raise RuntimeError(f"torch_npu has no {name}: the 'npu' backend needs torch_npu >= 2.1")
        try:
            params = inspect.signature(op).parameters
        except (TypeError, ValueError):  # a builtin without a signature: rely on the call
            verified[name] = False
            continue
        verified[name] = True
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        missing = [a for a in needed if a not in params]
        if missing:
            raise RuntimeError(
                f"torch_npu.{name} takes no {', '.join(missing)}: the 'npu' attention backend "
                "needs torch_npu >= 2.1 (sparse_mode and the softmax statistics); upgrade it"
            )
    _checked_ops[id(mod)] = (mod, verified)
    return verified


def _call(mod: ModuleType, name: str, *args, **kwargs):
    """``torch_npu.<name>(*args, **kwargs)``, naming the version needed when it cannot be called."""
    verified = _check_ops(mod)
    try:
        return getattr(mod, name)(*args, **kwargs)
    except TypeError as exc:
        if verified[name]:
            raise
        raise RuntimeError(
            f"torch_npu.{name} rejected the arguments of the 'npu' attention backend ({exc}); "
            "it needs torch_npu >= 2.1 (sparse_mode, softmax_max/softmax_sum, scale_value)"
        ) from exc


def _groups(cu_q: Sequence[int], cu_kv: Sequence[int]):
    """``(q rows, kv rows, group cu_q, group cu_kv)`` per run of ``MAX_TND_DOCUMENTS`` documents.

    The device takes at most that many documents per varlen call; each group's rows are
    contiguous, so a block with more documents is several calls, concatenated.
    """
    n = len(cu_q) - 1
    for a in range(0, n, MAX_TND_DOCUMENTS):
        b = min(a + MAX_TND_DOCUMENTS, n)
        q0, k0 = cu_q[a], cu_kv[a]
        yield (
            slice(q0, cu_q[b]),
            slice(k0, cu_kv[b]),
            [x - q0 for x in cu_q[a : b + 1]],
            [x - k0 for x in cu_kv[a : b + 1]],
        )


def _tnd(x: torch.Tensor) -> torch.Tensor:
    """Canonical ``[T, 1, N, D]`` (batch 1) -> the op's ``[T, N, D]``."""
    if x.shape[1] != 1:
        raise ValueError(f"a packed block needs batch 1, got shape {tuple(x.shape)}")
    return x[:, 0].contiguous()


def _causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask of sparse modes 2/3, one per device."""
    key = (device.type, device.index)
    mask = _causal_masks.get(key)
    if mask is None:
        mask = torch.ones(_COMPRESSED, _COMPRESSED, dtype=torch.bool, device=device).triu(1)
        _causal_masks[key] = mask
    return mask


class NpuBlockKernel:
    """Block attention on Ascend through ``torch_npu.npu_fusion_attention`` (see module doc).

    ``layout``: ``"SBH"`` or ``"BNSD"``, the layout handed to the op. ``keep_prob``: attention
    dropout keep probability (1 = no dropout).
    """

    name = "npu"
    stat_lanes = 8
    #: input dtypes the device kernel takes (no float64 on Ascend)
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, layout: str = "SBH", keep_prob: float = 1.0) -> None:
        if layout not in _LAYOUTS:
            raise ValueError(f"NpuBlockKernel layout must be one of {_LAYOUTS}, got {layout!r}")
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
        self.layout = layout
        self.keep_prob = float(keep_prob)

    @staticmethod
    def ensure_available() -> None:
        """Import torch_npu and check its ops now (RuntimeError saying what is missing).

        Lets a caller fail on every rank before the first collective rather than in a block.
        """
        _check_ops(_torch_npu())

    def __repr__(self) -> str:
        return f"NpuBlockKernel(layout={self.layout!r}, keep_prob={self.keep_prob})"

    # -- layout conversions -------------------------------------------------------------------

    def _to_op(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical ``[S, B, N, D]`` -> ``[S, B, N*D]`` (SBH) or ``[B, N, S, D]`` (BNSD)."""
        if self.layout == "SBH":  # a view for contiguous blocks: no copy
            return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).contiguous()
        return x.permute(1, 2, 0, 3).contiguous()

    def _from_op(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_to_op`, shaped like the canonical ``like``."""
        if self.layout == "SBH":
            return x.reshape(like.shape)
        return x.permute(2, 0, 1, 3).contiguous()

    @staticmethod
    def _mask_args(q: torch.Tensor, k: torch.Tensor, mask: BlockMask) -> dict:
        """``atten_mask``/``sparse_mode``/``inner_precise`` for a block mask."""
        sq, sk = q.shape[0], k.shape[0]
        if mask.causal:
            mode = 3 if sq == sk else 2
            return {"atten_mask": _causal_mask(q.device), "sparse_mode": mode, "inner_precise": 0}
        if mask.mask is None:
            return {"atten_mask": None, "sparse_mode": 0, "inner_precise": 0}
        m = mask.mask
        if tuple(m.shape) != (sq, sk):
            raise ValueError(
                f"block mask shape {tuple(m.shape)} does not match the block ({sq}, {sk})"
            )
        m = m.to(device=q.device, dtype=torch.bool)
        precise = 2 if bool(m.all(dim=-1).any()) else 0  # rows that see no key
        return {"atten_mask": m.contiguous(), "sparse_mode": 1, "inner_precise": precise}

    @staticmethod
    def _check_dtype(q: torch.Tensor) -> None:
        if q.dtype not in NpuBlockKernel.supported_dtypes:
            raise TypeError(
                f"the 'npu' attention backend takes float16, bfloat16 or float32, got {q.dtype}: "
                "Ascend has no float64 attention (use `--attention-backend torch` for float64)"
            )

    # -- packed (TND) blocks ------------------------------------------------------------------

    @staticmethod
    def _tnd_args(q, k, mask: BlockMask, cu_q, cu_kv) -> dict:
        """Layout, document lengths and mask arguments of a packed block."""
        if mask.mask is not None:
            raise ValueError("a packed block takes a causal or full mask, not an explicit one")
        args = {"actual_seq_qlen": [int(x) for x in cu_q[1:]]}
        args["actual_seq_kvlen"] = [int(x) for x in cu_kv[1:]]
        if mask.causal:
            square = all(a == b for a, b in zip(cu_q, cu_kv, strict=True))
            args.update(atten_mask=_causal_mask(q.device), sparse_mode=3 if square else 2)
        else:
            args.update(atten_mask=None, sparse_mode=0)
        return args

    @staticmethod
    def _stats_to_canonical(x: torch.Tensor, cu: Sequence[int]) -> torch.Tensor:
        """Op TND statistics (per document ``(N, s, 8)`` blocks) -> ``[1, N, T, 8]``."""
        _, n, lanes = x.shape
        flat, parts = x.reshape(-1), []
        for a, b in itertools.pairwise(cu):
            parts.append(flat[a * n * lanes : b * n * lanes].view(n, b - a, lanes))
        return torch.cat(parts, dim=1).unsqueeze(0)

    @staticmethod
    def _stats_to_op(x: torch.Tensor, cu: Sequence[int]) -> torch.Tensor:
        """Inverse of :meth:`_stats_to_canonical`: ``[1, N, T, 8]`` -> the op's TND layout."""
        _, n, t, lanes = x.shape
        parts = [x[0, :, a:b].reshape(-1) for a, b in itertools.pairwise(cu)]
        return torch.cat(parts).view(t, n, lanes)

    def _tnd_forward(self, q, k, v, scale, mask, cu_q, cu_kv):
        """Packed forward: one TND call per group of at most ``MAX_TND_DOCUMENTS`` documents."""
        outs, maxes, sums, rngs = [], [], [], []
        for qs, ks, gq, gk in _groups(cu_q, cu_kv):
            res = _call(
                _torch_npu(), "npu_fusion_attention",
                _tnd(q[qs]), _tnd(k[ks]), _tnd(v[ks]), q.shape[2], "TND", scale=scale,
                keep_prob=self.keep_prob, inner_precise=0,
                **self._tnd_args(q, k, mask, gq, gk),
            )  # fmt: skip
            outs.append(res[0].unsqueeze(1))
            maxes.append(self._stats_to_canonical(res[1], gq))
            sums.append(self._stats_to_canonical(res[2], gq))
            rngs.append(NpuRngState(int(res[4]), int(res[5]), int(res[6])))
        rng = (rngs[0] if len(rngs) == 1 else tuple(rngs)) if self.keep_prob < 1.0 else None
        if len(outs) == 1:
            return outs[0], maxes[0], sums[0], rng
        return torch.cat(outs), torch.cat(maxes, 2), torch.cat(sums, 2), rng

    def _tnd_backward(self, dout, q, k, v, out, smax, ssum, scale, mask, rng_state, cu_q, cu_kv):
        """Packed grad, grouped as in :meth:`_tnd_forward` (``rng_state``: one per group)."""
        groups = list(_groups(cu_q, cu_kv))
        if isinstance(rng_state, tuple):
            rngs = list(rng_state)
        elif isinstance(rng_state, NpuRngState):
            rngs = [rng_state]
        else:  # no dropout
            rngs = [NpuRngState(0, 0, 0)] * len(groups)
        if len(rngs) != len(groups):
            raise ValueError(f"{len(groups)} document groups but {len(rngs)} dropout RNG states")
        dq, dk, dv = [], [], []
        for (qs, ks, gq, gk), rng in zip(groups, rngs, strict=True):
            grads = _call(
                _torch_npu(), "npu_fusion_attention_grad",
                _tnd(q[qs]), _tnd(k[ks]), _tnd(v[ks]), _tnd(dout[qs]), q.shape[2], "TND",
                softmax_max=self._stats_to_op(smax[:, :, qs], gq),
                softmax_sum=self._stats_to_op(ssum[:, :, qs], gq), attention_in=_tnd(out[qs]),
                scale_value=scale, keep_prob=self.keep_prob, seed=rng.seed, offset=rng.offset,
                numels=rng.numels, inner_precise=0, **self._tnd_args(q, k, mask, gq, gk),
            )  # fmt: skip
            dq.append(grads[0].unsqueeze(1))
            dk.append(grads[1].unsqueeze(1))
            dv.append(grads[2].unsqueeze(1))
        if len(groups) == 1:
            return dq[0], dk[0], dv[0]
        return torch.cat(dq), torch.cat(dk), torch.cat(dv)

    # -- the BlockKernel protocol -------------------------------------------------------------

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        mask: BlockMask,
        cu_seqlens_q: Sequence[int] | None = None,
        cu_seqlens_kv: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, NpuRngState | None]:
        """``(out [sq, B, Nq, D], softmax_max, softmax_sum [B, Nq, sq, 8] fp32, rng_state)``."""
        check_block_shapes(q, k, v)
        self._check_dtype(q)
        docs = documents(cu_seqlens_q, cu_seqlens_kv, q.shape[0], k.shape[0])
        if docs is None:
            res = _call(
                _torch_npu(), "npu_fusion_attention",
                self._to_op(q), self._to_op(k), self._to_op(v), q.shape[2], self.layout,
                scale=scale, keep_prob=self.keep_prob, **self._mask_args(q, k, mask),
            )  # fmt: skip
            out, smax, ssum = self._from_op(res[0], q), res[1], res[2]
        else:
            return self._tnd_forward(q, k, v, scale, mask, cu_seqlens_q, cu_seqlens_kv)
        rng = NpuRngState(int(res[4]), int(res[5]), int(res[6])) if self.keep_prob < 1.0 else None
        return out, smax, ssum, rng

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        softmax_max: torch.Tensor,
        softmax_sum: torch.Tensor,
        *,
        scale: float,
        mask: BlockMask,
        rng_state: object = None,
        cu_seqlens_q: Sequence[int] | None = None,
        cu_seqlens_kv: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` of this block from the FINAL ``out`` and statistics of the ring.

        ``dout``/``out`` ``[sq, B, Nq, D]``; statistics ``[B, Nq, sq, 8]`` fp32; ``rng_state``:
        what :meth:`forward` returned for this block (dropout only): an :class:`NpuRngState`,
        or a tuple of them for a packed block computed in several groups.
        """
        check_block_shapes(q, k, v)
        self._check_dtype(q)
        replay = rng_state if isinstance(rng_state, tuple) else (rng_state,)
        if self.keep_prob < 1.0 and not all(isinstance(r, NpuRngState) for r in replay):
            raise ValueError(
                "NpuBlockKernel.backward with dropout needs the NpuRngState that forward "
                f"returned for this block, got {rng_state!r}"
            )
        rng = rng_state if isinstance(rng_state, NpuRngState) else NpuRngState(0, 0, 0)
        docs = documents(cu_seqlens_q, cu_seqlens_kv, q.shape[0], k.shape[0])
        if docs is not None:
            return self._tnd_backward(
                dout, q, k, v, out, softmax_max, softmax_sum, scale, mask, rng_state,
                cu_seqlens_q, cu_seqlens_kv,
            )  # fmt: skip
        grads = _call(
            _torch_npu(), "npu_fusion_attention_grad",
            self._to_op(q), self._to_op(k), self._to_op(v), self._to_op(dout), q.shape[2],
            self.layout, softmax_max=softmax_max.contiguous(),
            softmax_sum=softmax_sum.contiguous(), attention_in=self._to_op(out),
            scale_value=scale, keep_prob=self.keep_prob,
            seed=rng.seed, offset=rng.offset, numels=rng.numels, **self._mask_args(q, k, mask),
        )  # fmt: skip
        # 4-tuple (dq, dk, dv, dpse) in older releases, 5 (+ dsink) in newer: index 0..2
        return self._from_op(grads[0], q), self._from_op(grads[1], k), self._from_op(grads[2], v)
