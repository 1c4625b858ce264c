"""Shared multi-rank gloo pools: spawned once per world size, reused by every test."""

from __future__ import annotations

import pytest

from usp_npu.testing import ProcessGroupPool

_POOLS: dict[int, ProcessGroupPool] = {}


@pytest.fixture(scope="session")
def pools():
    """``pools(world_size)`` -> a started :class:`ProcessGroupPool` (rebuilt if a call broke it)."""

    def get(world_size: int) -> ProcessGroupPool:
        pool = _POOLS.setdefault(world_size, ProcessGroupPool(world_size, timeout_s=90))
        return pool.start()

    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
