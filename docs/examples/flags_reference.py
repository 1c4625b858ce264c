"""The flags table of docs/flags.md, read from the real parser at every docs build.

``python docs/examples/flags_reference.py`` prints it. ``docs/conf.py`` calls :func:`write_table`,
and flags.md includes ``_generated/flags_table.md``: a flag added to
``usp_npu.add_context_parallel_args`` appears on the page (in both languages, through the
catalogue) without anyone editing the page, and a renamed or removed one disappears.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from usp_npu import add_context_parallel_args

# The longer explanation of a flag, where its --help line is too short for the page.
# A flag missing here is documented by its --help text.
DETAILS = {
    "--context-parallel-size": "CP degree `cp`: ranks that share one sequence.",
    "--context-parallel-algo": (
        "Ulysses all-to-all, ring, both (USP), or K/V all-gathered once with local queries "
        "({doc}`mindspeed_options`)."
    ),
    "--ulysses-degree-in-cp": ("hybrid only: Ulysses degree `u`; the ring degree is `r = cp / u`."),
    "--attention-mask-type": (
        "`causal`: lower-triangular mask, load-balanced split. `general`: no mask or an explicit "
        "`[S, S]` bool mask, contiguous split."
    ),
    "--attention-backend": (
        "block kernel: `npu` = `torch_npu.npu_fusion_attention`; `torch` = PyTorch's "
        "flash-attention ops; `reference` = plain math (any dtype, any mask; slow). `auto` picks "
        "`npu` for `npu` tensors, else `torch` where it supports the device, dtype and mask, "
        "else `reference`."
    ),
    "--use-cp-send-recv-overlap": (
        "ring: a second communicator over the same ranks, so a rank's send and receive run on "
        "different communicators."
    ),
    "--megatron-cp-in-bnsd": (
        "`npu` backend: hand each block to the fused op in BNSD layout instead of SBH."
    ),
    "--use-fused-ring-attention-update": (
        "how ring steps are merged: auto (no flag) = the fused op where one exists for the "
        "device (the C++ extension for CPU tensors, `torch_npu.npu_ring_attention_update` for "
        "NPU tensors), else the composed PyTorch formula; the flag = the fused op or a "
        "`ValueError` before any communication; `--no-use-fused-ring-attention-update` = the "
        "composed formula."
    ),
    "--cp-window-size": (
        "double ring (ring and hybrid): windows of `w` consecutive ring ranks run an inner ring, "
        "an outer ring joins the windows; `1` = plain ring ({doc}`mindspeed_options`)."
    ),
    "--context-parallel-kv-cache-policy": (
        "ring: keep the K/V blocks (`full`) or only K (`half`) received in the forward, so the "
        "backward does not receive them again; Ulysses: keep K/V (`full`) or K (`half`) from "
        "before the all-to-all and redo it in the backward."
    ),
    "--context-parallel-cache-interval": (
        "`0`: the KV cache policy applies to every layer; `n > 0`: only to layers with "
        "`layer_number % (n + 1) == 1` (the attention takes `layer_number=`)."
    ),
    "--use-ulysses-allgather-kv": (
        "Ulysses with grouped-query attention: all-gather K/V and all-to-all only the queries, "
        "instead of replicating K/V heads up to `u`."
    ),
}


def context_parallel_actions() -> list[argparse.Action]:
    """The options ``add_context_parallel_args`` adds to an empty parser, in order."""
    parser = add_context_parallel_args(argparse.ArgumentParser(add_help=False))
    return [a for a in parser._actions if a.option_strings]


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch, three states"
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    return getattr(action.type, "__name__", "str")


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 and action.default is False:
        return "off"
    if action.default is None:
        return "`None` (auto)" if isinstance(action, argparse.BooleanOptionalAction) else "`None`"
    return f"`{action.default}`"


def _help(action: argparse.Action) -> str:
    """The --help text as argparse prints it (``%%`` -> ``%``, ``%(default)s`` filled in)."""
    text = action.help or ""
    try:
        return text % {**vars(action), "prog": "usp-npu"}
    except (KeyError, TypeError, ValueError):
        return text


def flags_table() -> str:
    """Markdown table: flag(s), type or choices, default, meaning."""
    lines = ["| flag | type | default | meaning |", "|---|---|---|---|"]
    for action in context_parallel_actions():
        names = " / ".join(f"`{s}`" for s in action.option_strings)
        meaning = DETAILS.get(action.option_strings[0], _help(action))
        lines.append(f"| {names} | {_kind(action)} | {_default(action)} | {meaning} |")
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path) -> None:
    """Write ``flags_table.md`` into ``out_dir`` (only if its text changed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "flags_table.md"
    text = flags_table()
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.stdout.write(flags_table())
