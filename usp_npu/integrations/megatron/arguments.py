"""The CP flags inside a Megatron-LM argument parser.

:func:`usp_npu.add_context_parallel_args` works as Megatron-LM's ``extra_args_provider``: it runs
after Megatron's own groups and leaves alone the flags Megatron already defines. Two of ours exist
there: ``--context-parallel-size`` (the same meaning) and ``--attention-backend``, which in
Megatron-LM picks the TransformerEngine kernel and parses to an ``AttnBackend`` enum. That one is
not usp_npu's block-kernel choice, so :func:`config_from_args` leaves ours at ``auto``.
"""

from __future__ import annotations

from dataclasses import replace

from usp_npu.config import ContextParallelConfig


def config_from_args(args: object) -> ContextParallelConfig:
    """``ContextParallelConfig.from_args`` for a namespace parsed by Megatron-LM's parser."""
    cfg = ContextParallelConfig.from_args(args)
    if not isinstance(cfg.attention_backend, str):  # Megatron-LM's AttnBackend enum
        cfg = replace(cfg, attention_backend="auto")
    return cfg
