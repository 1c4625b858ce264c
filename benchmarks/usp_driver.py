#!/usr/bin/env python3
"""usp_npu with the command line and JSON of ``yunchang_cpu_peer.py``, for side-by-side timing.

Same problem, same timing loop as the peer script: identical global ``[B, S, H, D]`` tensors on
every rank (seeded), this rank's shard (usp_npu's own split: load-balanced for ``--causal``),
``--warmup`` untimed and ``--iters`` timed steps between barriers, the slowest rank's time per
step, median/mean/min. ``--ulysses u --ring r`` picks ``ulysses_cp_algo`` (r = 1),
``megatron_cp_algo`` (u = 1) or ``hybrid_cp_algo``. ``--nproc 1`` (``--ulysses 1 --ring 1``)
times plain one-process attention instead (``torch.nn.functional.scaled_dot_product_attention``,
the same CPU flash kernel), the ideal a CP run is compared with.

    python benchmarks/usp_driver.py --nproc 2 --ulysses 2 --ring 1 --causal --threads 1 --json u.json
"""

from __future__ import annotations

import argparse
import json
import os
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--nproc", type=int, default=4, help="processes to spawn (ignored under torchrun)"
    )
    p.add_argument("--ulysses", type=int, default=2, help="ulysses degree")
    p.add_argument("--ring", type=int, default=2, help="ring degree")
    p.add_argument(
        "--ring-impl", default="basic", help="accepted for CLI parity; usp_npu has one split"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192, help="GLOBAL sequence length")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (GQA); default = heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--no-bwd", action="store_true", help="time forward only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per process (0 = cores / world)"
    )
    p.add_argument(
        "--check", action="store_true", help="compare out/dq/dk/dv with one-process SDPA"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=29527)
    p.add_argument("--json", default=None, help="write rank-0 results as JSON here")
    p.add_argument(
        "--pipeline-chunks",
        type=int,
        default=None,
        help="--ulysses-pipeline-chunks (default: rule)",
    )
    return p.parse_args(argv)


