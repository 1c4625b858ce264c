"""Packed sequences on real gloo groups: Ulysses, ring and hybrid against dense float64 attention
with a block-diagonal mask, forward and dq/dk/dv.

The issue's matrix (algorithms x (u, r) x tp x MHA/GQA/MQA x dtypes x backends x document mixes)
is covered pairwise: every pair of values of two dimensions appears in some case below, the
full product is not run.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import usp_npu
from usp_npu.config import ContextParallelConfig
from usp_npu.packing import positions_from_cu_seqlens
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.sharding import gather_sequence, split_sequence
from usp_npu.testing.cases import (
    AttentionCase,
    assert_matches_reference,
    check_attention,
    run_shards,
    world_size,
)
from usp_npu.testing.reference import dense_attention

S = 64
MIXES = {
    "equal": (0, 16, 32, 48, 64),
    "long+short": (0, 40, 48, 56, 64),
    "2r-r2": tuple(range(0, 65, 4)),  # 16 documents of exactly 2r tokens for r = 2
    "2r-r4": tuple(range(0, 65, 8)),  # 8 documents of exactly 2r tokens for r = 4
    "odd": (0, 5, 23, 30, 31, 64),  # general: lengths the causal ring could not hold
}
# (u, r, tp): Ulysses (4, 1), ring (1, 4), hybrid (2, 2), hybrid (2, 4) on 8, tp 2 on 8
GRIDS = {
    "uly4": (4, 1, 1),
    "ring4": (1, 4, 1),
    "hyb2x2": (2, 2, 1),
    "hyb2x4": (2, 4, 1),
    "tp2-hyb2x2": (2, 2, 2),
    "tp2-ring4": (1, 4, 2),
}
KV = {"MHA": 8, "GQA": 2, "MQA": 1}
# (grid, mix, mask type, kv, dtype, backend, layout)
MATRIX = [
    ("uly4", "equal", "causal", "MHA", "float64", "torch", "BSND"),
    ("uly4", "odd", "general", "GQA", "float32", "npu", "TND"),
    ("uly4", "long+short", "causal", "MQA", "bfloat16", "torch", "SBH"),
    ("uly4", "odd", "causal", "GQA", "float64", "torch", "BSND"),  # documents straddle ranks
    ("ring4", "equal", "causal", "GQA", "bfloat16", "npu", "BSND"),
    ("ring4", "long+short", "causal", "MHA", "float64", "torch", "TND"),
    ("ring4", "2r-r4", "causal", "MQA", "float32", "torch", "BNSD"),
    ("ring4", "odd", "general", "MHA", "float64", "torch", "BSND"),
    ("ring4", "2r-r4", "causal", "GQA", "float32", "npu", "TND"),
    ("hyb2x2", "2r-r2", "causal", "GQA", "float64", "torch", "BSND"),
    ("hyb2x2", "long+short", "causal", "MQA", "float32", "npu", "BSND"),
    ("hyb2x2", "odd", "general", "GQA", "bfloat16", "torch", "SBH"),
    ("hyb2x2", "equal", "causal", "MHA", "float32", "npu", "TND"),
    ("hyb2x4", "long+short", "causal", "GQA", "float64", "torch", "TND"),
    ("hyb2x4", "2r-r4", "causal", "MHA", "bfloat16", "npu", "BSND"),
    ("hyb2x4", "odd", "general", "MQA", "float32", "torch", "BSND"),
    ("tp2-hyb2x2", "equal", "causal", "GQA", "float64", "torch", "BSND"),
    ("tp2-hyb2x2", "odd", "general", "MHA", "float32", "npu", "TND"),
    ("tp2-ring4", "long+short", "causal", "GQA", "bfloat16", "torch", "BSND"),
]


def _case(grid, mix, mask_type, kv, dtype, backend, layout) -> AttentionCase:
    u, r, tp = GRIDS[grid]
    cp = u * r
    algo = "ulysses_cp_algo" if r == 1 else "megatron_cp_algo" if u == 1 else "hybrid_cp_algo"
    return AttentionCase(
        algo=algo,
        cp=cp,
        ulysses_degree=u if algo == "hybrid_cp_algo" else None,
        tp=tp,
        mask_type=mask_type,
        layout=layout,
        dtype=dtype,
        seq=S,
        heads=8,
        kv_heads=KV[kv],
        head_dim=16,
        backend=backend,
        emulate_npu=backend == "npu",
        cu_seqlens=MIXES[mix],
    )


@pytest.mark.parametrize(
    "params", MATRIX, ids=["-".join(p) for p in MATRIX]
)  # fmt: skip
def test_packed_matches_block_diagonal_reference(pools, params):
    case = _case(*params)
    assert_matches_reference(pools(world_size(case)).run(check_attention, case), case)


# -- one document is the unpacked causal run, bit for bit -----------------------------------------
def _packed_and_unpacked(case: AttentionCase):
    packed = run_shards(case, repeats=1)["got"]
    plain = run_shards(AttentionCase(**{**case.__dict__, "cu_seqlens": None}), repeats=1)["got"]
    return [torch.equal(a, b) for a, b in zip(packed, plain, strict=True)]


@pytest.mark.parametrize(("algo", "u"), [("megatron_cp_algo", None), ("hybrid_cp_algo", 2)])
def test_one_document_equals_unpacked_causal_bit_for_bit(pools, algo, u):
    case = AttentionCase(
        algo=algo, cp=4, ulysses_degree=u, seq=S, heads=4, kv_heads=2, cu_seqlens=(0, S)
    )
    for same in pools(4).run(_packed_and_unpacked, case):
        assert same == [True, True, True, True]  # out, dq, dk, dv


# -- split / gather and RoPE position ids ---------------------------------------------------------
def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [S, 1, N, D] at integer positions ``pos`` [S]."""
    d = x.shape[-1]
    freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.double().view(-1, 1, 1, 1) * freq
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack(
        [x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1
    ).flatten(-2)


def _rope_attention(u: int, r: int, cu: tuple[int, ...]):
    algo = "megatron_cp_algo" if u == 1 else "hybrid_cp_algo"
    mesh = initialize_context_parallel(ContextParallelConfig(u * r, algo, u if u > 1 else None))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(S, 1, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pos = positions_from_cu_seqlens(cu)  # restarts at 0 in every document
    # one process: RoPE then attention restricted to each document (block-diagonal causal)
    doc = torch.zeros(S, dtype=torch.int64)
    doc[list(cu[1:-1])] = 1
    doc = doc.cumsum(0)
    ref = dense_attention(_rope(q, pos), _rope(k, pos), v, causal=True, mask=doc[:, None] != doc)
    # CP: split tokens and position ids with the same call, RoPE on the shard
    pos_l = split_sequence(pos, 0, cu)
    ql, kl, vl = (split_sequence(x, 0, cu) for x in (q, k, v))
    same_rope = torch.equal(_rope(ql, pos_l), split_sequence(_rope(q, pos), 0, cu))
    # layout TND: [T, N, D], the batch dimension of the canonical tensors dropped
    out = usp_npu.context_parallel_attention(
        _rope(ql, pos_l)[:, 0], _rope(kl, pos_l)[:, 0], vl[:, 0], "TND", cu_seqlens=cu
    )
    err = (out - split_sequence(ref, 0, cu)[:, 0]).abs().max().item()
    gathered = torch.equal(gather_sequence(out, 0, cu), gather_sequence(out, 0, cu, mesh=mesh))
    return same_rope, err, gathered


@pytest.mark.parametrize(("u", "r"), [(1, 4), (2, 2)])
def test_position_ids_split_with_the_same_call_give_the_same_rope(pools, u, r):
    for same_rope, err, gathered in pools(4).run(_rope_attention, u, r, (0, 24, 32, 40, 64)):
        assert same_rope and gathered and err <= 1e-9, err


def _split_gather(u: int, r: int, mask_type: str, cu: tuple[int, ...]):
    algo = "ulysses_cp_algo" if r == 1 else "megatron_cp_algo" if u == 1 else "hybrid_cp_algo"
    cfg = ContextParallelConfig(u * r, algo, u if algo == "hybrid_cp_algo" else None, mask_type)
    initialize_context_parallel(cfg)
    x = torch.arange(2 * S * 3, dtype=torch.float64).view(2, S, 3)
    local = split_sequence(x, 1, torch.tensor(cu))
    back = gather_sequence(local, 1, list(cu))
    shard = split_sequence(x, 1, cu).requires_grad_()
    (gather_sequence(shard, 1, cu) * x).sum().backward()
    return torch.equal(back, x), torch.equal(shard.grad, split_sequence(x, 1, cu))


@pytest.mark.parametrize(
    ("u", "r", "mask_type", "mix"),
    [(1, 4, "causal", "long+short"), (2, 2, "causal", "2r-r2"), (4, 1, "causal", "odd"),
     (2, 2, "general", "odd")],
)  # fmt: skip
def test_gather_of_split_is_identity(pools, u, r, mask_type, mix):
    for same, grad_ok in pools(4).run(_split_gather, u, r, mask_type, MIXES[mix]):
        assert same and grad_ok


# -- bad input: every rank raises before any collective --------------------------------------------
def _bad_packed_calls():
    hybrid = ContextParallelConfig(4, "hybrid_cp_algo", 2)  # u = 2, r = 2
    general = ContextParallelConfig(4, "hybrid_cp_algo", 2, "general")
    q = torch.randn(1, 4, 4, 8)  # BSND, local 4 tokens: S = 16
    x = torch.randn(16, 3)
    attn = usp_npu.context_parallel_attention
    return [
        ("start", "start at 0", hybrid, lambda: attn(q, q, q, cu_seqlens=[1, 8, 16])),
        ("end", "ends at 12", hybrid, lambda: attn(q, q, q, cu_seqlens=[0, 8, 12])),
        ("increasing", "strictly increasing", hybrid, lambda: attn(q, q, q, cu_seqlens=[0, 8, 8, 16])),
        ("float list", "Python ints", hybrid, lambda: attn(q, q, q, cu_seqlens=[0, 8.0, 16])),
        ("float tensor", "integer", hybrid, lambda: attn(q, q, q, cu_seqlens=torch.tensor([0.0, 16.0]))),
        ("batch", "batch 1", hybrid, lambda: attn(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), cu_seqlens=[0, 8, 16])),
        ("mask", "attention_mask", general, lambda: attn(q, q, q, attention_mask=torch.zeros(16, 16, dtype=torch.bool), cu_seqlens=[0, 8, 16])),
        ("doc length", "pad_packed", hybrid, lambda: attn(q, q, q, cu_seqlens=[0, 6, 16])),
        ("general total", "pad_packed", general, lambda: split_sequence(torch.randn(18, 3), 0, [0, 5, 18])),
        ("module", "strictly increasing", hybrid, lambda: usp_npu.USPAttention()(q, q, q, None, [0, 9, 8, 16])),
        ("split start", "start at 0", hybrid, lambda: split_sequence(x, 0, [2, 16])),
        ("split end", "ends at 15", hybrid, lambda: split_sequence(x, 0, [0, 15])),
        ("split doc", "pad_packed", hybrid, lambda: split_sequence(x, 0, [0, 6, 16])),
        ("gather doc", "pad_packed", hybrid, lambda: gather_sequence(x[:4], 0, [0, 6, 16])),
        ("gather end", "ends at 8", hybrid, lambda: gather_sequence(x[:4], 0, [0, 8])),
    ]  # fmt: skip


def _every_rank_raises():
    outcomes = []
    for name, fragment, cfg, call in _bad_packed_calls():
        initialize_context_parallel(cfg)
        try:
            call()
            outcomes.append((name, fragment, None))
        except ValueError as err:
            outcomes.append((name, fragment, str(err)))
    ok = torch.ones(1)
    dist.all_reduce(ok)  # nobody is stuck in a collective
    return outcomes, ok.item()


def test_bad_packed_input_raises_on_every_rank_before_any_collective(pools):
    for outcomes, total in pools(4).run(_every_rank_raises):
        assert total == 4.0
        for name, fragment, message in outcomes:
            assert message is not None, f"{name}: no error"
            assert fragment in message, (name, message)
            assert "cu_seqlens" in message or "pad_packed" in message, (name, message)
