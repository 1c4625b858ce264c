"""The device check script (tests/npu/check_on_device.py) under torchrun, in --emulate mode.

It is the script a user runs on a real Ascend node; here it runs on CPU ranks (gloo) with the
emulated torch_npu, so that it is known to work, and known to fail when a result is wrong.
Small shapes; the time goes into starting torchrun and its ranks (importing torch).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from usp_npu.testing.launcher import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "npu" / "check_on_device.py"
SUMMARY = re.compile(r"^usp_npu device check: (FAILED: )?(\d+)/(\d+) configs passed on (.*)$", re.M)


def run_check(nproc: int, *extra: str) -> tuple[subprocess.CompletedProcess, re.Match]:
    """The emulated check with small shapes; returns the process and its one summary line."""
    proc = run_torchrun(
        nproc, str(SCRIPT), "--emulate", "--seq", str(16 * nproc), "--head-dim", "16", *extra
    )
    summaries = SUMMARY.findall(proc.stdout)
    assert len(summaries) == 1, f"want one summary line:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc, SUMMARY.search(proc.stdout)


def test_every_config_passes_on_4_ranks():
    """Ulysses, ring and hybrid (u = 2): 20 configs, exit status 0."""
    proc, summary = run_check(4)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    failed, passed, total, where = summary.groups()
    assert failed is None and int(passed) == int(total) == 20, summary.group(0)
    assert where.startswith("4 x cpu")
    assert proc.stdout.count(" PASS ") == 20


def test_a_wrong_result_fails_the_check():
    """2 ranks, the output of config 5 (the ring, causal) perturbed: it alone fails, the other
    11 pass (each launch of torchrun costs ~10 s here, so this run also covers 2 ranks)."""
    proc, summary = run_check(2, "--inject-error", "5")
    assert proc.returncode != 0, proc.stdout
    failed, passed, total, where = summary.groups()
    assert failed and (int(passed), int(total)) == (11, 12), summary.group(0)
    assert where.startswith("2 x cpu")
    lines = re.findall(r"^\[ *(\d+)/12\] (PASS|FAIL) ", proc.stdout, re.M)
    assert [n for n, verdict in lines if verdict == "FAIL"] == ["5"], proc.stdout
    assert len(lines) == 12


def test_packed_configs_pass_on_4_ranks():
    """--packed: four documents, the same 20 configs against the TND single-device op."""
    proc, summary = run_check(4, "--packed")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    failed, passed, total, _ = summary.groups()
    assert failed is None and int(passed) == int(total) == 20, summary.group(0)
    assert proc.stdout.count(" packed 4 docs") == 20
