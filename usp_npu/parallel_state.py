"""The 2D context-parallel mesh: CP, Ulysses and ring process groups (REFERENCE.md section 2).

Megatron rank order tp-cp-dp-pp::

    global = pp_idx * (world / pp) + dp_idx * (tp * cp) + cp_idx * tp + tp_idx
    cp_idx = ring_rank * u + ulysses_rank

Ulysses groups are contiguous runs of ``u`` CP members (one node: all-to-all wants the fast
links); ring groups take every ``u``-th member. Every rank creates every group in the same order
(HCCL and gloo both require it).

The result is a :class:`ContextParallelMesh` value. ``initialize_context_parallel`` also makes it
the *current* mesh that the module-level getters and the attention functions use by default; code
that runs two models with different meshes passes ``mesh=`` explicitly instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from usp_npu.config import ContextParallelConfig

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ContextParallelMesh:
    """This rank's view of the CP mesh. ``*_ranks`` are global ranks in group order."""

    config: ContextParallelConfig
    tensor_model_parallel_size: int
    cp_group: ProcessGroup
    cp_ranks: tuple[int, ...]
    ulysses_group: ProcessGroup
    ulysses_ranks: tuple[int, ...]
    ring_group: ProcessGroup
    ring_ranks: tuple[int, ...]
    #: second communicator over ``ring_ranks`` (``--use-cp-send-recv-overlap``), else None
    ring_overlap_group: ProcessGroup | None
    rank: int
    #: double ring (``--cp-window-size w > 1``): this rank's window of ``w`` consecutive ring
    #: ranks (inner ring) and the ring ranks at its position in every window (outer ring)
    ring_inner_group: ProcessGroup | None = None
    ring_inner_ranks: tuple[int, ...] = ()
    ring_outer_group: ProcessGroup | None = None
    ring_outer_ranks: tuple[int, ...] = ()
    #: second communicators over the inner / outer rings (``--use-cp-send-recv-overlap``)
    ring_inner_overlap_group: ProcessGroup | None = None
    ring_outer_overlap_group: ProcessGroup | None = None

    @property
    def cp_rank(self) -> int:
        return self.cp_ranks.index(self.rank)

    @property
    def cp_size(self) -> int:
        return len(self.cp_ranks)

    @property
    def ulysses_rank(self) -> int:
        return self.ulysses_ranks.index(self.rank)

    @property
    def ulysses_size(self) -> int:
        return len(self.ulysses_ranks)

    @property
    def ring_rank(self) -> int:
        return self.ring_ranks.index(self.rank)

    @property
    def ring_size(self) -> int:
        return len(self.ring_ranks)


