"""``USPCoreAttention``: USP as megatron-core's core attention (the layer spec's slot).

Megatron builds it with the keywords ``config, layer_number, attn_mask_type, attention_type,
cp_comm_type, softmax_scale, pg_collection`` (0.14 passes ``model_comm_pgs`` instead of
``pg_collection``; some callers add ``attention_dropout``) and calls
``forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
packed_seq_params=None)`` with q ``[s, b, np, hn]``, k/v ``[s, b, ng, hn]`` (this TP rank's heads,
RoPE applied), expecting ``[s, b, np * hn]``.

Megatron splits the batch for CP itself, with the same zigzag for every algorithm (CP rank ``c``
holds chunks ``c`` and ``2 cp - 1 - c`` of ``2 cp``), and slices the RoPE table the same way inside
the model. That is the ring's own split; for Ulysses and hybrid the module passes the
``token_order`` that puts the tokens gathered by the Ulysses all-to-all into usp_npu's order
(:mod:`usp_npu.token_order`), so Megatron's batch and RoPE are used unchanged.

THD packed sequences (``packed_seq_params``, qkv_format ``'thd'``, q ``[t, np, hn]``): Megatron
splits every (padded) document the same way (``get_thd_batch_on_this_cp_rank``) and applies RoPE
per document on that split; the module runs usp_npu's packed path with the padded documents as
``cu_seqlens`` and the per-document ``token_order`` (:mod:`usp_npu.integrations.megatron.thd`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from usp_npu.attention import context_parallel_attention
from usp_npu.integrations.megatron.mesh import check_megatron_mesh
from usp_npu.integrations.megatron.thd import thd_cu_seqlens
from usp_npu.parallel_state import get_mesh
from usp_npu.token_order import token_order_for, zigzag_positions

#: token orders a module keeps (one per sequence length / THD document layout)
_MAX_ORDERS = 16


def _is_causal(mask_type) -> bool:
    return mask_type in (AttnMaskType.causal, "causal")


class USPCoreAttention(MegatronModule):
    """Context-parallel core attention for a Megatron-core layer spec (no parameters).

    Runs the algorithm of the current usp_npu mesh (``usp_npu.initialize_context_parallel(cfg,
    tensor_model_parallel_size=tp)`` after Megatron's ``initialize_model_parallel``; ``cfg`` from
    the flags of :func:`usp_npu.add_context_parallel_args`, usable as Megatron's
    ``extra_args_provider``). Construction raises ValueError when the two meshes disagree or the
    layer asks for something this module cannot honour exactly (a mask type other than causal,
    a sliding window, a non-vanilla softmax). ``cp_comm_type`` is ignored: the algorithm comes
    from ``--context-parallel-algo``.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=AttnMaskType.causal,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        model_comm_pgs=None,
        **_unused,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        pgs = pg_collection if pg_collection is not None else model_comm_pgs
        self.mesh = get_mesh()
        check_megatron_mesh(self.mesh, pgs, config.context_parallel_size)
        if not _is_causal(attn_mask_type) or not self.mesh.config.causal:
            raise ValueError(
                f"USPCoreAttention supports causal self-attention with --attention-mask-type "
                f"causal; this layer asks for {attn_mask_type} with --attention-mask-type "
                f"{self.mesh.config.attention_mask_type}"
            )
        if getattr(config, "window_size", None) is not None:
            raise ValueError(
                f"window_size={config.window_size} (sliding window attention) is not supported "
                "by USPCoreAttention"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"softmax_type={config.softmax_type!r} is not supported by USPCoreAttention "
                "(vanilla softmax only)"
            )
        self._orders: dict[tuple, torch.Tensor | None] = {}

    def _token_order(
        self, seq_length: int, cu: tuple[int, ...] | None, device: torch.device
    ) -> torch.Tensor | None:
        key = (seq_length, cu, device)
        if key not in self._orders:
            if len(self._orders) >= _MAX_ORDERS:  # THD batches bring new documents each step
                self._orders.clear()
            self._orders[key] = token_order_for(
                zigzag_positions, seq_length, self.mesh, device, cu_seqlens=cu
            )
        return self._orders[key]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """q ``[s, b, np, hn]``, k/v ``[s, b, ng, hn]`` in Megatron's CP split -> ``[s, b, np*hn]``.

        THD (``packed_seq_params`` with qkv_format ``'thd'``): q ``[t, np, hn]``, k/v
        ``[t, ng, hn]`` (or with a batch dimension of 1 after ``t``) in Megatron's THD split ->
        ``[t, np*hn]``. ``attention_mask`` (Megatron's causal mask, full or CP-split) is ignored:
        causality is the attention's own; any other mask type or ``attention_bias`` raises, and
        so do ``packed_seq_params`` this module cannot honour exactly (see
        :func:`usp_npu.integrations.megatron.thd.thd_cu_seqlens`).
        """
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if not _is_causal(mask_type):
            raise ValueError(f"USPCoreAttention got attn_mask_type {mask_type}; only causal")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by USPCoreAttention")
        if self.mesh is not get_mesh():
            check_megatron_mesh(get_mesh(), None, self.config.context_parallel_size)
            self.mesh, self._orders = get_mesh(), {}
        hn, cp = query.shape[-1], self.mesh.cp_size
        if packed_seq_params is None:
            s, b = query.shape[:2]
            q, k, v = (x.reshape(s, b, -1) for x in (query, key, value))
            layout, cu = "SBH", None
        else:
            q, k, v = (
                _thd(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value"))
            )
            layout, cu = "TND", thd_cu_seqlens(packed_seq_params, q.shape[0] * cp, self.mesh)
        out = context_parallel_attention(
            q,
            k,
            v,
            layout=layout,
            softmax_scale=self.softmax_scale,
            head_dim=hn,
            cu_seqlens=cu,
            dropout_p=self.dropout_p if self.training else 0.0,
            mesh=self.mesh,
            layer_number=self.layer_number,  # --context-parallel-cache-interval
            token_order=self._token_order(q.shape[0] * cp, cu, q.device),
        )
        return out if cu is None else out.flatten(1)


def _thd(x: torch.Tensor, name: str) -> torch.Tensor:
    """A THD tensor as ``[t, heads, hn]`` (Megatron squeezes the batch of 1 away, or keeps it)."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x.squeeze(1)
    if x.dim() != 3:
        raise ValueError(
            f"packed_seq_params (THD) expects {name} [t, heads, head_dim] (or [t, 1, heads, "
            f"head_dim]), got shape {tuple(x.shape)}"
        )
    return x


def patch_spec(spec):
    """Make ``spec``'s self-attention use :class:`USPCoreAttention`; returns ``spec`` (in place).

    ``spec``: a transformer-layer ``ModuleSpec`` (``get_gpt_layer_local_spec()``,
    ``get_gpt_layer_with_transformer_engine_spec()``) or a block spec with ``layer_specs``
    (``get_gpt_decoder_block_spec``); every layer is patched.
    """
    layers = getattr(spec, "layer_specs", None)
    for layer in layers if layers is not None else [spec]:
        attention = getattr(getattr(layer, "submodules", None), "self_attention", None)
        inner = getattr(attention, "submodules", None)
        if inner is None or not hasattr(inner, "core_attention"):
            raise ValueError(
                f"patch_spec expects a Megatron transformer-layer spec whose "
                f"submodules.self_attention.submodules has core_attention; got {type(layer)}"
            )
        inner.core_attention = USPCoreAttention
    return spec
