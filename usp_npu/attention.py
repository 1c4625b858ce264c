"""Public entry points: ``context_parallel_attention`` and the ``USPAttention`` module.

Everything a rank can check on its own is checked here, before the first collective, so a bad
call fails with the same clear error on every rank instead of hanging one of them.
"""

from __future__ import annotations

import torch
from torch import nn

from usp_npu import ops
from usp_npu.algorithms.usp import usp_attention
from usp_npu.comm.stats import CommStats
from usp_npu.kernels import select_kernel
from usp_npu.layouts import check_layout, from_canonical, to_canonical
from usp_npu.packing import CuSeqlens, check_split, normalize_cu_seqlens
from usp_npu.parallel_state import ContextParallelMesh, get_mesh


def _check_inputs(q, k, v, layout: str, head_dim: int | None):
    check_layout(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if layout == "SBH" and head_dim is None:
        raise ValueError("layout SBH needs head_dim= (the hidden size holds N * head_dim)")
    qc, kc, vc = (to_canonical(t, layout, head_dim) for t in (q, k, v))
    if kc.shape != vc.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    (lq, bq, nq, dq), (lk, bk, nk, dk) = qc.shape, kc.shape
    if (lq, bq, dq) != (lk, bk, dk):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} ({layout}) disagree on the local sequence "
            "length, batch or head_dim"
        )
    if nq % nk:
        raise ValueError(f"{nq} query heads are not a multiple of {nk} key/value heads")
    return qc, kc, vc


def _check_against_mesh(qc, kc, mesh: ContextParallelMesh, attention_mask) -> None:
    cfg = mesh.config
    local, total = qc.shape[0], qc.shape[0] * mesh.cp_size
    problems = cfg.sequence_errors(total)
    if problems:
        raise ValueError(
            f"local sequence length {local} on {mesh.cp_size} CP ranks means --seq-length {total}, "
            f"which this split cannot hold: {problems[0]}. Split inputs with usp_npu.split_sequence."
        )
    problems = cfg.local_head_errors(qc.shape[2], kc.shape[2])
    if problems:
        raise ValueError(problems[0])
    if attention_mask is None:
        return
    if cfg.causal:
        raise ValueError(
            "attention_mask was given but --attention-mask-type is causal (the mask would be "
            "ignored); use --attention-mask-type general for an explicit mask"
        )
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (total, total):
        raise ValueError(
            f"attention_mask must be a bool [S, S] = [{total}, {total}] full-sequence mask "
            f"(True = masked); got {attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != qc.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, q on {qc.device}")


