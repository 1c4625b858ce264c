"""Packed sequences (cu_seqlens): time, compute balance, bytes and work vs the unpacked causal run.

    python benchmarks/bench_packed.py [--quick] [--worlds 4 8] [--seq 32768] [--docs 1 4 16]
    python benchmarks/bench_packed.py --kernel-only     # per-document calls vs block-diagonal mask

1. For every world size and every valid (u, r), the same S tokens packed as 1, 4 and 16 equal
   documents, causal, on real gloo ranks (one thread each), forward + backward: wall time of the
   slowest rank, per-rank block-kernel CPU time max/mean (compute balance), MiB sent per rank
   (the same for every packing: packing changes what is computed, not what travels), and the
   block-kernel CPU time summed over ranks relative to the unpacked causal run of the same
   config, next to the exact ratio of (q, k) pairs (sum over documents of n(n+1)/2 over S(S+1)/2).
2. ``--kernel``: one causal block of ``--block`` tokens holding 1..64 documents, timed as one
   varlen call of the torch kernel (one flash call per document) and as one flash call with a
   block-diagonal additive mask. Why the CPU kernel uses per-document calls.

Nothing here is a test; numbers from a loaded machine are noise (the script prints the load).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import dataclass

import torch

from usp_npu import bench as usp_npu_bench
from usp_npu.bench import BenchCase
from usp_npu.config import HYBRID, RING, ULYSSES, ContextParallelConfig
from usp_npu.kernels import CAUSAL, BlockMask, TorchBlockKernel
from usp_npu.testing.launcher import ProcessGroupPool


@dataclass(frozen=True)
class PackedCase:
    cp: int
    u: int
    seq: int
    docs: int | None  # None = unpacked
    heads: int = 8
    head_dim: int = 64
    repeats: int = 1

    @property
    def algo(self) -> str:
        return ULYSSES if self.u == self.cp else RING if self.u == 1 else HYBRID

    def config(self) -> ContextParallelConfig:
        return ContextParallelConfig(self.cp, self.algo, self.u if self.algo == HYBRID else None)

    def cu_seqlens(self) -> tuple[int, ...] | None:
        if self.docs is None:
            return None
        return tuple(range(0, self.seq + 1, self.seq // self.docs))


def bench_rank(case: PackedCase) -> dict:
    """One warm-up, then ``repeats`` forward + backward on this rank (``usp_npu.bench``'s loop)."""
    res = usp_npu_bench.bench_rank(
        BenchCase(
            algo=case.algo,
            cp=case.cp,
            ulysses_degree=case.u if case.algo == HYBRID else None,
            seq=case.seq,
            heads=case.heads,
            head_dim=case.head_dim,
            repeats=case.repeats,
            cu_seqlens=case.cu_seqlens(),
        )
    )
    return {
        "wall_s": res["forward_s"] + res["backward_s"],
        "kernel_s": res["kernel_cpu_s"],
        "bytes": sum(res["bytes"].values()),
    }


def _pairs(cu: tuple[int, ...]) -> int:
    return sum((b - a) * (b - a + 1) // 2 for a, b in itertools.pairwise(cu))


def _configs(world: int, heads: int) -> list[int]:
    return [u for u in range(1, world + 1) if world % u == 0 and heads % u == 0]


def packed_table(worlds, seq, docs, heads, head_dim, repeats) -> None:
    print(
        f"### {seq} tokens, causal, fp32, heads {heads}, head_dim {head_dim}, "
        f"1 thread per rank, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| ranks | config | documents | wall ms | compute max/mean | MiB sent per rank "
        "| kernel CPU vs unpacked | (q, k) pairs vs unpacked |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for world in worlds:
        with ProcessGroupPool(world, timeout_s=7200) as pool:
            for u in _configs(world, heads):
                base = None
                for n in (None, *docs):
                    case = PackedCase(world, u, seq, n, heads, head_dim, repeats)
                    ranks = pool.run(bench_rank, case)
                    kern = [r["kernel_s"] for r in ranks]
                    if n is None:
                        base = sum(kern)
                    cu = case.cu_seqlens() or (0, seq)
                    label = f"{case.algo} u={u} r={world // u}"
                    print(
                        f"| {world} | {label} | {n or 'unpacked'} "
                        f"| {1e3 * max(r['wall_s'] for r in ranks):.0f} "
                        f"| {max(kern) / (sum(kern) / len(kern)):.3f} "
                        f"| {max(r['bytes'] for r in ranks) / 2**20:.1f} "
                        f"| {sum(kern) / base:.3f} | {_pairs(cu) / _pairs((0, seq)):.3f} |",
                        flush=True,
                    )


def _time(fn, rounds: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_table(block: int, heads: int, head_dim: int) -> None:
    """Per-document varlen calls vs one call with a block-diagonal mask, forward + backward."""
    print(
        f"\n### One causal block of {block} tokens, heads {heads}, head_dim {head_dim}, fp32, "
        f"forward + backward, load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| documents | per-document calls ms | block-diagonal mask ms | mask / per-document |")
    print("|---|---|---|---|")
    kernel = TorchBlockKernel()
    q, k, v = (torch.randn(block, 1, heads, head_dim) for _ in range(3))
    scale = head_dim**-0.5
    for n in (1, 4, 16, 64):
        cu = tuple(range(0, block + 1, block // n))

        def varlen(cu=cu):
            o, m, s, _ = kernel.forward(
                q, k, v, scale=scale, mask=CAUSAL, cu_seqlens_q=cu, cu_seqlens_kv=cu
            )
            kernel.backward(
                o, q, k, v, o, m, s, scale=scale, mask=CAUSAL, cu_seqlens_q=cu, cu_seqlens_kv=cu
            )

        doc = torch.arange(block) // (block // n)
        hidden = (doc[:, None] != doc[None, :]) | torch.ones(block, block, dtype=torch.bool).triu(1)
        blockdiag = BlockMask(mask=hidden)

        def masked(blockdiag=blockdiag):
            o, m, s, _ = kernel.forward(q, k, v, scale=scale, mask=blockdiag)
            kernel.backward(o, q, k, v, o, m, s, scale=scale, mask=blockdiag)

        a, b = _time(varlen), _time(masked)
        print(f"| {n} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="world 4, 8192 tokens")
    parser.add_argument("--worlds", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--docs", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--block", type=int, default=4096, help="tokens of the --kernel block")
    parser.add_argument("--kernel", action="store_true", help="also the kernel comparison")
    parser.add_argument("--kernel-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    worlds, seq = ([4], 8192) if args.quick else (args.worlds, args.seq)
    if not args.kernel_only:
        packed_table(worlds, seq, args.docs, args.heads, args.head_dim, args.repeats)
    if args.kernel or args.kernel_only:
        kernel_table(args.block, args.heads, args.head_dim)


if __name__ == "__main__":
    main()
