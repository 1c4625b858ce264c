"""Packed sequences combined with the MindSpeed options (double ring, KV cache, kvallgather,
all-gather KV): every route of the one ring loop takes packed steps, exact against dense float64
attention with a block-diagonal mask, forward and dq/dk/dv."""

from __future__ import annotations

import pytest

from usp_npu.testing.cases import (
    AttentionCase,
    assert_matches_reference,
    check_attention,
    world_size,
)

S = 64
LONG_SHORT = (0, 32, 48, 56, 64)  # every length divisible by 2r = 8
CASES = {
    "double-ring-r4w2": dict(algo="megatron_cp_algo", cp=4, window=2),
    "double-ring-hyb2x4w2-gqa": dict(
        algo="hybrid_cp_algo", cp=8, ulysses_degree=2, window=2, kv_heads=2
    ),
    "kvallgather-cp4": dict(algo="kvallgather_cp_algo", cp=4, kv_heads=2),
    "ring4-full-cache": dict(algo="megatron_cp_algo", cp=4, kv_cache="full"),
    "ring4-half-cache-bf16": dict(algo="megatron_cp_algo", cp=4, kv_cache="half", dtype="bfloat16"),
    "ulysses4-allgather-kv": dict(algo="ulysses_cp_algo", cp=4, kv_heads=1, allgather_kv=True),
    "hyb2x2-general-window1-cache": dict(
        algo="hybrid_cp_algo", cp=4, ulysses_degree=2, mask_type="general", kv_cache="full"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_packed_with_mindspeed_options(pools, name):
    params = {"heads": 4, "head_dim": 16, "seq": S, "cu_seqlens": LONG_SHORT, **CASES[name]}
    case = AttentionCase(**params)
    assert_matches_reference(pools(world_size(case)).run(check_attention, case), case)
