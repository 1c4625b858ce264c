"""Packed sequences without processes: cu_seqlens checks, helpers, the split, the schedule, the
varlen block kernels. Expected index lists are written out by hand from docs/packed.md."""

from __future__ import annotations

import itertools

import pytest
import torch

import usp_npu
from usp_npu.algorithms.schedule import ring_schedule, step_work
from usp_npu.kernels import CAUSAL, FULL, ReferenceBlockKernel, TorchBlockKernel
from usp_npu.packing import (
    check_split,
    normalize_cu_seqlens,
    packed_token_indices,
    positions_from_cu_seqlens,
    split_multiple,
)
from usp_npu.testing.npu_emulation import emulated_torch_npu


def _ranks(cu, u, r, causal=True):
    return [packed_token_indices(cu, i, u, r, causal).tolist() for i in range(u * r)]


# -- cu_seqlens -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cu", "fragment"),
    [
        ([1, 4, 8], "start at 0"),
        ([0], "start at 0"),
        ([0, 4, 4, 8], "strictly increasing"),
        ([0, 6, 4, 8], "strictly increasing"),
        ([0, 4.0, 8], "Python ints"),
        (torch.tensor([0.0, 4.0, 8.0]), "integer"),
        (torch.tensor([[0, 4, 8]]), "1-D"),
        ("0,4,8", "list of ints"),
        ([0, 4, 9], "ends at 9"),
    ],
)
def test_bad_cu_seqlens_name_the_argument(cu, fragment):
    with pytest.raises(ValueError, match="cu_seqlens") as err:
        normalize_cu_seqlens(cu, total=8)
    assert fragment in str(err.value)


def test_cu_seqlens_list_and_tensor_agree():
    assert normalize_cu_seqlens([0, 3, 8]) == (0, 3, 8)
    assert normalize_cu_seqlens(torch.tensor([0, 3, 8], dtype=torch.int32), 8) == (0, 3, 8)


def test_cu_seqlens_from_position_ids_and_eod():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert usp_npu.cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 9]
    assert usp_npu.cu_seqlens_from_position_ids(torch.arange(5)).tolist() == [0, 5]
    eod = 9
    ids = torch.tensor([5, 6, 9, 7, 9, 1, 2])  # documents end WITH their EOD
    assert usp_npu.cu_seqlens_from_eod(ids, eod).tolist() == [0, 3, 5, 7]
    ids = torch.tensor([[5, 6, 9, 7, 9]])  # a final EOD closes the last document
    assert usp_npu.cu_seqlens_from_eod(ids, eod).tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="position_ids"):
        usp_npu.cu_seqlens_from_position_ids(torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="start at 0"):
        usp_npu.cu_seqlens_from_position_ids(torch.tensor([1, 2]))


def test_pad_packed_pads_each_document_at_its_end():
    cu, index = usp_npu.pad_packed([0, 3, 8], 4)
    assert cu.tolist() == [0, 4, 12]  # 3 -> 4 and 5 -> 8 tokens
    assert index.tolist() == [0, 1, 2, -1, 3, 4, 5, 6, 7, -1, -1, -1]
    # the padded sequence now satisfies the causal ring split it failed before
    with pytest.raises(ValueError, match="pad_packed"):
        check_split((0, 3, 8), 1, 2, True)
    check_split(tuple(cu.tolist()), 1, 2, True)
    # padding inputs / labels / position ids with the index map
    ids = torch.arange(100, 108)
    keep, src = index >= 0, index.clamp(min=0)
    labels = torch.where(keep, ids[src], -100).tolist()
    assert labels == [100, 101, 102, -100, 103, 104, 105, 106, 107, -100, -100, -100]
    assert positions_from_cu_seqlens(cu).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    cu, index = usp_npu.pad_packed(torch.tensor([0, 3, 6]), 4, per_document=False)
    assert cu.tolist() == [0, 3, 6, 8] and index.tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert usp_npu.pad_packed([0, 4], 4)[1].tolist() == [0, 1, 2, 3]


def test_split_multiple_is_what_the_split_needs():
    for u, r in ((1, 2), (2, 2), (4, 2), (3, 2), (2, 4)):
        m = split_multiple(u, r, True)
        check_split((0, m, 3 * m), u, r, True)  # every document a multiple of m: holds
    assert split_multiple(4, 1, True) == 4 and split_multiple(2, 2, False) == 4


