"""The CPU emulation of torch_npu's attention ops against dense attention written out here.

The oracle (:func:`dense`) is plain softmax of masked scores in float64 with autograd for the
gradients; the expected masks are spelled out element by element from the documented meaning of
each sparse mode, independently of the emulation's own mask code.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from usp_npu.testing import npu_emulation as emu

F64 = torch.float64
BIG = 2147483647


# ----------------------------------------------------------------------------- oracle


def dense(q, k, v, scale, hidden=None, keep=None, keep_prob=1.0):
    """q [B,N,Sq,D], k/v [B,Nkv,Sk,D]; hidden bool [Sq,Sk] (True = masked) -> out, max, sum."""
    g = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = scale * q @ kx.transpose(-1, -2)
    if hidden is None:
        hidden = torch.zeros(s.shape[-2:], dtype=torch.bool)
    s = s.masked_fill(hidden, float("-inf"))
    empty = hidden.all(-1, keepdim=True)  # rows that see no key
    m = s.amax(-1, keepdim=True).masked_fill(empty, 0.0)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    p = (e / total.masked_fill(empty, 1.0)).masked_fill(empty, 0.0)
    if keep is not None:
        p = p * keep.view_as(p) / keep_prob
    row_max = m.masked_fill(empty, float("-inf")).squeeze(-1)
    return p @ vx, row_max, total.squeeze(-1)


def dense_grads(q, k, v, dy, scale, hidden=None, keep=None, keep_prob=1.0):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = dense(*leaves, scale, hidden, keep, keep_prob)[0]
    out.backward(dy)
    return [t.grad for t in leaves]


def lanes(x):
    """[..., 8] with identical lanes -> [...]."""
    assert x.shape[-1] == 8 and torch.equal(x, x[..., :1].expand_as(x))
    return x[..., 0]


def to_layout(x, layout):
    """Canonical [B, N, S, D] -> the op's layout."""
    b, n, s, d = x.shape
    return {
        "BNSD": x,
        "BSND": x.permute(0, 2, 1, 3),
        "BSH": x.permute(0, 2, 1, 3).reshape(b, s, n * d),
        "SBH": x.permute(2, 0, 1, 3).reshape(s, b, n * d),
    }[layout].contiguous()


def from_layout(x, layout, n):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BSH":
        return x.view(x.shape[0], x.shape[1], n, -1).permute(0, 2, 1, 3)
    return x.view(x.shape[0], x.shape[1], n, -1).permute(1, 2, 0, 3)


def rand(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


def band_hidden(sq, sk, pre, nxt, anchor):
    """Written out: key j is visible to row i iff -pre <= j - i - anchor <= nxt."""
    h = torch.ones(sq, sk, dtype=torch.bool)
    for i in range(sq):
        for j in range(sk):
            h[i, j] = not (-pre <= j - i - anchor <= nxt)
    return h


COMPRESSED = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def run(layout, q, k, v, n, scale, **kw):
    out, m, s, *rest = emu.npu_fusion_attention(
        to_layout(q, layout), to_layout(k, layout), to_layout(v, layout), n, layout,
        scale=scale, **kw,
    )  # fmt: skip
    return from_layout(out, layout, n), m, s, rest


def run_grad(layout, q, k, v, dy, out, m, s, n, scale, **kw):
    g = emu.npu_fusion_attention_grad(
        to_layout(q, layout), to_layout(k, layout), to_layout(v, layout), to_layout(dy, layout),
        n, layout, softmax_max=m, softmax_sum=s, attention_in=to_layout(out, layout),
        scale_value=scale, **kw,
    )  # fmt: skip
    assert len(g) == 4
    return [from_layout(x, layout, t.shape[1]) for x, t in zip(g[:3], (q, k, v), strict=True)]


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- dense layouts


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("nkv", [4, 2, 1])
def test_forward_and_grad_every_layout_gqa(layout, nkv):
    torch.manual_seed(0)
    b, n, sq, sk, d, scale = 2, 4, 5, 7, 8, 0.3
    q, k, v = rand(b, n, sq, d), rand(b, nkv, sk, d), rand(b, nkv, sk, d)
    out, m, s, (placeholder, seed, offset, numels) = run(layout, q, k, v, n, scale)
    ref, rmax, rsum = dense(q, k, v, scale)
    assert_close(out, ref)
    assert m.shape == s.shape == (b, n, sq, 8) and m.dtype == s.dtype == F64
    assert_close(lanes(m), rmax)
    assert_close(lanes(s), rsum)
    assert placeholder.numel() == 0 and numels == 0
    assert all(isinstance(x, int) for x in (seed, offset, numels))
    dy = rand(b, n, sq, d)
    got = run_grad(layout, q, k, v, dy, out, m, s, n, scale)
    for g, r in zip(got, dense_grads(q, k, v, dy, scale), strict=True):
        assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_keeps_fp32_stats(dtype):
    torch.manual_seed(1)
    q, k, v = (
        rand(1, 2, 6, 8, dtype=dtype),
        rand(1, 2, 6, 8, dtype=dtype),
        rand(1, 2, 6, 8, dtype=dtype),
    )
    out, m, s, *_ = emu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.35)
    assert out.dtype == dtype and m.dtype == s.dtype == torch.float32
    ref = dense(q.double(), k.double(), v.double(), 0.35)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = emu.npu_fusion_attention_grad(
        q, k, v, out, 2, "BNSD", softmax_max=m, softmax_sum=s, attention_in=out, scale_value=0.35
    )
    assert [x.dtype for x in g[:3]] == [dtype] * 3