def _summarise(res: dict, key: str, times: list[float]) -> None:
    srt = sorted(times)
    res[key] = [round(x, 4) for x in times]
    res[key.replace("_s", "_mean_s")] = round(sum(srt) / len(srt), 4)
    res[key.replace("_s", "_median_s")] = round(srt[len(srt) // 2], 4)
    res[key.replace("_s", "_min_s")] = round(srt[0], 4)


def _inputs(args, torch):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    b, s, h, d = args.batch, args.seq, args.heads, args.head_dim
    g = torch.Generator().manual_seed(args.seed)
    shapes = [
        (b, s, h, d),
        (b, s, args.kv_heads or h, d),
        (b, s, args.kv_heads or h, d),
        (b, s, h, d),
    ]
    return [torch.randn(*shape, generator=g).to(dtype) for shape in shapes]


def _timed(fn, n, barrier):
    times = []
    for _ in range(n):
        barrier()
        t0 = time.perf_counter()
        fn()
        barrier()
        times.append(time.perf_counter() - t0)
    return times


def _bench(args, res, attend, leaves, dout, barrier, reduce_max):
    def step_fwd():
        import torch

        with torch.no_grad():
            attend()

    def step_fwdbwd():
        for x in leaves:
            x.grad = None
        attend().backward(dout)

    t_start = time.perf_counter()
    _timed(step_fwd, args.warmup, barrier)
    _summarise(res, "fwd_s", reduce_max(_timed(step_fwd, args.iters, barrier)))
    if not args.no_bwd:
        _timed(step_fwdbwd, args.warmup, barrier)
        _summarise(res, "fwdbwd_s", reduce_max(_timed(step_fwdbwd, args.iters, barrier)))
    res["total_bench_s"] = round(time.perf_counter() - t_start, 3)


def build_single(args, inputs):
    """One-process attention on the whole sequence (SDPA, the same CPU flash kernel):
    ``(attend, leaves, dout)`` in SDPA's ``[B, H, S, D]`` layout, from the global ``inputs``."""
    import torch.nn.functional as F

    q, k, v, dout = inputs
    leaves = [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    gqa = leaves[1].shape[1] != leaves[0].shape[1]

    def attend():
        return F.scaled_dot_product_attention(*leaves, is_causal=args.causal, enable_gqa=gqa)

    return attend, leaves, dout.transpose(1, 2).contiguous()


def single_process(args) -> dict:
    """One process, ``--threads`` threads: SDPA on the whole sequence (the ideal)."""
    import torch

    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    attend, leaves, dout = build_single(args, _inputs(args, torch))
    res = _header(args, torch, "one_process_sdpa", 0, 1)
    _bench(args, res, attend, leaves, dout, lambda: None, lambda t: t)
    return res


def _header(args, torch, module, rank, world):
    import usp_npu

    kvh = args.kv_heads or args.heads
    return {
        "module": module, "rank": rank, "world": world, "ulysses": args.ulysses, "ring": args.ring,
        "B": args.batch, "S": args.seq, "H": args.heads, "KVH": kvh, "D": args.head_dim,
        "dtype": args.dtype, "causal": args.causal, "threads_per_proc": torch.get_num_threads(),
        "torch": torch.__version__, "usp_npu": usp_npu.__version__,
    }  # fmt: skip


def build_usp(args, world: int, torch):
    """usp_npu's attention for ``--ulysses``/``--ring`` on the initialised default group:
    ``(attend, leaves, dout_local, mesh, inputs)``; ``attend()`` runs one layer's attention on
    this rank's shards ``leaves`` (q, k, v with ``requires_grad``), ``inputs`` the global tensors."""
    import usp_npu
    from usp_npu.config import HYBRID, RING, ULYSSES

    u, r = args.ulysses, args.ring
    assert u * r == world, f"ulysses*ring ({u}*{r}) must equal world size {world}"
    algo = ULYSSES if r == 1 else (RING if u == 1 else HYBRID)
    cfg = usp_npu.ContextParallelConfig(
        context_parallel_size=world,
        context_parallel_algo=algo,
        ulysses_degree_in_cp=u if algo == HYBRID else None,
        attention_mask_type="causal" if args.causal else "general",
        attention_backend="torch",
        ulysses_pipeline_chunks=args.pipeline_chunks,
    )
    mesh = usp_npu.initialize_context_parallel(cfg)
    inputs = _inputs(args, torch)
    q, k, v, dout = inputs
    leaves = [usp_npu.split_sequence(x, 1, mesh=mesh).detach().requires_grad_() for x in (q, k, v)]
    dout_local = usp_npu.split_sequence(dout, 1, mesh=mesh)

    def attend():
        return usp_npu.context_parallel_attention(*leaves, "BSND", mesh=mesh)

    return attend, leaves, dout_local, mesh, inputs


def worker(rank: int, world: int, args) -> None:
    import torch
    import torch.distributed as dist

    import usp_npu
    from usp_npu.algorithms.usp import pipeline_chunks

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    attend, leaves, dout_local, mesh, (q, k, v, dout) = build_usp(args, world, torch)

    def reduce_max(times):
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    res = _header(args, torch, f"usp_npu {mesh.config.context_parallel_algo}", rank, world)
    u = args.ulysses
    kv_rep = max(args.kv_heads or args.heads, u)
    local = (args.seq // world, args.batch, args.heads, args.head_dim)
    res["pipeline_chunks"] = pipeline_chunks(
        local, kv_rep, u, q.element_size(), args.pipeline_chunks
    )
    _bench(args, res, attend, leaves, dout_local, dist.barrier, reduce_max)
    if args.check:
        res["check"] = _check(args, torch, leaves, dout_local, attend, mesh, q, k, v, dout)
    if rank == 0:
        _emit(args, res)
    dist.barrier()
    usp_npu.destroy_context_parallel()
    dist.destroy_process_group()


def _check(args, torch, leaves, dout_local, attend, mesh, q, k, v, dout):
    import torch.distributed as dist
    import torch.nn.functional as F

    import usp_npu

    for x in leaves:
        x.grad = None
    out = attend()
    out.backward(dout_local)
    full = [x.double().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(
        *full, is_causal=args.causal, enable_gqa=k.shape[2] != q.shape[2]
    )
    ref.backward(dout.double().transpose(1, 2))
    errs = {}
    for name, mine, r in zip(("out", "dq", "dk", "dv"), (out, *(x.grad for x in leaves)),
                             (ref, *(x.grad for x in full)), strict=True):  # fmt: skip
        r = usp_npu.split_sequence(r.detach().transpose(1, 2), 1, mesh=mesh)
        e = torch.tensor([(mine.detach().double() - r).abs().max().item(), r.abs().max().item()])
        dist.all_reduce(e, op=dist.ReduceOp.MAX)
        errs[name] = {"max_abs_err": e[0].item(), "ref_max_abs": e[1].item()}
    return errs


def _emit(args, res: dict) -> None:
    print(json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def _spawn_entry(rank: int, world: int, args) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(args.port)
    worker(rank, world, args)


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    elif args.nproc == 1:
        _emit(args, single_process(args))
    else:
        import torch.multiprocessing as mp

        mp.spawn(_spawn_entry, args=(args.nproc, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
