"""Bad input: a clear error on EVERY rank, raised before any collective, never a hang."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import usp_npu
from usp_npu import context_parallel_attention
from usp_npu.config import ContextParallelConfig
from usp_npu.parallel_state import initialize_context_parallel


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _bad_calls():
    """(name, expected message fragment, config, call) — every call is wrong in one way."""
    ring = ContextParallelConfig(2, "megatron_cp_algo")
    uly = ContextParallelConfig(2, "ulysses_cp_algo")
    general = ContextParallelConfig(2, "megatron_cp_algo", attention_mask_type="general")
    q = _t(1, 8, 4, 16)  # BSND: local seq 8, 4 heads
    return [
        ("q/k seq", "disagree on the local sequence", ring, lambda: context_parallel_attention(q, _t(1, 6, 4, 16), _t(1, 6, 4, 16))),
        ("k/v shape", "k and v shapes differ", ring, lambda: context_parallel_attention(q, q, _t(1, 8, 2, 16))),
        ("dtype", "dtypes differ", ring, lambda: context_parallel_attention(q, q, q.double())),
        ("device", "different devices", ring, lambda: context_parallel_attention(q, q.to("meta"), q)),
        ("layout", "unknown layout", ring, lambda: context_parallel_attention(q, q, q, layout="BHSD")),
        ("sbh head_dim", "head_dim", ring, lambda: context_parallel_attention(_t(8, 1, 64), _t(8, 1, 64), _t(8, 1, 64), layout="SBH")),
        ("head_dim mismatch", "head_dim=8", ring, lambda: context_parallel_attention(q, q, q, head_dim=8)),
        ("seq split", "--seq-length", ring, lambda: context_parallel_attention(*(_t(1, 3, 4, 16) for _ in range(3)))),
        ("heads vs u", "--context-parallel-size", uly, lambda: context_parallel_attention(*(_t(1, 8, 3, 16) for _ in range(3)))),
        ("kv heads vs u", "key/value heads", uly, lambda: context_parallel_attention(_t(1, 8, 6, 16), _t(1, 8, 3, 16), _t(1, 8, 3, 16))),
        ("mask with causal", "--attention-mask-type general", ring, lambda: context_parallel_attention(q, q, q, attention_mask=torch.zeros(16, 16, dtype=torch.bool))),
        ("mask shape", "[16, 16]", general, lambda: context_parallel_attention(q, q, q, attention_mask=torch.zeros(8, 8, dtype=torch.bool))),
        ("mask dtype", "bool", general, lambda: context_parallel_attention(q, q, q, attention_mask=torch.zeros(16, 16))),
        ("dropout on torch", "--attention-backend npu", ring, lambda: context_parallel_attention(q, q, q, dropout_p=0.1)),
        ("backend dtype", "--attention-backend", ContextParallelConfig(2, "megatron_cp_algo", attention_backend="npu"), lambda: context_parallel_attention(q.double(), q.double(), q.double())),
    ]  # fmt: skip


def _every_rank_raises():
    """Run every bad call on every rank; then one good collective proves nobody hung."""
    outcomes = []
    for name, fragment, cfg, call in _bad_calls():
        initialize_context_parallel(cfg)
        try:
            call()
            outcomes.append((name, fragment, None))
        except (ValueError, TypeError, RuntimeError) as err:
            outcomes.append((name, fragment, f"{type(err).__name__}: {err}"))
    ok = torch.ones(1)
    dist.all_reduce(ok)
    return outcomes, ok.item()


def test_bad_input_raises_on_every_rank_before_any_collective(pools):
    results = pools(2).run(_every_rank_raises)
    for outcomes, total in results:
        assert total == 2.0  # the group is still usable: no rank is stuck in a collective
        for name, fragment, message in outcomes:
            assert message is not None, f"{name}: no error raised"
            assert fragment in message, f"{name}: {message!r} does not mention {fragment!r}"
    # the same error on every rank
    assert results[0][0] == results[1][0]


def test_attention_before_initialize_explains_the_setup():
    from usp_npu import parallel_state

    assert not dist.is_initialized()
    assert not parallel_state.is_initialized()
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="initialize_context_parallel"):
        usp_npu.context_parallel_attention(q, q, q)
