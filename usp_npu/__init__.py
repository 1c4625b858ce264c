"""usp_npu: Unified Sequence Parallelism (Ulysses, ring, hybrid) for Ascend NPU, CUDA and CPU."""

from usp_npu import ops, parallel_state
from usp_npu.arguments import add_context_parallel_args
from usp_npu.attention import USPAttention, context_parallel_attention
from usp_npu.config import ContextParallelConfig
from usp_npu.packing import cu_seqlens_from_eod, cu_seqlens_from_position_ids, pad_packed
from usp_npu.parallel_state import destroy_context_parallel, initialize_context_parallel
from usp_npu.sharding import gather_sequence, split_sequence

__version__ = "0.1.0"

__all__ = [
    "ContextParallelConfig",
    "USPAttention",
    "__version__",
    "add_context_parallel_args",
    "context_parallel_attention",
    "cu_seqlens_from_eod",
    "cu_seqlens_from_position_ids",
    "destroy_context_parallel",
    "gather_sequence",
    "initialize_context_parallel",
    "ops",
    "pad_packed",
    "parallel_state",
    "split_sequence",
]
