"""NpuBlockKernel on the CPU emulation of torch_npu, against dense attention written out here.

The backward tests use the kernel as the ring does: the blocks' forward results are merged
with the formula of REFERENCE.md section 5, and every block's backward gets the FINAL merged
output and statistics; the per-block gradients must add up to the dense gradient.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from usp_npu.kernels.base import CAUSAL, FULL, BlockMask
from usp_npu.kernels.npu import NpuBlockKernel, NpuRngState, _causal_mask
from usp_npu.testing import npu_emulation as emu

F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True)
def torch_npu():
    with emu.emulated_torch_npu() as mod:
        yield mod


# ----------------------------------------------------------------------------- oracle


def dense(q, k, v, scale, hidden=None, keep=None, keep_prob=1.0):
    """Canonical [S, B, N, D] in float64; hidden [Sq, Sk] True = masked -> (out, max, sum)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[2] // k.shape[2]
    kx, vx = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = scale * torch.einsum("sbnd,tbnd->bnst", q, kx)
    if hidden is None:
        hidden = torch.zeros(s.shape[-2:], dtype=torch.bool)
    empty = hidden.all(-1, keepdim=True)
    s = s.masked_fill(hidden, float("-inf")).masked_fill(empty, 0.0)
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m).masked_fill(hidden, 0.0)
    total = e.sum(-1, keepdim=True)
    p = (e / total.masked_fill(empty, 1.0)).masked_fill(empty, 0.0)
    if keep is not None:
        p = p * keep / keep_prob
    out = torch.einsum("bnst,tbnd->sbnd", p, vx)
    return out, m.masked_fill(empty, float("-inf")).squeeze(-1), total.squeeze(-1)


def dense_grads(q, k, v, dout, scale, hidden=None, keep=None, keep_prob=1.0):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    dense(*leaves, scale, hidden, keep, keep_prob)[0].backward(dout.double())
    return [t.grad for t in leaves]


def merge(acc, block, rows):
    """Merge a block's (out [s,B,N,D], max, sum [B,N,s,8]) into rows of the accumulators."""
    out, m, total = acc
    bo, bm, bs = block
    pm, ps = m[:, :, rows], total[:, :, rows]
    new_m = torch.maximum(pm, bm)
    safe = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)
    a, b = ps * torch.exp(pm - safe), bs * torch.exp(bm - safe)
    new_s = a + b
    den = torch.where(new_s > 0, new_s, torch.ones_like(new_s))
    wa, wb = ((w / den)[..., 0].permute(2, 0, 1).unsqueeze(-1) for w in (a, b))
    out[rows] = out[rows] * wa + bo.to(out.dtype) * wb
    m[:, :, rows], total[:, :, rows] = new_m, new_s


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def qkv(sq, sk, b=2, n=4, nkv=4, d=8, dtype=F32):
    return (torch.randn(sq, b, n, d, dtype=dtype), torch.randn(sk, b, nkv, d, dtype=dtype),
            torch.randn(sk, b, nkv, d, dtype=dtype))  # fmt: skip


def causal_hidden(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).triu(1)  # top-left anchored


# ----------------------------------------------------------------------------- single blocks

HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def block_case(name, sq, sk):
    if name == "causal":
        return CAUSAL, causal_hidden(sq, sk)
    if name == "full":
        return FULL, None
    hidden = torch.rand(sq, sk) < 0.3
    hidden[1] = True  # a row that sees no key
    return BlockMask(mask=hidden), hidden


@pytest.mark.parametrize("layout", ["SBH", "BNSD"])
@pytest.mark.parametrize(("nq", "nkv"), HEADS)
@pytest.mark.parametrize(("case", "sq", "sk"), [("causal", 6, 6), ("causal", 4, 7),
                                                ("full", 5, 8), ("mask", 5, 7)])  # fmt: skip
