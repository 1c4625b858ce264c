"""Pipelined Ulysses: bit-identical to the unpipelined path, exact, overlapped, chunk rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from usp_npu import ops
from usp_npu.algorithms import usp
from usp_npu.algorithms.usp import pipeline_chunks, usp_attention
from usp_npu.config import HYBRID, ULYSSES, ContextParallelConfig
from usp_npu.kernels import ReferenceBlockKernel
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.sharding import split_sequence
from usp_npu.testing.cases import (
    AttentionCase,
    assert_matches_reference,
    check_attention,
    run_shards,
    world_size,
)


def _plain_and_pipelined(case: AttentionCase, chunks: int):
    """This rank's (out, dq, dk, dv) with no pipelining and with ``chunks``, and the latter's
    check against the dense float64 reference."""
    plain = run_shards(dataclasses.replace(case, pipeline_chunks=1), repeats=1)["got"]
    piped = dataclasses.replace(case, pipeline_chunks=chunks)
    return plain, run_shards(piped, repeats=1)["got"], check_attention(piped)


C = AttentionCase
CASES = [
    (C(cp=2, heads=8, seq=32), 4),
    (C(cp=2, heads=8, seq=32, batch=2, layout="BNSD"), 2),
    (C(cp=2, heads=8, seq=32, mask_type="general", mask="random"), 2),
    (C(cp=2, heads=8, kv_heads=4, seq=32), 2),  # GQA, K/V heads split (no replication)
    (C(cp=4, heads=8, seq=32, mask_type="general"), 2),
    (C(cp=4, heads=8, seq=64, algo=HYBRID, ulysses_degree=2), 4),
    (C(cp=4, heads=8, kv_heads=4, seq=64, algo=HYBRID, ulysses_degree=2), 2),
    (
        C(cp=4, heads=8, seq=32, algo=HYBRID, ulysses_degree=2, mask_type="general", mask="random"),
        2,
    ),
    (C(cp=8, heads=8, seq=64, algo=HYBRID, ulysses_degree=4), 2),
    (C(cp=8, heads=8, seq=64, algo=HYBRID, ulysses_degree=2, overlap=True), 4),
    (C(cp=2, heads=8, seq=64, head_dim=16, dtype="float32"), 4),
    # packed documents (cu_seqlens): the ring's packed steps run unchanged in every chunk
    (C(cp=4, heads=8, seq=64, algo=HYBRID, ulysses_degree=2, cu_seqlens=(0, 40, 48, 56, 64)), 2),
    (
        C(
            cp=4,
            heads=8,
            seq=64,
            algo=HYBRID,
            ulysses_degree=2,
            mask_type="general",
            cu_seqlens=(0, 5, 23, 30, 31, 64),
        ),
        4,
    ),
    (C(cp=2, heads=8, seq=64, cu_seqlens=(0, 16, 32, 48, 64)), 2),
    # the ring's routes and KV cache inside every chunk: cache policies, double ring
    (C(cp=4, heads=8, seq=64, algo=HYBRID, ulysses_degree=2, kv_cache="full"), 2),
    (C(cp=4, heads=8, seq=64, algo=HYBRID, ulysses_degree=2, kv_cache="half"), 4),
    (C(cp=8, heads=8, seq=64, algo=HYBRID, ulysses_degree=2, window=2), 2),
    (C(cp=4, heads=8, seq=64, head_dim=16, dtype="bfloat16", algo=HYBRID, ulysses_degree=2), 2),
]


@pytest.mark.parametrize(
    ("case", "chunks"), CASES, ids=lambda x: str(x) if isinstance(x, int) else None
)
def test_pipelined_is_bit_identical_to_unpipelined(pools, case, chunks):
    results = pools(world_size(case)).run(_plain_and_pipelined, case, chunks)
    for rank, (plain, piped, _) in enumerate(results):
        for name, a, b in zip(("out", "dq", "dk", "dv"), plain, piped, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), f"rank {rank}: {name} differs with {chunks} chunks, {case}"
    assert_matches_reference(
        [r[2] for r in results], dataclasses.replace(case, pipeline_chunks=chunks)
    )


def test_gqa_replication_keeps_one_chunk_and_rejects_more(pools):
    # 2 K/V heads on u = 4: replicated to one per rank, so chunks cannot split them further
    case = AttentionCase(cp=4, heads=8, kv_heads=2, seq=32, pipeline_chunks=1)
    assert_matches_reference(pools(4).run(check_attention, case), case)
    errors = ContextParallelConfig(4, ULYSSES, ulysses_pipeline_chunks=2).local_head_errors(8, 2)
    assert errors and "--ulysses-pipeline-chunks 2" in errors[0] and "divisors of 1" in errors[0]


def _log_pipeline(chunks: int, hybrid: bool):
    """Forward + backward with the exchanges and kernel calls logged in the order they happen."""
    cfg = (
        ContextParallelConfig(4, HYBRID, ulysses_degree_in_cp=2)
        if hybrid
        else ContextParallelConfig(2)
    )
    mesh = initialize_context_parallel(cfg)
    log = []

    class Kernel(ReferenceBlockKernel):
        def forward(self, q, *a, **kw):
            log.append("compute")
            return super().forward(q, *a, **kw)

        def backward(self, dout, *a, **kw):
            log.append("compute")
            return super().backward(dout, *a, **kw)

    def logged(name, fn):
        def post(*a, **kw):
            log.append(f"{name} posted")
            pending = fn(*a, **kw)
            finish = pending._finish
            pending._finish = lambda: (log.append(f"{name} done"), finish())
            return pending

        return post

    saved = usp.post_heads_to_sequence, usp.post_sequence_to_heads
    usp.post_heads_to_sequence = logged("in", saved[0])
    usp.post_sequence_to_heads = logged("out", saved[1])
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(32, 1, 8, 4, generator=g, dtype=torch.float64) for _ in range(3))
        local = [split_sequence(x, 0, mesh=mesh).requires_grad_() for x in (q, k, v)]
        out = usp_attention(
            *local,
            mesh=mesh,
            kernel=Kernel(),
            scale=0.5,
            merge=ops.ring_attention_update_,
            chunks=chunks,
        )
        log.append("|")
        out.sum().backward()
    finally:
        usp.post_heads_to_sequence, usp.post_sequence_to_heads = saved
    return log


@pytest.mark.parametrize("hybrid", [False, True])
def test_next_chunk_exchange_is_in_flight_while_a_chunk_computes(pools, hybrid):
    chunks = 4
    for log in pools(4 if hybrid else 2).run(_log_pipeline, chunks, hybrid):
        cut = log.index("|")
        for phase, events in (("forward", log[:cut]), ("backward", log[cut + 1 :])):
            per_chunk = 1  # one collective per chunk: q, k, v (forward) or dO (backward)
            # a chunk's compute (one block, or its whole ring) is one run of "compute" events
            starts = [
                i for i, e in enumerate(events) if e == "compute" and events[i - 1] != "compute"
            ]
            assert len(starts) == chunks, (phase, events)
            for c, i in enumerate(starts):
                before = events[:i]
                # chunk c's input has arrived and chunk c + 1's is already in flight
                assert before.count("in done") == per_chunk * (c + 1), (phase, c, events)
                assert before.count("in posted") == per_chunk * min(c + 2, chunks), (
                    phase,
                    c,
                    events,
                )
                # chunk c - 1's output exchange is still in flight while chunk c computes
                assert before.count("out posted") == c, (phase, c, events)
                assert before.count("out done") == max(c - 1, 0), (phase, c, events)
            assert events.count("out done") == chunks


@pytest.mark.parametrize(
    ("q_shape", "kv_heads", "u", "elem", "want"),
    [
        ((4096, 1, 8, 64), 8, 2, 4, 4),  # S = 8192 on 2 ranks, fp32: 4 chunks of 6 MiB
        ((4096, 1, 8, 64), 8, 4, 4, 2),  # 2 heads per rank: at most 2 chunks
        ((8, 1, 8, 8), 8, 2, 8, 1),  # tiny: one chunk (under 1 MiB)
        ((4096, 1, 32, 128), 8, 2, 2, 4),  # GQA, no replication: 4 K/V heads per rank
        ((4096, 1, 32, 128), 2, 2, 2, 1),  # GQA replicated to u: one K/V head per rank
        ((4096, 1, 8, 64), 8, 1, 4, 1),  # no Ulysses, no all-to-all
    ],
)
def test_chunk_rule(q_shape, kv_heads, u, elem, want):
    assert pipeline_chunks(q_shape, kv_heads, u, elem) == want


def test_chunk_override_is_checked():
    assert pipeline_chunks((8, 1, 8, 8), 8, 2, 8, override=4) == 4
    with pytest.raises(ValueError, match="--ulysses-pipeline-chunks 3 must divide"):
        pipeline_chunks((8, 1, 8, 8), 8, 2, 8, override=3)
    with pytest.raises(ValueError, match="--ulysses-pipeline-chunks must be an integer >= 1"):
        ContextParallelConfig(2, ulysses_pipeline_chunks=0).validate(8, 32)
    with pytest.raises(ValueError, match="--ulysses-pipeline-chunks 8 must divide the 4 query"):
        ContextParallelConfig(2, ulysses_pipeline_chunks=8).validate(8, 32)
