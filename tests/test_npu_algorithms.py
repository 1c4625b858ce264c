"""Every algorithm on the NPU path (--attention-backend npu), through the CPU emulation of the
torch_npu contract installed as ``torch_npu`` in each rank: block calls, sparse modes, [B,N,S,8]
statistics, the grad from the final output and statistics, SBH and BNSD blocks."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from usp_npu.kernels import select_kernel
from usp_npu.testing.cases import (
    AttentionCase,
    assert_matches_reference,
    check_attention,
    world_size,
)

MASKS = [("causal", "none"), ("general", "none"), ("general", "random")]
ALGOS = [("ulysses_cp_algo", None), ("megatron_cp_algo", None), ("hybrid_cp_algo", 2)]


def _cases():
    for (algo, u), (mtype, mask), kv, bnsd in itertools.product(
        ALGOS, MASKS, (4, 1), (False, True)
    ):
        yield pytest.param(
            AttentionCase(
                algo=algo,
                cp=4,
                ulysses_degree=u,
                mask_type=mtype,
                mask=mask,
                heads=4,
                kv_heads=kv,
                dtype="float32",
                backend="npu",
                bnsd=bnsd,
                emulate_npu=True,
                seq=32,
            ),
            id=f"{algo}-{mtype}-{mask}-kv{kv}-{'bnsd' if bnsd else 'sbh'}",
        )
    for (algo, u), layout in itertools.product(ALGOS, ("BNSD", "SBH")):
        yield pytest.param(
            AttentionCase(
                algo=algo,
                cp=4,
                ulysses_degree=u,
                heads=4,
                kv_heads=2,
                layout=layout,
                dtype="bfloat16",
                backend="npu",
                emulate_npu=True,
                seq=64,
            ),
            id=f"{algo}-bf16-{layout}",
        )
    yield pytest.param(
        AttentionCase(
            algo="megatron_cp_algo",
            cp=8,
            heads=4,
            kv_heads=2,
            dtype="float32",
            backend="npu",
            emulate_npu=True,
            seq=64,
        ),
        id="ring-cp8",
    )


@pytest.mark.parametrize("case", list(_cases()))
def test_npu_path_matches_dense(pools, case):
    results = pools(world_size(case)).run(check_attention, case)
    assert_matches_reference(results, case)


def test_npu_backend_without_torch_npu_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    with pytest.raises(RuntimeError, match=r"torch_npu.*CANN|CANN.*torch_npu"):
        select_kernel("npu", torch.device("cpu"), torch.float32, False)


def test_npu_backend_rejects_float64_before_any_collective():
    with pytest.raises(ValueError, match="--attention-backend torch"):
        select_kernel("npu", torch.device("cpu"), torch.float64, False)
