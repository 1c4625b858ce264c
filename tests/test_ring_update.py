"""ring_attention_update(_): the fused C++ op (and its dispatch) against the composed formula in fp64."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import usp_npu.ops.ring_update as ru
from usp_npu.ops import (
    extension_available,
    resolve_ring_update,
    ring_attention_update,
    ring_attention_update_,
    ring_attention_update_reference,
)

ROOT = Path(__file__).resolve().parents[1]
NEG_INF = float("-inf")
needs_ext = pytest.mark.skipif(not extension_available(), reason="C++ extension not built")

# (prev attn dtype, cur attn dtype): same dtype, or a wider accumulator
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _stats(shape_rows, lanes, dtype, gen, inf_rows=None):
    """(max, sum) ``[*shape_rows, lanes]`` with identical lanes; ``inf_rows``: bool mask -> empty."""
    m = torch.randn(*shape_rows, 1, generator=gen, dtype=torch.float64) * 3
    s = torch.rand(*shape_rows, 1, generator=gen, dtype=torch.float64) * 4 + 0.5
    if inf_rows is not None:
        m[inf_rows] = NEG_INF
        s[inf_rows] = 0.0
    expand = (*shape_rows, lanes)
    return m.expand(expand).to(dtype).contiguous(), s.expand(expand).to(dtype).contiguous()


def make_case(layout, dims, lanes, dtypes, gen, inf_frac=(0.0, 0.0)):
    """Six tensors of one merge. SBH dims (S, B, N, D); TND dims (T, N, D)."""
    st_dt = torch.float64 if dtypes[0] == torch.float64 else torch.float32
    if layout == "SBH":
        s, b, n, d = dims
        attn_shape, rows = (s, b, n * d), (b, n, s)
    else:
        t, n, d = dims
        attn_shape, rows = (t, n, d), (t, n)
    out = []
    for dt, frac in zip(dtypes, inf_frac, strict=True):
        mask = torch.rand(*rows, generator=gen) < frac
        m, s_ = _stats(rows, lanes, st_dt, gen, mask)
        out.append((torch.randn(*attn_shape, generator=gen, dtype=torch.float64).to(dt), m, s_))
    (po, pm, ps), (co, cm, cs) = out
    return po, pm, ps, co, cm, cs


def oracle(args, seq=None, layout="SBH"):
    return ring_attention_update_reference(
        *[a.double() for a in args], actual_seq_qlen=seq, input_layout=layout
    )


def assert_close(got, want, dtype):
    out, m, s = got
    tol = TOL[dtype]
    assert not torch.isnan(out).any() and not torch.isnan(m).any() and not torch.isnan(s).any()
    torch.testing.assert_close(out.double(), want[0], atol=tol * 4, rtol=tol)
    torch.testing.assert_close(m.double(), want[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.double(), want[2], atol=1e-6, rtol=1e-6)


def random_dims(layout, gen):
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    if layout == "SBH":
        return (r(1, 9), r(1, 3), r(1, 4), r(1, 40))
    return (r(1, 30), r(1, 4), r(1, 40))


def seq_for(t, gen):
    cuts = sorted(int(x) for x in torch.randint(0, t + 1, (2,), generator=gen))
    return torch.tensor([0, *cuts, t], dtype=torch.int64)  # uneven documents, maybe empty


# ----------------------------------------------------------------------------- build


def test_extension_is_built():
    if os.environ.get("USP_NPU_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("USP_NPU_ALLOW_NO_EXTENSION=1")
    from usp_npu.ops import extension_error
    from usp_npu.ops._extension import ENV_PATH, extension_path

    assert extension_available(), extension_error()
    if os.environ.get(ENV_PATH):
        assert extension_path() == os.environ[ENV_PATH]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize("lanes", [1, 8])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_matches_composed_fp64(layout, lanes, dtypes):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{layout}{lanes}{dtypes}".encode()))
    for _ in range(3):
        dims = random_dims(layout, gen)
        args = make_case(layout, dims, lanes, dtypes, gen, inf_frac=(0.1, 0.1))
        seq = seq_for(dims[0], gen) if layout == "TND" else None
        want = oracle(args, seq, layout)
        got = ring_attention_update(*args, actual_seq_qlen=seq, input_layout=layout)
        assert got[0].dtype == dtypes[0] and got[0].shape == args[0].shape
        assert got[1].shape == args[1].shape and got[1].dtype == args[1].dtype
        assert_close(got, want, dtypes[0])
        acc = [a.clone() for a in args[:3]]
        ptrs = [a.data_ptr() for a in acc]
        ret = ring_attention_update_(*acc, *args[3:], actual_seq_qlen=seq, input_layout=layout)
        assert [r.data_ptr() for r in ret] == ptrs
        assert_close(ret, want, dtypes[0])


def test_large_head_dim_and_many_rows():
    """Vector main loop + tails, and enough rows for several parallel chunks."""
    gen = torch.Generator().manual_seed(7)
    for dims in [(300, 2, 3, 128), (33, 1, 2, 257)]:
        args = make_case("SBH", dims, 8, (torch.float32, torch.bfloat16), gen, (0.05, 0.05))
        assert_close(ring_attention_update(*args), oracle(args), torch.float32)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16,) * 2])
def test_neg_inf_rows(dtypes):
    """-inf on one side takes nothing from it; on both sides gives (0, -inf, 0), never NaN."""
    gen = torch.Generator().manual_seed(3)
    po, pm, ps, co, cm, cs = make_case("SBH", (4, 2, 3, 16), 8, dtypes, gen)
    # rows s=0: prev empty; s=1: cur empty; s=2: both empty; s=3: normal
    for m, s, rows in ((pm, ps, [0, 2]), (cm, cs, [1, 2])):
        m[:, :, rows] = NEG_INF
        s[:, :, rows] = 0.0
    for fn in (ring_attention_update, ring_attention_update_reference):
        out, m, s = fn(po, pm, ps, co, cm, cs)
        assert not out.isnan().any() and not s.isnan().any()
        torch.testing.assert_close(out[0].float(), co[0].float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out[1], po[1])
        assert (out[2] == 0).all() and (m[:, :, 2] == NEG_INF).all() and (s[:, :, 2] == 0).all()
        torch.testing.assert_close(m[:, :, 0], cm[:, :, 0])
        torch.testing.assert_close(s[:, :, 1], ps[:, :, 1])
        assert_close((out, m, s), oracle((po, pm, ps, co, cm, cs)), dtypes[0])


@needs_ext
def test_empty_side_is_not_read():
    """The fused kernel never reads the attn of a side with zero weight (NaN garbage stays out)."""
    gen = torch.Generator().manual_seed(4)
    po, pm, ps, co, cm, cs = make_case("SBH", (3, 1, 2, 8), 8, (torch.float32,) * 2, gen)
    pm[:, :, 0], ps[:, :, 0] = NEG_INF, 0.0  # an uninitialised accumulator row
    po[0] = float("nan")
    cm[:, :, 2], cs[:, :, 2] = NEG_INF, 0.0
    co[2] = float("nan")
    out, _, _ = ring_attention_update_(po, pm, ps, co, cm, cs)
    assert not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [8, 37])
def test_exact_rounding(dtype, d):
    """Equal weights 1/2: out = (p + c) / 2 exactly in fp32, then one round to nearest even."""
    gen = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**15), 2**15, (2, 64, 1, d), generator=gen, dtype=torch.int16)
    p, c = bits.view(dtype)  # every bit pattern: subnormals, inf, NaN, ties
    zeros, ones = torch.zeros(1, 1, 64, 8), torch.ones(1, 1, 64, 8)
    out, _, s = ring_attention_update(p, zeros, ones, c, zeros, ones)
    want = ((p.float() + c.float()) * 0.5).to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert (s == 2).all()


# ----------------------------------------------------------------------------- views


def test_inplace_into_strided_views_sbh():
    """The ring's call: acc = out[s0:s1].flatten(2), stats[:, :, s0:s1]; cur from a permute."""
    gen = torch.Generator().manual_seed(5)
    s_all, b, n, d, s0, s1 = 12, 2, 3, 20, 4, 9
    for lanes, dtypes in [(8, (torch.float32, torch.bfloat16)), (1, (torch.float64,) * 2)]:
        st_dt = torch.float64 if dtypes[0] == torch.float64 else torch.float32
        out = torch.randn(s_all, b, n, d, generator=gen).to(dtypes[0])
        smax, ssum = _stats((b, n, s_all), lanes, st_dt, gen)
        before = (out.clone(), smax.clone(), ssum.clone())
        cur_bsh = torch.randn(b, s1 - s0, n * d, generator=gen).to(dtypes[1])
        cur = cur_bsh.permute(1, 0, 2)  # [S, B, H] with B stride != H
        cm, cs = _stats((b, n, s1 - s0), lanes, st_dt, gen)
        acc = (out[s0:s1].flatten(2), smax[:, :, s0:s1], ssum[:, :, s0:s1])
        want = oracle((*[a.clone() for a in acc], cur, cm, cs))
        ring_attention_update_(*acc, cur, cm, cs)
        assert_close(acc, want, dtypes[0])
        outside = [slice(0, s0), slice(s1, s_all)]  # rows outside the slice are untouched
        for rows in outside:
            assert torch.equal(out[rows], before[0][rows])
            assert torch.equal(smax[:, :, rows], before[1][:, :, rows])
            assert torch.equal(ssum[:, :, rows], before[2][:, :, rows])


