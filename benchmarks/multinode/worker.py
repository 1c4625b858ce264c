"""One rank of the simulated cluster (started by ``run.sh`` inside its node's namespace).

Joins the gloo group over the namespace addresses, measures what ``usp-npu plan`` needs to know
about this machine (link bandwidth and latency per class, attention rate, memory bandwidth), then
runs ``usp_npu.bench.bench_rank`` for every valid configuration. Rank 0 writes one JSON file.
Every transfer is bounded in size and count; gloo's timeout bounds every wait.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from usp_npu.bench import bench_rank, valid_configs
from usp_npu.kernels import select_kernel
from usp_npu.kernels.base import CAUSAL
from usp_npu.plan.placement import node_of_rank


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats``, the slowest rank's each time (a transfer is
    done when both ends are)."""
    samples = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        samples.append(took.item())
    return statistics.median(samples)


def _timed_per_core(fn, repeats: int) -> float:
    """Mean over the ranks of each rank's median seconds of ``fn``, the ranks taking turns so
    that at most one per CPU core computes at a time: the rate of a device that owns its compute
    unit, which is what the plan's ``device_flops`` means. (On this machine the simulated
    cluster's ranks outnumber the cores; where they compute at the same moment they time-share,
    which the measurement shows and the model does not.)"""
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = max(1, len(os.sched_getaffinity(0)))
    mine = 0.0
    for turn in range(-(-world // cores)):
        dist.barrier()
        if rank // cores == turn:
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            mine = statistics.median(samples)
    took = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(took)
    return took.item() / world


def _exchange(peer_out: int, peer_in: int, nbytes: int):
    send = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    recv = torch.empty_like(send)

    def run():
        # receive posted first, as the ring does (usp_npu/comm/ring.py: gloo otherwise may
        # serialise the two directions of an exchange)
        ops = [dist.P2POp(dist.irecv, recv, peer_in), dist.P2POp(dist.isend, send, peer_out)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return run


def _bandwidth(peer_out: int, peer_in: int, nbytes: int, repeats: int, per_link: int) -> float:
    """Bytes/s of a link from two transfer sizes (nbytes / 4 and nbytes): the slope, so TCP's
    start-up and gloo's per-message cost stay out of the rate (they are the latency)."""
    small, large = nbytes // 4, nbytes
    t_small = _timed(_exchange(peer_out, peer_in, small), repeats)
    t_large = _timed(_exchange(peer_out, peer_in, large), repeats)
    if t_large <= t_small:  # noise swamped the difference: fall back to the plain ratio
        return per_link * large / t_large
    return per_link * (large - small) / (t_large - t_small)


def measure_links(nodes: list[int], nbytes: int, repeats: int) -> dict:
    """Inter: every rank sends to the same-index rank of the next node while receiving from the
    previous one (all at once: each node's shaped link carries devices_per_node transfers).
    Intra: the same towards the next rank of the own node. Latency: a 4-byte exchange."""
    rank, world = dist.get_rank(), dist.get_world_size()
    members = {n: [g for g in range(world) if nodes[g] == n] for n in sorted(set(nodes))}
    mine = members[nodes[rank]]
    local, dpn, count = mine.index(rank), len(mine), len(members)
    out = {}
    if count > 1:
        nxt = members[(nodes[rank] + 1) % count][local]
        prv = members[(nodes[rank] - 1) % count][local]
        out["inter_node_bandwidth"] = _bandwidth(nxt, prv, nbytes, repeats, dpn)
        out["inter_node_latency"] = _timed(_exchange(nxt, prv, 4), 2 * repeats)
    if dpn > 1:
        nxt, prv = mine[(local + 1) % dpn], mine[(local - 1) % dpn]
        out["intra_node_bandwidth"] = _bandwidth(nxt, prv, nbytes, repeats, 1)
        out["intra_node_latency"] = _timed(_exchange(nxt, prv, 4), 2 * repeats)
    return out


def measure_compute(tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Attention FLOP/s of one causal block per rank (one rank per core at a time, see
    ``_timed_per_core``), the backward/forward ratio, the per-call overhead (a 16-token block)
    and copy bandwidth."""
    kernel = select_kernel("auto", torch.device("cpu"), dtype, False)
    g = torch.Generator().manual_seed(dist.get_rank())

    def block(n: int):
        q, k, v = (torch.randn(n, 1, heads, head_dim, generator=g).to(dtype) for _ in range(3))
        scale = head_dim**-0.5
        state = {}

        def fwd():
            state["res"] = kernel.forward(q, k, v, scale=scale, mask=CAUSAL)

        def bwd():
            o, m, s, rng = state["res"]
            kernel.backward(
                torch.ones_like(o), q, k, v, o, m, s, scale=scale, mask=CAUSAL, rng_state=rng
            )

        return fwd, bwd

    fwd, bwd = block(tokens)
    fwd()
    bwd()  # warm-up
    t_fwd = _timed_per_core(fwd, 5)
    t_bwd = _timed_per_core(bwd, 5)
    flops = 4.0 * tokens * (tokens + 1) / 2 * heads * head_dim
    tiny_f, _ = block(16)
    tiny_f()
    overhead = _timed_per_core(tiny_f, 5)
    src = torch.ones(8 * 2**20 // 4)
    dst = torch.empty_like(src)
    copy = _timed_per_core(lambda: dst.copy_(src), 5)
    return {
        "device_flops": flops / t_fwd,
        "backward_flops_ratio": t_bwd / t_fwd,
        "call_overhead": overhead,
        "memory_bandwidth": 2 * src.numel() * 4 / copy,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--ranks-per-node", type=int, required=True)
    p.add_argument("--placement", default="megatron")
    p.add_argument("--master", required=True, help="ADDR:PORT of rank 0's store")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--probe-bytes", type=int, default=4 * 2**20)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--ulysses-all-to-all", default="p2p", choices=("collective", "p2p"))
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), args.nodes * args.ranks_per_node
    nodes = node_of_rank(world, args.ranks_per_node, args.placement)
    if int(os.environ["USP_NPU_NODE"]) != nodes[rank]:
        raise SystemExit(
            f"rank {rank} runs on node {os.environ['USP_NPU_NODE']}, not {nodes[rank]}"
        )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=args.timeout),
    )
    try:
        dtype = getattr(torch, args.dtype)
        links = measure_links(nodes, args.probe_bytes, 7)  # 7 samples per size: a steady median
        cases = valid_configs(
            world, args.num_attention_heads, args.seq_length, args.num_query_groups
        )
        rows = []
        for case in cases:
            # the attention rate right before each configuration: on a shared machine the CPU
            # share of the ranks drifts within minutes. Calibration block: the sweep's smallest
            # ring step (ring degree = world).
            compute = measure_compute(
                max(16, args.seq_length // world), args.num_attention_heads, args.head_dim, dtype
            )
            case = replace(
                case,
                head_dim=args.head_dim,
                dtype=args.dtype,
                repeats=args.repeats,
                devices_per_node=args.ranks_per_node,
                placement=args.placement,
                all_to_all=args.ulysses_all_to_all,
            )
            res = bench_rank(case)
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(res, gathered, dst=0)
            if rank == 0:
                rows.append({"algo": case.algo, "ulysses_degree": case.config().ulysses_degree,
                             "ring_degree": case.config().ring_degree, "ranks": gathered,
                             "calibration": compute, "loadavg": os.getloadavg()})  # fmt: skip
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump(
                    {"args": vars(args), "world": world, "nodes_of_rank": nodes,
                     "calibration": links, "configs": rows,
                     "loadavg": os.getloadavg()},
                    f,
                    indent=1,
                )  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
