#!/usr/bin/env python3
"""usp_npu side by side with yunchang 0.6.4 and one-process attention, alternating in one run.

Each round runs, for every config, the usp_npu driver (``usp_driver.py``; pipelined by the chunk
rule, and with ``--ulysses-pipeline-chunks 1`` for configs with u > 1), the yunchang peer
(``yunchang_cpu_peer.py``, same CLI and JSON, in its own venv) and one process with as many
threads as the CP run has ranks x threads, at most one per core (the ideal). Every run is a fresh set of processes;
the table gives, per program, the median over rounds of each run's median step time, and the
ratio of the one-process time to usp_npu's (100% = as fast as the ideal).

    python benchmarks/bench_peers.py --peer-python /work/peer-venv/bin/python --rounds 3

Install the peer (outside this checkout): see the docstring of yunchang_cpu_peer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# beside the main checkout (../shared/peers), which a worktree elsewhere finds at /work/shared
PEER_CANDIDATES = [HERE.parent.parent / "shared" / "peers", Path("/work/shared/peers")]
DEFAULT_PEER = (
    next((p for p in PEER_CANDIDATES if p.is_dir()), PEER_CANDIDATES[0]) / "yunchang_cpu_peer.py"
)
CONFIGS = {"ring": (1, 2), "ulysses": (2, 1), "hybrid": (2, 2)}  # name: (u, r)


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--peer", default=str(DEFAULT_PEER), help="path of yunchang_cpu_peer.py")
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python",
                   help="python of the venv with yunchang 0.6.4 ('' to skip the peer)")  # fmt: skip
    p.add_argument("--json", default=None, help="write every run's JSON here")
    return p.parse_args(argv)


def _run(python: str, script: str, extra: list[str], port: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = dict(os.environ)
    if "usp_driver" in script:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)  # the peer's venv must not see this checkout
    cmd = [python, script, *extra, "--port", str(port), "--json", path]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(path) as f:
        res = json.load(f)
    os.unlink(path)
    return res


def _programs(args, name: str):
    u, r = CONFIGS[name]
    common = ["--seq", str(args.seq), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
              "--causal", "--iters", str(args.iters), "--warmup", "1"]  # fmt: skip
    cp = [
        "--nproc",
        str(u * r),
        "--ulysses",
        str(u),
        "--ring",
        str(r),
        "--threads",
        str(args.threads),
    ]
    driver = str(HERE / "usp_driver.py")
    progs = [("usp_npu", sys.executable, driver, common + cp)]
    if u > 1:
        progs.append(
            (
                "usp_npu unpipelined",
                sys.executable,
                driver,
                common + cp + ["--pipeline-chunks", "1"],
            )
        )
    if args.peer_python:
        progs.append(
            ("yunchang 0.6.4", args.peer_python, args.peer, common + cp + ["--ring-impl", "zigzag"])
        )
    # the ideal: one process using what the CP run uses, capped at the cores there are
    threads = min(u * r * args.threads, os.cpu_count() or 1)
    single = ["--nproc", "1", "--ulysses", "1", "--ring", "1", "--threads", str(threads)]
    progs.append((f"one process, {threads} threads", sys.executable, driver, common + single))
    return progs


def main() -> None:
    args = _args()
    runs: dict[tuple[str, str], list[dict]] = {}
    loads = [os.getloadavg()]
    port = 29600
    for rnd in range(args.rounds):
        for name in args.configs:
            progs = _programs(args, name)
            # odd rounds run the programs in reverse, so no program always runs first or last
            for label, python, script, extra in progs[::-1] if rnd % 2 else progs:
                port += 1
                res = _run(python, script, extra, port)
                runs.setdefault((name, label), []).append(res)
                print(f"round {rnd + 1} {name:8s} {label:24s} fwd {res['fwd_median_s']:.3f} s  "
                      f"fwd+bwd {res['fwdbwd_median_s']:.3f} s  load {os.getloadavg()[0]:.2f}",
                      file=sys.stderr, flush=True)  # fmt: skip
                loads.append(os.getloadavg())
    print(_table(args, runs, loads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}|{k[1]}": v for k, v in runs.items()}, f, indent=1)


def _table(args, runs, loads) -> str:
    med = {k: {m: statistics.median(r[f"{m}_median_s"] for r in v) for m in ("fwd", "fwdbwd")}
           for k, v in runs.items()}  # fmt: skip
    lines = [
        f"S={args.seq}, {args.heads} heads, D {args.head_dim}, fp32, causal, {args.threads} thread(s) "
        f"per rank, medians of {args.rounds} alternating rounds x {args.iters} steps; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average 1 min "
        f"{min(x[0] for x in loads):.2f}-{max(x[0] for x in loads):.2f} during the run",
        "",
        "| config | program | fwd s | fwd+bwd s | ideal/this fwd | ideal/this fwd+bwd | pipeline chunks |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.configs:
        u, r = CONFIGS[name]
        ideal = next(
            v for (n, label), v in med.items() if n == name and label.startswith("one process")
        )
        for (n, label), m in med.items():
            if n != name:
                continue
            chunks = runs[(n, label)][0].get("pipeline_chunks", "")
            lines.append(
                f"| {name} (u{u} r{r}) | {label} | {m['fwd']:.3f} | {m['fwdbwd']:.3f} | "
                f"{ideal['fwd'] / m['fwd']:.0%} | {ideal['fwdbwd'] / m['fwdbwd']:.0%} | {chunks} |"
            )
    return "\n".join(lines + _paired(args, runs))


def ratio_cells(ours: list[float], theirs: list[float]) -> tuple[str, str]:
    """Pair by pair ``ours / theirs``: ``"median [min, max]"`` and ``"won/pairs"`` (won: < 1)."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return (
        f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]",
        f"{sum(x < 1 for x in ratios)}/{len(ratios)}",
    )


def _paired(args, runs) -> list[str]:
    """usp_npu's time over yunchang's, round by round: the two ran minutes apart in the same
    round, so slow drifts of the shared machine cancel better than in a ratio of medians."""
    peer = "yunchang 0.6.4"
    if not any(label == peer for _, label in runs):
        return []
    lines = [
        "",
        "usp_npu time / yunchang time, per round (< 1: usp_npu faster): median [min, max]",
        "",
        "| config | fwd | fwd+bwd | rounds usp_npu faster (fwd, fwd+bwd) |",
        "|---|---|---|---|",
    ]
    for name in args.configs:
        ours, theirs = runs[(name, "usp_npu")], runs[(name, peer)]
        fwd, fwdbwd = (
            ratio_cells([a[f"{m}_median_s"] for a in ours], [b[f"{m}_median_s"] for b in theirs])
            for m in ("fwd", "fwdbwd")
        )
        u, r = CONFIGS[name]
        lines.append(f"| {name} (u{u} r{r}) | {fwd[0]} | {fwdbwd[0]} | {fwd[1]}, {fwdbwd[1]} |")
    return lines


if __name__ == "__main__":
    main()