# ----------------------------------------------------------------------------- sparse modes

CASES = [  # (sparse_mode, sq, sk, pre, next)
    (0, 6, 6, BIG, 0),
    (0, 5, 8, 2, 1),
    (0, 8, 5, 1, -1),
    (1, 6, 9, 0, 0),  # pre/next are ignored in mode 1
    (2, 5, 8, 0, 0),
    (2, 8, 5, 0, 0),
    (3, 5, 8, 0, 0),
    (3, 8, 5, 0, 0),  # bottom-right with Sq > Skv: the first rows see no key
    (4, 6, 6, 2, 1),
    (4, 5, 8, 1, 2),
]


def expected_hidden(mode, sq, sk, pre, nxt, user):
    if mode == 0:
        return user | band_hidden(sq, sk, pre, nxt, 0)
    if mode == 1:
        return user
    if mode == 2:
        return band_hidden(sq, sk, BIG, 0, 0)
    if mode == 3:
        return band_hidden(sq, sk, BIG, 0, sk - sq)
    return band_hidden(sq, sk, pre, nxt, sk - sq)


@pytest.mark.parametrize(("mode", "sq", "sk", "pre", "nxt"), CASES)
def test_sparse_modes(mode, sq, sk, pre, nxt):
    torch.manual_seed(mode * 100 + sq)
    b, n, d, scale = 2, 2, 4, 0.5
    q, k, v = rand(b, n, sq, d), rand(b, 1, sk, d), rand(b, 1, sk, d)
    user = torch.rand(sq, sk) < 0.3
    given = (user if mode in (0, 1) else COMPRESSED).to(torch.uint8 if mode == 1 else torch.bool)
    kw = {"atten_mask": given, "sparse_mode": mode, "pre_tockens": pre, "next_tockens": nxt}
    out, m, s, _ = run("BNSD", q, k, v, n, scale, **kw)
    hidden = expected_hidden(mode, sq, sk, pre, nxt, user)
    ref, rmax, rsum = dense(q, k, v, scale, hidden)
    assert_close(out, ref)
    assert_close(lanes(m), rmax)
    assert_close(lanes(s), rsum)
    dy = rand(b, n, sq, d)
    got = run_grad("BNSD", q, k, v, dy, out, m, s, n, scale, **kw)
    for g, r in zip(got, dense_grads(q, k, v, dy, scale, hidden), strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, r)


def test_four_dim_masks_broadcast():
    """Mode 1 takes BNSS, B1SS, 11SS and SS masks."""
    torch.manual_seed(3)
    q, k, v = rand(2, 2, 4, 4), rand(2, 2, 5, 4), rand(2, 2, 5, 4)
    full = torch.rand(2, 2, 4, 5) < 0.4
    ref = run("BNSD", q, k, v, 2, 0.5, atten_mask=full, sparse_mode=1)[0]
    for i in range(2):
        for h in range(2):
            exp = dense(q[i : i + 1, h : h + 1], k[i : i + 1, h : h + 1], v[i : i + 1, h : h + 1],
                        0.5, full[i, h])[0]  # fmt: skip
            assert_close(ref[i, h], exp[0, 0])
    one = full[:1, :1]
    assert_close(run("BNSD", q, k, v, 2, 0.5, atten_mask=one, sparse_mode=1)[0],
                 run("BNSD", q, k, v, 2, 0.5, atten_mask=one[0, 0], sparse_mode=1)[0])  # fmt: skip


