"""Hybrid USP (hybrid_cp_algo): every (u, r) factorisation against dense float64 attention."""

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


def _algo(cp: int, u: int) -> tuple[str, int | None]:
    """u == cp is plain Ulysses (hybrid rejects it), u == 1 the ring through the hybrid path."""
    return ("ulysses_cp_algo", None) if u == cp else ("hybrid_cp_algo", u)


def _cases():
    for cp, (mtype, mask), kv in itertools.product((4, 8), MASKS, KV_HEADS):
        for u in (d for d in range(1, cp + 1) if cp % d == 0):
            algo, degree = _algo(cp, u)
            yield pytest.param(
                AttentionCase(
                    algo=algo,
                    cp=cp,
                    ulysses_degree=degree,
                    mask_type=mtype,
                    mask=mask,
                    heads=8,
                    kv_heads=KV_HEADS[kv],
                    seq=64,
                    batch=2,
                ),
                id=f"cp{cp}-u{u}-{mtype}-{mask}-{kv}",
            )
    for layout, (mtype, mask) in itertools.product(("BNSD", "SBH"), MASKS):
        yield pytest.param(
            AttentionCase(
                algo="hybrid_cp_algo",
                cp=4,
                ulysses_degree=2,
                mask_type=mtype,
                mask=mask,
                heads=8,
                kv_heads=2,
                layout=layout,
                seq=32,
            ),
            id=f"cp4-u2-{mtype}-{mask}-{layout}",
        )
    for cp, u, dtype, (mtype, mask) in itertools.product(
        (4, 8), (2,), ("float32", "bfloat16"), MASKS
    ):
        yield pytest.param(
            AttentionCase(
                algo="hybrid_cp_algo",
                cp=cp,
                ulysses_degree=u,
                mask_type=mtype,
                mask=mask,
                heads=8,
                kv_heads=2,
                dtype=dtype,
                seq=64,
                head_dim=16,
            ),
            id=f"cp{cp}-u{u}-{mtype}-{mask}-{dtype}",
        )
    for (mtype, mask), kv in itertools.product(MASKS, (8, 2)):
        # tp 2 x cp 4 (u 2, r 2) on 8 ranks: 4 query heads per TP rank, Megatron rank order
        yield pytest.param(
            AttentionCase(
                algo="hybrid_cp_algo",
                cp=4,
                ulysses_degree=2,
                tp=2,
                mask_type=mtype,
                mask=mask,
                heads=8,
                kv_heads=kv,
                seq=32,
            ),
            id=f"tp2-cp4-u2-{mtype}-{mask}-kv{kv}",
        )


@pytest.mark.parametrize("case", list(_cases()))
def test_hybrid_matches_dense(pools, case):
    results = pools(world_size(case)).run(check_attention, case)
    assert_matches_reference(results, case)


def test_hybrid_moves_fewer_bytes_over_the_ring_than_ring_alone(pools):
    # same problem, world 8: u=2 shrinks the ring's K/V volume by 2 (heads are split first)
    sent = {}
    for algo, u in (("megatron_cp_algo", None), ("hybrid_cp_algo", 2)):
        case = AttentionCase(algo=algo, cp=8, ulysses_degree=u, heads=8, seq=64)
        sent[algo] = pools(8).run(check_attention, case)[0]["bytes_sent"]
    assert sent["hybrid_cp_algo"] < sent["megatron_cp_algo"]
