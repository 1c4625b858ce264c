"""Ulysses (ulysses_cp_algo) against dense float64 attention on real gloo groups."""

from __future__ import annotations

import itertools

import pytest

from usp_npu.testing.cases import (
    AttentionCase,
    assert_matches_reference,
    check_attention,
    world_size,
)

MASKS = [("causal", "none"), ("general", "none"), ("general", "random")]
KV_HEADS = {"MHA": 8, "GQA": 2, "MQA": 1}


def _cases():
    for cp, (mtype, mask), kv, layout in itertools.product(
        (1, 2, 4, 8), MASKS, KV_HEADS, ("BSND", "BNSD", "SBH")
    ):
        yield pytest.param(
            AttentionCase(
                cp=cp,
                mask_type=mtype,
                mask=mask,
                kv_heads=KV_HEADS[kv],
                heads=8,
                layout=layout,
                seq=32,
                batch=2,
            ),
            id=f"cp{cp}-{mtype}-{mask}-{kv}-{layout}",
        )
    for cp, (mtype, mask), dtype in itertools.product((2, 4, 8), MASKS, ("float32", "bfloat16")):
        yield pytest.param(
            AttentionCase(
                cp=cp,
                mask_type=mtype,
                mask=mask,
                kv_heads=2,
                heads=8,
                dtype=dtype,
                seq=64,
                head_dim=16,
            ),
            id=f"cp{cp}-{mtype}-{mask}-GQA-{dtype}",
        )
    for cp, (mtype, mask), kv in itertools.product((2, 4), MASKS, (4, 2, 1)):
        # tensor parallel 2: each rank holds 4 of 8 query heads (and its share of K/V heads)
        yield pytest.param(
            AttentionCase(
                cp=cp,
                tp=2,
                mask_type=mtype,
                mask=mask,
                heads=8,
                kv_heads=kv * 2 if kv > 1 else 2,
                seq=32,
            ),
            id=f"tp2-cp{cp}-{mtype}-{mask}-kv{kv}",
        )


@pytest.mark.parametrize("case", list(_cases()))
def test_ulysses_matches_dense(pools, case):
    results = pools(world_size(case)).run(check_attention, case)
    assert_matches_reference(results, case)


def test_ulysses_gqa_replicates_kv_only_as_needed(pools):
    # 2 KV heads, Ulysses degree 8: each rank receives one replicated KV head (u % kv == 0)
    case = AttentionCase(cp=8, heads=8, kv_heads=2, seq=32)
    results = pools(8).run(check_attention, case)
    assert_matches_reference(results, case)
    # bytes each rank sends (7/8 of what it holds leaves): forward q, k, v in one all-to-all
    # (k, v replicated from 2 to 8 heads) and out back; backward the same volume again
    s_local, d, bsz = 32 // 8, 8, 1
    forward_elems = s_local * bsz * d * (8 + 8 + 8 + 8) * 7 // 8
    assert [r["bytes_sent"] for r in results] == [2 * forward_elems * 8] * 8
