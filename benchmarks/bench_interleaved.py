#!/usr/bin/env python3
"""usp_npu and yunchang 0.6.4 step after step in the same rank processes, with the ideal beside.

``bench_peers.py`` starts each program as its own set of processes, seconds to minutes apart; on
this shared machine one program's speed drifts between such runs by more than the two libraries
differ. Here every rank builds both libraries' attention (yunchang imported from the peer venv's
site-packages, with the CPU kernel shim of ``yunchang_cpu_peer.py``: yunchang's zigzag ring, or
its Ulysses with torch SDPA when the ring has one rank, as the peer script runs it) and rank 0
also the one-process ideal (torch SDPA on the whole sequence with as many threads as the run has
ranks x threads, at most one per core, while the other ranks wait in a barrier). The programs
then take turns, one step each: usp_npu, yunchang, ideal, then yunchang, usp_npu, ideal, and so
on, so each library follows the other as often as it follows the ideal; each usp_npu step is
compared with the yunchang step next to it (a pair), which cancels drifts slower than a few
seconds.

    python benchmarks/bench_interleaved.py --pairs 15

Same problem as ``bench_peers.py``: global ``[1, S, H, D]`` float32 tensors (seeded, equal on
every rank), causal; each library splits them its own way (both load-balance the ring).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_peers import CONFIGS, DEFAULT_PEER, ratio_cells  # noqa: E402
from usp_driver import build_single, build_usp  # noqa: E402

PEER_NAME = "yunchang 0.6.4"


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--pairs", type=int, default=15, help="steps of each program per pass")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--peer", default=str(DEFAULT_PEER), help="path of yunchang_cpu_peer.py")
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python",
                   help="python of the venv with yunchang 0.6.4 (its site-packages is used)")  # fmt: skip
    p.add_argument("--peer-site", default=None,
                   help="site-packages holding yunchang 0.6.4, instead of --peer-python's")  # fmt: skip
    p.add_argument("--port", type=int, default=29810)
    p.add_argument("--pipeline-chunks", type=int, default=None,
                   help="usp_npu's --ulysses-pipeline-chunks (default: its rule)")  # fmt: skip
    args = p.parse_args(argv)
    # what build_usp reads (usp_driver's options), fixed to this benchmark's problem
    args.batch, args.kv_heads, args.dtype, args.causal, args.seed = 1, None, "fp32", True, 0
    if args.peer_site is None:
        ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        args.peer_site = subprocess.check_output([args.peer_python, "-c", ask], text=True).strip()
    return args


def _yunchang(args, rank: int, world: int, inputs):
    """yunchang's attention for this rank, set up as ``yunchang_cpu_peer.py`` does:
    ``(attend, leaves, dout_local)``."""
    sys.path.append(args.peer_site)
    sys.path.insert(0, str(Path(args.peer).parent))
    import torch.nn.functional as F
    import yunchang_cpu_peer as peer
    from yunchang import EXTRACT_FUNC_DICT, LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    peer.install_cpu_shim()
    peer.patch_yunchang_ring_bugs()
    u, r = args.ulysses, args.ring
    set_seq_parallel_pg(u, r, rank, world, use_ulysses_low=True)
    if r > 1:
        attn = LongContextAttention(ring_impl_type="zigzag", attn_type=AttnType.FA)
    else:  # the peer script's choice for a one-rank ring: its Ulysses around torch SDPA
        from yunchang import UlyssesAttention
        from yunchang.globals import PROCESS_GROUP

        attn = UlyssesAttention(PROCESS_GROUP.ULYSSES_PG, attn_type=AttnType.TORCH_MATH)

        def sdpa_bshd(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
            heads_first = [x.transpose(1, 2) for x in (q, k, v)]
            out = F.scaled_dot_product_attention(
                *heads_first, is_causal=causal, scale=softmax_scale
            )
            return out.transpose(1, 2)

        attn.attn_fn = sdpa_bshd
    split = EXTRACT_FUNC_DICT["zigzag"]
    q, k, v, dout = (split(x, rank, world_size=world, rd=r, ud=u).detach().clone() for x in inputs)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def attend():
        return attn(*leaves, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)  # fmt: skip

    return attend, leaves, dout


def _step(program, backward: bool, threads: int, torch) -> None:
    """One forward (no autograd) or forward + backward, forward and backward on ``threads``."""
    attend, leaves, dout = program
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not backward:
            with torch.no_grad():
                attend()
            return
        for x in leaves:
            x.grad = None
        attend().backward(dout)
    finally:
        torch.set_num_threads(before)


def worker(rank: int, world: int, args, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    usp_attend, usp_leaves, usp_dout, _, inputs = build_usp(args, world, torch)
    programs = {"usp_npu": (usp_attend, usp_leaves, usp_dout)}
    programs[PEER_NAME] = _yunchang(args, rank, world, inputs)
    ideal_threads = min(world * args.threads, os.cpu_count() or 1)
    ideal = f"one process, {ideal_threads} threads"
    if rank == 0:
        programs[ideal] = build_single(args, inputs)  # rank 0 alone, ideal_threads
    threads = {"usp_npu": args.threads, PEER_NAME: args.threads, ideal: ideal_threads}
    names = ["usp_npu", PEER_NAME, ideal]
    times = {(n, p): [] for n in names for p in ("fwd", "fwdbwd")}
    for passname, backward in (("fwd", False), ("fwdbwd", True)):
        for i in range(args.pairs + 1):  # the first turn warms up
            for name in names if i % 2 == 0 else [names[1], names[0], names[2]]:
                dist.barrier()
                start = time.perf_counter()
                if name in programs:
                    _step(programs[name], backward, threads[name], torch)
                dist.barrier()
                if i > 0:
                    times[(name, passname)].append(time.perf_counter() - start)
    keys = sorted(times)
    slowest = torch.tensor([times[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put({k: row for k, row in zip(keys, slowest.tolist(), strict=True)})
    dist.barrier()
    dist.destroy_process_group()


def _run_config(args, name: str) -> dict:
    import torch.multiprocessing as mp

    args.ulysses, args.ring = CONFIGS[name]
    world = args.ulysses * args.ring
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=worker, args=(r, world, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = results.get()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"{name}: a rank exited with {p.exitcode}")
    args.port += 1
    return out


def table(args, by_config: dict[str, dict]) -> str:
    """Medians per program and the paired usp_npu / yunchang ratios, as markdown."""
    lines = [
        f"S={args.seq}, {args.heads} heads, D {args.head_dim}, fp32, causal, {args.threads} "
        f"thread(s) per rank, {args.pairs} interleaved steps per program and pass; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| config | program | fwd s | fwd+bwd s | ideal/this fwd | ideal/this fwd+bwd |",
        "|---|---|---|---|---|---|",
    ]
    pairs = [
        "",
        "| config | usp_npu / yunchang fwd: median [min, max] | fwd+bwd | steps usp_npu faster "
        "(fwd, fwd+bwd) |",
        "|---|---|---|---|",
    ]
    for name, times in by_config.items():
        u, r = CONFIGS[name]
        label = f"{name} (u{u} r{r})"
        med = {k: statistics.median(v) for k, v in times.items()}
        ideal = next(n for n, _ in times if n.startswith("one process"))
        programs = ["usp_npu", PEER_NAME, ideal]
        for prog in programs:
            f, fb = med[(prog, "fwd")], med[(prog, "fwdbwd")]
            lines.append(
                f"| {label} | {prog} | {f:.3f} | {fb:.3f} | {med[(ideal, 'fwd')] / f:.0%} | "
                f"{med[(ideal, 'fwdbwd')] / fb:.0%} |"
            )
        fwd, fwdbwd = (
            ratio_cells(times[("usp_npu", p)], times[(PEER_NAME, p)]) for p in ("fwd", "fwdbwd")
        )
        pairs.append(f"| {label} | {fwd[0]} | {fwdbwd[0]} | {fwd[1]}, {fwdbwd[1]} |")
    return "\n".join(lines + pairs)


def main() -> None:
    args = _args()
    loads = [os.getloadavg()[0]]
    by_config = {}
    for name in args.configs:
        by_config[name] = _run_config(args, name)
        loads.append(os.getloadavg()[0])
        print(f"{name}: done, load {loads[-1]:.2f}", file=sys.stderr, flush=True)
    print(table(args, by_config))
    print(f"\nload average (1 min) during the run: {min(loads):.2f}-{max(loads):.2f}")


if __name__ == "__main__":
    main()
