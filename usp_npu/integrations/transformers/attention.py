"""The attention function transformers calls for ``attn_implementation="usp_npu"``.

transformers (5.x) calls it as ``fn(module, query, key, value, attention_mask, dropout=,
scaling=, **kwargs)`` with q ``[b, n_q, s, d]``, k/v ``[b, n_kv, s, d]`` (K/V heads not repeated)
and expects ``([b, s, n_q, d], None)``. It builds no attention mask for a custom name unless a
mask function is registered too: :func:`register` registers one that hands a padding mask on to
the attention, which refuses it (a padding mask cannot be honoured exactly).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from usp_npu.attention import context_parallel_attention
from usp_npu.packing import (
    check_split,
    normalize_cu_seqlens,
    packed_token_indices,
    positions_from_cu_seqlens,
)
from usp_npu.parallel_state import ContextParallelMesh, get_mesh
from usp_npu.sharding import token_indices


def register(name: str = "usp_npu") -> str:
    """Register USP with transformers' ``AttentionInterface`` (and its mask hook) under ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)``, ``from_config(config,
    attn_implementation=name)`` or ``model.set_attn_implementation(name)`` runs every attention
    layer that uses the interface with the mesh of :func:`usp_npu.initialize_context_parallel`
    (looked up at call time). Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, usp_attention_forward)
    AttentionMaskInterface.register(name, _padding_mask_passthrough)
    return name


def _padding_mask_passthrough(*, attention_mask=None, **_) -> torch.Tensor | None:
    """Mask hook: no mask for a batch without padding; a padding mask goes on to the attention.

    The causal pattern (and the packed-sequence pattern transformers would infer from the zigzag
    position ids of a shard) is the attention's own business, so ``mask_function`` is ignored.
    The refusal happens in :func:`usp_attention_forward`, after the CP group agreed on it.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def _local_problem(module, attention_mask, mesh, sliding_window, softcap, kwargs):
    """Why this call cannot be honoured exactly, from what this rank sees (None when it can)."""
    if attention_mask is not None:
        return (
            "an attention mask reached the usp_npu attention (a padding mask or a custom 4-D "
            f"mask of shape {tuple(attention_mask.shape)}); it cannot be honoured exactly under "
            "context parallelism: drop padding (shard_batch(pad=True) pads at the end, where a "
            "causal model needs no mask) or remove the mask"
        )
    if sliding_window is not None:
        return f"sliding_window={sliding_window} is not supported by usp_npu attention"
    if softcap is not None:
        return f"softcap={softcap} (logit soft-capping) is not supported by usp_npu attention"
    if kwargs.get("s_aux") is not None:
        return "s_aux (attention sinks) is not supported by usp_npu attention"
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    if causal != mesh.config.causal:
        return (
            f"the model's attention is {'causal' if causal else 'bidirectional'} but "
            f"--attention-mask-type is {mesh.config.attention_mask_type}: make them agree"
        )
    return None


def _document_bounds(kwargs, local_len: int, mesh: ContextParallelMesh):
    """``(cu_seqlens of the FULL sequence or None, problem or None)`` from ``cu_seq_lens_q/k``."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    given = cu_q if cu_q is not None else cu_k
    if given is None:
        return None, None
    if cu_q is not None and cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu()):
        return None, "cu_seq_lens_q and cu_seq_lens_k differ; self-attention needs one set"
    cfg = mesh.config
    try:
        cu = normalize_cu_seqlens(given.cpu(), local_len * mesh.cp_size)
        check_split(cu, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
        return cu, None
    except ValueError as e:
        return None, (
            f"cu_seq_lens_q must hold the document bounds of the FULL packed sequence "
            f"({local_len * mesh.cp_size} tokens), as shard_batch returns them: {e}"
        )


def _position_problem(position_ids, local_len: int, mesh: ContextParallelMesh, cu) -> str | None:
    """Position ids must be this rank's split of 0..S-1 (per document when packed): RoPE would
    be silently wrong otherwise."""
    if position_ids is None:
        return None
    cfg, total = mesh.config, local_len * mesh.cp_size
    split = (mesh.cp_rank, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
    if cu is None:
        want = token_indices(total, *split)
    else:  # positions restart at every document start
        want = positions_from_cu_seqlens(cu)[packed_token_indices(cu, *split)]
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] == local_len and bool((pos.cpu() == want).all()):
        return None
    return (
        f"position_ids on CP rank {mesh.cp_rank} are not this rank's share of the "
        f"{'packed ' if cu is not None else ''}sequence of {total} tokens as split by "
        "usp_npu.split_sequence: split the batch with "
        "usp_npu.integrations.transformers.shard_batch (RoPE would be wrong otherwise; a packed "
        "batch also needs the cu_seq_lens_q it returns)"
    )


class _Verdicts:
    """The CP group's last agreed verdict, keyed by the (position_ids, attention_mask) objects.

    Every layer of one forward sees the same two tensors, so the group agrees once per forward.
    All ranks run the same program, so all of them hit or miss this cache together.
    """

    def __init__(self):
        self.key: tuple = ()

    def seen(self, position_ids, attention_mask, mesh) -> bool:
        refs = tuple(None if t is None else weakref.ref(t) for t in (position_ids, attention_mask))
        alive = tuple(None if r is None else r() for r in self.key[:2])
        if (
            self.key
            and self.key[2] is mesh
            and all(a is b for a, b in zip(alive, (position_ids, attention_mask), strict=True))
        ):
            return True
        self.key = (*refs, mesh)
        return False


_VERDICTS = _Verdicts()


def _agree(problem: str | None, mesh: ContextParallelMesh) -> None:
    """Raise on every rank of the CP group if any of them found a problem (one tiny all-reduce)."""
    if mesh.cp_size > 1:
        flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.cp_group)
        if flag.item() and problem is None:
            problem = "another rank of this CP group refused the batch (see its error)"
    if problem is not None:
        raise ValueError(problem)


def usp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function: local shards in, local shard out.

    ``query`` ``[b, n_q, L, d]``, ``key``/``value`` ``[b, n_kv, L, d]`` (BNSD, RoPE applied,
    L = this rank's tokens as split by :func:`shard_batch`); returns ``([b, L, n_q, d], None)``.
    Raises ValueError (on every rank of the CP group) for what it cannot honour exactly: an
    attention mask, ``sliding_window``, ``softcap``, ``s_aux``, a causality that disagrees with
    ``--attention-mask-type``, or position ids not split like the tokens. Packed rows: give
    ``cu_seq_lens_q`` (the FULL sequence's document bounds, as :func:`shard_batch` returns them);
    attention then stays inside each document.
    """
    mesh = get_mesh()
    local_len = query.shape[2]
    problem = _local_problem(module, attention_mask, mesh, sliding_window, softcap, kwargs)
    cu, cu_problem = _document_bounds(kwargs, local_len, mesh)
    problem = problem or cu_problem
    position_ids = kwargs.get("position_ids")
    if not _VERDICTS.seen(position_ids, attention_mask, mesh):
        if problem is None:
            problem = _position_problem(position_ids, local_len, mesh, cu)
        _agree(problem, mesh)
    elif problem is not None:  # the group agreed on these tensors already: same verdict everywhere
        raise ValueError(problem)
    out = context_parallel_attention(
        query,
        key,
        value,
        layout="BNSD",
        softmax_scale=scaling,
        cu_seqlens=cu,
        dropout_p=dropout,
        mesh=mesh,
    )
    return out.transpose(1, 2), None
