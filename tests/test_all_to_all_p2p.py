"""``--ulysses-all-to-all p2p``: the Ulysses all-to-all as point-to-point exchanges, receives
posted first. Bit-identical to the collective (forward and every gradient), exact against dense
attention, the same bytes counted, and every receive posted before any send."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from usp_npu.arguments import add_context_parallel_args
from usp_npu.comm import p2p
from usp_npu.config import HYBRID, ContextParallelConfig
from usp_npu.testing.cases import (
    AttentionCase,
    assert_matches_reference,
    check_attention,
    run_shards,
    world_size,
)


def _collective_and_p2p(case: AttentionCase):
    """This rank's (out, dq, dk, dv) and bytes sent both ways, and the p2p run's check."""
    runs = [run_shards(dataclasses.replace(case, all_to_all=kind), repeats=1)
            for kind in ("collective", "p2p")]  # fmt: skip
    checked = check_attention(dataclasses.replace(case, all_to_all="p2p"))
    return [(r["got"], r["sent_forward"], r["sent_backward"]) for r in runs], checked


C = AttentionCase
CASES = [
    C(cp=2, heads=8, seq=32),
    C(cp=4, heads=8, seq=32, batch=2, layout="BNSD", mask_type="general", mask="random"),
    C(cp=4, heads=8, kv_heads=2, seq=32),  # GQA: K/V heads replicated up to u
    C(cp=4, heads=8, seq=64, algo=HYBRID, ulysses_degree=2, pipeline_chunks=2),
    C(cp=8, heads=8, seq=64, algo=HYBRID, ulysses_degree=4, cu_seqlens=(0, 24, 40, 64)),
    C(cp=4, heads=8, seq=32, kv_cache="half"),  # the Ulysses KV cache redoes the all-to-all
    C(cp=2, heads=8, kv_heads=2, seq=32, allgather_kv=True),  # only q crosses the all-to-all
    C(cp=4, heads=8, seq=64, head_dim=16, dtype="bfloat16", algo=HYBRID, ulysses_degree=2),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_p2p_all_to_all_is_bit_identical_to_the_collective(pools, case):
    results = pools(world_size(case)).run(_collective_and_p2p, case)
    for rank, ((collective, p2p_run), _) in enumerate(results):
        for name, a, b in zip(("out", "dq", "dk", "dv"), collective[0], p2p_run[0], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"rank {rank}: {name}, {case}"
        assert collective[1:] == p2p_run[1:], f"rank {rank}: bytes differ, {case}"
        assert p2p_run[1]["all_to_all"] > 0  # the option's path really ran an exchange
    assert_matches_reference([r[1] for r in results], dataclasses.replace(case, all_to_all="p2p"))


def _posting_order(case: AttentionCase) -> list[str]:
    """The order this rank posts its point-to-point operations in (p2p all-to-all only)."""
    log: list[str] = []
    saved = p2p.dist.irecv, p2p.dist.isend

    def logged(kind, post):
        def call(*args, **kwargs):
            log.append(kind)
            return post(*args, **kwargs)

        return call

    p2p.dist.irecv, p2p.dist.isend = logged("recv", saved[0]), logged("send", saved[1])
    try:
        run_shards(case, repeats=1)
    finally:
        p2p.dist.irecv, p2p.dist.isend = saved
    return log


def test_p2p_all_to_all_posts_every_receive_before_any_send(pools):
    # Ulysses cp 4: three peers per exchange; forward (q/k/v in, out back) and backward
    case = C(cp=4, heads=8, seq=32, all_to_all="p2p", pipeline_chunks=1)
    for log in pools(4).run(_posting_order, case):
        exchanges = [log[i : i + 6] for i in range(0, len(log), 6)]
        assert len(log) % 6 == 0 and len(exchanges) >= 4, log
        assert all(x == ["recv"] * 3 + ["send"] * 3 for x in exchanges), log


def test_all_to_all_kind_is_a_flag_and_checked():
    parser = add_context_parallel_args(argparse.ArgumentParser())
    args = parser.parse_args(["--context-parallel-size", "2", "--ulysses-all-to-all", "p2p"])
    assert ContextParallelConfig.from_args(args).ulysses_all_to_all == "p2p"
    assert parser.parse_args([]).ulysses_all_to_all == "collective"
    with pytest.raises(SystemExit):
        parser.parse_args(["--ulysses-all-to-all", "nccl"])
    with pytest.raises(ValueError, match="--ulysses-all-to-all must be one of collective, p2p"):
        ContextParallelConfig(2, ulysses_all_to_all="mpi").validate(8, 32)