def test_inplace_into_strided_views_tnd():
    """TND with a strided head dim of attn and stats lanes picked from a wider buffer."""
    gen = torch.Generator().manual_seed(6)
    t, n, d = 17, 3, 24
    big = torch.randn(t + 4, 2 * n, d, generator=gen)
    acc_out = big[2 : t + 2, ::2]  # [T, N, D], N stride 2D, offset
    m_buf, s_buf = _stats((t, n), 8, torch.float32, gen)
    acc_max, acc_sum = m_buf[..., 3:4], s_buf[..., 5:6]  # K = 1 views with offsets
    cur = torch.randn(t, n, d, generator=gen)
    cm, cs = _stats((t, n), 1, torch.float32, gen)
    seq = torch.tensor([0, 5, 12, t])
    want = oracle((acc_out.clone(), acc_max.clone(), acc_sum.clone(), cur, cm, cs), seq, "TND")
    untouched = big[:, 1::2].clone()
    ring_attention_update_(acc_out, acc_max, acc_sum, cur, cm, cs, seq, "TND")
    assert_close((acc_out, acc_max, acc_sum), want, torch.float32)
    assert torch.equal(big[:, 1::2], untouched)
    assert torch.equal(m_buf[..., 4], m_buf[..., 0])  # other lanes of the buffer untouched


