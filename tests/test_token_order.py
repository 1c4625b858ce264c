"""The token_order hook: inputs split by Megatron's zigzag (rank c holds chunks c and 2cp-1-c of
2cp, for every algorithm) give exact attention through one local permutation after the Ulysses
all-to-all. Checked against dense float64 attention, forward and every gradient, at world 4 and 8."""

from __future__ import annotations

import pytest
import torch

import usp_npu
from usp_npu.testing import dense_attention
from usp_npu.testing.cases import relative_error
from usp_npu.token_order import token_order_for, zigzag_positions

# (algo, cp, u, options): the Ulysses KV cache rebuilds K/V in the backward, so it must get the
# same permutation; all-gathered K/V arrive in group order like the all-to-all's
CONFIGS = [
    ("ulysses_cp_algo", 4, None, {}),
    ("megatron_cp_algo", 4, None, {}),
    ("hybrid_cp_algo", 4, 2, {}),
    ("ulysses_cp_algo", 4, None, {"context_parallel_kv_cache_policy": "full"}),
    ("ulysses_cp_algo", 4, None, {"context_parallel_kv_cache_policy": "half"}),
    ("ulysses_cp_algo", 4, None, {"use_ulysses_allgather_kv": True}),
    ("ulysses_cp_algo", 8, None, {}),
    ("hybrid_cp_algo", 8, 2, {}),
    ("hybrid_cp_algo", 8, 4, {}),
]


def _zigzag_attention(algo: str, cp: int, u: int | None, options: dict) -> dict:
    cfg = usp_npu.ContextParallelConfig(cp, algo, ulysses_degree_in_cp=u, **options)
    mesh = usp_npu.initialize_context_parallel(cfg)
    seq, b, n, nkv, d = 64, 2, 8, 2, 8
    g = torch.Generator().manual_seed(3)
    q = torch.randn(seq, b, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(seq, b, nkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(seq, b, n, d, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = dense_attention(*leaves, causal=True)
    ref.backward(dout)
    refs = [ref.detach()] + [x.grad for x in leaves]

    mine = zigzag_positions(seq, mesh.cp_rank, cp)
    order = token_order_for(zigzag_positions, seq, mesh)
    # Megatron's core attention gets [s, b, heads, d]: SBH with the heads flattened
    local = [x[mine].flatten(2).requires_grad_() for x in (q, k, v)]
    out = usp_npu.context_parallel_attention(*local, layout="SBH", head_dim=d, token_order=order)
    out.backward(dout[mine].flatten(2))
    got = [x.unflatten(2, (-1, d)) for x in (out.detach(), *(x.grad for x in local))]
    errors = [relative_error(x, r[mine]) for x, r in zip(got, refs, strict=True)]
    return {"errors": errors, "permuted": order is not None}


@pytest.mark.parametrize(
    "algo,cp,u,options",
    CONFIGS,
    ids=[f"{a[:4]}-cp{c}-u{u}{''.join(f'-{v}' for v in o.values())}" for a, c, u, o in CONFIGS],
)
def test_zigzag_split_is_exact_with_token_order(pools, algo, cp, u, options):
    results = pools(cp).run(_zigzag_attention, algo, cp, u, options)
    for rank, res in enumerate(results):
        assert max(res["errors"]) <= 1e-9, (rank, res["errors"])
    # the ring's own split is Megatron's: nothing to permute there, and something everywhere else
    assert any(r["permuted"] for r in results) == (algo != "megatron_cp_algo")


def _bad_orders() -> list[str]:
    cfg = usp_npu.ContextParallelConfig(2, "ulysses_cp_algo")
    usp_npu.initialize_context_parallel(cfg)
    q = torch.zeros(1, 4, 2, 8, dtype=torch.float64)  # BSND, 4 local tokens, 8 gathered
    messages = []
    for order in (torch.arange(7), torch.arange(8).int(), torch.zeros(8, dtype=torch.int64)):
        try:
            usp_npu.context_parallel_attention(q, q, q, token_order=order)
        except ValueError as e:
            messages.append(str(e))
    try:  # a contiguous split gives the two Ulysses ranks of cp 2 ... the same tokens: fine
        token_order_for(lambda s, c, n: torch.arange(s).chunk(n)[c], 8)
        messages.append("contiguous accepted")
    except ValueError as e:
        messages.append(str(e))
    return messages


def test_bad_token_order_is_refused_before_any_collective(pools):
    for messages in pools(2).run(_bad_orders):
        assert "shape [8]" in messages[0] and "shape [8]" in messages[1]
        assert "permutation" in messages[2]
        assert messages[3] == "contiguous accepted"


def test_token_order_for_refuses_a_split_no_permutation_can_fix():
    from usp_npu.parallel_state import ContextParallelMesh

    cfg = usp_npu.ContextParallelConfig(4, "hybrid_cp_algo", ulysses_degree_in_cp=2)
    mesh = ContextParallelMesh(cfg, 1, None, (0, 1, 2, 3), None, (0, 1), None, (0, 2), None, 0)

    def contiguous(s, c, n):
        return torch.arange(s).chunk(n)[c]

    with pytest.raises(ValueError, match="other tokens than usp_npu"):
        token_order_for(contiguous, 32, mesh)
    assert token_order_for(zigzag_positions, 32, mesh) is not None
