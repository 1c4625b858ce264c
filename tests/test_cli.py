"""``usp-npu demo`` and ``usp-npu bench``: the main job and the benchmark entry point.

The demo must agree with single-device attention on spawned ranks and under torchrun, must
say MISMATCH (exit 1) when a shard is wrong, and must reject bad flags before starting any rank.
The bench is checked for what it counts exactly, the bytes each rank sends, against the cost
model; its timings are not asserted.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from usp_npu import cli
from usp_npu.bench import BenchCase
from usp_npu.plan import PRESETS, ModelShape, evaluate
from usp_npu.testing.cases import AttentionCase, run_shards
from usp_npu.testing.launcher import run_torchrun

SHAPE = ModelShape(heads=4, head_dim=8, seq=64, dtype="float32")
NODES_2X2 = replace(PRESETS["generic-8gpu"], nodes=2, devices_per_node=2)


def bench_fields(row: dict) -> dict:
    return {k: row[k] for k in ("algo", "cp", "ulysses_degree")}


ERRORS = re.compile(r"out (\S+), dq (\S+), dk (\S+), dv (\S+)\s+\(tolerance (\S+)\)")
SMALL = ["--seq-length", "64", "--num-attention-heads", "4", "--head-dim", "16"]


def demo_errors(stdout: str) -> tuple[list[float], float]:
    """The four reported max errors and the tolerance from the demo's output."""
    found = ERRORS.search(stdout)
    assert found, stdout
    *errors, tol = (float(x) for x in found.groups())
    return errors, tol


def test_demo_hybrid_general_mask_matches(capsys):
    """4 spawned ranks, hybrid 2 x 2, a random general mask, SBH, float64."""
    argv = ["demo", "--world-size", "4", *SMALL, "--dtype", "float64", "--layout", "SBH"]
    argv += ["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2"]
    argv += ["--attention-mask-type", "general", "--general-mask", "random"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "hybrid_cp_algo (ulysses x ring = 2 x 2), general" in out
    assert "MATCHES single-device attention" in out
    errors, tol = demo_errors(out)
    assert tol == 1e-9 and max(errors) <= tol


def test_demo_under_torchrun():
    """One rank per torchrun process; rank 0 alone reports."""
    proc = run_torchrun(2, "-m", "usp_npu.cli", "demo", *SMALL)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("usp-npu demo: 2 ranks (torchrun, gloo), ulysses_cp_algo") == 1
    errors, tol = demo_errors(proc.stdout)
    assert tol == 2e-5 and max(errors) <= tol
    assert "MATCHES single-device attention" in proc.stdout


def test_demo_reports_a_wrong_shard(pools, capsys):
    """A perturbed dq on one rank: the demo prints MISMATCH with that error and exits 1."""
    case = AttentionCase(cp=2, seq=64, heads=4, head_dim=16, dtype="float64")
    results = pools(2).run(run_shards, case)
    assert cli._report(case, results, "pool") == 0
    results[1]["got"][1] = results[1]["got"][1] + 1e-3
    assert cli._report(case, results, "pool") == 1
    out = capsys.readouterr().out.split("usp-npu demo:")[-1]
    assert "MISMATCH" in out
    (out_err, dq_err, dk_err, dv_err), _ = demo_errors(out)
    assert 1e-4 < dq_err <= 1e-3 * (1 + 1e-6)  # 1e-3 / max(1, |dq_ref|)
    assert max(out_err, dk_err, dv_err) <= 1e-9


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "3"], "--ulysses-degree-in-cp"),
        (["--seq-length", "90"], "--seq-length"),
        (["--num-attention-heads", "6"], "--num-attention-heads"),
    ],
)  # fmt: skip
def test_demo_rejects_bad_flags_before_starting_ranks(flags, named, capsys, monkeypatch):
    def no_ranks(*args, **kwargs):
        raise AssertionError("ranks were started for an invalid configuration")

    monkeypatch.setattr("usp_npu.testing.launcher.ProcessGroupPool.start", no_ranks)
    assert cli.main(["demo", "--world-size", "4", "--seq-length", "64", *flags]) == 2
    assert named in capsys.readouterr().err


def test_demo_rejects_a_cp_size_other_than_the_ranks():
    with pytest.raises(SystemExit, match="--context-parallel-size must equal the 4 ranks"):
        cli.main(["demo", "--world-size", "4", *SMALL, "--context-parallel-size", "2"])


def test_bench_counts_bytes_as_the_cost_model_says(tmp_path, capsys):
    """World 4: ring (u=1), hybrid (u=2) and Ulysses (u=4). With one shard = a local
    [S/cp, heads, D] tensor, each rank sends 8(u-1)/u shards in all-to-alls, 4(r-1) of K/V and
    2(r-1) of dK/dV per forward + backward."""
    path = tmp_path / "bench.json"
    argv = ["bench", "--world-size", "4", "--seq-length", "64", "--num-attention-heads", "4"]
    argv += ["--head-dim", "8", "--repeats", "1", "--json", str(path)]
    argv += ["--devices-per-node", "2", "--plot", str(tmp_path / "bench.png")]
    argv += ["--ulysses-all-to-all", "p2p"]  # counts the same bytes as the collective
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert [row["config"] for row in rows] == [
        "megatron_cp_algo u=1 r=4",
        "hybrid_cp_algo u=2 r=2",
        "ulysses_cp_algo u=4 r=1",
    ]
    shard_mib = (64 // 4) * 4 * 8 * 4 / 2**20  # tokens x heads x head_dim x fp32 bytes
    for row, (u, r) in zip(rows, [(1, 4), (2, 2), (4, 1)], strict=True):
        want = {"all_to_all": 8 * (u - 1) / u, "ring_kv": 4 * (r - 1), "ring_dkv": 2 * (r - 1)}
        want = {kind: shards * shard_mib for kind, shards in want.items() if shards}
        assert row["mib_by_kind"] == pytest.approx(want), row["config"]
        assert row["mib_per_rank"] == pytest.approx(sum(want.values()))
        assert row["compute_max_over_mean"] >= 1.0 and row["cpu_vs_single"] > 0
        assert row["all_to_all"] == "p2p"
        # per link class (ranks {0, 1} and {2, 3} share a node): what usp-npu plan predicts
        entry = evaluate(SHAPE, BenchCase(**bench_fields(row)).config(), NODES_2X2)
        assert row["bytes_per_rank"] == entry["bytes_per_rank"], row["config"]
    table = capsys.readouterr().out.split("causal:\n")[-1]
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(rows)
