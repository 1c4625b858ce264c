"""Megatron-core integration: ``USPCoreAttention`` in the layer spec, one line to switch.

::

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             context_parallel_size=cp)
    usp_npu.initialize_context_parallel(cfg, tensor_model_parallel_size=tp)
    spec = patch_spec(get_gpt_layer_local_spec())
    model = GPTModel(config, spec, ...)          # batches split by get_batch_on_this_cp_rank

See docs/integration_megatron.md. Importing this module imports megatron-core.
"""

from usp_npu.integrations.megatron.arguments import config_from_args
from usp_npu.integrations.megatron.core_attention import USPCoreAttention, patch_spec
from usp_npu.integrations.megatron.cpu import megatron_on_cpu
from usp_npu.integrations.megatron.mesh import (
    check_megatron_mesh,
    cp_groups_agree,
    megatron_cp_groups,
)

__all__ = [
    "USPCoreAttention",
    "check_megatron_mesh",
    "config_from_args",
    "cp_groups_agree",
    "megatron_cp_groups",
    "megatron_on_cpu",
    "patch_spec",
]
