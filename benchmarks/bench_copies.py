#!/usr/bin/env python3
"""Bytes one attention layer copies and holds for the backward, per rank, for every algorithm.

Counts every copy/cat/stack/clone/contiguous/zeros/fill/to the data path runs
(``usp_npu.testing.copy_counter``) in the forward and in the backward, and the bytes autograd
saves (``usp_npu.testing.saved_tensors``), next to the bytes of this rank's q + k + v + out.
The rank that copies most is shown (ranks differ only in the ring's causal half blocks). No
timing: the counts are exact on any load.

    python benchmarks/bench_copies.py --seq 8192 --heads 8 --head-dim 64
    python benchmarks/bench_copies.py --seq 64 --verbose      # every counted op, in order
"""

from __future__ import annotations

import argparse

from usp_npu.config import HYBRID, RING, ULYSSES
from usp_npu.testing import ProcessGroupPool
from usp_npu.testing.cases import AttentionCase
from usp_npu.testing.data_path import measure_data_path

MIB = 1 << 20


def _cases(args) -> list[tuple[str, AttentionCase]]:
    base = dict(seq=args.seq, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype)
    return [
        ("ring u1 r2", AttentionCase(cp=2, algo=RING, **base)),
        ("Ulysses u2 r1", AttentionCase(cp=2, algo=ULYSSES, **base)),
        ("hybrid u2 r2", AttentionCase(cp=4, algo=HYBRID, ulysses_degree=2, **base)),
    ]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--verbose", action="store_true", help="list every counted op")
    args = p.parse_args()
    print(f"S={args.seq}, {args.heads} heads, D {args.head_dim}, {args.dtype}, causal, BSND, batch 1; "
          "MiB per rank and layer (the rank that copies most)\n")  # fmt: skip
    print("| config | q+k+v+out | copied fwd | copied bwd | by op (fwd; bwd) | saved for bwd |")
    print("|---|---|---|---|---|---|")
    for name, case in _cases(args):
        with ProcessGroupPool(case.cp) as pool:
            ranks = pool.run(measure_data_path, case)
        r = max(ranks, key=lambda x: sum(x["forward"].values()) + sum(x["backward"].values()))
        io = r["q"] + r["k"] + r["v"] + r["out"]

        def ops(d):
            return ", ".join(f"{k} {v / MIB:.2f}" for k, v in d.items()) or "-"

        fwd, bwd = sum(r["forward"].values()), sum(r["backward"].values())
        print(f"| {name} | {io / MIB:.2f} | {fwd / MIB:.2f} | {bwd / MIB:.2f} | "
              f"{ops(r['forward'])}; {ops(r['backward'])} | {r['saved'] / MIB:.2f} |")  # fmt: skip
        if args.verbose:
            for event in r["events"]:
                print("    ", event)
            print("     saved:", r["saved_tensors"])


if __name__ == "__main__":
    main()
