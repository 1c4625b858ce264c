"""Run megatron-core on a CPU-only torch (tests, examples, laptops): three patches, undone on exit.

Exercised with megatron-core 0.16.1: ``GPTModel`` with ``get_gpt_layer_local_spec()``,
``use_cpu_initialization=True`` and either ``USPCoreAttention`` or Megatron's own
``DotProductAttention`` (cp = 1) trains on CPU over gloo with:

- ``torch.cuda.current_device`` answering ``"cpu"``: Megatron allocates with
  ``device=torch.cuda.current_device()`` in several places (``RotaryEmbedding.get_emb`` moving
  ``inv_freq``, the global memory buffer of ``DotProductAttention``, the tensor-parallel gather
  of the output logits), which then simply allocate on the CPU.
- ``get_pos_emb_on_this_cp_rank`` (cp > 1) builds its chunk index with ``pin_memory=True`` and
  ``.cuda()``; it is imported by name into ``rotary_pos_embedding`` too, so both names are
  replaced by a CPU version that takes the same chunks (``c`` and ``2 cp - 1 - c`` of ``2 cp``).
- ``megatron.core.utils.get_thd_batch_on_this_cp_rank`` (THD packed batches, cp > 1) takes its
  index from TransformerEngine's CUDA kernel ``thd_get_partitioned_indices``: replaced by a CPU
  version that builds the same ``PackedSeqParams`` and takes the same tokens (every padded
  document cut into ``2 cp`` chunks, CP rank ``c`` keeps chunks ``c`` and ``2 cp - 1 - c`` of each,
  documents in order: :func:`usp_npu.token_order.zigzag_positions` with ``cu_seqlens``). Import
  it from ``megatron.core.utils`` inside the block. THD RoPE (``_apply_rotary_pos_emb_thd``)
  needs no patch: it slices the table per document on the CPU already.

Nothing else is touched. Not for a machine with an accelerator: there, run Megatron unpatched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from usp_npu.token_order import zigzag_positions


def _cpu_device() -> str:
    return "cpu"


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """This CP rank's rows of the RoPE table, as Megatron takes them, without CUDA."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    rows = zigzag_positions(pos_emb.shape[seq_dim], cp_group.rank(), cp_group.size())
    return pos_emb.index_select(seq_dim, rows.to(pos_emb.device))


def _thd_batch_on_this_cp_rank(
    batch: dict,
    cu_seqlens: torch.Tensor,
    cu_seqlens_padded: torch.Tensor,
    max_seqlen: torch.Tensor,
    cp_size: int | None = None,
    cp_rank: int | None = None,
):
    """This CP rank's tokens of a THD batch (``[1, t]`` tensors) and its ``PackedSeqParams``."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int(max_seqlen[0].item())
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens_padded,
        cu_seqlens_kv_padded=cu_seqlens_padded,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    if cp_size is None:
        cp_size = parallel_state.get_context_parallel_world_size()
    if cp_rank is None:
        cp_rank = parallel_state.get_context_parallel_rank()
    if cp_size > 1:
        keep = zigzag_positions(batch["tokens"].size(1), cp_rank, cp_size, cu_seqlens_padded)
        for key, data in batch.items():
            if key not in _THD_NOT_SPLIT:
                batch[key] = data.index_select(1, keep.to(data.device))
    return batch, params


#: batch entries get_thd_batch_on_this_cp_rank leaves whole
_THD_NOT_SPLIT = frozenset({"attention_mask", "cu_seqlens", "cu_seqlens_padded", "max_seqlen"})


@contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Apply the patches above while the block runs; restore megatron-core on exit."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron_on_cpu is for a CPU-only torch: run megatron-core unpatched")
    from megatron.core import utils as megatron_utils
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rpe

    saved = [
        (torch.cuda, "current_device", torch.cuda.current_device),
        (rope_utils, "get_pos_emb_on_this_cp_rank", rope_utils.get_pos_emb_on_this_cp_rank),
        (rpe, "get_pos_emb_on_this_cp_rank", rpe.get_pos_emb_on_this_cp_rank),
        (
            megatron_utils,
            "get_thd_batch_on_this_cp_rank",
            megatron_utils.get_thd_batch_on_this_cp_rank,
        ),
    ]
    torch.cuda.current_device = _cpu_device
    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rpe.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    megatron_utils.get_thd_batch_on_this_cp_rank = _thd_batch_on_this_cp_rank
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