def test_single_block(layout, nq, nkv, case, sq, sk):
    torch.manual_seed(sq * 10 + sk)
    kernel = NpuBlockKernel(layout)
    assert kernel.name == "npu" and kernel.stat_lanes == 8
    q, k, v = qkv(sq, sk, n=nq, nkv=nkv)
    mask, hidden = block_case(case, sq, sk)
    out, m, s, rng = kernel.forward(q, k, v, scale=0.3, mask=mask)
    assert rng is None
    assert out.shape == q.shape and out.dtype == F32
    assert m.shape == s.shape == (2, nq, sq, 8) and m.dtype == s.dtype == F32
    ref, rmax, rsum = dense(q, k, v, 0.3, hidden)
    close(out, ref)
    torch.testing.assert_close(m[..., 0].double(), rmax, rtol=1e-5, atol=1e-5)
    close(s[..., 0], rsum)
    dout = torch.randn_like(out)
    grads = kernel.backward(dout, q, k, v, out, m, s, scale=0.3, mask=mask)
    for g, t, r in zip(grads, (q, k, v), dense_grads(q, k, v, dout, 0.3, hidden), strict=True):
        assert g.shape == t.shape and torch.isfinite(g).all()
        close(g, r)


# ----------------------------------------------------------------------------- the ring's use


def ring_blocks(scenario, c):
    """(local query positions, [(local row slice, key positions, BlockMask)], causal?)."""
    if scenario == "causal_rank0":  # R = 2, rank 0 holds [c0; c3]; rank 1's [c1; c2] is later
        own = [*range(0, c), *range(3 * c, 4 * c)]
        return own, [(slice(0, 2 * c), own, CAUSAL),
                     (slice(c, 2 * c), list(range(c, 3 * c)), FULL)], True  # fmt: skip
    if scenario == "causal_rank1":  # rank 1 holds [c1; c2]; rank 0's first half c0 is earlier
        own = list(range(c, 3 * c))
        return own, [(slice(0, 2 * c), own, CAUSAL),
                     (slice(0, 2 * c), list(range(0, c)), FULL)], True  # fmt: skip
    rows = list(range(0, 6))
    return rows, [(slice(0, 6), list(range(0, 4)), None),
                  (slice(0, 6), list(range(4, 10)), None)], False  # fmt: skip


