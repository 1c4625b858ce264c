"""Release the process groups a block of code created, for long-lived ranks that run many jobs.

A gloo process group holds a TCP connection to every peer, an event loop and worker threads
until it is destroyed. Megatron-core's ``initialize_model_parallel`` builds dozens of groups per
call (tensor, data, context, pipeline, embedding, expert, ... and gloo copies of some) and its
``destroy_model_parallel`` only forgets them, so a rank that initialises Megatron again and again
(a test pool, a notebook, a sweep) gains about 35 groups per call at world 4 and runs out of
file descriptors after a few dozen calls (at the common limit of 1024), after which gloo hangs
instead of failing. Wrapping each job in :func:`released_process_groups` keeps the count flat.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from torch.distributed import distributed_c10d

from usp_npu import parallel_state


def live_process_groups() -> list[dist.ProcessGroup]:
    """The process groups this rank belongs to and has not destroyed (the default one included)."""
    return list(distributed_c10d._world.pg_map)


@contextmanager
def released_process_groups() -> Iterator[None]:
    """Destroy, on exit, every process group this rank joined inside the block.

    usp_npu's own context-parallel groups are kept: :func:`usp_npu.initialize_context_parallel`
    caches and reuses them (one set per rank list and timeout), so they do not accumulate.
    Call it on every rank around the same code, after the block's last collective.
    """
    before = set(live_process_groups())
    try:
        yield
    finally:
        cached = set(parallel_state._GROUPS.values())
        for group in live_process_groups():
            if group not in before and group not in cached:
                dist.destroy_process_group(group)
