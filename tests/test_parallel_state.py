"""The 2D CP mesh (REFERENCE.md section 2): rank lists, real gloo groups, re-init and teardown.

Expected rank lists are written out by hand from the reference's examples and from
global = pp_idx * (world / pp) + dp_idx * (tp * cp) + cp_idx * tp + tp_idx, with
cp_idx = ring_rank * u + ulysses_rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from usp_npu import parallel_state as ps
from usp_npu.config import HYBRID, RING, ULYSSES, ContextParallelConfig
from usp_npu.parallel_state import (
    destroy_context_parallel,
    initialize_context_parallel,
    mesh_rank_lists,
)

# (world, tp, cp, u, pp) -> (cp groups, ulysses groups, ring groups), in creation order
MESHES = {
    # REFERENCE.md example 1
    (8, 1, 8, 2, 1): (
        [[0, 1, 2, 3, 4, 5, 6, 7]],
        [[0, 1], [2, 3], [4, 5], [6, 7]],
        [[0, 2, 4, 6], [1, 3, 5, 7]],
    ),
    # REFERENCE.md example 2
    (8, 2, 4, 2, 1): (
        [[0, 2, 4, 6], [1, 3, 5, 7]],
        [[0, 2], [4, 6], [1, 3], [5, 7]],
        [[0, 4], [2, 6], [1, 5], [3, 7]],
    ),
    # pp=2: stage 0 holds ranks 0-3, stage 1 ranks 4-7; tp pairs (0,1) (2,3); cp=u=2
    (8, 2, 2, 2, 2): (
        [[0, 2], [1, 3], [4, 6], [5, 7]],
        [[0, 2], [1, 3], [4, 6], [5, 7]],
        [[0], [2], [1], [3], [4], [6], [5], [7]],
    ),
    # pure ring, data parallel 2
    (8, 1, 4, 1, 1): (
        [[0, 1, 2, 3], [4, 5, 6, 7]],
        [[0], [1], [2], [3], [4], [5], [6], [7]],
        [[0, 1, 2, 3], [4, 5, 6, 7]],
    ),
    # pure Ulysses with tp=2 and data parallel 2
    (8, 2, 2, 2, 1): (
        [[0, 2], [1, 3], [4, 6], [5, 7]],
        [[0, 2], [1, 3], [4, 6], [5, 7]],
        [[0], [2], [1], [3], [4], [6], [5], [7]],
    ),
    # tp=1, cp=8, u=4: two Ulysses runs of 4, four rings of 2
    (8, 1, 8, 4, 1): (
        [[0, 1, 2, 3, 4, 5, 6, 7]],
        [[0, 1, 2, 3], [4, 5, 6, 7]],
        [[0, 4], [1, 5], [2, 6], [3, 7]],
    ),
    # 16 ranks: pp=2, dp=2, tp=2, cp=2, u=1 (pure ring). global = pp*8 + dp*4 + cp*2 + tp
    (16, 2, 2, 1, 2): (
        [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        [[0], [2], [1], [3], [4], [6], [5], [7], [8], [10], [9], [11], [12], [14], [13], [15]],
        [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
    ),
}


@pytest.mark.parametrize(("world", "tp", "cp", "u", "pp"), list(MESHES))
def test_mesh_rank_lists(world, tp, cp, u, pp):
    cp_lists, uly_lists, ring_lists = mesh_rank_lists(world, tp, cp, u, pp)
    want_cp, want_uly, want_ring = MESHES[(world, tp, cp, u, pp)]
    assert cp_lists == want_cp
    assert uly_lists == want_uly
    assert ring_lists == want_ring


@pytest.mark.parametrize(("world", "tp", "cp", "u", "pp"), list(MESHES))
def test_every_rank_is_in_exactly_one_group_of_each_kind(world, tp, cp, u, pp):
    for lists, size in zip(mesh_rank_lists(world, tp, cp, u, pp), (cp, u, cp // u), strict=True):
        assert sorted(r for group in lists for r in group) == list(range(world))
        assert all(len(group) == size for group in lists)


def test_mesh_rank_lists_rejects_bad_sizes():
    with pytest.raises(ValueError, match="world size 8"):
        mesh_rank_lists(8, 3, 1, 1)
    with pytest.raises(ValueError, match="world size 12"):
        mesh_rank_lists(12, 2, 2, 1, pp=2)
    with pytest.raises(ValueError, match="--context-parallel-size 4"):
        mesh_rank_lists(8, 1, 4, 3)


# -- the mesh on real gloo groups (world 8) ------------------------------------------------------
def _group_sum(group) -> int:
    """Sum of 2**rank over the members: identifies the exact member set."""
    t = torch.tensor([2 ** dist.get_rank()], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _mesh_view(config: ContextParallelConfig, tp: int, pp: int = 1):
    mesh = initialize_context_parallel(
        config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    view = {
        "rank": dist.get_rank(),
        "cp_ranks": mesh.cp_ranks,
        "ulysses_ranks": mesh.ulysses_ranks,
        "ring_ranks": mesh.ring_ranks,
        "cp": (mesh.cp_rank, mesh.cp_size),
        "ulysses": (mesh.ulysses_rank, mesh.ulysses_size),
        "ring": (mesh.ring_rank, mesh.ring_size),
        "getters": {
            "cp": (ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()),
            "ulysses": (ps.get_ulysses_rank(), ps.get_ulysses_world_size()),
            "ring": (ps.get_ring_rank(), ps.get_ring_world_size()),
            "cp_ranks": ps.get_context_parallel_global_ranks(),
            "same_groups": ps.get_mesh() is mesh
            and ps.get_context_parallel_group() is mesh.cp_group
            and ps.get_ulysses_group() is mesh.ulysses_group
            and ps.get_ring_group() is mesh.ring_group,
        },
        "initialized": ps.is_initialized(),
        "sums": {
            "cp": _group_sum(mesh.cp_group),
            "ulysses": _group_sum(mesh.ulysses_group),
            "ring": _group_sum(mesh.ring_group),
        },
        "overlap": None,
    }
    if mesh.ring_overlap_group is not None:
        view["overlap"] = (
            _group_sum(mesh.ring_overlap_group),
            mesh.ring_overlap_group is not mesh.ring_group,
        )
    return view


def _mine(lists: list[list[int]], rank: int) -> tuple[int, ...]:
    (group,) = [g for g in lists if rank in g]
    return tuple(group)


def _check_views(views, world, tp, cp, u, pp=1, overlap=False):
    want_cp, want_uly, want_ring = MESHES[(world, tp, cp, u, pp)]
    assert [v["rank"] for v in views] == list(range(world))
    for v in views:
        rank = v["rank"]
        cp_ranks, uly, ring = _mine(want_cp, rank), _mine(want_uly, rank), _mine(want_ring, rank)
        assert (v["cp_ranks"], v["ulysses_ranks"], v["ring_ranks"]) == (cp_ranks, uly, ring)
        cp_rank = cp_ranks.index(rank)
        uly_rank, ring_rank = uly.index(rank), ring.index(rank)
        assert v["cp"] == (cp_rank, cp)
        assert v["ulysses"] == (uly_rank, u)
        assert v["ring"] == (ring_rank, cp // u)
        assert cp_rank == ring_rank * u + uly_rank  # cp_idx = ring_rank * u + ulysses_rank
        getters = v["getters"]
        assert (getters["cp"], getters["ulysses"], getters["ring"]) == (
            v["cp"],
            v["ulysses"],
            v["ring"],
        )
        assert getters["cp_ranks"] == cp_ranks and getters["same_groups"]
        assert v["initialized"]
        # the all-reduce over each group reached exactly the expected members
        assert v["sums"] == {
            "cp": sum(2**r for r in cp_ranks),
            "ulysses": sum(2**r for r in uly),
            "ring": sum(2**r for r in ring),
        }
        if overlap:
            assert v["overlap"] == (sum(2**r for r in ring), True)
        else:
            assert v["overlap"] is None


@pytest.mark.parametrize(
    ("config", "tp", "u", "pp"),
    [
        (ContextParallelConfig(8, HYBRID, 2), 1, 2, 1),
        (ContextParallelConfig(4, HYBRID, 2), 2, 2, 1),
        (ContextParallelConfig(8, HYBRID, 4), 1, 4, 1),
        (ContextParallelConfig(4, RING), 1, 1, 1),
        (ContextParallelConfig(2, ULYSSES), 2, 2, 1),
        (ContextParallelConfig(2, ULYSSES), 2, 2, 2),
    ],
    ids=["tp1-cp8-u2", "tp2-cp4-u2", "tp1-cp8-u4", "ring-cp4-dp2", "uly-tp2-cp2", "uly-pp2"],
)
def test_mesh_on_gloo(pools, config, tp, u, pp):
    views = pools(8).run(_mesh_view, config, tp, pp)
    _check_views(views, 8, tp, config.context_parallel_size, u, pp)


def test_send_recv_overlap_group_spans_the_ring(pools):
    config = ContextParallelConfig(4, HYBRID, 2, use_cp_send_recv_overlap=True)
    views = pools(8).run(_mesh_view, config, 2)
    _check_views(views, 8, 2, 4, 2, overlap=True)


def _reinitialise():
    a_cfg = ContextParallelConfig(8, HYBRID, 2)
    a = initialize_context_parallel(a_cfg)
    b = initialize_context_parallel(ContextParallelConfig(8, HYBRID, 4))
    b_sums = (_group_sum(b.ulysses_group), _group_sum(b.ring_group))
    b_getters = (ps.get_ulysses_world_size(), ps.get_ring_world_size(), ps.get_mesh() is b)
    c = initialize_context_parallel(ContextParallelConfig(4, ULYSSES), tensor_model_parallel_size=2)
    c_sum = _group_sum(c.cp_group)
    again = initialize_context_parallel(a_cfg)
    return {
        "b_ranks": (b.cp_ranks, b.ulysses_ranks, b.ring_ranks),
        "b_sums": b_sums,
        "b_getters": b_getters,
        "cp_reused": b.cp_group is a.cp_group,
        "uly_new": b.ulysses_group is not a.ulysses_group,
        "ring_new": b.ring_group is not a.ring_group,
        "c_cp_ranks": c.cp_ranks,
        "c_cp_new": c.cp_group is not a.cp_group,
        "c_sum": c_sum,
        "again_reused": (
            again.cp_group is a.cp_group
            and again.ulysses_group is a.ulysses_group
            and again.ring_group is a.ring_group
        ),
        "again_sizes": (ps.get_ulysses_world_size(), ps.get_ring_world_size()),
    }


def test_reinitialising_changes_the_mesh_and_reuses_unchanged_groups(pools):
    for rank, res in enumerate(pools(8).run(_reinitialise)):
        uly = tuple(range(rank // 4 * 4, rank // 4 * 4 + 4))  # u=4: [0-3], [4-7]
        ring = (rank % 4, rank % 4 + 4)  # r=2: [0,4] [1,5] [2,6] [3,7]
        assert res["b_ranks"] == (tuple(range(8)), uly, ring)
        assert res["b_sums"] == (sum(2**r for r in uly), sum(2**r for r in ring))
        assert res["b_getters"] == (4, 2, True)
        assert res["cp_reused"] and res["uly_new"] and res["ring_new"]
        c_ranks = (0, 2, 4, 6) if rank % 2 == 0 else (1, 3, 5, 7)
        assert res["c_cp_ranks"] == c_ranks and res["c_cp_new"]
        assert res["c_sum"] == sum(2**r for r in c_ranks)
        assert res["again_reused"]
        assert res["again_sizes"] == (2, 4)


_GETTERS = [
    ps.get_mesh,
    ps.get_context_parallel_group,
    ps.get_context_parallel_rank,
    ps.get_context_parallel_world_size,
    ps.get_context_parallel_global_ranks,
    ps.get_ulysses_group,
    ps.get_ulysses_rank,
    ps.get_ulysses_world_size,
    ps.get_ring_group,
    ps.get_ring_rank,
    ps.get_ring_world_size,
]


def _getter_errors() -> dict[str, str | None]:
    errors = {}
    for getter in _GETTERS:
        try:
            getter()
            errors[getter.__name__] = None
        except RuntimeError as err:
            errors[getter.__name__] = str(err)
    return errors


def _destroy_then_get():
    initialize_context_parallel(ContextParallelConfig(8, HYBRID, 2, use_cp_send_recv_overlap=True))
    assert ps.is_initialized()
    destroy_context_parallel()
    out = {"initialized": ps.is_initialized(), "errors": _getter_errors()}
    # the default (world) group survives the teardown of the CP groups
    out["world_sum"] = _group_sum(None)
    # and a fresh initialisation builds working groups again
    mesh = initialize_context_parallel(ContextParallelConfig(8, HYBRID, 4))
    out["after"] = (_group_sum(mesh.ulysses_group), ps.get_ulysses_world_size())
    return out


def test_destroy_then_getters_raise(pools):
    for rank, res in enumerate(pools(8).run(_destroy_then_get)):
        assert res["initialized"] is False
        for name, message in res["errors"].items():
            assert message is not None, f"{name} did not raise after destroy"
            assert "initialize_context_parallel" in message, (name, message)
        assert res["world_sum"] == 2**8 - 1
        uly = range(rank // 4 * 4, rank // 4 * 4 + 4)
        assert res["after"] == (sum(2**r for r in uly), 4)


def _invalid_then_valid():
    errors = []
    for config, tp, pp in [
        (ContextParallelConfig(3), 1, 1),  # 8 % 3
        (ContextParallelConfig(4), 4, 1),  # 8 % 16
        (ContextParallelConfig(4), 1, 4),  # 8 % 16 with pp
        (ContextParallelConfig(4, HYBRID, 4), 1, 1),  # u == cp
        (ContextParallelConfig(4, HYBRID, 3), 1, 1),  # u does not divide cp
    ]:
        try:
            initialize_context_parallel(
                config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
            )
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    mesh = initialize_context_parallel(ContextParallelConfig(4, RING))
    return errors, _group_sum(mesh.ring_group)


def test_invalid_settings_raise_on_every_rank_and_leave_the_groups_usable(pools):
    for rank, (errors, ring_sum) in enumerate(pools(8).run(_invalid_then_valid)):
        want = [
            "--context-parallel-size 3",
            "--tensor-model-parallel-size 4",
            "--pipeline-model-parallel-size 4",
            "plain Ulysses",
            "--ulysses-degree-in-cp 3",
        ]
        for message, fragment in zip(errors, want, strict=True):
            assert message is not None and fragment in message, (fragment, message)
        ring = range(rank // 4 * 4, rank // 4 * 4 + 4)
        assert ring_sum == sum(2**r for r in ring)


# -- single process, no torch.distributed -----------------------------------------------------
def test_initialize_before_init_process_group_explains_the_setup():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group") as info:
        initialize_context_parallel(ContextParallelConfig(2))
    assert "initialize_context_parallel" in str(info.value)
    assert not ps.is_initialized()


def test_getters_before_initialize_name_initialize_context_parallel():
    assert not ps.is_initialized()
    for name, message in _getter_errors().items():
        assert message is not None, name
        assert "initialize_context_parallel" in message and "init_process_group" in message