@pytest.mark.parametrize("layout", ["SBH", "BNSD"])
@pytest.mark.parametrize("scenario", ["causal_rank0", "causal_rank1", "full", "mask"])
@pytest.mark.parametrize(("nq", "nkv"), [(4, 4), (4, 1)])
def test_two_block_split_with_final_stats(layout, scenario, nq, nkv):
    """Forward per block, merge, then backward per block with the MERGED out and stats."""
    torch.manual_seed(42)
    c, scale = 3, 0.35
    qpos, blocks, causal = ring_blocks(scenario, c)
    total_keys = 4 * c if causal else 10
    qg, kg, vg = qkv(total_keys, total_keys, n=nq, nkv=nkv)
    q = qg[qpos]
    key_union = sorted({p for _, kp, _ in blocks for p in kp})
    # the dense problem: local queries against every key the blocks cover
    hidden = torch.zeros(len(qpos), len(key_union), dtype=torch.bool)
    if causal:
        hidden = torch.tensor(key_union)[None, :] > torch.tensor(qpos)[:, None]
    elif scenario == "mask":
        hidden = torch.rand(len(qpos), len(key_union)) < 0.3
        hidden[2, :4] = True  # no key in the first block
        hidden[4] = True  # no key at all: zero output, zero gradient
    masks = []
    for rows, kp, bm in blocks:
        if bm is None:
            sub = hidden[rows][:, [key_union.index(p) for p in kp]]
            bm = BlockMask(mask=sub) if scenario == "mask" else FULL
        masks.append(bm)

    kernel = NpuBlockKernel(layout)
    sq, b = len(qpos), q.shape[1]
    acc = (torch.zeros(sq, b, nq, q.shape[3], dtype=F32),
           torch.full((b, nq, sq, 8), float("-inf")), torch.zeros(b, nq, sq, 8))  # fmt: skip
    for (rows, kp, _), bm in zip(blocks, masks, strict=True):
        out_b, m_b, s_b, _ = kernel.forward(q[rows], kg[kp], vg[kp], scale=scale, mask=bm)
        merge(acc, (out_b, m_b, s_b), rows)
    out, m, s = acc
    ref_out = dense(q, kg[key_union], vg[key_union], scale, hidden)[0]
    close(out, ref_out)

    dout = torch.randn_like(out)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kg), torch.zeros_like(vg)
    for (rows, kp, _), bm in zip(blocks, masks, strict=True):
        gq, gk, gv = kernel.backward(
            dout[rows],
            q[rows],
            kg[kp],
            vg[kp],
            out[rows],
            m[:, :, rows],
            s[:, :, rows],
            scale=scale,
            mask=bm,
        )
        dq[rows] += gq
        dk[kp] += gk
        dv[kp] += gv
    rq, rk, rv = dense_grads(q, kg[key_union], vg[key_union], dout, scale, hidden)
    close(dq, rq)
    close(dk[key_union], rk)
    close(dv[key_union], rv)
    if scenario == "mask":
        assert (out[4] == 0).all() and (dq[4] == 0).all()


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("layout", ["SBH", "BNSD"])
def test_dropout_replay_across_two_blocks(layout):
    torch.manual_seed(7)
    kp, scale = 0.75, 0.4
    kernel = NpuBlockKernel(layout, keep_prob=kp)
    q, k, v = qkv(5, 9, n=2, nkv=2)
    halves = [slice(0, 4), slice(4, 9)]
    emu.reset_dropout_state()
    acc = (torch.zeros_like(q), torch.full((2, 2, 5, 8), float("-inf")), torch.zeros(2, 2, 5, 8))
    states = []
    for h in halves:
        o, m, s, rng = kernel.forward(q, k[h], v[h], scale=scale, mask=FULL)
        assert isinstance(rng, NpuRngState) and rng.numels == 2 * 2 * 5 * (h.stop - h.start)
        states.append(rng)
        merge(acc, (o, m, s), slice(0, 5))
    assert states[0].offset != states[1].offset  # each block draws its own mask
    # replay: the same RNG state gives the same block output
    emu.reset_dropout_state()
    again = kernel.forward(q, k[halves[0]], v[halves[0]], scale=scale, mask=FULL)
    assert again[3] == states[0]
    keep = torch.cat(
        [
            emu.dropout_keep_mask(r.seed, r.offset, r.numels, kp).view(2, 2, 5, -1).double()
            for r in states
        ],
        dim=-1,
    )
    out, m, s = acc
    close(out, dense(q, k, v, scale, keep=keep, keep_prob=kp)[0])
    dout = torch.randn_like(out)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for h, rng in zip(halves, states, strict=True):
        gq, gk, gv = kernel.backward(
            dout, q, k[h], v[h], out, m, s, scale=scale, mask=FULL, rng_state=rng
        )
        dq += gq
        dk[h], dv[h] = gk, gv
    for g, r in zip(
        (dq, dk, dv), dense_grads(q, k, v, dout, scale, keep=keep, keep_prob=kp), strict=True
    ):
        close(g, r)
    with pytest.raises(ValueError, match="NpuRngState"):
        kernel.backward(dout, q, k[halves[0]], v[halves[0]], out, m, s, scale=scale, mask=FULL)


# ----------------------------------------------------------------------------- errors and plumbing


def test_float64_is_refused():
    q, k, v = qkv(4, 4, dtype=F64)
    with pytest.raises(TypeError, match="float64"):
        NpuBlockKernel().forward(q, k, v, scale=0.5, mask=FULL)


def test_constructor_checks():
    with pytest.raises(ValueError, match="layout"):
        NpuBlockKernel("BSH")
    with pytest.raises(ValueError, match="keep_prob"):
        NpuBlockKernel(keep_prob=0.0)