@pytest.mark.parametrize("mode", [0, 2, 3, 4])
def test_no_mask_means_full_attention(mode):
    torch.manual_seed(4)
    q, k, v = rand(1, 2, 5, 4), rand(1, 2, 7, 4), rand(1, 2, 7, 4)
    out = run("BNSD", q, k, v, 2, 0.5, sparse_mode=mode, pre_tockens=0, next_tockens=0)[0]
    assert_close(out, dense(q, k, v, 0.5)[0])


@pytest.mark.parametrize("mode", [2, 3, 4])
def test_compressed_modes_reject_other_masks(mode):
    q, k, v = rand(1, 1, 4, 4), rand(1, 1, 4, 4), rand(1, 1, 4, 4)
    for bad in (
        torch.ones(4, 4, dtype=torch.bool).triu(1),
        COMPRESSED.tril(),
        COMPRESSED[None, None],
    ):
        with pytest.raises(ValueError, match="compressed"):
            emu.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=bad, sparse_mode=mode)
    with pytest.raises(TypeError, match="bool or uint8"):
        emu.npu_fusion_attention(
            q, k, v, 1, "BNSD", atten_mask=COMPRESSED.float(), sparse_mode=mode
        )


def test_fully_masked_rows_are_zero_and_finite():
    torch.manual_seed(5)
    q, k, v = rand(1, 2, 4, 4), rand(1, 2, 6, 4), rand(1, 2, 6, 4)
    mask = torch.rand(4, 6) < 0.3
    mask[1] = True
    out, m, s, _ = run("BNSD", q, k, v, 2, 0.5, atten_mask=mask, sparse_mode=1)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()
    assert (lanes(m)[:, :, 1] == float("-inf")).all() and (lanes(s)[:, :, 1] == 0).all()
    dy = rand(1, 2, 4, 4)
    dq, dk, dv = run_grad("BNSD", q, k, v, dy, out, m, s, 2, 0.5, atten_mask=mask, sparse_mode=1)
    assert torch.isfinite(torch.cat([dq.flatten(), dk.flatten(), dv.flatten()])).all()
    assert (dq[:, :, 1] == 0).all()
    for g, r in zip((dq, dk, dv), dense_grads(q, k, v, dy, 0.5, mask), strict=True):
        assert_close(g, r)


# ----------------------------------------------------------------------------- TND


def tnd(x):
    """[1, N, T, D] -> [T, N, D]."""
    return x[0].permute(1, 0, 2).contiguous()


def head_major(rows, qb, t):
    """Per-token stats [T, N] -> the default TND softmax layout [T, N, 8] (per document N, s, 8)."""
    parts = [rows[a:e].t().unsqueeze(-1).expand(-1, -1, 8).reshape(-1) for a, e in qb]
    end = qb[-1][1]
    if end < t:
        parts.append(rows[end:t].t().unsqueeze(-1).expand(-1, -1, 8).reshape(-1))
    return torch.cat(parts).view(t, rows.shape[1], 8)


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize(("mode", "masked"), [(0, False), (2, True), (3, True), (1, True)])
def test_tnd_uneven_documents(softmax_layout, mode, masked):
    torch.manual_seed(6)
    qlen, kvlen = [3, 8, 9], [4, 6, 11]  # documents of 3/5/1 queries and 4/2/5 keys
    n, nkv, d, scale = 4, 2, 4, 0.4
    q, k, v = rand(1, n, 9, d), rand(1, nkv, 11, d), rand(1, nkv, 11, d)
    user = torch.rand(5, 5) < 0.3  # [maxSq, maxSkv], cut per document in mode 1
    mask = (user if mode == 1 else COMPRESSED) if masked else None
    kw = {"atten_mask": mask, "sparse_mode": mode, "actual_seq_qlen": qlen,
          "actual_seq_kvlen": kvlen, "softmax_layout": softmax_layout}  # fmt: skip
    out, m, s, *_ = emu.npu_fusion_attention(tnd(q), tnd(k), tnd(v), n, "TND", scale=scale, **kw)
    dy = rand(9, n, d)
    dq, dk, dv, _ = emu.npu_fusion_attention_grad(
        tnd(q), tnd(k), tnd(v), dy, n, "TND", softmax_max=m, softmax_sum=s, attention_in=out,
        scale_value=scale, **kw,
    )  # fmt: skip
    qb, kb = [(0, 3), (3, 8), (8, 9)], [(0, 4), (4, 6), (6, 11)]
    want_max, want_sum = torch.empty(9, n, dtype=F64), torch.empty(9, n, dtype=F64)
    for (qa, qe), (ka, ke) in zip(qb, kb, strict=True):
        sq, sk = qe - qa, ke - ka
        hidden = None
        if masked:
            hidden = user[:sq, :sk] if mode == 1 else expected_hidden(mode, sq, sk, 0, 0, None)
        qd, kd, vd = q[:, :, qa:qe], k[:, :, ka:ke], v[:, :, ka:ke]
        ref, rmax, rsum = dense(qd, kd, vd, scale, hidden)
        assert_close(out[qa:qe], tnd(ref))
        want_max[qa:qe], want_sum[qa:qe] = rmax[0].t(), rsum[0].t()
        dyd = dy[qa:qe].permute(1, 0, 2).unsqueeze(0)
        rq, rk, rv = dense_grads(qd, kd, vd, dyd, scale, hidden)
        assert_close(dq[qa:qe], tnd(rq))
        assert_close(dk[ka:ke], tnd(rk))
        assert_close(dv[ka:ke], tnd(rv))
    if softmax_layout == "TND":
        assert_close(lanes(m), want_max)
        assert_close(lanes(s), want_sum)
    else:
        assert_close(m, head_major(want_max, qb, 9))
        assert_close(s, head_major(want_sum, qb, 9))


