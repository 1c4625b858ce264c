"""Measurements behind ``usp-npu bench`` and ``benchmarks/``: time, CPU time, bytes per rank.

Each rank runs forward + backward of context-parallel attention on random shards and reports
wall time, the CPU time of its main thread (all compute, copies and merges; gloo's own threads
excluded), the CPU time spent inside block kernels, and the bytes it sent by kind and, when the
ranks are given nodes (``devices_per_node``, ``placement``), by link class. The parent
aggregates across ranks; nothing here is a test.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from usp_npu import ops
from usp_npu.algorithms.usp import usp_attention
from usp_npu.comm.stats import CommStats
from usp_npu.config import HYBRID, RING, ULYSSES, ContextParallelConfig
from usp_npu.kernels import select_kernel
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.plan.placement import node_of_rank


@dataclass(frozen=True)
class BenchCase:
    algo: str = ULYSSES
    cp: int = 4
    ulysses_degree: int | None = None
    seq: int = 8192
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 64
    dtype: str = "float32"
    mask_type: str = "causal"
    overlap: bool = False
    blocking: bool = False  # ring exchanges waited at once: no compute/communication overlap
    repeats: int = 2
    tp: int = 1  # tensor-parallel size: the world is tp * cp ranks, each with heads / tp
    devices_per_node: int | None = None  # count bytes per link class with these nodes
    placement: str = "megatron"  # usp_npu.plan.placement.PLACEMENTS
    cu_seqlens: tuple[int, ...] | None = None  # packed documents over the whole sequence
    kv_cache: str | None = None  # --context-parallel-kv-cache-policy: None | full | half
    cache_interval: int = 0  # --context-parallel-cache-interval
    layer_number: int | None = None  # the layer this call stands for (picks the cache policy)
    window: int = 1  # --cp-window-size (double ring when > 1)
    allgather_kv: bool = False  # --use-ulysses-allgather-kv
    all_to_all: str = "collective"  # --ulysses-all-to-all

    def config(self) -> ContextParallelConfig:
        return ContextParallelConfig(
            self.cp,
            self.algo,
            self.ulysses_degree,
            self.mask_type,
            use_cp_send_recv_overlap=self.overlap,
            context_parallel_kv_cache_policy=self.kv_cache,
            context_parallel_cache_interval=self.cache_interval,
            cp_window_size=self.window,
            use_ulysses_allgather_kv=self.allgather_kv,
            ulysses_all_to_all=self.all_to_all,
        )

    @property
    def label(self) -> str:
        cfg = self.config()
        label = f"{self.algo} u={cfg.ulysses_degree} r={cfg.ring_degree}"
        if self.window > 1:
            label += f" w={self.window}"
        return label + (" allgather-kv" if self.allgather_kv else "")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp


class TimedKernel:
    """Wraps a block kernel; adds the CPU time of this thread spent in its calls (``cpu_s``)."""

    def __init__(self, inner):
        self.inner, self.name, self.stat_lanes = inner, inner.name, inner.stat_lanes
        self.cpu_s = 0.0

    def forward(self, *args, **kwargs):
        t0 = time.thread_time()
        try:
            return self.inner.forward(*args, **kwargs)
        finally:
            self.cpu_s += time.thread_time() - t0

    def backward(self, *args, **kwargs):
        t0 = time.thread_time()
        try:
            return self.inner.backward(*args, **kwargs)
        finally:
            self.cpu_s += time.thread_time() - t0


def bench_rank(case: BenchCase) -> dict:
    """Run ``case`` on this rank (one warm-up, then ``repeats``); per-iteration averages."""
    mesh = initialize_context_parallel(case.config(), tensor_model_parallel_size=case.tp)
    dtype = getattr(torch, case.dtype)
    local = case.seq // case.cp
    g = torch.Generator().manual_seed(mesh.rank)
    nq, nkv = case.heads // case.tp, (case.kv_heads or case.heads) // case.tp
    shapes = [(local, case.batch, nq, case.head_dim)] + [
        (local, case.batch, nkv, case.head_dim)
    ] * 2
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in shapes)
    kernel = TimedKernel(select_kernel("auto", q.device, dtype, False))
    nodes = None
    if case.devices_per_node:
        nodes = node_of_rank(dist.get_world_size(), case.devices_per_node, case.placement)
    stats = CommStats(nodes=nodes, rank=mesh.rank)
    totals = dict.fromkeys(("forward_s", "backward_s", "cpu_s", "kernel_cpu_s", "ring_wait_s"), 0.0)
    for it in range(case.repeats + 1):
        stats.reset()
        kernel.cpu_s = 0.0
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        c0, t0 = time.thread_time(), time.perf_counter()
        out = usp_attention(
            *leaves,
            mesh=mesh,
            kernel=kernel,
            scale=case.head_dim**-0.5,
            merge=ops.resolve_ring_update(None, q.device),
            stats=stats,
            blocking_comm=case.blocking,
            cu_seqlens=case.cu_seqlens,
            kv_cache=mesh.config.kv_cache_policy(case.layer_number),
        )
        t1 = time.perf_counter()
        forward_bytes = dict(stats.sent)
        forward_by_link = {kind: dict(classes) for kind, classes in stats.by_link.items()}
        out.backward(torch.ones_like(out))
        t2, c2 = time.perf_counter(), time.thread_time()
        if it == 0:
            continue  # warm-up
        for key, value in (
            ("forward_s", t1 - t0),
            ("backward_s", t2 - t1),
            ("cpu_s", c2 - c0),
            ("kernel_cpu_s", kernel.cpu_s),
        ):
            totals[key] += value / case.repeats
        totals["ring_wait_s"] += stats.ring_wait_s / case.repeats
    by_link = {kind: dict(classes) for kind, classes in stats.by_link.items()}
    return {
        **totals,
        "bytes": dict(stats.sent),
        "bytes_by_link": by_link,
        "forward_bytes": forward_bytes,
        "forward_bytes_by_link": forward_by_link,
        "rank": mesh.rank,
    }


def summarize(case: BenchCase, ranks: list[dict], single_cpu_s: float | None = None) -> dict:
    """Aggregate per-rank results: slowest wall time, compute balance, CPU total, bytes."""
    compute = [r["kernel_cpu_s"] for r in ranks]
    row = {
        "config": case.label,
        **asdict(case),
        "wall_ms": 1e3 * max(r["forward_s"] + r["backward_s"] for r in ranks),
        "kernel_ms": 1e3 * max(compute),
        "compute_max_over_mean": max(compute) / (sum(compute) / len(compute)),
        "cpu_total_s": sum(r["cpu_s"] for r in ranks),
        "ring_wait_ms": 1e3 * max(r["ring_wait_s"] for r in ranks),
        "mib_per_rank": max(sum(r["bytes"].values()) for r in ranks) / 2**20,
        "mib_by_kind": {
            k: max(r["bytes"].get(k, 0) for r in ranks) / 2**20
            for k in sorted({k for r in ranks for k in r["bytes"]})
        },
    }
    if case.devices_per_node:
        row["bytes_by_link_per_rank"] = [r["bytes_by_link"] for r in ranks]
        row["bytes_per_rank"] = {
            cls: max(sum(c.get(cls, 0) for c in r["bytes_by_link"].values()) for r in ranks)
            for cls in ("intra_node", "inter_node")
        }
    if single_cpu_s:
        row["cpu_vs_single"] = row["cpu_total_s"] / single_cpu_s
    return row


def valid_configs(
    cp: int, heads: int, seq: int, kv_heads: int | None = None, tp: int = 1
) -> list[BenchCase]:
    """Every (algo, u) that validates for this problem, Ulysses and ring included."""
    out = []
    for u in (d for d in range(1, cp + 1) if cp % d == 0):
        algo = ULYSSES if u == cp else (RING if u == 1 else HYBRID)
        case = BenchCase(
            algo=algo,
            cp=cp,
            ulysses_degree=u if algo == HYBRID else None,
            seq=seq,
            heads=heads,
            kv_heads=kv_heads,
            tp=tp,
        )
        try:
            case.config().validate(
                heads,
                seq,
                tensor_model_parallel_size=tp,
                num_query_groups=kv_heads,
                world_size=tp * cp,
            )
        except ValueError:
            continue
        out.append(case)
    return out


def single_process_cpu(case: BenchCase) -> float:
    """Main-thread CPU seconds of one-process attention (forward + backward) of the same size."""
    one = replace(
        case,
        algo=ULYSSES,
        cp=1,
        ulysses_degree=None,
        tp=1,
        heads=case.heads // case.tp,
        kv_heads=case.kv_heads and case.kv_heads // case.tp,
        devices_per_node=None,
    )
    return bench_rank(one)["cpu_s"]


def format_table(rows: list[dict]) -> str:
    links = any("bytes_per_rank" in r for r in rows)
    head = (
        "| config | S | wall ms (slowest rank) | compute max/mean | CPU total s | CPU vs 1 process "
        "| MiB sent per rank (by kind) |" + (" MiB intra / inter node |" if links else "")
    )
    lines = [head, "|---" * (8 if links else 7) + "|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["mib_by_kind"].items()) or "-"
        ratio = f"{r['cpu_vs_single']:.2f}" if "cpu_vs_single" in r else "-"
        line = (
            f"| {r['config']} | {r['seq']} | {r['wall_ms']:.0f} | {r['compute_max_over_mean']:.3f} "
            f"| {r['cpu_total_s']:.2f} | {ratio} | {r['mib_per_rank']:.1f} ({kinds}) |"
        )
        if links:
            b = r.get("bytes_per_rank") or {"intra_node": 0, "inter_node": 0}
            line += f" {b['intra_node'] / 2**20:.1f} / {b['inter_node'] / 2**20:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str) -> None:
    """One bar per row: kernel time of the busiest rank, and the rest of the wall time
    (communication not hidden, copies, merges), stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['config'].split('_')[0]} {r['config'].split(' ', 1)[1]}\nS={r['seq']}" for r in rows
    ]
    kernel = [min(r["kernel_ms"], r["wall_ms"]) for r in rows]
    rest = [r["wall_ms"] - k for r, k in zip(rows, kernel, strict=True)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(labels, kernel, label="block kernels (busiest rank, CPU time)")
    ax.bar(labels, rest, bottom=kernel, label="everything else (exposed communication, copies)")
    ax.set_ylabel("ms, forward + backward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
