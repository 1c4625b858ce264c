"""Bytes autograd holds for the backward, measured with ``saved_tensors_hooks``.

Every tensor a node saves passes through the pack hook. Several saved tensors may share one
storage (q, k and v as views of one all-to-all buffer, or a leaf saved by two nodes), so the
measure is the bytes of the distinct storages they keep alive: what the backward actually holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class SavedTensorBytes:
    """``with saved.recording(): out = f(x)`` -> ``saved.bytes``, ``saved.tensors`` (shape, dtype)."""

    def __init__(self) -> None:
        self._storages: dict[int, int] = {}
        self.tensors: list[tuple[tuple[int, ...], torch.dtype]] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedTensorBytes]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            self._storages[storage.data_ptr()] = storage.nbytes()
            self.tensors.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self

    @property
    def bytes(self) -> int:
        """Bytes of the distinct storages the saved tensors keep alive."""
        return sum(self._storages.values())
