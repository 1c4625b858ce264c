"""MindSpeed-style command-line flags for context parallelism."""

from __future__ import annotations

import argparse

from usp_npu.config import (
    ALGORITHMS,
    ALL_TO_ALL_KINDS,
    BACKENDS,
    KV_CACHE_POLICIES,
    MASK_TYPES,
    ULYSSES,
)


def _flag_already_added(parser: argparse.ArgumentParser, flag: str) -> bool:
    return any(flag in action.option_strings for action in parser._actions)


def add_context_parallel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the context-parallel flags (REFERENCE.md section 1) to ``parser`` and return it.

    Flags Megatron already defines (``--context-parallel-size``) are left as they are, so this can
    be called on a Megatron parser too. Parse results map 1:1 to :class:`ContextParallelConfig`
    fields (``ContextParallelConfig.from_args(args)``).
    """
    group = parser.add_argument_group("context parallel (usp_npu)")
    specs: list[tuple[str, dict]] = [
        ("--context-parallel-size", {"type": int, "default": 1, "help": "CP degree"}),
        (
            "--context-parallel-algo",
            {
                "default": ULYSSES,
                "choices": ALGORITHMS,
                "help": "ulysses_cp_algo (all-to-all), megatron_cp_algo (ring), hybrid_cp_algo "
                "(USP) or kvallgather_cp_algo (K/V all-gathered once)",
            },
        ),
        (
            "--ulysses-degree-in-cp",
            {
                "type": int,
                "default": None,
                "help": "hybrid_cp_algo: Ulysses degree u inside CP; ring degree = cp / u",
            },
        ),
        (
            "--attention-mask-type",
            {
                "default": "causal",
                "choices": MASK_TYPES,
                "help": "causal: load-balanced split; general: full or explicit mask, contiguous split",
            },
        ),
        (
            "--attention-backend",
            {
                "default": "auto",
                "choices": BACKENDS,
                "help": "block kernel: npu (torch_npu), torch (aten flash ops), reference (plain math)",
            },
        ),
        (
            "--use-cp-send-recv-overlap",
            {
                "action": "store_true",
                "help": "ring: send and receive on two communicators so both directions overlap",
            },
        ),
        (
            "--megatron-cp-in-bnsd",
            {
                "action": "store_true",
                "help": "npu backend: run each ring block in BNSD layout instead of SBH",
            },
        ),
        (
            "--use-fused-ring-attention-update",
            {
                "action": argparse.BooleanOptionalAction,
                "default": None,
                "help": "merge ring steps with the fused op (C++ on CPU, torch_npu on NPU); "
                "default: wherever one is available; --no-... forces the composed formula",
            },
        ),
        (
            "--cp-window-size",
            {
                "type": int,
                "default": 1,
                "help": "double ring: windows of this many consecutive ring ranks (inner ring), "
                "an outer ring across windows; 1 = plain ring",
            },
        ),
        (
            "--context-parallel-kv-cache-policy",
            {
                "default": None,
                "choices": KV_CACHE_POLICIES,
                "help": "ring: keep received K/V (full) or K (half) for the backward; Ulysses: "
                "keep pre-all-to-all K/V (full) or K (half) and redo the all-to-all",
            },
        ),
        (
            "--context-parallel-cache-interval",
            {
                "type": int,
                "default": 0,
                "help": "0: the KV cache policy applies to every layer; n > 0: only to layers "
                "with layer_number %% (n + 1) == 1",
            },
        ),
        (
            "--use-ulysses-allgather-kv",
            {
                "action": "store_true",
                "help": "Ulysses with GQA: all-gather K/V and all-to-all only the queries",
            },
        ),
        (
            "--ulysses-pipeline-chunks",
            {
                "type": int,
                "default": None,
                "help": "Ulysses (u > 1): head chunks whose all-to-all overlaps the previous "
                "chunk's attention; default: up to 4 chunks of >= 1 MiB; 1 = no pipelining",
            },
        ),
        (
            "--ulysses-all-to-all",
            {
                "default": "collective",
                "choices": ALL_TO_ALL_KINDS,
                "help": "Ulysses all-to-all as one collective, or as point-to-point sends and "
                "receives with the receives posted first (p2p: for gloo across hosts)",
            },
        ),
    ]
    for flag, kwargs in specs:
        if not _flag_already_added(parser, flag):
            group.add_argument(flag, **kwargs)
    return parser
