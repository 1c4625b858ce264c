"""``usp-npu``: the command line.

``usp-npu demo``: run context-parallel attention on CPU ranks (spawned, gloo) or, under
torchrun, one rank per process, and show its agreement with single-device attention.
``usp-npu bench``: for every valid (algo, u, r) of a world size, measure time, CPU time against
one-process attention, compute balance and bytes sent per rank (per link class with
``--devices-per-node``).
``usp-npu plan``: predict time, bytes per link class and memory of every valid configuration on a
cluster, and recommend one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch

from usp_npu.arguments import add_context_parallel_args
from usp_npu.config import ALL_TO_ALL_KINDS, ContextParallelConfig
from usp_npu.plan.cluster import PRESETS
from usp_npu.plan.placement import PLACEMENTS, node_of_rank
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
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="cp = world / tp")
    p.add_argument(
        "--devices-per-node",
        type=int,
        default=None,
        help="count bytes per link class as if this many consecutive ranks shared a node",
    )
    p.add_argument("--placement", choices=PLACEMENTS, default="megatron")
    p.add_argument(
        "--ulysses-all-to-all",
        choices=ALL_TO_ALL_KINDS,
        default="collective",
        help="the Ulysses all-to-all as one collective or point-to-point (p2p: gloo across hosts)",
    )
    _output_args(p, "rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _output_args(p, what: str) -> None:
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help=f"the {what} as JSON: to PATH, or alone on stdout (the table then goes to stderr)",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="bar chart of the " + what)


def _emit(data, table: str, args) -> None:
    """Table on stdout, or on stderr when ``--json`` alone claims stdout."""
    import json

    print(table, file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    if args.json == "-":
        print(json.dumps(data, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


def _bench(args) -> int:
    from tqdm import tqdm

    from usp_npu.bench import (
        bench_rank,
        format_table,
        plot_rows,
        single_process_cpu,
        summarize,
        valid_configs,
    )
    from usp_npu.testing.launcher import ProcessGroupPool

    tp = args.tensor_model_parallel_size
    if tp < 1 or args.world_size % tp:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} must divide --world-size {args.world_size}"
        )
    cp = args.world_size // tp
    if args.devices_per_node is not None:  # fails here, before any rank starts
        node_of_rank(args.world_size, args.devices_per_node, args.placement)
    sweep = []
    for seq in args.seq_length:
        cases = valid_configs(cp, args.num_attention_heads, seq, args.num_query_groups, tp)
        if not cases:
            raise ValueError(f"no valid configuration for S={seq} on {args.world_size} ranks")
        sweep += [
            replace(
                c,
                dtype=args.dtype,
                head_dim=args.head_dim,
                repeats=args.repeats,
                devices_per_node=args.devices_per_node,
                placement=args.placement,
                all_to_all=args.ulysses_all_to_all,
            )
            for c in cases
        ]
    rows: list[dict] = []
    singles: dict[int, float] = {}
    out = sys.stderr if args.json == "-" else sys.stdout
    with (
        ProcessGroupPool(1, timeout_s=3600) as one,
        ProcessGroupPool(args.world_size, timeout_s=3600) as pool,
        tqdm(sweep, desc="usp-npu bench", unit="config", disable=args.no_progress) as bar,
    ):
        for case in bar:
            bar.set_postfix_str(f"S={case.seq} {case.label}")
            if case.seq not in singles:
                singles[case.seq] = one.run(single_process_cpu, case)[0]
            rows.append(summarize(case, pool.run(bench_rank, case), singles[case.seq]))
            bar.write(format_table(rows[-1:]).splitlines()[-1], file=out)
    header = (
        f"\n{args.world_size} ranks (gloo, 1 thread each, tp {tp}, cp {cp}) on {os.cpu_count()} "
        f"cores, {args.dtype}, heads {args.num_attention_heads}, head_dim {args.head_dim}, causal:\n"
    )
    _emit(rows, header + "\n" + format_table(rows), args)
    if args.plot:
        plot_rows(rows, args.plot)
    return 0


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="predict time, bytes per link class and memory of every (algo, u, r)"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="atlas-800t-a2")
    model = p.add_argument_group("model (one attention layer)")
    model.add_argument("--num-attention-heads", type=int, required=True)
    model.add_argument("--num-query-groups", type=int, default=None, help="K/V heads (GQA)")
    model.add_argument("--head-dim", type=int, default=128)
    model.add_argument("--seq-length", type=int, required=True)
    model.add_argument("--num-layers", type=int, default=1, help="layers per step")
    model.add_argument("--micro-batch-size", type=int, default=1)
    model.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    model.add_argument("--attention-mask-type", choices=("causal", "general"), default="causal")
    model.add_argument(
        "--document-lengths",
        type=int,
        nargs="+",
        default=None,
        help="packed documents: their lengths, summing to --seq-length (attention per document)",
    )
    par = p.add_argument_group("parallelism")
    par.add_argument("--context-parallel-size", type=int, default=None, help="default: world / tp")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument(
        "--context-parallel-kv-cache-policy",
        choices=("full", "half"),
        default=None,
        help="keep K/V (full) or K (half) for the backward instead of re-sending them",
    )
    par.add_argument(
        "--context-parallel-cache-interval",
        type=int,
        default=0,
        help="with a KV cache policy: cache only layers n with n %% (interval + 1) == 1",
    )
    par.add_argument(
        "--cp-window-size",
        type=int,
        nargs="+",
        default=None,
        help="double-ring windows to try on every ring degree (default: every valid one)",
    )
    par.add_argument(
        "--placement",
        choices=(*PLACEMENTS, "all"),
        default="megatron",
        help="megatron: consecutive ranks per node; round_robin: rank g on node g %% nodes",
    )
    hw = p.add_argument_group("cluster (overrides the preset)")
    for flag, unit in (
        ("--nodes", "count"),
        ("--devices-per-node", "count"),
        ("--intra-node-bandwidth", "GB/s per device"),
        ("--intra-node-link-bandwidth", "GB/s per peer link"),
        ("--inter-node-bandwidth", "GB/s per node"),
        ("--intra-node-latency", "microseconds"),
        ("--inter-node-latency", "microseconds"),
        ("--device-flops", "TFLOP/s"),
        ("--device-memory", "GiB"),
        ("--memory-bandwidth", "GB/s"),
        ("--call-overhead", "microseconds per kernel call"),
        ("--backward-flops-ratio", "backward / forward FLOPs"),
    ):
        hw.add_argument(flag, type=int if unit == "count" else float, default=None, help=unit)
    _output_args(p, "configurations")


_UNITS = {
    "intra_node_bandwidth": 1e9,
    "intra_node_link_bandwidth": 1e9,
    "inter_node_bandwidth": 1e9,
    "intra_node_latency": 1e-6,
    "inter_node_latency": 1e-6,
    "device_flops": 1e12,
    "device_memory": 2**30,
    "memory_bandwidth": 1e9,
    "call_overhead": 1e-6,
    "backward_flops_ratio": 1.0,
    "nodes": 1,
    "devices_per_node": 1,
}


def _cumulative(lengths: list[int] | None) -> tuple[int, ...] | None:
    if lengths is None:
        return None
    if any(n < 1 for n in lengths):
        raise ValueError(f"--document-lengths must be positive, got {lengths}")
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return tuple(out)


def _plan(args) -> int:
    from usp_npu.plan import ModelShape, format_plan, plan, plot_plan

    overrides = {
        name: None if getattr(args, name) is None else getattr(args, name) * unit
        for name, unit in _UNITS.items()
    }
    for name in ("nodes", "devices_per_node"):
        value = overrides[name]
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    cluster = PRESETS[args.preset].with_overrides(**overrides)
    tp = args.tensor_model_parallel_size
    if tp < 1 or cluster.world_size % tp:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} must divide the {cluster.world_size} devices "
            f"(--nodes {cluster.nodes} x --devices-per-node {cluster.devices_per_node})"
        )
    shape = ModelShape(
        heads=args.num_attention_heads,
        head_dim=args.head_dim,
        seq=args.seq_length,
        kv_heads=args.num_query_groups,
        batch=args.micro_batch_size,
        dtype=args.dtype,
        num_layers=args.num_layers,
        cu_seqlens=_cumulative(args.document_lengths),
    )
    placements = PLACEMENTS if args.placement == "all" else (args.placement,)
    result = plan(
        shape,
        cluster,
        cp=args.context_parallel_size,
        tp=tp,
        placements=placements,
        mask_type=args.attention_mask_type,
        kv_cache_policy=args.context_parallel_kv_cache_policy,
        windows=None if args.cp_window_size is None else tuple(args.cp_window_size),
        cache_interval=args.context_parallel_cache_interval,
    )
    head = (
        f"usp-npu plan: {cluster.name}, {cluster.nodes} x {cluster.devices_per_node} devices, "
        f"tp {tp}, cp {result['context_parallel_size']}; heads {shape.heads}/"
        f"{shape.kv_heads or shape.heads}, head_dim {shape.head_dim}, S={shape.seq}, "
        f"{shape.dtype}, {args.attention_mask_type}; one layer forward + backward per rank\n"
    )
    _emit(result, head + "\n" + format_plan(result), args)
    if args.plot:
        plot_plan(result, args.plot)
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
    _plan_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "plan":
            return _plan(args)
    except ValueError as err:
        print(f"usp-npu: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