def test_tnd_trailing_documents_empty_document_and_tail_tokens():
    torch.manual_seed(7)
    q, k, v = rand(7, 2, 4), rand(6, 2, 4), rand(6, 2, 4)
    # documents of 2, 0 and 4 tokens, then two that take no part; query token 6 is in none
    out, m, s, *_ = emu.npu_fusion_attention(
        q, k, v, 2, "TND", scale=0.5, actual_seq_qlen=[2, 2, 6, 0, 0],
        actual_seq_kvlen=[2, 2, 6, 0, 0], softmax_layout="TND",
    )  # fmt: skip
    for a, e in ((0, 2), (2, 6)):
        blk = [x[a:e].permute(1, 0, 2).unsqueeze(0) for x in (q, k, v)]
        assert_close(out[a:e], tnd(dense(*blk, 0.5)[0]))
    assert torch.isfinite(lanes(m)[:6]).all() and (lanes(s)[:6] > 0).all()
    assert (out[6] == 0).all() and (lanes(m)[6] == float("-inf")).all() and (lanes(s)[6] == 0).all()


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("layout", ["BNSD", "SBH"])
def test_dropout_replays_from_seed_offset(layout):
    b, n, sq, sk, d, scale, kp = 2, 2, 5, 6, 4, 0.5, 0.7
    torch.manual_seed(8)
    q, k, v = rand(b, n, sq, d), rand(b, n, sk, d), rand(b, n, sk, d)
    emu.reset_dropout_state()
    out1, m1, s1, (_, seed1, off1, num1) = run(layout, q, k, v, n, scale, keep_prob=kp)
    out2, *_, (_, seed2, off2, num2) = run(layout, q, k, v, n, scale, keep_prob=kp)
    assert num1 == num2 == b * n * sq * sk and seed1 == seed2 and off2 != off1
    assert not torch.allclose(out1, out2)  # a new offset, a new mask
    emu.reset_dropout_state()
    torch.manual_seed(8)
    out3, *_, (_, seed3, off3, _) = run(layout, q, k, v, n, scale, keep_prob=kp)
    assert (seed3, off3) == (seed1, off1)
    assert torch.equal(out3, out1)  # same seed/offset -> same output
    keep = emu.dropout_keep_mask(seed1, off1, num1, kp).double()
    assert 0.5 < keep.mean() < 0.9
    ref, rmax, rsum = dense(q, k, v, scale, keep=keep, keep_prob=kp)
    assert_close(out1, ref)
    assert_close(lanes(m1), rmax)  # statistics are those of the undropped softmax
    assert_close(lanes(s1), rsum)
    dy = rand(b, n, sq, d)
    kw = {"keep_prob": kp, "seed": seed1, "offset": off1, "numels": num1}
    got = run_grad(layout, q, k, v, dy, out1, m1, s1, n, scale, **kw)
    for g, r in zip(got, dense_grads(q, k, v, dy, scale, keep=keep, keep_prob=kp), strict=True):
        assert_close(g, r)
    with pytest.raises(ValueError, match="numels"):
        run_grad(layout, q, k, v, dy, out1, m1, s1, n, scale, **{**kw, "numels": 0})


