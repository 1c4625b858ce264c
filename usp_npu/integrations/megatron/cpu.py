"""Run megatron-core on a CPU-only torch (tests, examples, laptops): two patches, undone on exit.

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


@contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Apply the patches above while the block runs; restore megatron-core on exit."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron_on_cpu is for a CPU-only torch: run megatron-core unpatched")
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rpe

    saved = [
        (torch.cuda, "current_device", torch.cuda.current_device),
        (rope_utils, "get_pos_emb_on_this_cp_rank", rope_utils.get_pos_emb_on_this_cp_rank),
        (rpe, "get_pos_emb_on_this_cp_rank", rpe.get_pos_emb_on_this_cp_rank),
    ]
    torch.cuda.current_device = _cpu_device
    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rpe.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
