"""Which tokens each CP rank holds (REFERENCE.md section 3), and split/gather on real gloo groups.

The expected index lists are written out by hand from the reference's description, not
recomputed with the formula under test.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from usp_npu.config import HYBRID, RING, ULYSSES, ContextParallelConfig
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.sharding import gather_sequence, split_sequence, token_indices


def _all_ranks(seq: int, u: int, r: int, causal: bool) -> list[list[int]]:
    return [token_indices(seq, rank, u, r, causal).tolist() for rank in range(u * r)]


# -- token_indices against hand-written lists --------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_ulysses_cp4_is_contiguous(causal):
    # u = cp = 4, r = 1: causal and general are the same contiguous split
    assert _all_ranks(8, 4, 1, causal) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert _all_ranks(12, 4, 1, causal) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_ring_cp2_causal_zigzag():
    # 4 chunks of 2: c0=[0,1] c1=[2,3] c2=[4,5] c3=[6,7]; rank i holds [c_i ; c_(3-i)]
    assert _all_ranks(8, 1, 2, True) == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert _all_ranks(4, 1, 2, True) == [[0, 3], [1, 2]]


def test_ring_cp4_causal_zigzag():
    # 8 chunks of 2; rank i holds [c_i ; c_(7-i)]
    assert _all_ranks(16, 1, 4, True) == [
        [0, 1, 14, 15],
        [2, 3, 12, 13],
        [4, 5, 10, 11],
        [6, 7, 8, 9],
    ]
    assert _all_ranks(8, 1, 4, True) == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_ring_general_is_contiguous():
    assert _all_ranks(8, 1, 2, False) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert _all_ranks(8, 1, 4, False) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_hybrid_cp4_u2_causal():
    # r = 2: 4 chunks c0=[0,1] c1=[2,3] c2=[4,5] c3=[6,7]; ring rank 0 holds [c0;c3], ring
    # rank 1 [c1;c2]; cp_idx = ring_rank * u + ulysses_rank, each ring share cut 2 ways
    assert _all_ranks(8, 2, 2, True) == [[0, 1], [6, 7], [2, 3], [4, 5]]
    # 16 tokens: chunks of 4; the Ulysses cut gives 4 tokens each
    assert _all_ranks(16, 2, 2, True) == [
        [0, 1, 2, 3],
        [12, 13, 14, 15],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]
    # 24 tokens: chunks of 6; ring rank 0 holds [0..5, 18..23]
    assert _all_ranks(24, 2, 2, True) == [
        [0, 1, 2, 3, 4, 5],
        [18, 19, 20, 21, 22, 23],
        [6, 7, 8, 9, 10, 11],
        [12, 13, 14, 15, 16, 17],
    ]


def test_hybrid_cp8_u4_causal():
    # r = 2, 16 tokens: c0=[0..3] c1=[4..7] c2=[8..11] c3=[12..15]; each share cut 4 ways
    assert _all_ranks(16, 4, 2, True) == [
        [0, 1],
        [2, 3],
        [12, 13],
        [14, 15],
        [4, 5],
        [6, 7],
        [8, 9],
        [10, 11],
    ]


def test_hybrid_cp6_u3_causal_cut_straddles_the_two_chunks():
    # r = 2, 12 tokens: c0=[0,1,2] c1=[3,4,5] c2=[6,7,8] c3=[9,10,11]; ring rank 0's share
    # [0,1,2,9,10,11] cut 3 ways: the middle Ulysses rank gets one token of each chunk
    assert _all_ranks(12, 3, 2, True) == [[0, 1], [2, 9], [10, 11], [3, 4], [5, 6], [7, 8]]


def test_hybrid_general_is_contiguous():
    # chunk(r)[ring_rank].chunk(u)[ulysses_rank]
    assert _all_ranks(8, 2, 2, False) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert _all_ranks(12, 3, 2, False) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]


def test_indices_are_int64():
    idx = token_indices(16, 1, 2, 2, True)
    assert idx.dtype == torch.int64 and idx.dim() == 1


_CONFIGS = [
    (u, r, causal, seq)
    for (u, r), causal in itertools.product(
        [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 2), (3, 2),
         (2, 3), (3, 4), (4, 4)],
        [True, False],
    )
    for seq in (2 * u * r * 2, 2 * u * r * 3, 4 * u * r * 5)
]  # fmt: skip


@pytest.mark.parametrize(("u", "r", "causal", "seq"), _CONFIGS)
def test_ranks_partition_the_sequence(u, r, causal, seq):
    per_rank = _all_ranks(seq, u, r, causal)
    assert all(len(idx) == seq // (u * r) for idx in per_rank)
    assert sorted(itertools.chain(*per_rank)) == list(range(seq))


@pytest.mark.parametrize(("u", "r", "causal", "seq"), [c for c in _CONFIGS if c[2]])
def test_ulysses_gather_restores_the_ring_zigzag(u, r, causal, seq):
    # after the Ulysses all-to-all (sequence gathered in group order) ring rank j holds
    # [chunk_j ; chunk_(2r-1-j)], and each piece is sorted inside each chunk
    chunk = seq // (2 * r)
    for j in range(r):
        gathered = list(itertools.chain(*(_all_ranks(seq, u, r, True)[j * u : (j + 1) * u])))
        want = list(range(j * chunk, (j + 1) * chunk))
        want += list(range((2 * r - 1 - j) * chunk, (2 * r - j) * chunk))
        assert gathered == want


@pytest.mark.parametrize(
    ("seq", "u", "r", "causal"),
    [(6, 4, 1, False), (6, 1, 4, False), (12, 1, 4, True), (6, 2, 2, True), (8, 3, 2, True)],
)
def test_indivisible_lengths_raise(seq, u, r, causal):
    with pytest.raises(ValueError, match=f"sequence length {seq}"):
        token_indices(seq, 0, u, r, causal)


# -- split / gather on gloo -----------------------------------------------------------------------
def _full(seq: int, seq_dim: int, offset: float, dtype=torch.float32) -> torch.Tensor:
    """Same on every rank of one CP group; distinct per token, per element and per CP group."""
    shape = [2, 3]
    shape.insert(seq_dim % 3, seq)
    x = torch.arange(seq * 6, dtype=dtype).reshape(shape)
    return x + offset


def _split_gather(tp: int, cp: int, algo: str, u: int | None, mask: str, seq: int):
    config = ContextParallelConfig(cp, algo, u, mask)
    mesh = initialize_context_parallel(config, tensor_model_parallel_size=tp)
    offset = 1000.0 * min(mesh.cp_ranks)  # a different full tensor on every CP group
    idx = token_indices(
        seq, mesh.cp_rank, config.ulysses_degree, config.ring_degree, mesh.config.causal
    )
    out = {"rank": dist.get_rank(), "cp_rank": mesh.cp_rank, "indices": idx.tolist()}
    for seq_dim in (0, 1, -2):
        x = _full(seq, seq_dim, offset)
        local = split_sequence(x, seq_dim)
        back = gather_sequence(local, seq_dim)
        # backward: the gathered tensor feeds a replicated loss; the gradient of this rank's
        # shard is the slice of the full gradient at this rank's positions
        weight = _full(seq, seq_dim, 0.5 + offset, torch.float64) * 0.01
        shard = split_sequence(x.double(), seq_dim).requires_grad_()
        (gather_sequence(shard, seq_dim) * weight).sum().backward()
        out[seq_dim] = {
            "split_ok": torch.equal(local, x.index_select(seq_dim, idx)),
            "split_len": local.shape[seq_dim],
            "gather_ok": torch.equal(back, x),
            "grad_ok": torch.equal(shard.grad, weight.index_select(seq_dim, idx)),
        }
    # split is differentiable: the gradient lands at this rank's positions, zero elsewhere
    x = _full(seq, 0, offset).requires_grad_()
    split_sequence(x, 0).sum().backward()
    hit = torch.zeros(seq)
    hit[idx] = 1.0
    out["split_grad_ok"] = torch.equal(x.grad, hit.view(-1, 1, 1).expand_as(x))
    return out


_GLOO = [
    # (world, tp, cp, algo, u, seq)
    (4, 1, 4, ULYSSES, None, 24),
    (4, 1, 4, RING, None, 24),
    (4, 1, 4, HYBRID, 2, 24),
    (4, 1, 2, RING, None, 24),  # two CP groups (data parallel 2)
    (4, 2, 2, ULYSSES, None, 24),  # tp=2 x cp=2: CP groups [0, 2] and [1, 3]
    (4, 2, 2, RING, None, 24),
    (4, 2, 2, HYBRID, 1, 24),
    (8, 1, 8, ULYSSES, None, 32),
    (8, 1, 8, RING, None, 32),
    (8, 1, 8, HYBRID, 2, 32),
    (8, 1, 8, HYBRID, 4, 32),
    (8, 2, 4, HYBRID, 2, 32),
    (8, 1, 4, RING, None, 32),
]


@pytest.mark.parametrize("mask", ["causal", "general"])
@pytest.mark.parametrize(
    ("world", "tp", "cp", "algo", "u", "seq"),
    _GLOO,
    ids=[f"w{w}-tp{tp}-cp{cp}-{a.split('_')[0]}-u{u}" for w, tp, cp, a, u, _ in _GLOO],
)
def test_split_and_gather_on_gloo(pools, world, tp, cp, algo, u, seq, mask):
    results = pools(world).run(_split_gather, tp, cp, algo, u, mask, seq)
    for res in results:
        for seq_dim in (0, 1, -2):
            checks = res[seq_dim]
            assert checks["split_len"] == seq // cp
            assert checks["split_ok"], (res["rank"], seq_dim)
            assert checks["gather_ok"], (res["rank"], seq_dim)
            assert checks["grad_ok"], (res["rank"], seq_dim)
        assert res["split_grad_ok"], res["rank"]
    # inside every CP group the shards partition the sequence, one shard per CP rank
    groups: dict[int, dict[int, list[int]]] = {}
    for res in results:
        dp_tp = res["rank"] - res["cp_rank"] * tp  # the first member identifies the CP group
        groups.setdefault(dp_tp, {})[res["cp_rank"]] = res["indices"]
    assert len(groups) == world // cp
    for shards in groups.values():
        assert sorted(shards) == list(range(cp))
        assert sorted(itertools.chain(*shards.values())) == list(range(seq))


def _gather_is_a_collective_of_shards(seq: int):
    # every rank contributes a shard that only it holds (its rank number in every element);
    # gather must place rank i's shard at rank i's positions
    config = ContextParallelConfig(4, RING, attention_mask_type="causal")
    initialize_context_parallel(config)
    local = torch.full((seq // 4, 2), float(dist.get_rank()))
    full = gather_sequence(local, 0)
    return full[:, 0].tolist()


def test_gather_places_each_rank_at_its_zigzag_positions(pools):
    results = pools(4).run(_gather_is_a_collective_of_shards, 16)
    # 8 chunks of 2: rank i holds chunks i and 7 - i
    want = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 2, 2, 1, 1, 0, 0]
    assert all(r == want for r in results)


def _cp1_gather_is_identity():
    mesh = initialize_context_parallel(ContextParallelConfig(1, RING))
    x = torch.arange(8.0).view(4, 2)
    return mesh.cp_size, torch.equal(split_sequence(x, 0), x), gather_sequence(x, 0) is x


def test_cp1_split_and_gather_are_identities(pools):
    for cp_size, split_same, gather_same in pools(4).run(_cp1_gather_is_identity):
        assert cp_size == 1 and split_same and gather_same