# ----------------------------------------------------------------------------- given stats


def test_grad_uses_the_stats_and_output_it_is_given():
    torch.manual_seed(9)
    q, k, v = rand(1, 2, 5, 4), rand(1, 2, 6, 4), rand(1, 2, 6, 4)
    out, m, s, _ = run("BNSD", q, k, v, 2, 0.5)
    dy = rand(1, 2, 5, 4)
    right = run_grad("BNSD", q, k, v, dy, out, m, s, 2, 0.5)
    for g, r in zip(right, dense_grads(q, k, v, dy, 0.5), strict=True):
        assert_close(g, r)
    wrong = [
        run_grad("BNSD", q, k, v, dy, out, m + 1.0, s, 2, 0.5),
        run_grad("BNSD", q, k, v, dy, out, m, s * 2.0, 2, 0.5),
        run_grad("BNSD", q, k, v, dy, out * 0.5, m, s, 2, 0.5),
    ]
    for grads in wrong:
        assert not torch.allclose(grads[0], right[0], atol=1e-6)


# ----------------------------------------------------------------------------- argument checks


def test_argument_checks():
    q, k, v = rand(1, 2, 4, 4), rand(1, 2, 4, 4), rand(1, 2, 4, 4)
    fa = emu.npu_fusion_attention
    with pytest.raises(ValueError, match="input_layout"):
        fa(q, k, v, 2, "NSD")
    with pytest.raises(ValueError, match="head_num"):
        fa(q, k, v, 3, "BNSD")
    with pytest.raises(ValueError, match="head_num"):
        fa(to_layout(q, "BSH"), to_layout(k, "BSH"), to_layout(v, "BSH"), 3, "BSH")
    with pytest.raises(ValueError, match="key/value heads"):
        fa(rand(1, 3, 4, 4), k, v, 3, "BNSD")
    for kp in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep_prob"):
            fa(q, k, v, 2, "BNSD", keep_prob=kp)
    for mode in (-1, 9, True):
        with pytest.raises(ValueError, match="sparse_mode"):
            fa(q, k, v, 2, "BNSD", sparse_mode=mode)
    with pytest.raises(ValueError, match="TND"):
        fa(q, k, v, 2, "BNSD", sparse_mode=7)
    with pytest.raises(NotImplementedError):
        fa(q, k, v, 2, "BNSD", sparse_mode=5)
    with pytest.raises(NotImplementedError):
        fa(q, k, v, 2, "BNSD", pse=torch.zeros(1, 2, 4, 4))
    t = rand(4, 2, 4)
    with pytest.raises(ValueError, match="actual_seq_qlen"):
        fa(t, t, t, 2, "TND")
    with pytest.raises(TypeError, match="python ints"):
        fa(t, t, t, 2, "TND", actual_seq_qlen=torch.tensor([4]), actual_seq_kvlen=[4])
    with pytest.raises(ValueError, match="non-decreasing"):
        fa(t, t, t, 2, "TND", actual_seq_qlen=[3, 2, 4], actual_seq_kvlen=[3, 2, 4])
    with pytest.raises(ValueError, match="only 4 tokens"):
        fa(t, t, t, 2, "TND", actual_seq_qlen=[5], actual_seq_kvlen=[4])
    with pytest.raises(ValueError, match="softmax_layout"):
        fa(q, k, v, 2, "BNSD", softmax_layout="TND")
    with pytest.raises(ValueError, match="shapes differ"):
        fa(q, k, rand(1, 2, 5, 4), 2, "BNSD")
    with pytest.raises(ValueError, match="attention_in"):
        emu.npu_fusion_attention_grad(q, k, v, q, 2, "BNSD")


# ----------------------------------------------------------------------------- ring update


def merge_formula(po, pm, ps, co, cm, cs):
    """REFERENCE section 5, per row: po/co [rows, D], stats [rows]; -inf rows contribute nothing."""
    m = torch.maximum(pm, cm)
    ms = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    a, b = ps * torch.exp(pm - ms), cs * torch.exp(cm - ms)
    total = a + b
    wa = torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a))
    wb = torch.where(total > 0, b / total.clamp_min(1e-300), torch.zeros_like(b))
    return po * wa[:, None] + co * wb[:, None], m, total


