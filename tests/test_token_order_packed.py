"""token_order for packed sequences: Megatron's THD split (every padded document cut into 2cp
chunks, CP rank c holds chunks c and 2cp-1-c of each, documents in order; TransformerEngine's
thd_get_partitioned_indices) mapped onto usp_npu's packed split by one local permutation after
the Ulysses all-to-all. Unit checks for every (u, r) of cp 2 and 4, then attention against dense
float64 with a block-diagonal causal mask, forward and every gradient, on gloo groups."""

from __future__ import annotations

import itertools

import pytest
import torch

import usp_npu
from usp_npu.packing import pad_packed
from usp_npu.parallel_state import ContextParallelMesh
from usp_npu.testing import dense_attention
from usp_npu.testing.cases import relative_error
from usp_npu.token_order import token_order_for, zigzag_positions

# actual document lengths; each is padded to a multiple of 2 cp as Megatron's THD split needs
MIXES = {
    "three-unequal": [13, 24, 19],  # 24 is a multiple of 2cp already, the others only after padding
    "one": [29],
    "tiny": [1, 1, 2, 1],  # documents far shorter than 2 cp: mostly padding
    "many": [8, 3, 16, 5, 7],
}
GRIDS = [(2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]  # (u, r): every split of cp 2 and 4


def _algo(u: int, r: int) -> str:
    return "ulysses_cp_algo" if r == 1 else "megatron_cp_algo" if u == 1 else "hybrid_cp_algo"


def _mesh(u: int, r: int, cp_rank: int, mask: str = "causal") -> ContextParallelMesh:
    """This CP rank's mesh without process groups (token_order_for is pure arithmetic)."""
    cfg = usp_npu.ContextParallelConfig(
        u * r,
        _algo(u, r),
        ulysses_degree_in_cp=u if u > 1 and r > 1 else None,
        attention_mask_type=mask,
    )
    ring_rank, ulysses_rank = divmod(cp_rank, u)
    ulysses = tuple(range(ring_rank * u, ring_rank * u + u))
    ring = tuple(ulysses_rank + j * u for j in range(r))
    return ContextParallelMesh(
        cfg, 1, None, tuple(range(u * r)), None, ulysses, None, ring, None, cp_rank
    )


def _te_thd_indices(cu_padded: list[int], cp_size: int, cp_rank: int) -> list[int]:
    """TransformerEngine's thd_get_partitioned_indices, token by token as its kernel computes it
    (local token i of a document: first half of the rank's share -> offset cp_rank chunks, else
    2 (cp - 1) - cp_rank more)."""
    local = [x // cp_size for x in cu_padded]
    out = []
    for token in range(local[-1]):
        doc = max(d for d in range(len(local) - 1) if local[d] <= token)
        half = (local[doc + 1] - local[doc]) // 2
        index = token - local[doc]
        offset = cp_rank if index < half else 2 * (cp_size - 1) - cp_rank
        out.append(index + local[doc] * cp_size + half * offset)
    return out


def _ring_share(cu: tuple[int, ...], ring_rank: int, r: int) -> torch.Tensor:
    """What the ring schedule expects ring rank ``ring_rank`` to hold (docs/packed.md)."""
    if r == 1:
        return torch.arange(cu[-1])
    parts = []
    for a, b in itertools.pairwise(cu):
        chunks = torch.arange(a, b).chunk(2 * r)
        parts += [chunks[ring_rank], chunks[2 * r - 1 - ring_rank]]
    return torch.cat(parts)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize(("u", "r"), GRIDS, ids=[f"u{u}r{r}" for u, r in GRIDS])
def test_packed_token_order_maps_the_thd_split_onto_the_ring_share(u, r, mix):
    cp = u * r
    cu = tuple(pad_packed(list(itertools.accumulate(MIXES[mix], initial=0)), 2 * cp)[0].tolist())
    permuted = False
    for c in range(cp):
        thd = zigzag_positions(cu[-1], c, cp, cu_seqlens=cu)
        assert thd.tolist() == _te_thd_indices(list(cu), cp, c), (c, cu)
        mesh = _mesh(u, r, c)
        order = token_order_for(zigzag_positions, cu[-1], mesh, cu_seqlens=cu)
        first = mesh.ring_rank * u
        gathered = torch.cat([zigzag_positions(cu[-1], m, cp, cu) for m in range(first, first + u)])
        arranged = gathered if order is None else gathered[order]
        assert torch.equal(arranged, _ring_share(cu, mesh.ring_rank, r)), (c, order)
        permuted |= order is not None
    # the ring's own packed split is TE's: nothing to permute; Ulysses and hybrid permute
    assert permuted == (u > 1), (u, r, cu)


def test_packed_token_order_refuses_what_no_permutation_fixes():
    cu = (0, 8, 24)
    with pytest.raises(ValueError, match=r"other tokens than usp_npu.*general.*cu_seqlens"):
        token_order_for(zigzag_positions, 24, _mesh(1, 2, 0, "general"), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"document length 6 .* cu_seqlens_q_padded"):
        token_order_for(zigzag_positions, 14, _mesh(2, 1, 0), cu_seqlens=(0, 8, 14))
    with pytest.raises(ValueError, match="cu_seqlens ends at 24"):
        token_order_for(zigzag_positions, 32, _mesh(1, 2, 0), cu_seqlens=cu)


# -- attention: THD split + token_order vs dense float64 ---------------------------------------
def _thd_attention(u: int, r: int, lengths: list[int]) -> dict:
    cp = u * r
    cfg = usp_npu.ContextParallelConfig(
        cp, _algo(u, r), ulysses_degree_in_cp=u if u > 1 and r > 1 else None
    )
    mesh = usp_npu.initialize_context_parallel(cfg)
    cu = pad_packed(list(itertools.accumulate(lengths, initial=0)), 2 * cp)[0].tolist()
    s, n, nkv, d = cu[-1], 4, 2, 8
    g = torch.Generator().manual_seed(5)
    q = torch.randn(s, 1, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(s, 1, nkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(s, 1, n, d, generator=g, dtype=torch.float64)
    doc = torch.bucketize(torch.arange(s), torch.tensor(cu[1:]), right=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = dense_attention(*leaves, causal=True, mask=doc[:, None] != doc)
    ref.backward(dout)
    refs = [ref.detach()] + [x.grad for x in leaves]

    mine = zigzag_positions(s, mesh.cp_rank, cp, cu_seqlens=cu)  # Megatron's THD split
    order = token_order_for(zigzag_positions, s, mesh, cu_seqlens=cu)
    local = [x[mine, 0].requires_grad_() for x in (q, k, v)]  # THD: [t, heads, d]
    out = usp_npu.context_parallel_attention(*local, layout="TND", cu_seqlens=cu, token_order=order)
    out.backward(dout[mine, 0])
    got = [out.detach(), *(x.grad for x in local)]
    errors = [relative_error(x, ref_[mine, 0]) for x, ref_ in zip(got, refs, strict=True)]
    return {"errors": errors, "permuted": order is not None}


@pytest.mark.parametrize("mix", ["three-unequal", "tiny"])
@pytest.mark.parametrize(("u", "r"), GRIDS, ids=[f"u{u}r{r}" for u, r in GRIDS])
def test_thd_split_with_token_order_matches_dense(pools, u, r, mix):
    results = pools(u * r).run(_thd_attention, u, r, MIXES[mix])
    for rank, res in enumerate(results):
        assert max(res["errors"]) <= 1e-9, (rank, res["errors"])
    assert any(res["permuted"] for res in results) == (u > 1)


def test_zigzag_positions_at_cp1_is_megatrons_no_split():
    """Megatron leaves the batch whole at cp 1, odd lengths included (THD or not)."""
    assert torch.equal(zigzag_positions(7, 0, 1), torch.arange(7))
    assert torch.equal(zigzag_positions(10, 0, 1, cu_seqlens=(0, 3, 10)), torch.arange(10))