def test_missing_torch_npu_explains_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail
    q, k, v = qkv(4, 4)
    with pytest.raises(RuntimeError) as err:
        NpuBlockKernel().forward(q, k, v, scale=0.5, mask=FULL)
    msg = str(err.value)
    assert "torch_npu" in msg and "CANN" in msg and "--attention-backend torch" in msg


def test_old_torch_npu_is_named(monkeypatch):
    def npu_fusion_attention(query, key, value, head_num, input_layout, atten_mask=None, scale=1.0):
        raise AssertionError("must not be called")

    old = types.SimpleNamespace(
        npu_fusion_attention=npu_fusion_attention,
        npu_fusion_attention_grad=emu.npu_fusion_attention_grad,
    )
    monkeypatch.setitem(sys.modules, "torch_npu", old)
    q, k, v = qkv(4, 4)
    with pytest.raises(RuntimeError, match=r"torch_npu >= 2\.1"):
        NpuBlockKernel().forward(q, k, v, scale=0.5, mask=CAUSAL)


def test_op_without_signature_rejecting_arguments(monkeypatch):
    class Builtin:
        __signature__ = "not a signature"  # inspect.signature raises, as for some builtins

        def __call__(self, *args, **kwargs):
            raise TypeError("npu_fusion_attention() got an unexpected keyword 'sparse_mode'")

    fake = types.SimpleNamespace(
        npu_fusion_attention=Builtin(), npu_fusion_attention_grad=Builtin()
    )
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    q, k, v = qkv(4, 4)
    with pytest.raises(RuntimeError, match=r"torch_npu >= 2\.1"):
        NpuBlockKernel().forward(q, k, v, scale=0.5, mask=FULL)


def test_type_error_of_a_verified_op_is_not_blamed_on_the_version(monkeypatch):
    def npu_fusion_attention(query, key, value, head_num, input_layout, **kwargs):
        raise TypeError("some other problem")

    fake = types.SimpleNamespace(
        npu_fusion_attention=npu_fusion_attention,
        npu_fusion_attention_grad=emu.npu_fusion_attention_grad,
    )
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    q, k, v = qkv(4, 4)
    with pytest.raises(TypeError, match="some other problem"):
        NpuBlockKernel().forward(q, k, v, scale=0.5, mask=FULL)


def test_ensure_available(monkeypatch):
    NpuBlockKernel.ensure_available()  # the emulation is installed
    assert torch.float64 not in NpuBlockKernel.supported_dtypes
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(RuntimeError, match="CANN"):
        NpuBlockKernel.ensure_available()


def test_grad_with_five_outputs(monkeypatch):
    def grad5(*args, **kwargs):
        return (*emu.npu_fusion_attention_grad(*args, **kwargs), torch.empty(0))  # + dsink

    newer = types.SimpleNamespace(npu_fusion_attention=emu.npu_fusion_attention,
                                  npu_fusion_attention_grad=grad5)  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch_npu", newer)
    torch.manual_seed(3)
    q, k, v = qkv(5, 5)
    kernel = NpuBlockKernel("BNSD")
    out, m, s, _ = kernel.forward(q, k, v, scale=0.5, mask=CAUSAL)
    dout = torch.randn_like(out)
    grads = kernel.backward(dout, q, k, v, out, m, s, scale=0.5, mask=CAUSAL)
    for g, r in zip(grads, dense_grads(q, k, v, dout, 0.5, causal_hidden(5, 5)), strict=True):
        close(g, r)


def test_causal_mask_is_cached_and_compressed():
    a, b = _causal_mask(torch.device("cpu")), _causal_mask(torch.device("cpu"))
    assert a is b and a.shape == (2048, 2048) and a.dtype == torch.bool
    assert torch.equal(a, torch.ones(2048, 2048, dtype=torch.bool).triu(1))


def test_import_does_not_need_torch_npu():
    code = (
        "import sys, usp_npu.kernels.npu; "
        "assert 'torch_npu' not in sys.modules, 'torch_npu imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
