"""One attention check, run on every rank: CP attention vs dense single-device attention.

Used by the test suite and by ``usp-npu demo``. Every rank builds the same full-sequence inputs
from a seed, computes the dense float64 reference and its gradients locally, runs
context-parallel attention on its own shard and reports the largest error of its shard.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from usp_npu.attention import context_parallel_attention
from usp_npu.comm.stats import CommStats
from usp_npu.config import ContextParallelConfig
from usp_npu.layouts import from_canonical, to_canonical
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.sharding import split_sequence
from usp_npu.testing.reference import dense_attention

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class AttentionCase:
    """A problem and a CP configuration. ``seq`` is the FULL sequence length."""

    algo: str = "ulysses_cp_algo"
    cp: int = 2
    ulysses_degree: int | None = None
    tp: int = 1
    mask_type: str = "causal"
    mask: str = (
        "none"  # general only: "none" (full attention) or "random" (with a fully masked row)
    )
    layout: str = "BSND"
    dtype: str = "float64"
    seq: int = 32
    batch: int = 1
    heads: int = 4
    kv_heads: int | None = None
    head_dim: int = 8
    backend: str = "auto"
    overlap: bool = False
    bnsd: bool = False  # --megatron-cp-in-bnsd (npu backend)
    emulate_npu: bool = False  # install the CPU emulation as torch_npu while the case runs
    fused_update: bool | None = None  # --use-fused-ring-attention-update (None = auto)
    seed: int = 0
    cu_seqlens: tuple[int, ...] | None = None  # packed documents (batch 1), full sequence
    window: int = 1  # --cp-window-size (double ring)
    kv_cache: str | None = None  # --context-parallel-kv-cache-policy
    cache_interval: int = 0  # --context-parallel-cache-interval
    allgather_kv: bool = False  # --use-ulysses-allgather-kv
    layer_number: int | None = None  # the attention call's layer_number
    pipeline_chunks: int | None = None  # --ulysses-pipeline-chunks (None = the rule)
    all_to_all: str = "collective"  # --ulysses-all-to-all

    def config(self) -> ContextParallelConfig:
        return ContextParallelConfig(
            context_parallel_size=self.cp,
            context_parallel_algo=self.algo,
            ulysses_degree_in_cp=self.ulysses_degree,
            attention_mask_type=self.mask_type,
            attention_backend=self.backend,
            use_cp_send_recv_overlap=self.overlap,
            megatron_cp_in_bnsd=self.bnsd,
            use_fused_ring_attention_update=self.fused_update,
            cp_window_size=self.window,
            context_parallel_kv_cache_policy=self.kv_cache,
            context_parallel_cache_interval=self.cache_interval,
            use_ulysses_allgather_kv=self.allgather_kv,
            ulysses_pipeline_chunks=self.pipeline_chunks,
            ulysses_all_to_all=self.all_to_all,
        )


def full_inputs(case: AttentionCase):
    """Same on every rank: q [S,B,N,D], k, v [S,B,Nkv,D], dout, mask (float64, canonical)."""
    g = torch.Generator().manual_seed(case.seed)
    s, b, n, d = case.seq, case.batch, case.heads, case.head_dim
    nkv = case.kv_heads or n
    q = torch.randn(s, b, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, nkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, nkv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(s, b, n, d, generator=g, dtype=torch.float64)
    mask = None
    if case.cu_seqlens is not None:  # documents: block-diagonal (the config adds causal)
        doc = torch.zeros(s, dtype=torch.int64)
        doc[list(case.cu_seqlens[1:-1])] = 1
        doc = doc.cumsum(0)
        mask = doc.view(s, 1) != doc.view(1, s)
    if case.mask == "random":
        mask = torch.rand(s, s, generator=g) < 0.4
        mask[s // 3] = True  # a query row that sees no key at all
    return q, k, v, dout, mask


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got - ref| / max(1, max|ref|)``, in float64: the measure every tolerance applies to."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _run_cp(case: AttentionCase, mesh, inputs, repeats: int) -> dict:
    """CP attention forward + backward on this rank's shards of ``inputs`` (full, canonical)."""
    q, k, v, dout, mask = inputs
    dtype = DTYPES[case.dtype]
    cu = case.cu_seqlens
    if cu is not None:
        mask = None  # the block-diagonal mask is the reference's; CP attention gets cu_seqlens

    def local(x):
        return from_canonical(split_sequence(x, 0, cu, mesh=mesh).to(dtype), case.layout)

    stats = CommStats()
    for _ in range(max(repeats, 1)):
        stats.reset()
        ql, kl, vl = (local(x).requires_grad_() for x in (q, k, v))
        t0 = time.perf_counter()
        out = context_parallel_attention(
            ql,
            kl,
            vl,
            case.layout,
            head_dim=case.head_dim,
            attention_mask=mask,
            cu_seqlens=cu,
            mesh=mesh,
            comm_stats=stats,
            layer_number=case.layer_number,
        )
        t1 = time.perf_counter()
        sent_forward = dict(stats.sent)
        out.backward(local(dout))
        t2 = time.perf_counter()
    got = [
        to_canonical(x, case.layout, case.head_dim)
        for x in (out.detach(), ql.grad, kl.grad, vl.grad)
    ]
    return {
        "got": got,
        "finite": all(torch.isfinite(x).all().item() for x in got),
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "bytes_sent": stats.total,
        "sent_forward": sent_forward,
        "sent_backward": {k: n - sent_forward.get(k, 0) for k, n in stats.sent.items()},
    }


