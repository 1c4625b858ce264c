"""The scripts of docs/examples run on CPU ranks, and the generated tables and diagrams hold.

No Sphinx needed: the tables and diagrams are plain functions of the code.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from usp_npu.testing.reference import dense_attention

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load(name: str):
    module_name = "docs_" + name.replace("/", "_")
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, DOCS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _run_example(name: str, function: str, *args):
    """On a pool rank: import docs/<name>.py by path and call one of its functions."""
    return getattr(_load(name), function)(*args)


@pytest.mark.parametrize(
    "flags",
    [
        ["--context-parallel-algo", "ulysses_cp_algo"],
        ["--context-parallel-algo", "megatron_cp_algo"],
        ["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2"],
    ],
    ids=["ulysses", "ring", "hybrid"],
)
def test_train_step_example_matches_one_process(pools, flags):
    argv = ["--context-parallel-size", "4", "--seq-length", "32", *flags]
    results = pools(4).run(_run_example, "examples/train_step", "main", argv)
    for res in results:
        assert abs(res["loss"] - res["reference_loss"]) < 1e-9
        assert res["gradient_error"] < 1e-9


def test_two_meshes_example_matches_dense_attention(pools):
    results = pools(4).run(_run_example, "examples/two_meshes", "two_meshes", 0)
    torch.manual_seed(0)  # the inputs two_meshes builds
    q, k, v = (torch.randn(1, 16, 4, 8, dtype=torch.float64) for _ in range(3))
    ref = dense_attention(*(t.transpose(0, 1) for t in (q, k, v)), causal=True).transpose(0, 1)
    for full in results:
        torch.testing.assert_close(full, ref, rtol=0, atol=1e-9)


def test_flags_table_lists_every_parser_flag():
    flags_reference = _load("examples/flags_reference")
    table = flags_reference.flags_table()
    actions = flags_reference.context_parallel_actions()
    assert len(actions) >= 8
    for action in actions:
        for flag in action.option_strings:
            assert f"`{flag}`" in table


def test_validation_table_has_a_message_for_every_rule():
    messages = _load("examples/validation_messages")
    table = messages.english_table()
    assert table.count("\n") == len(messages.RULES) + 2
    assert "invalid context-parallel settings" in messages.several_problems()


def test_packed_diagram_draws_the_worked_example_of_the_packed_page():
    svg = _load("diagrams").packed_split("en")
    text = (DOCS / "packed.md").read_text(encoding="utf-8")
    rows = {  # docs/packed.md: cp_rank -> tokens, for cu_seqlens [0, 8, 24], u = r = 2
        0: "0 1 6 7 8 9",
        1: "10 11 20 21 22 23",
        2: "2 3 4 5 12 13",
        3: "14 15 16 17 18 19",
    }
    for rank, tokens in rows.items():
        assert f"| {tokens} |" in text
        drawn = svg.split(f">CP rank {rank}<")[1].split("CP rank")[0]
        assert re.findall(r">(\d+)</text>", drawn) == tokens.split()


def test_diagrams_are_well_formed_svg_in_both_languages(tmp_path):
    diagrams = _load("diagrams")
    paths = diagrams.write_all(tmp_path)
    assert len(paths) == 2 * len(diagrams.DIAGRAMS)
    for path in paths:
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg")
    ring = (tmp_path / "ring_steps.svg").read_text(encoding="utf-8")
    assert ring.count("<polygon") == 4  # one causal own block per rank, at step 0


def test_python_on_the_pages_is_executed():
    """Python shown on a page runs: a {doctest}/{testcode} block or a docs/examples file.

    A plain python fence would be shown without ever running, so none is allowed.
    """
    plain = [
        f"{page.name}:{number}"
        for page in sorted(DOCS.glob("**/*.md"))
        if "_build" not in page.parts
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip().startswith(("```python", "```py", "```{code-block} python"))
    ]
    assert not plain, f"use {{testcode}}/{{doctest}} or docs/examples/*.py instead: {plain}"


def test_every_docs_example_is_run_by_a_test():
    tests = " ".join(p.read_text(encoding="utf-8") for p in (DOCS.parent / "tests").glob("*.py"))
    for example in sorted((DOCS / "examples").glob("*.py")):
        assert f"examples/{example.stem}" in tests, f"{example.name} is not run by any test"