def mesh_rank_lists(
    world_size: int, tp: int, cp: int, u: int, pp: int = 1
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """All CP, Ulysses and ring groups as global-rank lists, in creation order.

    Pure function (no communication): the single source of the rank arithmetic, also used by
    tests and ``usp-npu plan``.
    """
    if world_size % (tp * cp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--context-parallel-size {cp} x pipeline size {pp}"
        )
    if cp % u != 0:
        raise ValueError(f"Ulysses degree {u} must divide --context-parallel-size {cp}")
    per_stage = world_size // pp
    dp = per_stage // (tp * cp)
    cp_groups, ulysses_groups, ring_groups = [], [], []
    for pp_idx in range(pp):
        for dp_idx in range(dp):
            start = pp_idx * per_stage + dp_idx * tp * cp
            for tp_idx in range(tp):
                members = list(range(start + tp_idx, start + tp * cp, tp))
                cp_groups.append(members)
                ulysses_groups += [members[i : i + u] for i in range(0, cp, u)]
                ring_groups += [members[j::u] for j in range(u)]
    return cp_groups, ulysses_groups, ring_groups


def double_ring_rank_lists(
    ring_groups: list[list[int]], window: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Inner (windows of ``window`` consecutive ring ranks) and outer (same position in every
    window) rings of every ring group, in creation order. Pure function, like
    :func:`mesh_rank_lists`."""
    inner, outer = [], []
    for ring in ring_groups:
        if len(ring) % window:
            raise ValueError(f"--cp-window-size {window} must divide the ring degree {len(ring)}")
        inner += [ring[i : i + window] for i in range(0, len(ring), window)]
        outer += [ring[p::window] for p in range(window)]
    return inner, outer


# Groups are cached by (purpose, ranks, timeout): re-initialising with another config reuses the groups
# whose members did not change. Every rank walks the same creation order, so caches agree.
_GROUPS: dict[tuple[str, tuple[int, ...], timedelta | None], ProcessGroup] = {}
_CURRENT: ContextParallelMesh | None = None


def _group(kind: str, ranks: list[int], timeout: timedelta | None) -> ProcessGroup:
    key = (kind, tuple(ranks), timeout)
    if key not in _GROUPS:
        kwargs = {"timeout": timeout} if timeout is not None else {}
        _GROUPS[key] = dist.new_group(ranks=list(ranks), **kwargs)
    return _GROUPS[key]


def initialize_context_parallel(
    config: ContextParallelConfig,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    timeout: timedelta | None = None,
) -> ContextParallelMesh:
    """Build (or reuse) the CP, Ulysses and ring groups and make this mesh the current one.

    Call after ``torch.distributed.init_process_group`` on every rank with the same arguments.
    ``timeout`` bounds every collective on the new groups (a failed peer raises, never hangs).
    """
    global _CURRENT
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_context_parallel needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    problems = config.settings_errors() + config.parallel_errors(
        tensor_model_parallel_size, world, pipeline_model_parallel_size
    )
    if problems:
        raise ValueError("invalid context-parallel settings:\n  - " + "\n  - ".join(problems))
    cp_lists, uly_lists, ring_lists = mesh_rank_lists(
        world,
        tensor_model_parallel_size,
        config.context_parallel_size,
        config.ulysses_degree,
        pipeline_model_parallel_size,
    )
    mine: dict[str, tuple[ProcessGroup, tuple[int, ...]]] = {}
    for kind, lists in (("cp", cp_lists), ("ulysses", uly_lists), ("ring", ring_lists)):
        for ranks in lists:
            group = _group(kind, ranks, timeout)
            if rank in ranks:
                mine[kind] = (group, tuple(ranks))
    overlap = None
    if config.use_cp_send_recv_overlap:
        for ranks in ring_lists:
            group = _group("ring-overlap", ranks, timeout)
            if rank in ranks:
                overlap = group
    double: dict[str, tuple[ProcessGroup | None, tuple[int, ...]]] = {}
    if config.cp_window_size > 1:  # every rank creates every window's groups, in one order
        inner_lists, outer_lists = double_ring_rank_lists(ring_lists, config.cp_window_size)
        kinds = [("ring_inner", inner_lists), ("ring_outer", outer_lists)]
        if config.use_cp_send_recv_overlap:
            kinds += [("ring_inner_overlap", inner_lists), ("ring_outer_overlap", outer_lists)]
        for kind, lists in kinds:
            for ranks in lists:
                group = _group(kind, ranks, timeout)
                if rank in ranks:
                    double[kind] = (group, tuple(ranks))
    _CURRENT = ContextParallelMesh(
        config=config,
        tensor_model_parallel_size=tensor_model_parallel_size,
        cp_group=mine["cp"][0],
        cp_ranks=mine["cp"][1],
        ulysses_group=mine["ulysses"][0],
        ulysses_ranks=mine["ulysses"][1],
        ring_group=mine["ring"][0],
        ring_ranks=mine["ring"][1],
        ring_overlap_group=overlap,
        rank=rank,
        ring_inner_group=double.get("ring_inner", (None, ()))[0],
        ring_inner_ranks=double.get("ring_inner", (None, ()))[1],
        ring_outer_group=double.get("ring_outer", (None, ()))[0],
        ring_outer_ranks=double.get("ring_outer", (None, ()))[1],
        ring_inner_overlap_group=double.get("ring_inner_overlap", (None, ()))[0],
        ring_outer_overlap_group=double.get("ring_outer_overlap", (None, ()))[0],
    )
    return _CURRENT


def destroy_context_parallel() -> None:
    """Destroy every group this module created and forget the current mesh."""
    global _CURRENT
    for group in _GROUPS.values():
        dist.destroy_process_group(group)
    _GROUPS.clear()
    _CURRENT = None


def is_initialized() -> bool:
    return _CURRENT is not None


def get_mesh() -> ContextParallelMesh:
    """The current mesh; raises a RuntimeError explaining the set-up when there is none."""
    if _CURRENT is None:
        raise RuntimeError(
            "usp_npu context parallelism is not initialised: call "
            "usp_npu.initialize_context_parallel(config) after torch.distributed.init_process_group"
        )
    return _CURRENT


def get_context_parallel_group() -> ProcessGroup:
    return get_mesh().cp_group


def get_context_parallel_rank() -> int:
    return get_mesh().cp_rank


def get_context_parallel_world_size() -> int:
    return get_mesh().cp_size


def get_context_parallel_global_ranks() -> tuple[int, ...]:
    return get_mesh().cp_ranks


def get_ulysses_group() -> ProcessGroup:
    return get_mesh().ulysses_group


def get_ulysses_rank() -> int:
    return get_mesh().ulysses_rank


def get_ulysses_world_size() -> int:
    return get_mesh().ulysses_size


def get_ring_group() -> ProcessGroup:
    return get_mesh().ring_group


def get_ring_rank() -> int:
    return get_mesh().ring_rank


def get_ring_world_size() -> int:
    return get_mesh().ring_size


def get_ring_inner_group() -> ProcessGroup | None:
    """Double ring: this rank's window (``--cp-window-size`` consecutive ring ranks), else None."""
    return get_mesh().ring_inner_group


def get_ring_outer_group() -> ProcessGroup | None:
    """Double ring: the ring ranks at this rank's window position, one per window, else None."""
    return get_mesh().ring_outer_group
