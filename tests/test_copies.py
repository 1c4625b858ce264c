"""What the data path copies and holds for the backward, counted exactly (not timed).

Each expected count is a sum of named shard-sized pieces; a new copy anywhere in the forward or
backward changes a count and fails here, to be removed or explained.
"""

from __future__ import annotations

import pytest

from usp_npu.config import HYBRID, RING
from usp_npu.testing.cases import AttentionCase
from usp_npu.testing.data_path import measure_data_path

SEQ, HEADS, DIM, F32 = 32, 4, 8, 4


def _sizes(case: AttentionCase, kv_heads: int | None = None):
    """Bytes of one rank's [L, B, heads, D] shard, and of one statistic [B, heads, L, 1] (fp32)."""
    local = case.seq // case.cp
    return local * HEADS * DIM * F32, local * (kv_heads or HEADS) * DIM * F32, local * HEADS * F32


def _lse_copy(stats: int, heads_per_block: int) -> int:
    """The CPU flash kernel returns lse [B, H, L] strided as [B, L, H]: making it contiguous (the
    merged max accumulator, or the backward's lse) copies it, unless a block has one head."""
    return stats if heads_per_block > 1 else 0


def _route(kv_shard: int) -> dict[str, int]:
    """The ring's route moves K and V as one stacked [2, L, B, N, D] block (routes.py: the plain
    ring, the double ring and the all-gather share that form): one stack per forward/backward."""
    return {"stack": 2 * kv_shard}


def _clone(n: int) -> dict[str, int]:
    return {"clone": n} if n else {}


def _case(**kw) -> AttentionCase:
    return AttentionCase(seq=SEQ, heads=HEADS, head_dim=DIM, dtype="float32", **kw)


def test_ring_copies_only_statistics(pools):
    case = _case(cp=2, algo=RING)
    shard, _, stats = _sizes(case)
    for r in pools(2).run(measure_data_path, case):
        # step 1 covers every query row on ring rank 1 (an earlier block), half of them on rank 0
        later = r["ring_rank"] == 0
        assert r["forward"] == {
            "copy_": _lse_copy(stats, HEADS),  # the merged max starts as a contiguous lse copy
            "fill": int(stats * (1.5 if later else 2)),  # the kernel's sum = 1 of each block
            **_route(shard),
        }
        # the own block's piece starts dq (no zero-fill, no += copy-back); the route zero-fills
        # the home and step-1 dK/dV accumulators (one [2, L, B, N, D] each) and stacks K|V again
        assert r["backward"] == {"fill": 4 * shard, **_route(shard)}
        assert r["saved"] == r["q"] + r["k"] + r["v"] + r["out"] + 2 * stats


def test_ulysses_copies_one_pack_and_one_unpack_per_exchange(pools):
    case = _case(cp=2, pipeline_chunks=2)
    shard, _, stats = _sizes(case)
    for r in pools(2).run(measure_data_path, case):
        # q, k, v packed for the all-to-all in (3 shards); out unpacked into place (1 shard)
        assert r["forward"] == {"copy_": 4 * shard, "fill": stats}
        # dO packed (1); dQ/dK/dV sent as the kernel made them and unpacked (3); the kernel's lse
        # made contiguous
        assert r["backward"] == {"copy_": 4 * shard, **_clone(_lse_copy(stats, HEADS // 4))}
        assert r["saved"] == r["q"] + r["k"] + r["v"] + r["out"] + 2 * stats


def test_ulysses_gqa_replicates_kv_once(pools):
    case = _case(cp=2, kv_heads=1)  # one K/V head, u = 2: replicated to 2 for the all-to-all
    shard, kv, stats = _sizes(case, kv_heads=1)
    for r in pools(2).run(measure_data_path, case):
        replicated = 2 * kv
        assert r["forward"] == {
            "copy_": shard + 2 * replicated + shard,  # packs of q, k', v'; unpack of out
            "fill": stats,
            "clone": 2 * replicated,  # k, v repeated to u heads (repeat_interleave)
        }
        saved = r["q"] + 2 * replicated + r["out"] + 2 * stats
        assert r["saved"] == saved, "K/V are held replicated only as far as the all-to-all needs"


@pytest.mark.parametrize("chunks", [1, 2])
def test_hybrid_copies(pools, chunks):
    case = _case(cp=4, algo=HYBRID, ulysses_degree=2, pipeline_chunks=chunks)
    shard, _, stats = _sizes(case)
    for r in pools(4).run(measure_data_path, case):
        first = r["ring_rank"] == 0  # ring step 1 on ring rank 0: a later block, all K/V rows
        fwd_fill = stats * (1 + (0.5 if first else 1.0))
        lse = _lse_copy(stats, HEADS // (2 * chunks))
        assert r["forward"] == {"copy_": 4 * shard + lse, "fill": int(fwd_fill), **_route(shard)}
        # dO packed (1), dQ/dK/dV unpacked (3); the route's zeroed dK/dV accumulators and stack
        assert r["backward"] == {"copy_": 4 * shard, "fill": 4 * shard, **_route(shard)}
        assert r["saved"] == r["q"] + r["k"] + r["v"] + r["out"] + 2 * stats
