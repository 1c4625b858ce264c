"""KV cache policies (--context-parallel-kv-cache-policy, --context-parallel-cache-interval):
the same gradients as without a cache, bit for bit in float64; backward bytes and bytes held for
the backward as the model says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from usp_npu import context_parallel_attention
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.sharding import split_sequence
from usp_npu.testing.cases import (
    AttentionCase,
    assert_bytes_match_model,
    full_inputs,
    run_shards,
    world_size,
)
from usp_npu.testing.memory import saved_tensor_bytes

RING, HYBRID, ULYSSES = "megatron_cp_algo", "hybrid_cp_algo", "ulysses_cp_algo"

BASES = {
    "ring-causal-GQA": AttentionCase(algo=RING, cp=4, kv_heads=2, seq=32),
    "double-ring-general-random": AttentionCase(
        algo=RING, cp=4, window=2, mask_type="general", mask="random", seq=32
    ),
    "hybrid-u2-r2-causal": AttentionCase(algo=HYBRID, cp=4, ulysses_degree=2, heads=8, seq=32),
    "ulysses-replicated-kv": AttentionCase(algo=ULYSSES, cp=4, heads=8, kv_heads=2, seq=32),
    "ulysses-allgather-kv": AttentionCase(
        algo=ULYSSES, cp=4, heads=8, kv_heads=1, allgather_kv=True, seq=32
    ),
}


@pytest.mark.parametrize("base", list(BASES.values()), ids=list(BASES))
def test_cache_gives_bit_identical_results_and_the_models_bytes(pools, base):
    pool = pools(world_size(base))
    runs = {}
    for policy in (None, "full", "half"):
        case = dataclasses.replace(base, kv_cache=policy)
        results = pool.run(run_shards, case, 1)
        assert_bytes_match_model(results, case)
        runs[policy] = results
    for policy in ("full", "half"):
        for rank, (got, want) in enumerate(zip(runs[policy], runs[None], strict=True)):
            for name, a, b in zip(("out", "dq", "dk", "dv"), got["got"], want["got"], strict=True):
                assert a.dtype == torch.float64 and torch.equal(a, b), (policy, rank, name)
    # what the backward sends again: ring K/V (all, half, none) or the Ulysses K/V all-to-all
    backward = {p: sum(r[0]["sent_backward"].values()) for p, r in runs.items()}
    if base.algo == ULYSSES:
        assert backward["full"] > backward["half"] > backward[None]
    else:
        assert backward[None] > backward["half"] > backward["full"]


@pytest.mark.parametrize(
    ("interval", "layer", "cached"),
    [(0, 7, True), (2, 1, True), (2, 2, False), (2, 3, False), (2, 4, True), (2, None, True)],
)
def test_cache_interval_picks_the_layers(pools, interval, layer, cached):
    case = AttentionCase(
        algo=RING, cp=4, seq=32, kv_cache="full", cache_interval=interval, layer_number=layer
    )
    results = pools(4).run(run_shards, case, 1)
    assert_bytes_match_model(results, case)
    resent = results[0]["sent_backward"].get("ring_kv", 0)
    assert (resent == 0) is cached, results[0]["sent_backward"]


def _held_bytes(case: AttentionCase) -> int:
    """Bytes this rank keeps for the backward of one attention call (unique storages)."""
    mesh = initialize_context_parallel(case.config())
    q, k, v, _, _ = full_inputs(case)
    shards = [split_sequence(x, 0, mesh).requires_grad_() for x in (q, k, v)]

    def call():
        return context_parallel_attention(
            *(x.transpose(0, 1) for x in shards), "BSND", mesh=mesh, layer_number=1
        )

    return saved_tensor_bytes(call)[1]


@pytest.mark.parametrize("base", [BASES["ring-causal-GQA"], BASES["ulysses-replicated-kv"]])
def test_bytes_held_for_the_backward_follow_the_model(pools, base):
    pool = pools(world_size(base))
    held = {
        p: pool.run(_held_bytes, dataclasses.replace(base, kv_cache=p))[0]
        for p in (None, "full", "half")
    }
    nkv, d, es = base.kv_heads, base.head_dim, 8
    if base.algo == RING:
        # full keeps the R - 1 received K/V blocks, half only their K
        block = base.seq // base.cp * base.batch * nkv * d * es  # one of K or V
        assert held["full"] - held[None] == (base.cp - 1) * 2 * block
        assert held["half"] - held[None] == (base.cp - 1) * block
    else:
        # instead of K/V after the all-to-all (heads replicated up to u), the tensors before it
        u = base.cp
        post = base.seq * base.batch * (max(nkv, u) // u) * d * es
        pre = base.seq // u * base.batch * nkv * d * es
        assert held[None] - held["full"] == 2 * (post - pre) > 0
        assert held[None] - held["half"] == post - pre
