"""The simulated multi-node run (benchmarks/multinode/run.sh): 2 nodes x 1 rank, a tiny problem.

Needs root, ``ip`` and ``tc`` (network namespaces); skipped with the reason otherwise. Checks the
run's result (every valid configuration, bytes per link class as the plan predicts) and that no
namespace or link of the run is left behind, also when a crashed run left some before it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "multinode" / "run.sh"
PREFIX = "uspmn"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
    reason="network namespaces need root with ip and tc (iproute2)",
)


def leftovers() -> list[str]:
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in spaces.splitlines() if line.strip()]
    names += [line.split(": ")[1].split("@")[0] for line in links.splitlines() if ": " in line]
    return [n for n in names if n.startswith(PREFIX)]


def test_two_nodes_one_rank_each(tmp_path):
    # what a crashed earlier run would leave: the script must clear it first
    subprocess.run(["ip", "netns", "add", f"{PREFIX}-n0"], check=True)
    subprocess.run(["ip", "link", "add", f"{PREFIX}br", "type", "bridge"], check=True)
    env = {**os.environ, "PYTHON": sys.executable}
    argv = [str(SCRIPT), "--nodes", "2", "--ranks-per-node", "1", "--rates", "200mbit"]
    argv += ["--placements", "megatron", "--seq-length", "64", "--num-attention-heads", "2"]
    argv += ["--head-dim", "8", "--probe-bytes", "65536", "--timeout", "120"]
    argv += ["--out", str(tmp_path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    finally:
        left = leftovers()
        if left:  # never leave them on the machine, even when the assertion below fails
            subprocess.run([str(SCRIPT), "--cleanup-only"], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert left == []
    run = json.loads((tmp_path / "n2x1_200mbit_megatron.json").read_text())
    assert run["nodes_of_rank"] == [0, 1]
    assert [c["algo"] for c in run["configs"]] == ["megatron_cp_algo", "ulysses_cp_algo"]
    cal = run["calibration"]
    assert cal["inter_node_bandwidth"] > 0
    assert all(c["calibration"]["device_flops"] > 0 for c in run["configs"])
    assert "intra_node_bandwidth" not in cal  # one rank per node: no intra-node link
    for row in json.loads((tmp_path / "summary.json").read_text()):
        assert row["counted_bytes"] == row["predicted_bytes"]
        assert row["counted_bytes"]["intra_node"] == 0 < row["counted_bytes"]["inter_node"]
    assert "| 2x1 200mbit megatron | megatron_cp_algo u=1 r=2 |" in proc.stdout
