"""``usp-npu``: the command line.

``usp-npu demo``: run context-parallel attention on CPU ranks (spawned, gloo) or, under
torchrun, one rank per process, and show its agreement with single-device attention.
``usp-npu bench``: for every valid (algo, u, r) of a world size, measure time, CPU time against
one-process attention, compute balance and bytes sent per rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch

from usp_npu.arguments import add_context_parallel_args
from usp_npu.config import ContextParallelConfig
from usp_npu.sharding import token_indices
from usp_npu.testing.cases import (
    DTYPES,
    TOLERANCES,
    AttentionCase,
    full_inputs,
    relative_error,
    run_shards,
)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="CP attention vs single-device attention, on CPU ranks")
    p.add_argument(
        "--world-size", type=int, default=4, help="ranks to spawn (ignored under torchrun)"
    )
    p.add_argument("--seq-length", type=int, default=4096, help="full sequence length S")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=None, help="K/V heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--layout", choices=("BSND", "BNSD", "SBH"), default="BSND")
    p.add_argument(
        "--general-mask",
        choices=("none", "random"),
        default="none",
        help="with --attention-mask-type general: no mask or a random one",
    )
    add_context_parallel_args(p)
    p.set_defaults(context_parallel_size=None)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time, CPU time and bytes per rank for every valid (u, r)")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, nargs="+", default=[8192])
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")


def _bench(args) -> int:
    import json

    from usp_npu.bench import bench_rank, format_table, single_process_cpu, summarize, valid_configs
    from usp_npu.testing.launcher import ProcessGroupPool

    rows = []
    with (
        ProcessGroupPool(1, timeout_s=3600) as one,
        ProcessGroupPool(args.world_size, timeout_s=3600) as pool,
    ):
        for seq in args.seq_length:
            cases = [
                replace(c, dtype=args.dtype, head_dim=args.head_dim, repeats=args.repeats)
                for c in valid_configs(
                    args.world_size, args.num_attention_heads, seq, args.num_query_groups
                )
            ]
            if not cases:
                raise ValueError(f"no valid configuration for S={seq} on {args.world_size} ranks")
            single = one.run(single_process_cpu, cases[0])[0]
            for case in cases:
                rows.append(summarize(case, pool.run(bench_rank, case), single))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(
        f"\n{args.world_size} ranks (gloo, 1 thread each) on {os.cpu_count()} cores, {args.dtype}, "
        f"heads {args.num_attention_heads}, head_dim {args.head_dim}, causal:\n"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _case_from_args(args, world: int) -> AttentionCase:
    cfg = ContextParallelConfig.from_args(args)
    cfg.context_parallel_size = args.context_parallel_size or world
    cfg.validate(
        args.num_attention_heads,
        args.seq_length,
        num_query_groups=args.num_query_groups,
        world_size=world,
    )
    if world != cfg.context_parallel_size:
        raise SystemExit(
            f"demo runs one CP group: --context-parallel-size must equal the {world} ranks"
        )
    return AttentionCase(
        algo=cfg.context_parallel_algo,
        cp=cfg.context_parallel_size,
        ulysses_degree=cfg.ulysses_degree_in_cp,
        mask_type=cfg.attention_mask_type,
        mask=args.general_mask if cfg.attention_mask_type == "general" else "none",
        layout=args.layout,
        dtype=args.dtype,
        seq=args.seq_length,
        batch=args.batch_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_query_groups,
        head_dim=args.head_dim,
        backend=cfg.attention_backend,
        overlap=cfg.use_cp_send_recv_overlap,
        window=cfg.cp_window_size,
        kv_cache=cfg.context_parallel_kv_cache_policy,
        cache_interval=cfg.context_parallel_cache_interval,
        allgather_kv=cfg.use_ulysses_allgather_kv,
    )


def _reference(case: AttentionCase):
    """Single-device attention on the same rounded inputs: float64 for the error, and the case
    dtype for the time (both through torch's memory-efficient SDPA, no S x S matrix)."""
    q, k, v, dout, mask = full_inputs(case)
    dtype = DTYPES[case.dtype]
    q, k, v, dout = (x.to(dtype) for x in (q, k, v, dout))
    bias = (
        None
        if mask is None
        else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))
    )
    groups = case.heads // (case.kv_heads or case.heads)

    def sdpa(q_, k_, v_, dt):
        # canonical [S, B, N, D] -> [B, N, S, D]
        leaves = [x.to(dt).permute(1, 2, 0, 3).detach().requires_grad_() for x in (q_, k_, v_)]
        out = torch.nn.functional.scaled_dot_product_attention(
            *leaves,
            attn_mask=None if bias is None else bias.to(dt),
            is_causal=case.mask_type == "causal",
            enable_gqa=groups > 1,
        )
        out.backward(dout.to(dt).permute(1, 2, 0, 3))
        return [x.permute(2, 0, 1, 3) for x in (out.detach(), *(leaf.grad for leaf in leaves))]

    sdpa(q, k, v, dtype)  # warm-up, as the CP run times its second iteration
    t0 = time.perf_counter()
    sdpa(q, k, v, dtype)
    single_s = time.perf_counter() - t0
    ref = sdpa(q, k, v, torch.float64)
    if mask is not None:  # SDPA gives NaN for rows that see no key; attention there is 0
        ref = [torch.nan_to_num(x) for x in ref]
    return ref, single_s