# ----------------------------------------------------------------------------- shapes only


@needs_ext
def test_meta_and_fake_tensors():
    args = [
        a.to("meta")
        for a in make_case(
            "SBH", (5, 2, 4, 8), 8, (torch.float32, torch.bfloat16), torch.Generator()
        )
    ]
    out, m, s = ring_attention_update(*args)
    assert out.device.type == "meta" and out.shape == (5, 2, 32) and out.dtype == torch.float32
    assert m.shape == s.shape == (2, 4, 5, 8)
    assert ring_attention_update_(*args)[0] is args[0]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        po = torch.empty(7, 3, 16, dtype=torch.bfloat16)
        st = torch.empty(7, 3, 1)
        out, m, s = ring_attention_update(po, st, st, po, st, st, input_layout="TND")
        assert out.shape == (7, 3, 16) and out.dtype == torch.bfloat16 and m.shape == (7, 3, 1)


@needs_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    sbh = make_case("SBH", (6, 2, 2, 8), 8, (torch.float32, torch.bfloat16), gen)
    tnd = make_case("TND", (9, 2, 8), 1, (torch.float32,) * 2, gen)
    kw_tnd = {"actual_seq_qlen": torch.tensor([0, 4, 9]), "input_layout": "TND"}
    for args, kw in ((sbh, {}), (tnd, kw_tnd)):
        torch.library.opcheck(torch.ops.usp_npu.ring_attention_update.default, args, kw)
        acc = [a.clone() for a in args[:3]]
        torch.library.opcheck(
            torch.ops.usp_npu.ring_attention_update_.default, (*acc, *args[3:]), kw
        )


# ----------------------------------------------------------------------------- errors


