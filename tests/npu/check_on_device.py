"""Device check: every CP algorithm against single-device ``npu_fusion_attention``.

Run under torchrun, one process per NPU (``tests/npu/run_on_device.sh`` does that)::

    torchrun --standalone --nproc-per-node 8 tests/npu/check_on_device.py

Every configuration valid for the world size W is checked: ``ulysses_cp_algo`` (cp = W),
``megatron_cp_algo`` (cp = W) and ``hybrid_cp_algo`` for every Ulysses degree 1 < u < W that
divides W; causal and general (no mask); SBH and BNSD blocks (``--megatron-cp-in-bnsd``) for the
ring and the hybrid; MHA and GQA. Every rank builds the same seeded full-sequence inputs, computes
the reference on its own device with ``torch_npu.npu_fusion_attention`` and
``npu_fusion_attention_grad`` over the whole sequence, runs ``context_parallel_attention``
(``attention_backend="npu"``) on its shard, gathers the output and dq/dk/dv back into sequence
order and measures ``max|cp - ref| / max(1, max|ref|)``, the measure and tolerance (bf16 2.5e-2)
of the test suite (:mod:`usp_npu.testing.cases`). The errors are max-reduced over the ranks.

``--packed`` checks the same configurations on a packed sequence of four documents
(``cu_seqlens = [0, S/2, 3S/4, 7S/8, S]``, batch 1) against the single-device op in ``TND``
layout with ``actual_seq_qlen``/``actual_seq_kvlen``: the varlen ring steps, the TND kernels and
the TND merge on the device.

Rank 0 prints one line per configuration, then one summary line::

    usp_npu device check: 28/28 configs passed on 8 x npu (max err 3.1e-03, 40 s)

The exit status is 0 when every configuration passed, 1 otherwise, 2 for bad arguments.
``--emulate`` runs the same check on CPU ranks (gloo) with the CPU emulation of torch_npu.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from types import ModuleType

import torch
import torch.distributed as dist

from usp_npu import (
    context_parallel_attention,
    destroy_context_parallel,
    gather_sequence,
    initialize_context_parallel,
    split_sequence,
)
from usp_npu.parallel_state import ContextParallelMesh
from usp_npu.testing.cases import DTYPES, TOLERANCES, AttentionCase, full_inputs, relative_error

NAMES = ("out", "dq", "dk", "dv")
_COMPRESSED = 2048  # side of the compressed causal mask of sparse modes 2/3


@dataclass(frozen=True)
class Setup:
    """Where this rank runs: the torch_npu module (real or emulated) and the device."""

    torch_npu: ModuleType
    device: torch.device
    rank: int
    world: int
    emulated: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (every rank parses the same one)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=None, help="full sequence length (2 * W * 256)")
    p.add_argument(
        "--heads", type=int, default=None, help="query heads (smallest multiple of W >= 8)"
    )
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (auto)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--packed", action="store_true", help="four packed documents (cu_seqlens)")
    p.add_argument("--timeout", type=float, default=600.0, help="collective timeout, seconds")
    p.add_argument(
        "--emulate", action="store_true", help="CPU ranks, gloo, emulated torch_npu (no NPU)"
    )
    # perturbs the gathered output of the N-th config (1-based) so that its check must fail:
    # the tests prove that the check can fail
    p.add_argument("--inject-error", type=int, default=0, metavar="N", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def algorithms(world: int) -> list[tuple[str, int | None]]:
    """(algo, Ulysses degree) for every algorithm valid on ``world`` CP ranks."""
    hybrid = [("hybrid_cp_algo", u) for u in range(2, world) if world % u == 0]
    return [("ulysses_cp_algo", None), ("megatron_cp_algo", None), *hybrid]


def make_cases(args: argparse.Namespace, world: int) -> list[AttentionCase]:
    """The configurations to check, all validated with the library's own rules."""
    seq = args.seq or 2 * world * 256
    heads = args.heads or world * math.ceil(8 / world)
    base = {
        "cp": world,
        "seq": seq,
        "batch": args.batch,
        "heads": heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "backend": "npu",
        "seed": args.seed,
    }
    if args.packed:
        if args.batch != 1:
            raise ValueError(f"--packed needs --batch 1 (one packed sequence), got {args.batch}")
        base["cu_seqlens"] = (0, seq // 2, 3 * seq // 4, 7 * seq // 8, seq)
    shapes = [
        AttentionCase(algo=a, ulysses_degree=u, mask_type=m, bnsd=b, **base)
        for a, u in algorithms(world)
        for m in ("causal", "general")
        for b in ((False,) if a == "ulysses_cp_algo" else (False, True))
    ]
    kv = args.kv_heads or _gqa_heads(heads, shapes)
    cases = [c for s in shapes for c in (s, replace(s, kv_heads=kv))]
    for case in cases:
        case.config().validate(heads, seq, num_query_groups=case.kv_heads, world_size=world)
    return cases


def _gqa_heads(heads: int, cases: list[AttentionCase]) -> int:
    """The smallest K/V head count > 1 that every case accepts (1, MQA, when none does)."""
    for kv in range(2, heads):
        if heads % kv == 0 and not any(c.config().local_head_errors(heads, kv) for c in cases):
            return kv
    return 1


def describe(case: AttentionCase) -> str:
    """One line: algorithm and degrees, mask type, block layout, heads."""
    cfg = case.config()
    algo = f"{case.algo} u={cfg.ulysses_degree} r={cfg.ring_degree}"
    block = "BNSD" if case.bnsd else "SBH"
    kv = case.kv_heads or case.heads
    heads = f"{'GQA' if kv < case.heads else 'MHA'} {case.heads}/{kv}"
    packed = f" packed {len(case.cu_seqlens) - 1} docs" if case.cu_seqlens else ""
    return f"{algo:<26} {case.mask_type:<7} {block:<4} {heads}{packed}"


# --------------------------------------------------------------------------------- reference


def _causal_args(setup: Setup, causal: bool) -> dict:
    """Mask arguments of the full-sequence op: compressed causal mask, mode 3; or none."""
    if not causal:
        return {"atten_mask": None, "sparse_mode": 0}
    mask = torch.ones(_COMPRESSED, _COMPRESSED, dtype=torch.bool, device=setup.device).triu(1)
    return {"atten_mask": mask, "sparse_mode": 3}


def device_inputs(setup: Setup, case: AttentionCase) -> list[torch.Tensor]:
    """q, k, v, dout: the seeded full inputs, BSND ``[B, S, N, D]``, case dtype, on the device."""
    q, k, v, dout, _ = full_inputs(case)  # canonical [S, B, N, D], float64, same on every rank
    return [
        x.transpose(0, 1).to(setup.device, DTYPES[case.dtype]).contiguous() for x in (q, k, v, dout)
    ]


def reference(setup: Setup, case: AttentionCase, inputs: list[torch.Tensor]):
    """Single-device out, dq, dk, dv over the full sequence (BSND), with the fused ops."""
    q, k, v, dout = inputs
    kw = {"scale": case.head_dim**-0.5, **_causal_args(setup, case.mask_type == "causal")}
    layout = "BSND"
    if case.cu_seqlens:  # one sequence, per-document attention: TND, lengths without the 0
        layout = "TND"
        q, k, v, dout = (x[0] for x in (q, k, v, dout))
        kw["actual_seq_qlen"] = kw["actual_seq_kvlen"] = list(case.cu_seqlens[1:])
    res = setup.torch_npu.npu_fusion_attention(q, k, v, case.heads, layout, **kw)
    out, smax, ssum = res[0], res[1], res[2]
    kw["scale_value"] = kw.pop("scale")
    grads = setup.torch_npu.npu_fusion_attention_grad(
        q, k, v, dout, case.heads, layout, softmax_max=smax, softmax_sum=ssum,
        attention_in=out, **kw,
    )  # fmt: skip
    result = [out, *grads[:3]]
    return [x.unsqueeze(0) for x in result] if case.cu_seqlens else result


# --------------------------------------------------------------------------------- CP run


def context_parallel(
    case: AttentionCase, mesh: ContextParallelMesh, inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """CP out, dq, dk, dv, gathered back into full sequence order (BSND, seq dim 1)."""
    cu = case.cu_seqlens
    q, k, v, dout = (split_sequence(x, 1, cu, mesh=mesh) for x in inputs)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = context_parallel_attention(*leaves, "BSND", cu_seqlens=cu, mesh=mesh)
    out.backward(dout)
    local = [out.detach(), *(x.grad for x in leaves)]
    return [gather_sequence(x.contiguous(), 1, cu, mesh=mesh) for x in local]


def check(setup: Setup, case: AttentionCase, ref_cache: dict, inject: bool) -> list[float]:
    """Errors of the gathered out, dq, dk, dv on this rank (non-finite ones become inf)."""
    key = (case.mask_type, case.kv_heads)
    if key not in ref_cache:
        inputs = device_inputs(setup, case)
        ref_cache[key] = (inputs, [x.float().cpu() for x in reference(setup, case, inputs)])
    inputs, refs = ref_cache[key]
    mesh = initialize_context_parallel(case.config())
    got = [x.float().cpu() for x in context_parallel(case, mesh, inputs)]
    if inject:  # one element off by 4x the tolerance
        got[0].view(-1)[0] += 4 * TOLERANCES[case.dtype] * refs[0].abs().max().clamp_min(1.0)
    errors = [relative_error(g, r.double()) for g, r in zip(got, refs, strict=True)]
    return [e if math.isfinite(e) else math.inf for e in errors]


# --------------------------------------------------------------------------------- driver


def _setup(args: argparse.Namespace, torch_npu: ModuleType) -> Setup:
    """Initialise the process group (hccl, or gloo with --emulate) and pick the device."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    timeout = timedelta(seconds=args.timeout)
    if args.emulate:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("gloo", timeout=timeout)
        device = torch.device("cpu")
    else:
        torch.npu.set_device(local_rank)
        dist.init_process_group("hccl", timeout=timeout)
        device = torch.device("npu", local_rank)
    return Setup(torch_npu, device, rank, world, args.emulate)


def _import_torch_npu() -> ModuleType:
    """The real torch_npu, or exit with what to install."""
    try:
        import torch_npu
    except Exception as exc:  # ImportError, or OSError for a missing CANN library
        sys.exit(
            f"check_on_device.py: cannot import torch_npu ({exc}). Source the CANN "
            "set_env.sh and install the torch-npu wheel built for torch "
            f"{torch.__version__}; or pass --emulate to run the check on CPU ranks."
        )
    return torch_npu


def run(args: argparse.Namespace, torch_npu: ModuleType) -> int:
    """Check every configuration on this rank; rank 0 prints. Returns the exit status."""
    setup = _setup(args, torch_npu)
    say = print if setup.rank == 0 else (lambda *a, **k: None)
    try:
        try:
            cases = make_cases(args, setup.world)
        except ValueError as exc:  # the same on every rank, before any collective
            say(f"usp_npu device check: {exc}", file=sys.stderr)
            return 2
        where = f"{setup.world} x {'cpu [emulated torch_npu]' if setup.emulated else 'npu'}"
        say(
            f"checking {len(cases)} configs on {where}: S={cases[0].seq}, "
            f"B={args.batch}, heads={cases[0].heads}, D={args.head_dim}, {args.dtype}, "
            f"tolerance {TOLERANCES[args.dtype]:g} (max|cp - ref| / max(1, max|ref|))",
            flush=True,
        )
        ref_cache: dict = {}
        worst, failed, t_start = 0.0, 0, time.perf_counter()
        for i, case in enumerate(cases, 1):
            t0 = time.perf_counter()
            try:
                errors = check(setup, case, ref_cache, inject=i == args.inject_error)
            except Exception as exc:  # counted as a failure; peers see it in the reduction
                print(f"rank {setup.rank}: {describe(case)}: {exc!r}", file=sys.stderr)
                errors = [math.inf] * len(NAMES)
            reduced = torch.tensor(errors, dtype=torch.float32, device=setup.device)
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            errors = reduced.tolist()
            ok = max(errors) <= TOLERANCES[case.dtype]
            worst = max(worst, max(errors))
            failed += not ok
            detail = "  ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errors, strict=True))
            say(
                f"[{i:>2}/{len(cases)}] {'PASS' if ok else 'FAIL'}  {describe(case):<50} "
                f"{detail}  ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        passed = len(cases) - failed
        verdict = "FAILED: " if failed else ""
        say(
            f"usp_npu device check: {verdict}{passed}/{len(cases)} configs passed on {where} "
            f"(max err {worst:.1e}, {time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
        return 1 if failed else 0
    finally:
        destroy_context_parallel()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of every rank; returns the exit status."""
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        sys.exit("check_on_device.py runs under torchrun: see tests/npu/run_on_device.sh")
    if not args.emulate:
        return run(args, _import_torch_npu())
    from usp_npu.testing.npu_emulation import emulated_torch_npu

    with emulated_torch_npu() as emulated:
        return run(args, emulated)


if __name__ == "__main__":
    sys.exit(main())
