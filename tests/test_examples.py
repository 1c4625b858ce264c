"""examples/hf_train.py and examples/megatron_train.py (also with --packed) run verbatim under
torchrun on CPU (small): every step's CP loss matches the one-process loss they print beside it
(float32)."""

from __future__ import annotations

import re

import pytest

from usp_npu.testing.launcher import run_torchrun

LINE = re.compile(r"step (\d+)  cp loss ([\d.]+)  one-process loss ([\d.]+)")
HYBRID = ("--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2")


def _losses(script: str, *flags: str) -> list[tuple[float, float]]:
    done = run_torchrun(
        4, script, *HYBRID, "--steps", "3", "--seq-length", "64", *flags, timeout_s=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [(int(s), float(a), float(b)) for s, a, b in LINE.findall(done.stdout)]
    assert [s for s, _, _ in steps] == [0, 1, 2], done.stdout
    return [(a, b) for _, a, b in steps]


@pytest.mark.parametrize(
    "script,needs,flags",
    [
        ("examples/hf_train.py", "transformers", ()),
        ("examples/megatron_train.py", "megatron.core", ()),
        ("examples/megatron_train.py", "megatron.core", ("--packed",)),  # THD packed documents
    ],
)
def test_example_prints_matching_losses(script, needs, flags):
    pytest.importorskip(needs)
    for cp_loss, single_loss in _losses(script, *flags):
        assert cp_loss > 3.0  # ~ln(128): real cross-entropy, not a degenerate value
        assert abs(cp_loss - single_loss) <= 1e-5 * single_loss, (cp_loss, single_loss)
