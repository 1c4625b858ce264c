"""Do usp_npu's mesh and megatron-core's parallel_state agree on who is in which CP group?

Both use Megatron's rank order tp-cp-(ep)-dp-pp, so for the same (tp, cp, dp, pp) the CP groups
must be identical, member for member and in the same order (the CP rank decides which tokens a
rank holds: Megatron splits the batch and the RoPE table by it). Megatron's groups come from its
own ``RankGenerator`` (pure arithmetic) or, at run time, from its process groups.
"""

from __future__ import annotations

import torch.distributed as dist

from usp_npu.parallel_state import ContextParallelMesh, get_mesh, mesh_rank_lists


def megatron_cp_groups(
    world_size: int, tp: int, cp: int, pp: int = 1, order: str = "tp-cp-ep-dp-pp"
) -> list[list[int]]:
    """Every CP group megatron-core's ``initialize_model_parallel`` builds, from its RankGenerator."""
    from megatron.core.parallel_state import RankGenerator

    if world_size % (tp * cp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tp {tp} x cp {cp} x pp {pp}")
    dp = world_size // (tp * cp * pp)
    return [
        list(g)
        for g in RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order).get_ranks("cp")
    ]


def cp_groups_agree(world_size: int, tp: int, cp: int, pp: int = 1) -> bool:
    """True when usp_npu's CP groups equal megatron-core's (default order) for these sizes."""
    ours = mesh_rank_lists(world_size, tp, cp, 1, pp)[0]
    return sorted(ours) == sorted(megatron_cp_groups(world_size, tp, cp, pp))


def _megatron_groups(pg_collection):
    """(cp group, tp group) from a ProcessGroupCollection (0.15+), ModelCommProcessGroups (0.14),
    or megatron's parallel_state globals."""
    cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    tp = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    if cp is None or tp is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError(
                "megatron-core's parallel_state is not initialised: call "
                "megatron.core.parallel_state.initialize_model_parallel(...) first"
            )
        cp = cp if cp is not None else parallel_state.get_context_parallel_group()
        tp = tp if tp is not None else parallel_state.get_tensor_model_parallel_group()
    return cp, tp


def check_megatron_mesh(
    mesh: ContextParallelMesh | None = None, pg_collection=None, context_parallel_size=None
) -> None:
    """Raise ValueError unless this rank's usp_npu CP group is megatron's, member for member.

    Compares the CP group's global ranks (same order), the tensor-parallel size and, if given,
    the model config's ``context_parallel_size``. No communication: the arithmetic is the same on
    every rank, so a layout mismatch shows on every rank of the affected groups.
    """
    mesh = mesh or get_mesh()
    cp_group, tp_group = _megatron_groups(pg_collection)
    theirs = tuple(dist.get_process_group_ranks(cp_group))
    tp = dist.get_world_size(tp_group)
    fix = (
        "initialise both from the same sizes: megatron.core.parallel_state."
        "initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, ...) "
        "(default order tp-cp-ep-dp-pp), then usp_npu.initialize_context_parallel(cfg, "
        "tensor_model_parallel_size=tp) with cfg.context_parallel_size = cp"
    )
    if context_parallel_size is not None and context_parallel_size != mesh.cp_size:
        raise ValueError(
            f"Megatron's --context-parallel-size {context_parallel_size} differs from usp_npu's "
            f"{mesh.cp_size}; {fix}"
        )
    if tp != mesh.tensor_model_parallel_size:
        raise ValueError(
            f"Megatron's --tensor-model-parallel-size {tp} differs from the "
            f"tensor_model_parallel_size={mesh.tensor_model_parallel_size} usp_npu's mesh was "
            f"built with; {fix}"
        )
    if theirs != mesh.cp_ranks:
        raise ValueError(
            f"rank {mesh.rank}: Megatron's context-parallel group is {list(theirs)} but usp_npu's "
            f"is {list(mesh.cp_ranks)}; {fix}"
        )