def _bad_cases():
    gen = torch.Generator().manual_seed(9)
    po, pm, ps, co, cm, cs = make_case("SBH", (4, 2, 2, 8), 8, (torch.float32,) * 2, gen)
    t = make_case("TND", (6, 2, 8), 8, (torch.float32,) * 2, gen)
    lanes4 = pm[..., :4].contiguous()
    return {
        "layout": ((po, pm, ps, co, cm, cs), {"input_layout": "BSH"}, "input_layout"),
        "lanes": ((po, lanes4, lanes4, co, lanes4, lanes4), {}, "K must be 1 or 8"),
        "stats dtype": ((po, pm.half(), ps.half(), co, cm.half(), cs.half()), {}, "float32"),
        "cur wider": ((po.bfloat16(), pm, ps, co, cm, cs), {}, "narrower"),
        "fp64 stats": ((po, pm.double(), ps.double(), co, cm.double(), cs.double()), {}, "float64"),
        "attn shape": ((po, pm, ps, co[:3], cm, cs), {}, "equal shapes"),
        "stats shape": ((po, pm[:, :, :3], ps, co, cm, cs), {}, "share one"),
        "heads": ((po[..., :15], pm, ps, co[..., :15], cm, cs), {}, "N dividing H"),
        "stride": ((po[..., ::2], pm, ps, co[..., ::2], cm, cs), {}, "stride 1"),
        "lane stride": (
            (po, pm, ps, co, cm.transpose(2, 3).contiguous().transpose(2, 3), cs),
            {},
            "lanes",
        ),
        "seq on SBH": ((po, pm, ps, co, cm, cs), {"actual_seq_qlen": torch.tensor([0, 4])}, "TND"),
        "seq end": (
            t,
            {"input_layout": "TND", "actual_seq_qlen": torch.tensor([0, 5])},
            "prefix sums",
        ),
        "seq order": (
            t,
            {"input_layout": "TND", "actual_seq_qlen": torch.tensor([0, 4, 3, 6])},
            "prefix sums",
        ),
        "seq start": (
            t,
            {"input_layout": "TND", "actual_seq_qlen": torch.tensor([2, 6])},
            "prefix sums",
        ),
        "seq dtype": (
            t,
            {"input_layout": "TND", "actual_seq_qlen": torch.tensor([0.0, 6.0])},
            "int64",
        ),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_errors(name):
    args, kw, match = _bad_cases()[name]
    fns = [ring_attention_update, ring_attention_update_reference]
    if extension_available():
        fns += [torch.ops.usp_npu.ring_attention_update, torch.ops.usp_npu.ring_attention_update_]
    for fn in fns:
        with pytest.raises(ValueError, match=match):
            fn(*args, **kw)  # raises before writing anything


# ----------------------------------------------------------------------------- dispatch


def test_resolve_ring_update(monkeypatch):
    assert resolve_ring_update(False, "cpu") is ru._composed_update_
    assert resolve_ring_update(None, "cuda:0") is ru._composed_update_
    with pytest.raises(ValueError, match="--use-fused-ring-attention-update"):
        resolve_ring_update(True, "cuda")
    if extension_available():
        assert resolve_ring_update(None, torch.device("cpu")) is ring_attention_update_
        assert resolve_ring_update(True, "cpu") is ring_attention_update_
    monkeypatch.setattr(ru, "extension_available", lambda: False)
    monkeypatch.setitem(ru._warned, "fallback", True)
    with pytest.raises(ValueError, match="pip install --no-build-isolation"):
        resolve_ring_update(True, "cpu")
    assert resolve_ring_update(None, "cpu") is ru._composed_update_
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(ValueError, match="torch_npu"):
        resolve_ring_update(True, "npu:0")
    from usp_npu.testing.npu_emulation import emulated_torch_npu

    with emulated_torch_npu():
        assert resolve_ring_update(True, "npu:0") is ring_attention_update_


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(ru, "extension_available", lambda: False)
    monkeypatch.setitem(ru._warned, "fallback", False)
    args = make_case("SBH", (3, 1, 2, 8), 8, (torch.float32,) * 2, torch.Generator())
    with pytest.warns(RuntimeWarning, match="extension is not available"):
        got = ring_attention_update(*args)
    assert_close(got, oracle(args), torch.float32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = [a.clone() for a in args[:3]]
        assert_close(ring_attention_update_(*acc, *args[3:]), oracle(args), torch.float32)


@pytest.mark.parametrize("layout", ["SBH", "TND"])
def test_npu_path_with_emulated_op(layout):
    """The call the NPU backend makes (cur cast up, token-major TND stats), on the CPU emulation."""
    from usp_npu.testing.npu_emulation import npu_ring_attention_update

    gen = torch.Generator().manual_seed(10)
    dims = (5, 2, 2, 16) if layout == "SBH" else (11, 2, 64)  # TND on the device: D % 64 == 0
    args = make_case(layout, dims, 8, (torch.float32, torch.bfloat16), gen, (0.2, 0.2))
    seq = torch.tensor([0, 4, 11]) if layout == "TND" else None
    got = ru._npu_update(npu_ring_attention_update, *args, seq, layout)
    assert_close(got, oracle(args, seq, layout), torch.float32)


def test_find_library(monkeypatch, tmp_path):
    from usp_npu.ops._extension import ENV_PATH, find_library

    monkeypatch.setenv(ENV_PATH, str(tmp_path / "missing.so"))
    path, err = find_library()
    assert path is None and "missing.so" in err
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    monkeypatch.setenv(ENV_PATH, str(lib))
    assert find_library() == (lib, None)
    monkeypatch.delenv(ENV_PATH)
    path, err = find_library()  # the packaged library, or how to build it
    assert (path is not None and path.name.startswith("_C")) or "pip install" in err


@needs_ext
def test_baseline_kernel_and_cmake_library():
    """The baseline-ISA kernel (USP_NPU_NO_AVX2=1), loaded from the CMake build when present."""
    env = {**os.environ, "USP_NPU_NO_AVX2": "1", "USP_NPU_ALLOW_NO_EXTENSION": "0"}
    cmake_lib = ROOT / "build" / "cmake" / "libusp_npu_ops.so"
    if cmake_lib.is_file():
        env["USP_NPU_EXTENSION_PATH"] = str(cmake_lib)
    tests = "matches_composed or exact_rounding or strided or neg_inf or extension_is_built"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