def _case_inputs(case: AttentionCase):
    """Full inputs rounded to the case dtype (kept in float64), this TP rank's heads only."""
    q, k, v, dout, mask = full_inputs(case)
    dtype = DTYPES[case.dtype]
    q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))
    # tensor parallel: this rank keeps its slice of the heads (Megatron: tp is the fastest axis)
    tp_idx = dist.get_rank() % case.tp
    q, k, v, dout = (x.chunk(case.tp, dim=2)[tp_idx] for x in (q, k, v, dout))
    return q, k, v, dout, mask


def check_attention(case: AttentionCase, repeats: int = 1) -> dict:
    """Run ``case`` on this rank; return the max errors of its out/dq/dk/dv shards against the
    dense float64 reference (computed locally on the same rounded inputs), and timings."""
    if case.emulate_npu:
        from usp_npu.testing.npu_emulation import emulated_torch_npu

        with emulated_torch_npu():
            return _check_attention(case, repeats)
    return _check_attention(case, repeats)


def _check_attention(case: AttentionCase, repeats: int) -> dict:
    cfg = case.config()
    mesh = initialize_context_parallel(cfg, tensor_model_parallel_size=case.tp)
    inputs = _case_inputs(case)
    q, k, v, dout, mask = inputs
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = dense_attention(*leaves, causal=cfg.causal, mask=mask)
    ref.backward(dout)
    refs = [ref.detach()] + [x.grad for x in leaves]
    res = _run_cp(case, mesh, inputs, repeats)
    pairs = [
        (name, g, split_sequence(r, 0, case.cu_seqlens, mesh=mesh))
        for name, g, r in zip(("out", "dq", "dk", "dv"), res.pop("got"), refs, strict=True)
    ]
    res["errors"] = {name: relative_error(g, r) for name, g, r in pairs}
    # root-mean-square error over this rank's shard, relative to the reference's RMS
    res["rms_errors"] = {
        name: (
            (g.double() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)
        ).item()
        for name, g, r in pairs
    }
    res["case"] = asdict(case)
    return res


def run_shards(case: AttentionCase, repeats: int = 2) -> dict:
    """Run ``case`` on this rank and return its shards (``got``: out, dq, dk, dv, canonical) and
    timings, for a caller that compares them against a reference elsewhere (the demo)."""
    mesh = initialize_context_parallel(case.config(), tensor_model_parallel_size=case.tp)
    res = _run_cp(case, mesh, _case_inputs(case), repeats)
    # kept in the case dtype: relative_error compares in float64, so no precision is lost here
    res["got"] = [x.detach() for x in res["got"]]
    res["cp_rank"] = mesh.cp_rank
    return res


#: max error allowed against the float64 dense reference (relative to max(1, |ref|))
TOLERANCES = {"float64": 1e-9, "float32": 2e-5, "bfloat16": 2.5e-2, "float16": 5e-3}


def world_size(case: AttentionCase) -> int:
    return case.cp * case.tp


def assert_matches_reference(results: list[dict], case: AttentionCase) -> None:
    """Raise AssertionError unless every rank's output and gradients are within tolerance."""
    tol = TOLERANCES[case.dtype]
    for rank, res in enumerate(results):
        assert res["finite"], f"rank {rank}: non-finite output or gradient for {case}"
        bad = {k: v for k, v in res["errors"].items() if not v <= tol}
        assert not bad, f"rank {rank}: errors {bad} above {tol} for {case}"


def expected_case_bytes(case: AttentionCase) -> tuple[dict[str, int], dict[str, int]]:
    """The communication model's ``(forward, backward)`` bytes per rank for ``case``."""
    from usp_npu.comm.volume import expected_bytes

    size = DTYPES[case.dtype].itemsize
    return expected_bytes(
        case.config(),
        case.seq,
        case.batch,
        case.heads // case.tp,
        (case.kv_heads or case.heads) // case.tp,
        case.head_dim,
        size,
        8 if size == 8 else 4,
        case.layer_number,
    )


def assert_bytes_match_model(results: list[dict], case: AttentionCase) -> None:
    """Raise AssertionError unless every rank sent, per kind and direction, what the model says."""
    want_forward, want_backward = expected_case_bytes(case)
    for rank, res in enumerate(results):
        forward = {k: n for k, n in res["sent_forward"].items() if n}
        backward = {k: n for k, n in res["sent_backward"].items() if n}
        assert forward == want_forward, (rank, "forward", forward, want_forward, case)
        assert backward == want_backward, (rank, "backward", backward, want_backward, case)
