"""What autograd keeps for the backward: bytes of the tensors saved while a function runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, bytes saved for the backward during it)``.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``, once per storage: views of one
    buffer (q, k and v after a packed all-to-all, cached views of a gathered tensor) cost their
    buffer once, and a saved view keeps its whole buffer alive, as it does in memory.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())
