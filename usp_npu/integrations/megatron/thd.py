"""Megatron's THD packed sequences (``PackedSeqParams``) as usp_npu's packed ``cu_seqlens``.

Megatron-core describes a packed batch with ``PackedSeqParams(qkv_format='thd', ...)``:
``cu_seqlens_q`` / ``cu_seqlens_kv`` hold the cumulative ACTUAL document lengths and
``cu_seqlens_q_padded`` / ``cu_seqlens_kv_padded`` the cumulative lengths of the documents as laid
out in the packed tensor, each padded (at its end) to a multiple of ``2 cp`` so that the THD
context-parallel split can cut it into ``2 cp`` chunks. The attention layer squeezes the batch
dimension away: q ``[t, np, hn]``, k/v ``[t, ng, hn]``, t = this CP rank's tokens.

Padding: the padded documents are the documents usp_npu attends over. Under the causal mask this
is exact for every real token: a document's padding sits after its real tokens, so no real token
sees it; the padding tokens' own outputs are defined (they see their document) and carry no loss
in Megatron's data pipeline (loss mask 0).
"""

from __future__ import annotations

import itertools

import torch.distributed as dist

from usp_npu.packing import normalize_cu_seqlens
from usp_npu.parallel_state import ContextParallelMesh


def _values(params, name: str, total: int | None) -> tuple[int, ...] | None:
    value = getattr(params, name, None)
    if value is None:
        return None
    try:
        return normalize_cu_seqlens(value, total)
    except ValueError as e:
        raise ValueError(f"packed_seq_params.{name}: {e}") from None


def thd_cu_seqlens(params, total: int, mesh: ContextParallelMesh) -> tuple[int, ...]:
    """The ``cu_seqlens`` of the packed tensor (the padded documents) of a THD batch, checked.

    ``params``: Megatron's ``PackedSeqParams``; ``total``: the packed sequence's full length
    (this rank's tokens x CP size). Raises ValueError naming the ``packed_seq_params`` field
    for what this self-attention cannot honour exactly: another ``qkv_format``, Megatron's
    dynamic hybrid CP (``local_cp_size`` / a ``cp_group`` other than the mesh's), q and kv
    describing different documents, or padded lengths shorter than the actual ones.
    """
    fmt = getattr(params, "qkv_format", None)
    if fmt != "thd":
        raise ValueError(
            f"packed_seq_params.qkv_format={fmt!r}: USPCoreAttention takes packed sequences in "
            "Megatron's 'thd' format only (qkv_format='thd' with cu_seqlens_q / "
            "cu_seqlens_q_padded); without packing pass packed_seq_params=None"
        )
    local_cp = getattr(params, "local_cp_size", None)
    group = getattr(params, "cp_group", None)
    if local_cp is not None or (
        group is not None and tuple(dist.get_process_group_ranks(group)) != mesh.cp_ranks
    ):
        raise ValueError(
            f"packed_seq_params.local_cp_size={local_cp} / cp_group (Megatron's dynamic hybrid "
            "context parallelism) is not supported by USPCoreAttention: it runs on the CP "
            f"group of usp_npu.initialize_context_parallel (ranks {list(mesh.cp_ranks)}); "
            "leave both None"
        )
    for q_name in ("cu_seqlens_q", "cu_seqlens_q_padded"):
        kv_name = q_name.replace("_q", "_kv")
        q_cu, kv_cu = _values(params, q_name, None), _values(params, kv_name, None)
        if kv_cu is not None and q_cu != kv_cu:
            raise ValueError(
                f"packed_seq_params.{q_name} {list(q_cu or [])} differs from {kv_name} "
                f"{list(kv_cu)}: USPCoreAttention is self-attention over one packed sequence, "
                "the query and key/value documents must be the same"
            )
    actual = _values(params, "cu_seqlens_q", None)
    if actual is None:
        raise ValueError(
            "packed_seq_params.cu_seqlens_q is None: a THD batch needs the cumulative document "
            "lengths"
        )
    padded = _values(params, "cu_seqlens_q_padded", total)
    if padded is None:
        return _values(params, "cu_seqlens_q", total)
    short = [
        (i, b - a, d - c)
        for i, ((a, b), (c, d)) in enumerate(
            zip(itertools.pairwise(actual), itertools.pairwise(padded), strict=False)
        )
        if b - a > d - c
    ]
    if len(actual) != len(padded) or short:
        raise ValueError(
            f"packed_seq_params.cu_seqlens_q_padded {list(padded)} does not pad cu_seqlens_q "
            f"{list(actual)}: both must list the same documents, each padded length at least "
            f"the actual one (document, actual, padded: {short[:3]})"
        )
    return padded