def _report(case: AttentionCase, results: list[dict], where: str) -> int:
    ref, single_s = _reference(case)
    errors = {name: 0.0 for name in ("out", "dq", "dk", "dv")}
    for res in results:
        idx = token_indices(
            case.seq,
            res["cp_rank"],
            case.config().ulysses_degree,
            case.config().ring_degree,
            case.mask_type == "causal",
        )
        for name, got, full in zip(errors, res["got"], ref, strict=True):
            want = full.index_select(0, idx)
            errors[name] = max(errors[name], relative_error(got, want))
    tol = TOLERANCES[case.dtype]
    fwd = max(r["forward_s"] for r in results) * 1e3
    bwd = max(r["backward_s"] for r in results) * 1e3
    mb = max(r["bytes_sent"] for r in results) / 2**20
    cfg = case.config()
    print(
        f"usp-npu demo: {case.cp} ranks ({where}), {case.algo} (ulysses x ring = "
        f"{cfg.ulysses_degree} x {cfg.ring_degree}), {case.mask_type}, S={case.seq}, B={case.batch}, "
        f"heads={case.heads}/{case.kv_heads or case.heads}, D={case.head_dim}, {case.dtype}, "
        f"{case.layout}"
    )
    print("  tokens per rank:", case.seq // case.cp)
    print(
        "  max error vs single-device attention (relative to max(1, |ref|)): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f"  (tolerance {tol:g})"
    )
    print(
        f"  time per rank (slowest): forward {fwd:.1f} ms, backward {bwd:.1f} ms; "
        f"single-device forward+backward {single_s * 1e3:.1f} ms; sent {mb:.2f} MiB per rank"
    )
    ok = all(v <= tol for v in errors.values()) and all(r["finite"] for r in results)
    print("  result:", "MATCHES single-device attention" if ok else "MISMATCH")
    return 0 if ok else 1


def _demo(args) -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _demo_torchrun(args)
    from usp_npu.testing.launcher import ProcessGroupPool

    case = _case_from_args(args, args.world_size)
    with ProcessGroupPool(args.world_size, timeout_s=600) as pool:
        results = pool.run(run_shards, case)
    return _report(case, results, "spawned CPU processes, gloo")


def _demo_torchrun(args) -> int:
    import torch.distributed as dist

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    )
    dist.init_process_group("gloo")
    try:
        case = _case_from_args(args, world)
        res = run_shards(case)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(res, gathered, dst=0)
        return _report(case, gathered, "torchrun, gloo") if rank == 0 else 0
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="usp-npu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
    except ValueError as err:
        print(f"usp-npu: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
