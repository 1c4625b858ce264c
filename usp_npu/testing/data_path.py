"""One layer's data-path costs on this rank: bytes copied (forward, backward) and bytes saved.

Used by the tests (which assert the numbers) and by ``benchmarks/bench_copies.py`` (the table).
Inputs are made and sharded outside the measured region; only ``context_parallel_attention``
and its backward are measured.
"""

from __future__ import annotations

import torch

from usp_npu.attention import context_parallel_attention
from usp_npu.layouts import from_canonical
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.sharding import split_sequence
from usp_npu.testing.cases import DTYPES, AttentionCase, full_inputs
from usp_npu.testing.copy_counter import CopyCounter
from usp_npu.testing.saved_tensors import SavedTensorBytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_data_path(case: AttentionCase) -> dict:
    """Run ``case`` forward + backward once on this rank and report, per rank:

    ``forward``/``backward``: ``{category: bytes}`` written by copy/fill ops (``CopyCounter``);
    ``events``: every counted op; ``saved``: bytes autograd holds for the backward;
    ``q``, ``k``, ``v``, ``out``: bytes of this rank's shards.
    """
    mesh = initialize_context_parallel(case.config(), tensor_model_parallel_size=case.tp)
    q, k, v, dout, mask = full_inputs(case)
    dtype = DTYPES[case.dtype]

    def local(x):
        return from_canonical(split_sequence(x, 0, mesh=mesh).to(dtype), case.layout).detach()

    ql, kl, vl = (local(x).requires_grad_() for x in (q, k, v))
    dl = local(dout)
    counter, saved = CopyCounter(), SavedTensorBytes()
    with counter.phase("forward"), saved.recording():
        out = context_parallel_attention(
            ql, kl, vl, case.layout, head_dim=case.head_dim, attention_mask=mask, mesh=mesh
        )
    with counter.phase("backward"):
        out.backward(dl)
    return {
        "ring_rank": mesh.ring_rank,
        "forward": counter.by_op("forward"),
        "backward": counter.by_op("backward"),
        "events": counter.events,
        "saved": saved.bytes,
        "saved_tensors": saved.tensors,
        "q": _nbytes(ql),
        "k": _nbytes(kl),
        "v": _nbytes(vl),
        "out": _nbytes(out),
    }
