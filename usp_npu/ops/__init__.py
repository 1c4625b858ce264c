"""Custom ops: the softmax-statistics merge of ring steps (fused C++/NPU op or composed formula)."""

from usp_npu.ops._extension import extension_available, extension_error, load_extension
from usp_npu.ops.ring_update import (
    resolve_ring_update,
    ring_attention_update,
    ring_attention_update_,
    ring_attention_update_reference,
)

__all__ = [
    "extension_available",
    "extension_error",
    "resolve_ring_update",
    "ring_attention_update",
    "ring_attention_update_",
    "ring_attention_update_reference",
]

# Load now (a few ms), not on first use: torch.compile must not trace the loader's lock.
load_extension()