# -- the split ------------------------------------------------------------------------------------
def test_packed_ring_split_zigzags_every_document():
    # documents of 4 and 8 tokens, ring degree 2: 4 chunks per document
    # doc1 chunks [0] [1] [2] [3], doc2 chunks [4 5] [6 7] [8 9] [10 11]
    cu = (0, 4, 12)
    assert _ranks(cu, 1, 2) == [[0, 3, 4, 5, 10, 11], [1, 2, 6, 7, 8, 9]]
    # hybrid u=2: each ring share cut contiguously in two (cp_rank = ring_rank * u + w)
    assert _ranks(cu, 2, 2) == [[0, 3, 4], [5, 10, 11], [1, 2, 6], [7, 8, 9]]


def test_packed_ulysses_and_general_are_contiguous():
    cu = (0, 3, 5, 8)  # documents straddle ranks: fine, attention sees the gathered sequence
    assert _ranks(cu, 4, 1) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert _ranks(cu, 1, 4, causal=False) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert _ranks(cu, 2, 2, causal=False) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_one_document_is_the_unpacked_split():
    from usp_npu.sharding import token_indices

    for u, r, causal in ((1, 4, True), (2, 2, True), (4, 1, True), (2, 2, False)):
        for rank in range(u * r):
            got = packed_token_indices((0, 32), rank, u, r, causal)
            assert torch.equal(got, token_indices(32, rank, u, r, causal))


def test_split_errors_name_pad_packed():
    with pytest.raises(ValueError, match=r"pad_packed\(cu_seqlens, 4\)"):
        check_split((0, 6, 12), 1, 2, True)  # 6 % 4
    with pytest.raises(ValueError, match="Ulysses"):
        check_split((0, 4, 8, 12), 4, 2, True)  # documents fine, but ring share 6 % u=4
    with pytest.raises(ValueError, match="per_document=False"):
        check_split((0, 3, 10), 4, 1, True)


