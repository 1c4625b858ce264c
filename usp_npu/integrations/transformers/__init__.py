"""Hugging Face transformers: USP as an attention implementation, the batch split and the loss.

Three pieces, used together (see docs/integration_transformers.md)::

    usp_npu.initialize_context_parallel(cfg)              # after init_process_group
    register()                                            # attn_implementation="usp_npu"
    local = shard_batch(batch)                            # this rank's tokens, labels shifted first
    out = model(**local)                                  # attention runs over the whole CP group
    loss = reduce_loss(out.loss, local["shift_labels"])   # token-weighted over the CP group
    loss.backward(); then sum the gradients over the CP group

transformers is imported only by :func:`register`.
"""

from usp_npu.integrations.transformers.attention import register, usp_attention_forward
from usp_npu.integrations.transformers.batch import shard_batch
from usp_npu.integrations.transformers.loss import reduce_loss

__all__ = ["reduce_loss", "register", "shard_batch", "usp_attention_forward"]
