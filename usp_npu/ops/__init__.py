"""Custom ops: the softmax-statistics merge of ring steps."""

from usp_npu.ops.ring_update import ring_attention_update, ring_attention_update_

__all__ = ["ring_attention_update", "ring_attention_update_"]
