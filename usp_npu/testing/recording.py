"""A block kernel that records what the ring loop asks of it, for schedule tests."""

from __future__ import annotations

from usp_npu.kernels import ReferenceBlockKernel


class RecordingKernel(ReferenceBlockKernel):
    """The reference kernel, recording ``(phase, q rows, kv rows, causal)`` of every call."""

    def __init__(self):
        self.calls: list[tuple[str, int, int, bool]] = []

    def forward(self, q, k, v, *, scale, mask, **varlen):
        self.calls.append(("fwd", q.shape[0], k.shape[0], mask.causal))
        return super().forward(q, k, v, scale=scale, mask=mask, **varlen)

    def backward(self, dout, q, k, v, out, smax, ssum, *, scale, mask, rng_state=None, **varlen):
        self.calls.append(("bwd", q.shape[0], k.shape[0], mask.causal))
        return super().backward(dout, q, k, v, out, smax, ssum, scale=scale, mask=mask, **varlen)
