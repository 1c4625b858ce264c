"""kvallgather_cp_algo and --use-ulysses-allgather-kv: exact against dense attention, bytes per
rank equal to the model, and compared with what they replace (the ring; K/V head replication)."""

from __future__ import annotations

import dataclasses

import pytest

from usp_npu.testing.cases import (
    AttentionCase,
    assert_bytes_match_model,
    assert_matches_reference,
    check_attention,
    world_size,
)

KVAG, ULYSSES, RING = "kvallgather_cp_algo", "ulysses_cp_algo", "megatron_cp_algo"


def _kvag(cp, mask_type="causal", mask="none", kv=4, dtype="float64", **kw):
    wide = dtype != "float64"
    return AttentionCase(
        algo=KVAG, cp=cp, mask_type=mask_type, mask=mask, heads=4, kv_heads=kv, dtype=dtype,
        seq=64 if wide else 32, head_dim=16 if wide else 8, **kw,
    )  # fmt: skip


KVAG_CASES = {
    "cp2-causal-MHA": _kvag(2),
    "cp2-general-random-GQA-SBH": _kvag(2, "general", "random", kv=2, layout="SBH"),
    "cp4-causal-GQA-BNSD": _kvag(4, kv=2, layout="BNSD", batch=2),
    "cp4-general-MQA": _kvag(4, "general", kv=1),
    "cp4-causal-MQA-fp32": _kvag(4, kv=1, dtype="float32"),
    "cp4-general-random-bf16": _kvag(4, "general", "random", dtype="bfloat16"),
    "cp8-causal-GQA": _kvag(8, kv=2),
    "cp8-general-random-MHA-fp32": _kvag(8, "general", "random", dtype="float32"),
    "tp2-cp4-causal-GQA": _kvag(4, kv=2, tp=2),
    "cp4-general-random-npu-emulated": _kvag(
        4, "general", "random", kv=2, dtype="float32", backend="npu", emulate_npu=True
    ),
}


@pytest.mark.parametrize("case", list(KVAG_CASES.values()), ids=list(KVAG_CASES))
def test_kvallgather_matches_dense_and_the_byte_model(pools, case):
    results = pools(world_size(case)).run(check_attention, case)
    assert_matches_reference(results, case)
    assert_bytes_match_model(results, case)
    # the all-gather moves exactly the K/V bytes the ring moves forward, once; the backward
    # sends only the dK/dV reduce-scatter (the ring sends K/V again plus dK/dV)
    ring = pools(world_size(case)).run(check_attention, dataclasses.replace(case, algo=RING))
    ag, rg = results[0], ring[0]
    assert ag["sent_forward"]["all_gather"] == rg["sent_forward"]["ring_kv"]
    assert ag["sent_backward"]["reduce_scatter"] == rg["sent_backward"]["ring_dkv"]
    assert sum(ag["sent_backward"].values()) < sum(rg["sent_backward"].values())


def _uly(cp, kv, mask_type="causal", mask="none", dtype="float64", heads=8, **kw):
    wide = dtype != "float64"
    return AttentionCase(
        algo=ULYSSES, cp=cp, heads=heads, kv_heads=kv, allgather_kv=True, mask_type=mask_type,
        mask=mask, dtype=dtype, seq=64 if wide else 32, head_dim=16 if wide else 8, **kw,
    )  # fmt: skip


ALLGATHER_CASES = {
    "u4-kv1-causal": _uly(4, 1),
    "u4-kv2-general-random-SBH": _uly(4, 2, "general", "random", layout="SBH"),
    "u4-kv1-causal-bf16": _uly(4, 1, dtype="bfloat16"),
    "u4-kv4-heads16-general": _uly(4, 4, "general", heads=16),
    "u8-kv2-causal-fp32": _uly(8, 2, dtype="float32"),
    "u8-kv1-general-random": _uly(8, 1, "general", "random"),
    "tp2-u2-kv1-causal": _uly(2, 2, heads=8, tp=2),
    "u4-kv1-causal-npu-emulated": _uly(4, 1, dtype="float32", backend="npu", emulate_npu=True),
}


@pytest.mark.parametrize("case", list(ALLGATHER_CASES.values()), ids=list(ALLGATHER_CASES))
def test_ulysses_allgather_kv_matches_dense_and_the_byte_model(pools, case):
    results = pools(world_size(case)).run(check_attention, case)
    assert_matches_reference(results, case)
    assert_bytes_match_model(results, case)
    # against replication: the same all-to-all of queries and outputs; K/V bytes differ by
    # Nkv * u / (K/V heads after replication), equal for one K/V head per tensor-parallel rank
    base = pools(world_size(case)).run(
        check_attention, dataclasses.replace(case, allgather_kv=False)
    )
    assert_matches_reference(base, case)
    u, nkv = case.cp, (case.kv_heads or case.heads) // case.tp
    replicated = nkv if nkv % u == 0 else u
    fwd_ag, fwd_rep = results[0]["sent_forward"], base[0]["sent_forward"]
    q_and_out = fwd_ag["all_to_all"]
    kv_ag, kv_rep = fwd_ag["all_gather"], fwd_rep["all_to_all"] - q_and_out
    # all-gather: (u - 1) shards of Nkv heads; all-to-all: (u - 1) / u of `replicated` heads
    assert kv_ag * replicated == kv_rep * nkv * u
    if nkv == 1:
        assert kv_ag == kv_rep  # MindSpeed's case: the same bytes, no replicated copies


def _bad_option_calls():
    """Bad calls with the new options, on every rank; then a collective proves nobody hung."""
    import torch
    import torch.distributed as dist

    from usp_npu import context_parallel_attention
    from usp_npu.config import ContextParallelConfig
    from usp_npu.parallel_state import initialize_context_parallel

    def t(*shape):
        return torch.randn(*shape)

    ag = ContextParallelConfig(2, ULYSSES, use_ulysses_allgather_kv=True)
    kvag = ContextParallelConfig(2, KVAG)
    calls = [
        (ag, lambda: context_parallel_attention(*(t(1, 8, 4, 8) for _ in range(3)))),
        (kvag, lambda: context_parallel_attention(*(t(1, 3, 4, 8) for _ in range(3)))),
        (ContextParallelConfig(2, RING, cp_window_size=2), None),  # w must be below r = 2
        (ContextParallelConfig(2, RING, context_parallel_cache_interval=1), None),
    ]
    messages = []
    for cfg, call in calls:
        try:
            initialize_context_parallel(cfg)
            call()
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    ok = torch.ones(1)
    dist.all_reduce(ok)
    return messages, ok.item()


def test_bad_option_input_raises_on_every_rank_before_any_collective(pools):
    results = pools(2).run(_bad_option_calls)
    fragments = [
        "--use-ulysses-allgather-kv",
        "--seq-length 6",
        "--cp-window-size 2",
        "--context-parallel-cache-interval 1",
    ]
    for messages, total in results:
        assert total == 2.0  # no rank is stuck in a collective
        for fragment, message in zip(fragments, messages, strict=True):
            assert message is not None and fragment in message, (fragment, message)
    assert results[0][0] == results[1][0]  # the same error on every rank
