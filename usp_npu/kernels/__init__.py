"""Per-block attention backends behind one interface (see ``base.py``)."""

from __future__ import annotations

import torch

from usp_npu.kernels import torch_flash
from usp_npu.kernels.base import CAUSAL, FULL, BlockKernel, BlockMask, stats_dtype
from usp_npu.kernels.reference import ReferenceBlockKernel
from usp_npu.kernels.torch_flash import TorchBlockKernel

__all__ = [
    "CAUSAL",
    "FULL",
    "BlockKernel",
    "BlockMask",
    "ReferenceBlockKernel",
    "TorchBlockKernel",
    "select_kernel",
    "stats_dtype",
]


def select_kernel(
    backend: str, device: torch.device, dtype: torch.dtype, has_mask: bool, **npu_options
) -> BlockKernel:
    """The block kernel for ``--attention-backend backend`` on tensors of this device/dtype.

    ``auto``: npu for npu tensors, torch where its ops take the dtype and mask, reference otherwise.
    ``npu_options`` (``layout``, ``keep_prob``) go to the NPU kernel.
    """
    if backend == "auto":
        if device.type == "npu":
            backend = "npu"
        elif torch_flash.supports(device, dtype, has_mask):
            backend = "torch"
        else:
            backend = "reference"
    if backend == "npu":
        from usp_npu.kernels.npu import NpuBlockKernel

        return NpuBlockKernel(**npu_options)
    if backend == "torch":
        if not torch_flash.supports(device, dtype, has_mask):
            raise ValueError(
                f"--attention-backend torch has no kernel for {dtype} on {device.type}"
                f"{' with an explicit mask' if has_mask else ''}; use --attention-backend auto "
                "or reference"
            )
        return TorchBlockKernel()
    if backend == "reference":
        return ReferenceBlockKernel()
    raise ValueError(f"unknown --attention-backend {backend!r}")
