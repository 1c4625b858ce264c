"""A CPU emulation of the torch_npu attention ops, to stand in for ``torch_npu`` in tests.

No machine in CI has an Ascend NPU, and ``import torch_npu`` without the CANN toolkit breaks
``import torch`` itself. This module re-implements in plain torch, on the CPU, the documented
contract (torch_npu 2.14 schemas) of ``npu_fusion_attention``, ``npu_fusion_attention_grad``
and ``npu_ring_attention_update``, as a module object that :func:`install` /
:func:`emulated_torch_npu` put in ``sys.modules["torch_npu"]``. Tensors stay on the CPU: nothing
pretends that an ``npu`` device exists; the module carries ``__version__ = "2.14.0-emulated"``.

Layouts (``head_num`` = query heads N; K/V may have fewer heads, GQA, head ``h`` of the query
uses K/V head ``h // (N / Nkv)``):

- ``BSH`` ``[B, S, N*D]``, ``SBH`` ``[S, B, N*D]``, ``BSND`` ``[B, S, N, D]``,
  ``BNSD`` ``[B, N, S, D]``: statistics ``[B, N, Sq, 8]``.
- ``TND`` ``[T, N, D]`` with ``actual_seq_qlen`` / ``actual_seq_kvlen``: cumulative document
  lengths WITHOUT a leading 0 (python ints; trailing zeros = documents that do not take part);
  attention is per document. Statistics ``[T, N, 8]``: by default stored per document
  head-major (document after document, each ``(N, s_doc, 8)``), or token-major with
  ``softmax_layout="TND"``.

Device limits that are refused as on the device: more than 256 query heads or a head dim
over 768; more than 1024 documents in one TND call; a TND ``atten_mask`` that masks a whole row
of a document (the varlen kernel has no invalid-row handling); ``npu_ring_attention_update``
in TND with N > 256 or D not a multiple of 64 up to 768 (Atlas A2/A3).

Masks (``atten_mask`` bool/uint8, True = masked out; ``None`` = full attention whatever
``sparse_mode``/``pre_tockens``/``next_tockens`` say, as on the device):
``sparse_mode`` 0: the given mask AND the band ``-pre <= j - i <= next`` (top-left anchored);
1: the given mask as is; 2: causal anchored top-left; 3: causal anchored bottom-right;
4: the band anchored bottom-right. Modes 2-4 take only the compressed 2048x2048
``triu(diagonal=1)`` mask (bool or uint8) and reject any other. For TND the modes apply per
document and a 0/1 mask ``[maxSq, maxSkv]`` is cut to ``[:sq_doc, :skv_doc]``. Prefix
(5, 6) and varlen-split (7, 8) modes, ``pse``, ``prefix`` and ``padding_mask`` are not emulated.

Choices where the emulation cannot copy the device:

- Precision: fp32 for fp16/bf16/fp32 inputs (statistics fp32). fp64 inputs, which the device
  rejects, are accepted so that tests can compare tightly; they keep fp64 statistics.
- Rows that see no key: ``out = 0``, ``softmax_max = -inf``, ``softmax_sum = 0`` (the convention
  of ``usp_npu.kernels.base``), never NaN. (The device, with invalid-row handling on, reports
  the finite pair ``(finfo.min, finfo.max)``; both merge to the same result.)
- Dropout (``keep_prob < 1``): ``P * keep / keep_prob``, the keep mask a flat vector of
  ``numels`` Bernoulli(keep_prob) draws laid out ``[B, N, Sq, Skv]`` (TND: ``[N, sq, skv]`` per
  document) from a CPU generator seeded by a mix of ``(seed, offset)``
  (:func:`dropout_keep_mask`). ``seed = torch.initial_seed()``; ``offset`` advances by
  ``numels`` per call and restarts when the seed changes or on :func:`reset_dropout_state`.
- The grad uses the ``softmax_max``/``softmax_sum``/``attention_in`` it is GIVEN, as the device
  does (``P = exp(s - max) / sum``, ``D = rowsum(dy * attention_in)``): wrong ones, wrong grads.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

from usp_npu.testing.npu_emulation.fusion_attention import (
    EMULATED_VERSION,
    dropout_keep_mask,
    npu_fusion_attention,
    npu_fusion_attention_grad,
    reset_dropout_state,
)
from usp_npu.testing.npu_emulation.ring_update import npu_ring_attention_update

__all__ = [  # noqa: RUF022 -- grouped: constants, installation, ops, dropout helpers
    "EMULATED_VERSION", "emulated_torch_npu", "install", "make_module", "uninstall",
    "npu_fusion_attention", "npu_fusion_attention_grad", "npu_ring_attention_update",
    "dropout_keep_mask", "reset_dropout_state",
]  # fmt: skip


def make_module() -> types.ModuleType:
    """A fresh module object named ``torch_npu`` that carries the emulated ops."""
    mod = types.ModuleType("torch_npu", "CPU emulation of torch_npu attention ops (usp_npu).")
    mod.__version__ = EMULATED_VERSION
    mod.npu_fusion_attention = npu_fusion_attention
    mod.npu_fusion_attention_grad = npu_fusion_attention_grad
    mod.npu_ring_attention_update = npu_ring_attention_update
    mod.USP_NPU_EMULATED = True
    return mod


_saved: list[types.ModuleType | None] = []


def install() -> types.ModuleType:
    """Put a fresh emulation in ``sys.modules["torch_npu"]`` and return it (nests)."""
    _saved.append(sys.modules.get("torch_npu"))
    mod = make_module()
    sys.modules["torch_npu"] = mod
    return mod


def uninstall() -> None:
    """Undo the latest :func:`install`: restore whatever ``sys.modules["torch_npu"]`` held."""
    if not _saved:
        raise RuntimeError("npu_emulation.uninstall() without a matching install()")
    previous = _saved.pop()
    if previous is None:
        sys.modules.pop("torch_npu", None)
    else:
        sys.modules["torch_npu"] = previous


@contextlib.contextmanager
def emulated_torch_npu() -> Iterator[types.ModuleType]:
    """``with emulated_torch_npu() as torch_npu:`` -- the emulation imports as ``torch_npu``."""
    mod = install()
    try:
        yield mod
    finally:
        uninstall()