# -- the schedule: exact coverage and balance -----------------------------------------------------
def _pairs_of_rank(cu, rank, r, causal):
    """Global (q, k) pairs the schedule of ring rank ``rank`` asks its kernel for."""
    total = cu[-1]
    idx = [packed_token_indices(cu, i, 1, r, causal) for i in range(r)]
    pairs = []
    for step in ring_schedule(rank, r, total // r, causal, cu_seqlens=cu):
        if step.empty:
            continue
        qpos = idx[rank][step.q_rows]
        kpos = idx[step.source][step.kv_rows]
        for (qa, qb), (ka, kb) in zip(
            itertools.pairwise(step.cu_q), itertools.pairwise(step.cu_kv), strict=True
        ):
            for i, j in itertools.product(range(qa, qb), range(ka, kb)):
                if not step.mask.causal or j - ka <= i - qa:
                    pairs.append((int(qpos[i]), int(kpos[j])))
    return pairs


def _wanted_pairs(cu, causal):
    want = set()
    for a, b in itertools.pairwise(cu):
        for i, j in itertools.product(range(a, b), repeat=2):
            if not causal or j <= i:
                want.add((i, j))
    return want


@pytest.mark.parametrize(
    ("cu", "r", "causal"),
    [
        ((0, 32), 4, True),
        ((0, 8, 16, 24, 32), 4, True),  # every document exactly 2r tokens
        ((0, 48, 56, 64), 4, True),  # one long, two short
        ((0, 4, 12, 24), 2, True),
        ((0, 5, 20, 24), 4, False),  # general: documents straddle the contiguous blocks
        ((0, 3, 4, 17, 24), 2, False),
        ((0, 5, 9, 24), 1, True),  # Ulysses only: one step over the whole sequence
    ],
)
def test_schedule_computes_every_document_pair_once_and_nothing_else(cu, r, causal):
    got = [p for rank in range(r) for p in _pairs_of_rank(cu, rank, r, causal)]
    assert len(got) == len(set(got)), "a (q, k) pair computed twice"
    assert set(got) == _wanted_pairs(cu, causal)


def test_causal_work_is_balanced_exactly_for_a_skewed_mix():
    # one document of 64 tokens and six of 8 (2r each): per ring rank the same (q, k) count
    cu = (0, 64, 72, 80, 88, 96, 104, 112)
    r = 4
    work = [
        sum(step_work(s, 28) for s in ring_schedule(rank, r, 28, True, cu_seqlens=cu))
        for rank in range(r)
    ]
    assert len(set(work)) == 1, work
    assert max(work) <= 1.05 * min(work)
    # and the total is exactly the causal pairs of the documents: no masked work anywhere
    assert sum(work) == len(_wanted_pairs(cu, True))
    # a contiguous cut of the same sequence would not be balanced (what the zigzag buys)
    contiguous = [len([p for p in _wanted_pairs(cu, True) if p[0] // 28 == i]) for i in range(r)]
    assert max(contiguous) > 1.05 * min(contiguous)


def test_packed_steps_are_one_call_with_slices_for_one_document():
    steps = ring_schedule(2, 4, 8, True, cu_seqlens=(0, 32))
    assert all(isinstance(s.q_rows, slice) and isinstance(s.kv_rows, slice) for s in steps)
    unpacked = ring_schedule(2, 4, 8, True)
    assert [(s.q_rows, s.kv_rows, s.mask) for s in steps] == [
        (s.q_rows, s.kv_rows, s.mask) for s in unpacked
    ]


# -- varlen block kernels -------------------------------------------------------------------------
def _qkv(sq, sk, nq=4, nkv=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, 1, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(sk, 1, nkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sk, 1, nkv, d, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(sq, 1, nq, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def _per_document(kernel, q, k, v, dout, mask, cu_q, cu_kv):
    """The block computed document by document with plain (non-varlen) calls."""
    out, m, s, grads = [], [], [], [[], [], []]
    for (qa, qb), (ka, kb) in zip(itertools.pairwise(cu_q), itertools.pairwise(cu_kv), strict=True):
        o, mm, ss, _ = kernel.forward(q[qa:qb], k[ka:kb], v[ka:kb], scale=0.3, mask=mask)
        g = kernel.backward(
            dout[qa:qb], q[qa:qb], k[ka:kb], v[ka:kb], o, mm, ss, scale=0.3, mask=mask
        )
        out.append(o), m.append(mm), s.append(ss)
        for acc, x in zip(grads, g, strict=True):
            acc.append(x)
    return (
        torch.cat(out),
        torch.cat(m, 2),
        torch.cat(s, 2),
        *(torch.cat(x) for x in grads),
    )


def _emulated_npu():
    from usp_npu.kernels.npu import NpuBlockKernel

    return NpuBlockKernel()


@pytest.mark.parametrize("kernel_name", ["torch", "reference", "npu"])
@pytest.mark.parametrize(
    ("mask", "cu_q", "cu_kv"),
    [
        (CAUSAL, (0, 4, 12, 14), (0, 4, 12, 14)),  # own block: square documents
        (FULL, (0, 4, 12, 14), (0, 2, 6, 7)),  # earlier block: first halves of K/V
        (FULL, (0, 2, 6, 7), (0, 4, 12, 14)),  # later block: second halves of queries
    ],
)
def test_varlen_kernel_equals_per_document_calls(kernel_name, mask, cu_q, cu_kv):
    dtype = torch.float32 if kernel_name == "npu" else torch.float64
    q, k, v, dout = _qkv(cu_q[-1], cu_kv[-1], dtype=dtype)
    with emulated_torch_npu():
        kernel = {
            "torch": TorchBlockKernel,
            "reference": ReferenceBlockKernel,
            "npu": _emulated_npu,
        }[kernel_name]()
        o, m, s, _ = kernel.forward(
            q, k, v, scale=0.3, mask=mask, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv
        )
        grads = kernel.backward(
            dout, q, k, v, o, m, s, scale=0.3, mask=mask, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv
        )
        want = _per_document(kernel, q, k, v, dout, mask, cu_q, cu_kv)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for got, ref in zip((o, m, s, *grads), want, strict=True):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_one_document_spanning_the_block_is_the_plain_call_bit_for_bit():
    q, k, v, _ = _qkv(8, 8)
    kernel = TorchBlockKernel()
    plain = kernel.forward(q, k, v, scale=0.3, mask=CAUSAL)
    packed = kernel.forward(
        q, k, v, scale=0.3, mask=CAUSAL, cu_seqlens_q=(0, 8), cu_seqlens_kv=(0, 8)
    )
    for a, b in zip(plain[:3], packed[:3], strict=True):
        assert torch.equal(a, b)


def test_varlen_kernel_rejects_inconsistent_lengths():
    q, k, v, _ = _qkv(8, 8)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        TorchBlockKernel().forward(
            q, k, v, scale=0.3, mask=FULL, cu_seqlens_q=(0, 4, 8), cu_seqlens_kv=(0, 8)
        )
    with pytest.raises(ValueError, match="run from 0"):
        TorchBlockKernel().forward(
            q, k, v, scale=0.3, mask=FULL, cu_seqlens_q=(0, 4, 7), cu_seqlens_kv=(0, 4, 8)
        )


def test_packed_merge_views_agree_between_the_cpp_op_and_the_npu_op():
    # the ring merges a packed step as TND views of its [T, 1, N, D] / [1, N, T, K] accumulators
    from usp_npu import ops
    from usp_npu.testing.npu_emulation import npu_ring_attention_update

    g = torch.Generator().manual_seed(1)
    t, n, d = 12, 3, 64  # the device's TND merge takes D in multiples of 64
    out = torch.randn(t, 1, n, d, generator=g)
    stats = [torch.randn(1, n, t, 1, generator=g).expand(1, n, t, 8).contiguous() for _ in "ms"]
    stats[1] = stats[1].abs() + 0.5  # sums are positive
    cur = [torch.randn(t, n, d, generator=g)]
    cur += [torch.randn(t, n, 1, generator=g).expand(t, n, 8).contiguous() for _ in "ms"]
    cur[2] = cur[2].abs() + 0.5
    seq = torch.tensor([0, 4, 12])
    want = npu_ring_attention_update(
        out[:, 0].clone(), stats[0][0].transpose(0, 1).contiguous(),
        stats[1][0].transpose(0, 1).contiguous(), *cur, actual_seq_qlen=seq,
        input_layout="TND", input_softmax_layout="TND",
    )  # fmt: skip
    acc = (out[:, 0], stats[0][0].transpose(0, 1), stats[1][0].transpose(0, 1))
    ops.ring_attention_update_(*acc, *cur, actual_seq_qlen=seq, input_layout="TND")
    for got, ref in zip((out[:, 0], *acc[1:]), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("keep_prob", [1.0, 0.8])
def test_npu_kernel_splits_blocks_with_more_documents_than_the_device_takes(monkeypatch, keep_prob):
    from usp_npu.kernels import npu

    cu_q, cu_kv = (0, 4, 12, 14, 20, 22), (0, 2, 6, 7, 10, 11)  # 5 documents, groups of 2
    q, k, v, dout = _qkv(cu_q[-1], cu_kv[-1], dtype=torch.float32)
    with emulated_torch_npu():
        kernel = npu.NpuBlockKernel(keep_prob=keep_prob)
        args = {"scale": 0.3, "mask": FULL, "cu_seqlens_q": cu_q, "cu_seqlens_kv": cu_kv}
        whole = kernel.forward(q, k, v, **args)
        monkeypatch.setattr(npu, "MAX_TND_DOCUMENTS", 2)
        o, m, s, rng = kernel.forward(q, k, v, **args)
        grads = kernel.backward(dout, q, k, v, o, m, s, rng_state=rng, **args)
    if keep_prob < 1.0:  # three calls, three dropout states, replayed in the backward
        assert isinstance(rng, tuple) and len(rng) == 3
        assert all(torch.isfinite(g).all() for g in grads)
        return
    with emulated_torch_npu():
        monkeypatch.setattr(npu, "MAX_TND_DOCUMENTS", 1024)
        want = kernel.backward(dout, q, k, v, *whole[:3], **args)
    for got, ref in zip((o, m, s, *grads), (*whole[:3], *want), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_emulation_refuses_what_the_device_refuses():
    from usp_npu.testing import npu_emulation as emu

    q, long = torch.randn(8, 2, 16), torch.randn(1025, 1, 16)
    with pytest.raises(ValueError, match="at most 1024"):
        emu.npu_fusion_attention(
            long, long, long, 1, "TND", actual_seq_qlen=list(range(1, 1026)),
            actual_seq_kvlen=list(range(1, 1026)),
        )  # fmt: skip
    padded = torch.zeros(8, 8, dtype=torch.bool)
    padded[2] = True  # a whole row masked: padding, which the varlen kernel refuses
    with pytest.raises(ValueError, match="whole query row"):
        emu.npu_fusion_attention(
            q, q, q, 2, "TND", atten_mask=padded, sparse_mode=1, actual_seq_qlen=[8],
            actual_seq_kvlen=[8],
        )  # fmt: skip
    with pytest.raises(ValueError, match="256"):
        big = torch.randn(4, 257, 8)
        emu.npu_fusion_attention(
            big, big, big, 257, "TND", actual_seq_qlen=[4], actual_seq_kvlen=[4]
        )
    stats = torch.ones(8, 2, 8)
    with pytest.raises(ValueError, match="multiple of 64"):
        emu.npu_ring_attention_update(
            q, stats, stats, q, stats, stats, input_layout="TND", input_softmax_layout="TND",
            actual_seq_qlen=torch.tensor([0, 8]),
        )  # fmt: skip
