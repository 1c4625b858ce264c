"""Adaptors for the stacks people train with.

- :mod:`usp_npu.integrations.transformers`: USP as a Hugging Face ``attn_implementation``,
  the batch split (``shard_batch``) and the token-weighted loss (``reduce_loss``).
- :mod:`usp_npu.integrations.megatron`: ``USPCoreAttention`` for a Megatron-core layer spec
  (``patch_spec``) and the check that both sides agree on the process groups.

Each module imports its framework lazily, so ``import usp_npu`` never needs either.
"""
