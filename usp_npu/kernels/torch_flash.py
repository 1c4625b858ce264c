"""Block kernel on PyTorch's own flash-attention ops, which return the log-sum-exp.

CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``): fp64/fp32/bf16/fp16,
GQA, an additive float mask. CUDA: ``aten::_scaled_dot_product_flash_attention`` (fp16/bf16, no
explicit mask; K/V heads are expanded for GQA). The log-sum-exp is reported as the statistics
``(max, sum) = (lse, 1)``.
"""

from __future__ import annotations

import torch

from usp_npu.kernels.base import BlockMask, check_block_shapes, documents

_aten = torch.ops.aten


def supports(device: torch.device, dtype: torch.dtype, has_mask: bool) -> bool:
    """Whether this backend runs blocks of this device/dtype/mask kind."""
    if device.type == "cpu":
        return dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16) and not has_mask
    return False


def _bnsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


def _sbnd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(2, 0, 1, 3)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf")
    )


class TorchBlockKernel:
    name = "torch"
    stat_lanes = 1

    def forward(
        self, q, k, v, *, scale: float, mask: BlockMask, cu_seqlens_q=None, cu_seqlens_kv=None
    ):
        check_block_shapes(q, k, v)
        docs = documents(cu_seqlens_q, cu_seqlens_kv, q.shape[0], k.shape[0])
        if docs is None:
            out, lse = self._forward(q, k, v, scale, mask)
        else:
            # Packed: one flash call per document (never a mask over the whole block): the work
            # is exactly the documents' (docs/packed.md compares it with a block-diagonal mask).
            out = torch.empty_like(q)
            lse = None
            for qs, ks in docs:
                o, l_doc = self._forward(q[qs], k[ks], v[ks], scale, mask)
                if lse is None:
                    lse = l_doc.new_empty(*l_doc.shape[:2], q.shape[0])
                out[qs], lse[:, :, qs] = o, l_doc
        softmax_max = lse.unsqueeze(-1)
        # contiguous (ones_like would copy lse's strides), so the ring can merge into it in place
        softmax_sum = torch.ones(softmax_max.shape, dtype=softmax_max.dtype, device=q.device)
        if mask.mask is not None:
            # The op reports lse = 0 and out = 0 for a row that sees no key; the merge must see
            # such a row as empty (max = -inf, sum = 0) or it would weigh it as e^0.
            visible = (~mask.mask).any(-1).view(1, 1, -1, 1)
            softmax_max = torch.where(visible, softmax_max, float("-inf"))
            softmax_sum = visible.to(softmax_sum.dtype).expand_as(softmax_sum)
        return out, softmax_max, softmax_sum, None

    def _forward(self, q, k, v, scale, mask):
        """(out [sq, B, N, D], lse [B, N, sq]) of one plain block."""
        if q.device.type == "cuda":
            out, lse = self._cuda_forward(q, k, v, scale, mask)
        else:
            bias = None if mask.mask is None else _additive(mask.mask, q.dtype)
            out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
                _bnsd(q), _bnsd(k), _bnsd(v), 0.0, mask.causal, attn_mask=bias, scale=scale
            )
        return _sbnd(out), lse

    def backward(
        self,
        dout,
        q,
        k,
        v,
        out,
        softmax_max,
        softmax_sum,
        *,
        scale,
        mask,
        rng_state=None,
        cu_seqlens_q=None,
        cu_seqlens_kv=None,
    ):
        lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
        # A row with no visible key anywhere has lse = -inf; any finite value gives p = 0 there.
        lse = torch.where(torch.isfinite(lse), lse, 0.0).contiguous()
        docs = documents(cu_seqlens_q, cu_seqlens_kv, q.shape[0], k.shape[0])
        if docs is None:
            return self._backward(dout, q, k, v, out, lse, scale, mask, softmax_max.dtype)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for qs, ks in docs:
            dq[qs], dk[ks], dv[ks] = self._backward(
                dout[qs], q[qs], k[ks], v[ks], out[qs], lse[:, :, qs].contiguous(), scale, mask,
                softmax_max.dtype,
            )  # fmt: skip
        return dq, dk, dv

    def _backward(self, dout, q, k, v, out, lse, scale, mask, lse_dtype):
        if q.device.type == "cuda":
            return self._cuda_backward(dout, q, k, v, out, lse, scale, mask)
        bias = None if mask.mask is None else _additive(mask.mask, q.dtype)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bnsd(dout),
            _bnsd(q),
            _bnsd(k),
            _bnsd(v),
            _bnsd(out),
            lse.to(lse_dtype),
            0.0,
            mask.causal,
            attn_mask=bias,
            scale=scale,
        )
        return _sbnd(dq), _sbnd(dk), _sbnd(dv)

    # -- CUDA: the flash op wants equal head counts and no explicit mask ---------------------
    @staticmethod
    def _expand_kv(q, k):
        groups = q.shape[2] // k.shape[2]
        return k if groups == 1 else k.repeat_interleave(groups, dim=2)

    def _cuda_forward(self, q, k, v, scale, mask):
        if mask.mask is not None:
            raise ValueError(
                "the CUDA torch backend takes no explicit mask; use --attention-backend reference"
            )
        res = _aten._scaled_dot_product_flash_attention(
            _bnsd(q),
            _bnsd(self._expand_kv(q, k)),
            _bnsd(self._expand_kv(q, v)),
            0.0,
            mask.causal,
            False,
            scale=scale,
        )
        return res[0], res[1]

    def _cuda_backward(self, dout, q, k, v, out, lse, scale, mask):
        kx, vx = self._expand_kv(q, k), self._expand_kv(q, v)
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            _bnsd(dout).contiguous(),
            _bnsd(q),
            _bnsd(kx),
            _bnsd(vx),
            _bnsd(out).contiguous(),
            lse.float(),
            empty,
            empty,
            q.shape[0],
            k.shape[0],
            0.0,
            mask.causal,
            empty,
            empty,
            scale=scale,
        )
        dk, dv = _sbnd(dk), _sbnd(dv)
        groups = q.shape[2] // k.shape[2]
        if groups > 1:  # sum the gradients of the expanded copies back onto each K/V head
            dk = dk.unflatten(2, (k.shape[2], groups)).sum(3)
            dv = dv.unflatten(2, (k.shape[2], groups)).sum(3)
        return _sbnd(dq), dk, dv
