"""MindSpeed's other CP options at world 8: bytes per rank per group, memory held for the
backward, time per step.

    python benchmarks/bench_options.py [--seq 4096] [--repeats 2] [--heads 8] [--head-dim 64]

For every option beside the plain algorithm it replaces, each rank runs forward + backward of
context-parallel attention (float32, the torch block kernel, causal) and reports:

- bytes it sent per group and direction (CommStats kinds), checked against the model in
  ``usp_npu.comm.volume`` (a mismatch is printed as an error);
- bytes saved for the backward (``saved_tensors_hooks``, once per storage);
- wall time of one step (the slowest rank, median over repeats) and the CPU time of one step
  (each rank's main thread, mean over ranks: compute and copies, not waiting), which a busy
  machine disturbs far less than wall time.

Eight CPU ranks time-share the cores of this machine: the times compare options within one run,
they are not cluster throughput.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch

from usp_npu import context_parallel_attention
from usp_npu.comm.stats import CommStats
from usp_npu.comm.volume import expected_bytes
from usp_npu.config import ContextParallelConfig
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.testing.launcher import ProcessGroupPool
from usp_npu.testing.memory import saved_tensor_bytes

# which process group carries each kind of traffic
GROUP = {
    "all_to_all": "ulysses",
    "ring_kv": "ring",
    "ring_dkv": "ring",
    "ring_inner_kv": "inner",
    "ring_inner_dkv": "inner",
    "ring_outer_kv": "outer",
    "ring_outer_dkv": "outer",
    "all_gather": "cp/ulysses",
    "reduce_scatter": "cp/ulysses",
}


@dataclass(frozen=True)
class Option:
    label: str
    cfg: ContextParallelConfig
    kv_heads: int = 2


def options(world: int = 8) -> list[Option]:
    ring = ContextParallelConfig(world, "megatron_cp_algo")
    hybrid = ContextParallelConfig(world, "hybrid_cp_algo", 2)
    uly = ContextParallelConfig(world, "ulysses_cp_algo")
    return [
        Option("ring r8", ring),
        Option("ring r8, --cp-window-size 2", replace(ring, cp_window_size=2)),
        Option("ring r8, --cp-window-size 4", replace(ring, cp_window_size=4)),
        Option("ring r8, kv cache full", replace(ring, context_parallel_kv_cache_policy="full")),
        Option("ring r8, kv cache half", replace(ring, context_parallel_kv_cache_policy="half")),
        Option("kvallgather cp8", replace(ring, context_parallel_algo="kvallgather_cp_algo")),
        Option("hybrid u2 r4", hybrid),
        Option("hybrid u2 r4, --cp-window-size 2", replace(hybrid, cp_window_size=2)),
        Option("ulysses u8", uly),
        Option("ulysses u8, kv cache full", replace(uly, context_parallel_kv_cache_policy="full")),
        Option("ulysses u8, kv cache half", replace(uly, context_parallel_kv_cache_policy="half")),
        Option(
            "ulysses u8, --use-ulysses-allgather-kv", replace(uly, use_ulysses_allgather_kv=True)
        ),
        Option("ulysses u8, 1 KV head", uly, kv_heads=1),
        Option(
            "ulysses u8, 1 KV head, --use-ulysses-allgather-kv",
            replace(uly, use_ulysses_allgather_kv=True),
            kv_heads=1,
        ),
    ]


def run_rank(option: Option, seq: int, heads: int, head_dim: int, repeats: int) -> dict:
    mesh = initialize_context_parallel(option.cfg)
    g = torch.Generator().manual_seed(mesh.rank)
    local = seq // option.cfg.context_parallel_size
    shapes = [(1, local, heads, head_dim)] + [(1, local, option.kv_heads, head_dim)] * 2
    q, k, v = (torch.randn(s, generator=g).requires_grad_() for s in shapes)
    stats, times, cpu, held, fwd, bwd = CommStats(), [], [], 0, {}, {}
    for i in range(repeats + 1):  # the first run warms up
        stats.reset()
        t0, c0 = time.perf_counter(), time.thread_time()
        out, held = saved_tensor_bytes(
            lambda: context_parallel_attention(q, k, v, "BSND", mesh=mesh, comm_stats=stats)
        )
        fwd = dict(stats.sent)
        out.backward(torch.ones_like(out))
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        bwd = {kind: n - fwd.get(kind, 0) for kind, n in stats.sent.items()}
    return {
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu),
        "held": held,
        "fwd": fwd,
        "bwd": bwd,
    }


def _by_group(sent: dict[str, int]) -> str:
    parts = {}
    for kind, n in sent.items():
        if n:
            parts[GROUP[kind]] = parts.get(GROUP[kind], 0) + n
    return ", ".join(f"{g} {n / 2**20:.2f}" for g, n in sorted(parts.items())) or "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with ProcessGroupPool(8, timeout_s=600) as pool:
        for option in options():
            ranks = pool.run(run_rank, option, args.seq, args.heads, args.head_dim, args.repeats)
            want = expected_bytes(
                option.cfg, args.seq, 1, args.heads, option.kv_heads, args.head_dim, 4
            )
            got = tuple(
                {k: n for k, n in r.items() if n} for r in (ranks[0]["fwd"], ranks[0]["bwd"])
            )
            if got != want:
                print(f"ERROR {option.label}: measured {got} != model {want}")
            rows.append(
                (
                    option.label,
                    _by_group(ranks[0]["fwd"]),
                    _by_group(ranks[0]["bwd"]),
                    "yes" if got == want else "NO",
                    max(r["held"] for r in ranks) / 2**20,
                    max(r["time_s"] for r in ranks) * 1e3,
                    statistics.mean(r["cpu_s"] for r in ranks) * 1e3,
                )
            )
    print(
        f"world 8, S={args.seq}, {args.heads} query heads, head_dim {args.head_dim}, float32, "
        "causal; MiB per rank\n"
    )
    print(
        "| option | forward MiB by group | backward MiB by group | = model | held MiB "
        "| wall ms/step | CPU ms/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, f, b, ok, held, ms, cpu in rows:
        print(f"| {label} | {f} | {b} | {ok} | {held:.2f} | {ms:.0f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
