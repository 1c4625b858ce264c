"""Bytes the data path copies and fills, counted at the dispatcher (forward and backward apart).

``CopyCounter`` is a ``TorchDispatchMode``: every aten op that runs while it is active passes
through it, so it sees copies wherever they come from (``.contiguous()``, ``.to()``, ``cat``,
``torch.stack``, a ``reshape`` that cannot be a view, an accumulator's ``zeros``), including
those autograd runs in the backward. It counts the bytes each such op WRITES (its output, or
the tensor it fills in place). Ops a kernel runs internally (below the dispatcher) are not seen:
they are the kernel's business, not the data path's.

    counter = CopyCounter()
    with counter.phase("forward"):
        out = attention(q, k, v)
    with counter.phase("backward"):
        out.backward(dout)
    counter.bytes("forward"), counter.by_op("backward")
"""

from __future__ import annotations

import contextlib
import traceback
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

#: op overload packet -> the category it is reported under
COPY_OPS: dict[object, str] = {
    _aten.copy_: "copy_",
    _aten._to_copy: "to",
    _aten.clone: "clone",  # also .contiguous() and reshape of a non-viewable layout
    _aten.cat: "cat",
    _aten.stack: "stack",
    _aten.index_select: "index_select",
    _aten.repeat_interleave: "repeat_interleave",
    _aten.repeat: "repeat",
    _aten.zeros: "fill",
    _aten.zeros_like: "fill",
    _aten.ones: "fill",
    _aten.ones_like: "fill",
    _aten.full: "fill",
    _aten.full_like: "fill",
    _aten.new_zeros: "fill",
    _aten.new_ones: "fill",
    _aten.new_full: "fill",
    _aten.fill_: "fill",
    _aten.zero_: "fill",
}


def _nbytes(x: object) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _caller() -> str:
    """``module.py:line`` of the innermost frame in the library (outside this module)."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/usp_npu/" in path and not path.endswith("copy_counter.py"):
            return f"{path.rsplit('/usp_npu/', 1)[1]}:{frame.lineno}"
    return "?"


class CopyCounter(TorchDispatchMode):
    """Sum the bytes written by copy/fill ops, per phase and per category (see ``COPY_OPS``)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = "untagged"
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        #: (phase, category, shape, dtype, bytes, where) of every counted op, in order; ``where`` is
        #: the innermost ``usp_npu`` line that caused it (the "why" of a count)
        self.events: list[tuple[str, str, tuple[int, ...], torch.dtype, int, str]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[CopyCounter]:
        """Count into ``name`` while active (``forward``, ``backward``, ...)."""
        previous, self.current = self.current, name
        try:
            with self:
                yield self
        finally:
            self.current = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = COPY_OPS.get(func.overloadpacket)
        if category is not None:
            # in-place ops write their first argument; the others write their output
            written = (
                args[0] if func.overloadpacket in (_aten.copy_, _aten.fill_, _aten.zero_) else out
            )
            n = _nbytes(written)
            if n:
                self.counts[(self.current, category)] += n
                first = written[0] if isinstance(written, (list, tuple)) else written
                self.events.append(
                    (self.current, category, tuple(first.shape), first.dtype, n, _caller())
                )
        return out

    def bytes(self, phase: str | None = None) -> int:
        """Total bytes written by counted ops in ``phase`` (all phases when None)."""
        return sum(n for (p, _), n in self.counts.items() if phase is None or p == phase)

    def by_op(self, phase: str) -> dict[str, int]:
        """``{category: bytes}`` of one phase."""
        return {c: n for (p, c), n in sorted(self.counts.items()) if p == phase}