def _check_packed(
    qc, mesh: ContextParallelMesh, cu_seqlens, attention_mask, layout: str
) -> tuple[int, ...] | None:
    """Validated ``cu_seqlens`` as a tuple of ints, or None (a TND tensor without it is one sequence)."""
    if cu_seqlens is None:
        return None
    if attention_mask is not None:
        raise ValueError(
            "cu_seqlens and attention_mask were both given: pass one of them (cu_seqlens "
            "already restricts attention to each document; drop attention_mask)"
        )
    if qc.shape[1] != 1:
        raise ValueError(
            f"cu_seqlens needs batch 1 (one packed sequence), got batch {qc.shape[1]} in layout "
            f"{layout}: pack the batch into one sequence, or use layout='TND'"
        )
    cfg = mesh.config
    cu = normalize_cu_seqlens(cu_seqlens, qc.shape[0] * mesh.cp_size)
    check_split(cu, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
    return cu


def _check_token_order(token_order, qc, mesh: ContextParallelMesh) -> None:
    if token_order is None:
        return
    n = qc.shape[0] * mesh.ulysses_size
    if (
        not isinstance(token_order, torch.Tensor)
        or token_order.dtype != torch.int64
        or tuple(token_order.shape) != (n,)
    ):
        raise ValueError(
            f"token_order must be an int64 tensor of shape [{n}] (local length x Ulysses degree "
            f"{mesh.ulysses_size}); got {getattr(token_order, 'dtype', type(token_order))} "
            f"{tuple(getattr(token_order, 'shape', ()))}"
        )
    if token_order.device != qc.device:
        raise ValueError(f"token_order is on {token_order.device}, q on {qc.device}")
    if not torch.equal(token_order.sort().values, torch.arange(n, device=qc.device)):
        raise ValueError(f"token_order must be a permutation of 0..{n - 1}")


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: str = "BSND",
    softmax_scale: float | None = None,
    head_dim: int | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: CuSeqlens | None = None,
    *,
    dropout_p: float = 0.0,
    mesh: ContextParallelMesh | None = None,
    comm_stats: CommStats | None = None,
    layer_number: int | None = None,
    token_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the whole CP group's sequence, from and to this rank's shards.

    Args:
        q: local queries in ``layout``: ``BSND`` ``[B, L, Nq, D]``, ``BNSD`` ``[B, Nq, L, D]``,
            ``SBH`` ``[L, B, Nq * D]`` (``head_dim`` required) or ``TND`` ``[L, Nq, D]`` (one
            packed sequence), L = this rank's tokens as laid out by
            :func:`usp_npu.split_sequence`; Nq = this tensor-parallel rank's heads.
        k, v: local keys/values, same layout, ``Nkv`` heads (``Nq % Nkv == 0``: GQA/MQA).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        attention_mask: general mask type only: bool ``[S, S]`` over the full sequence,
            True = masked (torch_npu convention). Causal comes from the config.
        cu_seqlens: packed sequences: cumulative document lengths of the FULL sequence (leading
            0, last = S, strictly increasing; list of ints or 1-D integer tensor), the same on
            every rank; attention stays inside each document (causal inside it for the causal
            mask type, full for general). Batch must be 1 (or layout ``TND``); the shards must
            come from ``split_sequence(x, seq_dim, cu_seqlens)``, or from another split that
            ``token_order`` maps onto it. See ``docs/packed.md``.
        dropout_p: attention dropout; needs the npu backend, whose blocks replay their dropout
            mask (seed, offset) in the backward.
        mesh: defaults to the mesh of :func:`usp_npu.initialize_context_parallel`.
        comm_stats: if given, bytes sent are counted into it.
        layer_number: this layer's number (1-based, as Megatron counts) for
            ``--context-parallel-cache-interval`` n: the KV cache policy applies when n is 0 or
            ``layer_number % (n + 1) == 1``; ``None`` = as if the layer qualifies.
        token_order: for inputs split another way than :func:`usp_npu.split_sequence` that
            still gives every Ulysses group the same tokens (Megatron's own zigzag split, see
            :mod:`usp_npu.integrations.megatron`): int64 ``[L * u]``, the permutation that puts
            the tokens gathered by the Ulysses all-to-all (group order) into ``split_sequence``'s
            order. The output comes back in the caller's order. With ``cu_seqlens`` the target
            order is ``split_sequence``'s packed split (Megatron's THD split qualifies:
            :func:`usp_npu.token_order.token_order_for` with ``cu_seqlens=``).

    Returns:
        The local output, same layout and shape as ``q``. Differentiable w.r.t. q, k, v.
    """
    qc, kc, vc = _check_inputs(q, k, v, layout, head_dim)
    mesh = mesh or get_mesh()
    cu = _check_packed(qc, mesh, cu_seqlens, attention_mask, layout)
    _check_against_mesh(qc, kc, mesh, attention_mask)
    _check_token_order(token_order, qc, mesh)
    cfg = mesh.config
    scale = qc.shape[3] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    kernel = select_kernel(
        cfg.attention_backend,
        q.device,
        q.dtype,
        attention_mask is not None,
        npu_layout="BNSD" if cfg.megatron_cp_in_bnsd else "SBH",
        dropout_p=dropout_p,
    )
    merge = ops.resolve_ring_update(cfg.use_fused_ring_attention_update, q.device)
    out = usp_attention(
        qc,
        kc,
        vc,
        mesh=mesh,
        kernel=kernel,
        scale=scale,
        merge=merge,
        mask=attention_mask,
        stats=comm_stats,
        kv_cache=cfg.kv_cache_policy(layer_number),
        cu_seqlens=cu,
        token_order=token_order,
    )
    return from_canonical(out, layout)


class USPAttention(nn.Module):
    """Context-parallel core attention as a module (no parameters).

    ``forward(q, k, v, attention_mask=None, cu_seqlens=None)`` takes and returns local shards in
    ``layout``; see :func:`context_parallel_attention` (``cu_seqlens``: packed sequences).
    ``mesh=None`` uses the current mesh at call time. ``layer_number`` (1-based) decides whether
    the KV cache policy applies to this layer (``--context-parallel-cache-interval``); ``None`` =
    it does.
    """

    def __init__(
        self,
        layout: str = "BSND",
        softmax_scale: float | None = None,
        head_dim: int | None = None,
        mesh: ContextParallelMesh | None = None,
        dropout_p: float = 0.0,
        layer_number: int | None = None,
    ):
        super().__init__()
        check_layout(layout)
        if layout == "SBH" and head_dim is None:
            raise ValueError("USPAttention(layout='SBH') needs head_dim=")
        self.layout, self.softmax_scale, self.head_dim = layout, softmax_scale, head_dim
        self.mesh, self.dropout_p, self.layer_number = mesh, dropout_p, layer_number
        self.comm_stats: CommStats | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: CuSeqlens | None = None,
    ) -> torch.Tensor:
        return context_parallel_attention(
            q, k, v, self.layout, self.softmax_scale, self.head_dim, attention_mask, cu_seqlens,
            dropout_p=self.dropout_p if self.training else 0.0,
            mesh=self.mesh, comm_stats=self.comm_stats, layer_number=self.layer_number,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"layout={self.layout}, softmax_scale={self.softmax_scale}, head_dim={self.head_dim}"
