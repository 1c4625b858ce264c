"""Every ContextParallelConfig validation rule, with the message the code gives for it today.

``python docs/examples/validation_messages.py`` prints the tables. ``docs/conf.py`` runs
:func:`write_tables` at every build and the flags page includes the result (translated through the catalogue),
so the documented messages and flag names are always those of ``usp_npu/config.py``. If a case
below is no longer rejected the build stops: the rule changed and this list must follow.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from usp_npu.config import ContextParallelConfig as C


def validate(cfg: C, heads: int = 8, seq: int = 64, **kwargs) -> list[str]:
    """The problems ``cfg.validate`` reports (one per line of the ValueError), or []."""
    try:
        cfg.validate(num_attention_heads=heads, seq_length=seq, **kwargs)
    except ValueError as err:
        return [line.removeprefix("  - ") for line in str(err).splitlines()[1:]]
    return []


@dataclass(frozen=True)
class Rule:
    number: str
    rule: str
    problems: Callable[[], list[str]]


HYB = "hybrid_cp_algo"
RING = "megatron_cp_algo"
RULES = [
    Rule("1", "`cp` is an int >= 1", lambda: validate(C(0))),
    Rule("2", "known algorithm", lambda: validate(C(4, "ring"))),
    Rule("3", "known mask type", lambda: validate(C(4, attention_mask_type="padding"))),
    Rule("4", "known backend", lambda: validate(C(4, attention_backend="cuda"))),
    Rule(
        "5",
        "Ulysses and ring: `--ulysses-degree-in-cp`, if given, equals the fixed degree "
        "(`cp`, resp. 1)",
        lambda: validate(C(8, RING, 2)),
    ),
    Rule(
        "6",
        "hybrid: `u` is given",
        lambda: validate(C(8, HYB)),
    ),
    Rule(
        "7",
        "hybrid: `u >= 1` and `cp % u == 0`",
        lambda: validate(C(8, HYB, 3)),
    ),
    Rule(
        "8",
        "hybrid: `u < cp` (`u == cp` is plain Ulysses)",
        lambda: validate(C(8, HYB, 8)),
    ),
    Rule(
        "9",
        "tensor- and pipeline-parallel sizes >= 1",
        lambda: validate(C(4), pipeline_model_parallel_size=0),
    ),
    Rule(
        "10",
        "world size divisible by `tp x cp x pp`",
        lambda: validate(C(8, HYB, 2), 32, 131072, world_size=12),
    ),
    Rule(
        "11",
        "Ulysses: query heads divisible by `cp x tp`",
        lambda: validate(C(8), 12),
    ),
    Rule("11", "hybrid: query heads divisible by `u x tp`", lambda: validate(C(8, HYB, 4), 6)),
    Rule(
        "11",
        "ring: query heads divisible by `tp`",
        lambda: validate(C(4, RING), 6, tensor_model_parallel_size=4),
    ),
    Rule(
        "12",
        "K/V heads (`num_query_groups`) >= 1 and divide the query heads",
        lambda: validate(C(4), 32, num_query_groups=6),
    ),
    Rule(
        "13",
        "K/V heads divisible by `tp`",
        lambda: validate(C(2), 32, num_query_groups=2, tensor_model_parallel_size=4),
    ),
    Rule(
        "14",
        "query heads per TP rank divisible by `u` (checked on the tensors at call time)",
        lambda: C(8, HYB, 2).local_head_errors(3, 3),
    ),
    Rule(
        "15",
        "query heads per TP rank a multiple of K/V heads per TP rank (call time)",
        lambda: C(4, HYB, 2).local_head_errors(4, 3),
    ),
    Rule(
        "16",
        "`u > 1`: K/V heads per TP rank divide `u` or are divisible by it",
        lambda: validate(C(8, HYB, 4), 24, num_query_groups=6),
    ),
    Rule("17", "sequence length >= 1", lambda: validate(C(4), seq=0)),
    Rule(
        "18",
        "Ulysses, any mask: `seq % cp == 0`",
        lambda: validate(C(4), seq=1000002),
    ),
    Rule(
        "18",
        "`general` mask, any algorithm: `seq % cp == 0` (hybrid shown)",
        lambda: validate(C(8, HYB, 2, "general"), seq=100),
    ),
    Rule(
        "19",
        "ring and kvallgather, causal: `seq % (2 x cp) == 0`",
        lambda: validate(C(8, RING), seq=8200),
    ),
    Rule(
        "20",
        "hybrid, causal: `seq % (r x lcm(2, u)) == 0`, i.e. `seq % 2r == 0` and "
        "`(seq / r) % u == 0`",
        lambda: validate(C(8, HYB, 2), 32, 131076),
    ),
    Rule(
        "21",
        "`--cp-window-size > 1` (double ring) only with `megatron_cp_algo` / `hybrid_cp_algo`",
        lambda: validate(C(8, cp_window_size=2)),
    ),
    Rule(
        "22",
        "`--cp-window-size` `w`: an int >= 1; `w > 1`: `w < r` and `r % w == 0`",
        lambda: validate(C(4, RING, cp_window_size=3)),
    ),
    Rule(
        "23",
        "`--context-parallel-kv-cache-policy` is `full` or `half` (or unset)",
        lambda: validate(C(4, RING, context_parallel_kv_cache_policy="all")),
    ),
    Rule(
        "24",
        "KV cache policy: `cp > 1`, and not with `kvallgather_cp_algo` (it keeps the gathered K/V)",
        lambda: validate(C(1, RING, context_parallel_kv_cache_policy="full")),
    ),
    Rule(
        "25",
        "`--context-parallel-cache-interval` `n`: an int >= 0; `n > 0` needs a KV cache policy",
        lambda: validate(C(4, RING, context_parallel_cache_interval=2)),
    ),
    Rule(
        "25",
        "`n < --num-layers` (when `validate` is given `num_layers`)",
        lambda: validate(
            C(4, RING, context_parallel_kv_cache_policy="full", context_parallel_cache_interval=4),
            num_layers=4,
        ),
    ),
    Rule(
        "26",
        "`--use-ulysses-allgather-kv`: `ulysses_cp_algo`, `cp > 1`",
        lambda: validate(C(4, RING, use_ulysses_allgather_kv=True)),
    ),
    Rule(
        "26",
        "`--use-ulysses-allgather-kv`: grouped-query attention (`num_query_groups` below the "
        "query heads; on the tensors: fewer K/V heads than query heads)",
        lambda: validate(C(4, use_ulysses_allgather_kv=True), num_query_groups=8),
    ),
]


def _message(rule: Rule) -> str:
    problems = rule.problems()
    if not problems:
        raise RuntimeError(
            f"docs: the example of validation rule {rule.number} ({rule.rule}) is accepted now; "
            "update docs/examples/validation_messages.py and docs/flags.md"
        )
    return problems[0]


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _flags(message: str) -> str:
    names = dict.fromkeys(re.findall(r"--[a-z][a-z-]*[a-z]", message))
    return ", ".join(f"`{n}`" for n in names) or "none"


def english_table() -> str:
    lines = [
        "| # | rule | flags named in the message | message |",
        "|---|---|---|---|",
    ]
    for rule in RULES:
        msg = _message(rule)
        lines.append(f"| {rule.number} | {rule.rule} | {_flags(msg)} | {_code(msg)} |")
    return "\n".join(lines) + "\n"


def several_problems() -> str:
    cfg = C(8, HYB, 2)
    try:
        cfg.validate(num_attention_heads=31, seq_length=100, world_size=12)
    except ValueError as err:
        return f"```text\n{err}\n```\n"
    raise RuntimeError("docs: the several-problems example of docs/flags.md is accepted now")


def write_tables(out_dir: Path) -> None:
    """Write the generated Markdown pieces into ``out_dir`` (only files whose text changed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = {
        "validation_rules.md": english_table(),
        "validation_several.md": several_problems(),
    }
    for name, text in pieces.items():
        path = out_dir / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.stdout.write(english_table() + "\n" + several_problems())
