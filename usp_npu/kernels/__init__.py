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
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    has_mask: bool,
    *,
    npu_layout: str = "SBH",
    dropout_p: float = 0.0,
) -> BlockKernel:
    """The block kernel for ``--attention-backend backend`` on tensors of this device/dtype.

    ``auto``: npu for npu tensors, torch where its ops take the dtype and mask, reference otherwise.
    Everything is checked here (torch_npu importable, dtype, dropout), before any collective.
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

        if dtype not in NpuBlockKernel.supported_dtypes:
            raise ValueError(
                f"--attention-backend npu takes float16, bfloat16 or float32, not {dtype} "
                "(Ascend has no float64 attention); use --attention-backend torch or reference"
            )
        NpuBlockKernel.ensure_available()
        return NpuBlockKernel(layout=npu_layout, keep_prob=1.0 - dropout_p)
    if dropout_p > 0:
        raise ValueError(
            f"attention dropout ({dropout_p}) needs --attention-backend npu: the {backend} block "
            "kernel cannot replay a dropout mask in the backward; set the dropout to 0"
        )
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
