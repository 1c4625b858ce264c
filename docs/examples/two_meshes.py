"""Two models with different context-parallel configurations in one process (docs/usage.md).

Run on 4 CPU ranks: ``torchrun --nproc-per-node 4 docs/examples/two_meshes.py``. The test suite
runs :func:`two_meshes` on its 4-rank gloo pool and checks the result against dense attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import usp_npu


def two_meshes(seed: int = 0) -> torch.Tensor:
    """Ulysses and ring meshes side by side; returns the gathered Ulysses output [B, S, N, D]."""
    torch.manual_seed(seed)  # the same full-sequence q, k, v on every rank
    q, k, v = (torch.randn(1, 16, 4, 8, dtype=torch.float64) for _ in range(3))

    uly = usp_npu.initialize_context_parallel(usp_npu.ContextParallelConfig(4, "ulysses_cp_algo"))
    ring = usp_npu.initialize_context_parallel(
        usp_npu.ContextParallelConfig(4, "megatron_cp_algo", attention_mask_type="general")
    )

    attn = usp_npu.USPAttention(layout="BSND", mesh=uly)
    out = attn(*(usp_npu.split_sequence(t, 1, mesh=uly) for t in (q, k, v)))
    full = usp_npu.gather_sequence(out, 1, mesh=uly)

    # The ring mesh is still there, and its split is its own (contiguous: general mask).
    ring_out = usp_npu.USPAttention(layout="BSND", mesh=ring)(
        *(usp_npu.split_sequence(t, 1, mesh=ring) for t in (q, k, v))
    )
    assert ring_out.shape == (1, 4, 4, 8)
    usp_npu.destroy_context_parallel()
    return full


if __name__ == "__main__":
    dist.init_process_group("gloo")
    result = two_meshes()
    if dist.get_rank() == 0:
        print("gathered output", tuple(result.shape))
    dist.destroy_process_group()