def random_partial(shape, *, dead_rows=()):
    m, s = torch.randn(shape, dtype=torch.float32), torch.rand(shape, dtype=torch.float32) + 0.5
    for r in dead_rows:
        m.view(-1)[r], s.view(-1)[r] = float("-inf"), 0.0
    return m, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_update_sbh(dtype):
    torch.manual_seed(10)
    sq, b, n, d = 5, 2, 3, 4
    po, co = torch.randn(sq, b, n * d).to(dtype), torch.randn(sq, b, n * d).to(dtype)
    pm, ps = random_partial((b, n, sq), dead_rows=(0, 7))
    cm, cs = random_partial((b, n, sq), dead_rows=(0, 9))  # row 0 dead on both sides
    st = [x.unsqueeze(-1).expand(b, n, sq, 8).contiguous() for x in (pm, ps, cm, cs)]
    out, m, s = emu.npu_ring_attention_update(po, st[0], st[1], co, st[2], st[3])
    assert out.dtype == dtype and out.shape == po.shape and m.shape == (b, n, sq, 8)

    def rows(x):  # [S, B, N*D] -> [B*N*S, D], row order of the stats
        return x.float().view(sq, b, n, d).permute(1, 2, 0, 3).reshape(-1, d)

    ro, rm, rs = merge_formula(rows(po), pm.reshape(-1), ps.reshape(-1), rows(co), cm.reshape(-1),
                               cs.reshape(-1))  # fmt: skip
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(rows(out), ro, rtol=tol, atol=tol)
    torch.testing.assert_close(lanes(m).reshape(-1), rm)
    torch.testing.assert_close(lanes(s).reshape(-1), rs)
    assert torch.isfinite(out.float()).all() and (rows(out)[0] == 0).all()


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_ring_update_tnd(softmax_layout):
    torch.manual_seed(11)
    t, n, d, qb = 9, 2, 64, [(0, 3), (3, 8), (8, 9)]  # TND: D a multiple of 64
    po, co = torch.randn(t, n, d), torch.randn(t, n, d)
    pm, ps = random_partial((t, n), dead_rows=(4,))
    cm, cs = random_partial((t, n), dead_rows=(4, 5))

    def pack(x):
        return (
            x.unsqueeze(-1).expand(t, n, 8).contiguous() if softmax_layout else head_major(x, qb, t)
        )

    out, m, s = emu.npu_ring_attention_update(
        po, pack(pm), pack(ps), co, pack(cm), pack(cs), input_layout="TND",
        actual_seq_qlen=torch.tensor([0, 3, 8, 9]), input_softmax_layout=softmax_layout,
    )  # fmt: skip
    ro, rm, rs = merge_formula(po.reshape(-1, d), pm.reshape(-1), ps.reshape(-1),
                               co.reshape(-1, d), cm.reshape(-1), cs.reshape(-1))  # fmt: skip
    torch.testing.assert_close(out.reshape(-1, d), ro)
    torch.testing.assert_close(m, pack(rm.view(t, n)))
    torch.testing.assert_close(s, pack(rs.view(t, n)))
    if not softmax_layout:
        with pytest.raises(ValueError, match="actual_seq_qlen"):
            emu.npu_ring_attention_update(po, pack(pm), pack(ps), co, pack(cm), pack(cs),
                                          input_layout="TND")  # fmt: skip


def test_merging_key_halves_gives_full_attention():
    torch.manual_seed(12)
    q, k, v = rand(1, 2, 6, 4), rand(1, 2, 8, 4), rand(1, 2, 8, 4)
    parts = [run("SBH", q, k[:, :, a:e], v[:, :, a:e], 2, 0.5) for a, e in ((0, 3), (3, 8))]
    (o1, m1, s1, _), (o2, m2, s2, _) = parts
    out, _, _ = emu.npu_ring_attention_update(
        to_layout(o1, "SBH"), m1, s1, to_layout(o2, "SBH"), m2, s2
    )
    assert_close(from_layout(out, "SBH", 2), dense(q, k, v, 0.5)[0])


# ----------------------------------------------------------------------------- installation


def test_install_and_uninstall():
    before = sys.modules.get("torch_npu")
    with emu.emulated_torch_npu() as mod:
        tnpu = importlib.import_module("torch_npu")
        assert tnpu is mod and tnpu.__version__ == "2.14.0-emulated"
        assert callable(getattr(tnpu, "npu_ring_attention_update", None))
        assert not hasattr(tnpu, "npu")  # nothing pretends a device exists
        inner = emu.install()
        assert sys.modules["torch_npu"] is inner
        emu.uninstall()
        assert sys.modules["torch_npu"] is mod
    assert sys.modules.get("torch_npu") is before
    with pytest.raises(RuntimeError):
        emu.uninstall()
