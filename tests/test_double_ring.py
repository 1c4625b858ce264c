"""Double ring (--cp-window-size): exact against dense attention, the same causal load balance
as the plain ring with blocks visited in the double ring's order, and bytes per link (inner /
outer) equal to the model."""

from __future__ import annotations

import pytest
import torch

from usp_npu import ops
from usp_npu.algorithms.routes import double_ring_order
from usp_npu.algorithms.usp import usp_attention
from usp_npu.config import ContextParallelConfig
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.sharding import split_sequence
from usp_npu.testing import dense_attention
from usp_npu.testing.cases import (
    AttentionCase,
    assert_bytes_match_model,
    assert_matches_reference,
    check_attention,
    world_size,
)
from usp_npu.testing.recording import RecordingKernel

RING, HYBRID = "megatron_cp_algo", "hybrid_cp_algo"


def _case(cp, w, mask_type="causal", mask="none", kv=4, dtype="float64", **kw):
    seq = 64 if dtype != "float64" else 32
    return AttentionCase(
        algo=kw.pop("algo", RING), cp=cp, window=w, mask_type=mask_type, mask=mask,
        heads=kw.pop("heads", 4),
        kv_heads=kv, dtype=dtype, seq=kw.pop("seq", seq), head_dim=16 if dtype != "float64"
        else 8, **kw,
    )  # fmt: skip


# a pairwise selection of (ring size, window, mask, heads, dtype, layout, hybrid/overlap/tp)
CASES = {
    "r4-w2-causal-MHA": _case(4, 2),
    "r4-w2-general-random-GQA-SBH": _case(4, 2, "general", "random", kv=2, layout="SBH"),
    "r4-w2-causal-GQA-fp32-BNSD": _case(4, 2, kv=2, dtype="float32", layout="BNSD"),
    "r4-w2-general-GQA-bf16": _case(4, 2, "general", kv=2, dtype="bfloat16"),
    "r4-w2-causal-overlap": _case(4, 2, kv=2, overlap=True),
    "r8-w2-causal-GQA": _case(8, 2, kv=2, batch=2),
    "r8-w2-general-random-MQA-fp32": _case(8, 2, "general", "random", kv=1, dtype="float32"),
    "r8-w4-general-random-MQA": _case(8, 4, "general", "random", kv=1),
    "r8-w4-causal-GQA-bf16": _case(8, 4, kv=2, dtype="bfloat16"),
    "u2-r4-w2-causal-GQA": _case(8, 2, kv=2, algo=HYBRID, ulysses_degree=2, heads=8),
    "u2-r4-w2-general-random": _case(8, 2, "general", "random", algo=HYBRID, ulysses_degree=2),
    "u2-r4-w2-causal-bf16": _case(8, 2, algo=HYBRID, ulysses_degree=2, dtype="bfloat16"),
    "tp2-r4-w2-general-GQA": _case(4, 2, "general", kv=2, tp=2),
    "r4-w2-causal-npu-emulated": _case(
        4, 2, kv=2, dtype="float32", backend="npu", emulate_npu=True, kv_cache="half"
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_double_ring_matches_dense_and_bytes_per_link_match_the_model(pools, case):
    results = pools(world_size(case)).run(check_attention, case)
    assert_matches_reference(results, case)
    assert_bytes_match_model(results, case)
    sent = results[0]["sent_forward"]
    r, w = case.config().ring_degree, case.window
    # same bytes as the plain ring, split (r - r/w) : (r/w - 1) between inner and outer links
    assert sent["ring_inner_kv"] * (r // w - 1) == sent["ring_outer_kv"] * (r - r // w)


def _record(cp: int, window: int, seq: int):
    mesh = initialize_context_parallel(ContextParallelConfig(cp, RING, cp_window_size=window))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = dense_attention(q, k, v, causal=True)
    kernel = RecordingKernel()
    leaves = [split_sequence(x, 0, mesh).requires_grad_() for x in (q, k, v)]
    out = usp_attention(
        *leaves, mesh=mesh, kernel=kernel, scale=8**-0.5, merge=ops.ring_attention_update_
    )
    out.sum().backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dense_attention(*ref_leaves, causal=True).sum().backward()
    errors = [(out.detach() - split_sequence(ref, 0, mesh)).abs().max().item()]
    errors += [
        (leaf.grad - split_sequence(r.grad, 0, mesh)).abs().max().item()
        for leaf, r in zip(leaves, ref_leaves, strict=True)
    ]
    return mesh.ring_rank, kernel.calls, max(errors)


@pytest.mark.parametrize(("cp", "window"), [(4, 2), (8, 4)])
def test_every_step_computes_the_balanced_block_of_its_source(pools, cp, window):
    seq = 8 * cp
    local = seq // cp
    for rank, calls, err in pools(cp).run(_record, cp, window, seq):
        assert err < 1e-12  # output and every gradient (dK/dV home) exact
        order = double_ring_order(rank, cp, window)
        for phase in ("fwd", "bwd"):
            shapes = [c[1:] for c in calls if c[0] == phase]
            assert len(shapes) == cp
            assert shapes[0] == (local, local, True)  # own block: the causal square
            for t in range(1, cp):
                src = order[t]
                # earlier block: all queries x first half; later: second half x all keys
                want = (local, local // 2, False) if src < rank else (local // 2, local, False)
                assert shapes[t] == want, (rank, phase, t, src, shapes)
            assert sum(q * k for q, k, _ in shapes[1:]) == (cp - 1) * local * local // 2


def _double_ring_mesh(overlap: bool):
    from usp_npu.parallel_state import get_ring_inner_group, get_ring_outer_group

    cfg = ContextParallelConfig(8, HYBRID, 2, cp_window_size=2, use_cp_send_recv_overlap=overlap)
    mesh = initialize_context_parallel(cfg)
    return {
        "inner": mesh.ring_inner_ranks,
        "outer": mesh.ring_outer_ranks,
        "inner_size": torch.distributed.get_world_size(get_ring_inner_group()),
        "outer_size": torch.distributed.get_world_size(get_ring_outer_group()),
        "overlap_groups": [
            g is not None for g in (mesh.ring_inner_overlap_group, mesh.ring_outer_overlap_group)
        ],
    }


@pytest.mark.parametrize("overlap", [False, True])
def test_every_rank_gets_its_window_and_outer_ring(pools, overlap):
    # cp 8, u 2: rings {0,2,4,6} and {1,3,5,7}; windows of 2 ring ranks
    inner = {0: (0, 2), 2: (0, 2), 4: (4, 6), 6: (4, 6), 1: (1, 3), 3: (1, 3), 5: (5, 7), 7: (5, 7)}
    outer = {0: (0, 4), 4: (0, 4), 2: (2, 6), 6: (2, 6), 1: (1, 5), 5: (1, 5), 3: (3, 7), 7: (3, 7)}
    for rank, got in enumerate(pools(8).run(_double_ring_mesh, overlap)):
        assert (got["inner"], got["outer"]) == (inner[rank], outer[rank])
        assert got["inner_size"] == got["outer_size"] == 2
        assert got["overlap_groups"] == [overlap, overlap]
