"""benchmarks/bench_peers.py's paired comparison with the peer (no processes are started)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_peers.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(fwd: float, fwdbwd: float) -> dict:
    return {"fwd_median_s": fwd, "fwdbwd_median_s": fwdbwd}


def test_paired_ratios_are_taken_round_by_round():
    bench = _module()
    args = argparse.Namespace(configs=["ring"])
    # round 2 is slow for both programs: per-round ratios see through it, medians of each do not
    runs = {
        ("ring", "usp_npu"): [_run(1.0, 2.0), _run(2.0, 4.4), _run(1.0, 2.0)],
        ("ring", "yunchang 0.6.4"): [_run(1.1, 2.0), _run(2.1, 4.0), _run(0.9, 2.5)],
    }
    row = bench._paired(args, runs)[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "ring (u1 r2)"
    # fwd ratios 0.909, 0.952, 1.111; fwd+bwd 1.0, 1.1, 0.8
    assert cells[1] == "0.952 [0.909, 1.111]"
    assert cells[2] == "1.000 [0.800, 1.100]"
    assert cells[3] == "2/3, 1/3"


def test_no_peer_no_paired_table():
    bench = _module()
    runs = {("ring", "usp_npu"): [_run(1.0, 2.0)]}
    assert bench._paired(argparse.Namespace(configs=["ring"]), runs) == []


def _interleaved():
    path = SCRIPT.parent / "bench_interleaved.py"
    spec = importlib.util.spec_from_file_location("bench_interleaved", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_table_pairs_each_step_with_its_neighbour():
    bench = _interleaved()
    args = argparse.Namespace(seq=64, heads=2, head_dim=8, threads=1, pairs=3)
    ideal = "one process, 2 threads"
    # step 2 is slow for both libraries: the pair's ratio sees through it
    times = {
        ("usp_npu", "fwd"): [1.0, 3.0, 1.0],
        ("yunchang 0.6.4", "fwd"): [1.25, 2.5, 1.0],
        (ideal, "fwd"): [0.9, 0.9, 0.9],
        ("usp_npu", "fwdbwd"): [2.0, 2.0, 2.0],
        ("yunchang 0.6.4", "fwdbwd"): [2.5, 2.5, 2.5],
        (ideal, "fwdbwd"): [1.8, 1.8, 1.8],
    }
    lines = bench.table(args, {"ulysses": times}).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if "ulysses" in line]
    assert rows[0] == ["ulysses (u2 r1)", "usp_npu", "1.000", "2.000", "90%", "90%"]
    assert rows[1] == ["ulysses (u2 r1)", "yunchang 0.6.4", "1.250", "2.500", "72%", "72%"]
    assert rows[2] == ["ulysses (u2 r1)", ideal, "0.900", "1.800", "100%", "100%"]
    # fwd ratios 0.8, 1.2, 1.0 (not faster in a tie); fwd+bwd 0.8 each step
    assert rows[3] == [
        "ulysses (u2 r1)",
        "1.000 [0.800, 1.200]",
        "0.800 [0.800, 0.800]",
        "1/3, 3/3",
    ]
