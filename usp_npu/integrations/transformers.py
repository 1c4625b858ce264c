"""Hugging Face transformers: USP as an attention implementation, the batch split and the loss.

Three pieces, used together (see docs/integration_transformers.md)::

    usp_npu.initialize_context_parallel(cfg)              # after init_process_group
    register()                                            # attn_implementation="usp_npu"
    local = shard_batch(batch)                            # this rank's tokens, labels shifted first
    out = model(**local)                                  # attention runs over the whole CP group
    loss = reduce_loss(out.loss, local["shift_labels"])   # token-weighted over the CP group
    loss.backward(); then sum the gradients over the CP group

transformers (5.x) calls the registered function as ``fn(module, query, key, value,
attention_mask, dropout=, scaling=, **kwargs)`` with q ``[b, n_q, s, d]``, k/v ``[b, n_kv, s, d]``
(K/V heads not repeated) and expects ``([b, s, n_q, d], None)``. It builds no attention mask for a
custom name unless a mask function is registered too: :func:`register` registers one that hands a
padding mask on to the attention, which refuses it (a padding mask cannot be honoured exactly).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
import torch.distributed as dist

from usp_npu.attention import context_parallel_attention
from usp_npu.parallel_state import ContextParallelMesh, get_mesh
from usp_npu.sharding import split_sequence, token_indices

IGNORE_INDEX = -100
_PACKED_PENDING = (
    "packed sequences (several documents in one row: position_ids restarting at 0, or "
    "cu_seq_lens_q/k from DataCollatorWithFlattening) are not supported by the usp_npu "
    "transformers integration yet: they need the packed-sequence split (cu_seqlens) of "
    "usp_npu's packed-sequence issue, which has not landed; pack fewer documents per row or "
    "pad each document to its own row"
)
_SPLIT_KEYS = ("input_ids", "position_ids", "shift_labels", "labels", "attention_mask")


# -- the attention implementation ----------------------------------------------------------
def register(name: str = "usp_npu") -> str:
    """Register USP with transformers' ``AttentionInterface`` (and its mask hook) under ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)``, ``from_config(config,
    attn_implementation=name)`` or ``model.set_attn_implementation(name)`` runs every attention
    layer that uses the interface with the mesh of :func:`usp_npu.initialize_context_parallel`
    (looked up at call time). Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, usp_attention_forward)
    AttentionMaskInterface.register(name, _padding_mask_passthrough)
    return name


def _padding_mask_passthrough(*, attention_mask=None, **_) -> torch.Tensor | None:
    """Mask hook: no mask for a batch without padding; a padding mask goes on to the attention.

    The causal pattern (and the packed-sequence pattern transformers would infer from the zigzag
    position ids of a shard) is the attention's own business, so ``mask_function`` is ignored.
    The refusal happens in :func:`usp_attention_forward`, after the CP group agreed on it.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def _local_problem(module, attention_mask, mesh, sliding_window, softcap, kwargs):
    """Why this call cannot be honoured exactly, from what this rank sees (None when it can)."""
    if attention_mask is not None:
        return (
            "an attention mask reached the usp_npu attention (a padding mask or a custom 4-D "
            f"mask of shape {tuple(attention_mask.shape)}); it cannot be honoured exactly under "
            "context parallelism: drop padding (shard_batch(pad=True) pads at the end, where a "
            "causal model needs no mask) or remove the mask"
        )
    if sliding_window is not None:
        return f"sliding_window={sliding_window} is not supported by usp_npu attention"
    if softcap is not None:
        return f"softcap={softcap} (logit soft-capping) is not supported by usp_npu attention"
    if kwargs.get("s_aux") is not None:
        return "s_aux (attention sinks) is not supported by usp_npu attention"
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k")):
        return _PACKED_PENDING
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    if causal != mesh.config.causal:
        return (
            f"the model's attention is {'causal' if causal else 'bidirectional'} but "
            f"--attention-mask-type is {mesh.config.attention_mask_type}: make them agree"
        )
    return None


def _position_problem(position_ids, local_len: int, mesh: ContextParallelMesh) -> str | None:
    """Position ids must be this rank's split of 0..S-1 (RoPE would be silently wrong otherwise)."""
    if position_ids is None:
        return None
    cfg = mesh.config
    total = local_len * mesh.cp_size
    want = token_indices(total, mesh.cp_rank, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] == local_len and bool((pos.cpu() == want).all()):
        return None
    return (
        f"position_ids on CP rank {mesh.cp_rank} are not this rank's share of 0..{total - 1} as "
        "split by usp_npu.split_sequence: split the batch with "
        "usp_npu.integrations.transformers.shard_batch (RoPE would be wrong otherwise), or "
        + _PACKED_PENDING
    )


class _Verdicts:
    """The CP group's last agreed verdict, keyed by the (position_ids, attention_mask) objects.

    Every layer of one forward sees the same two tensors, so the group agrees once per forward.
    All ranks run the same program, so all of them hit or miss this cache together.
    """

    def __init__(self):
        self.key: tuple = ()

    def seen(self, position_ids, attention_mask, mesh) -> bool:
        refs = tuple(None if t is None else weakref.ref(t) for t in (position_ids, attention_mask))
        alive = tuple(None if r is None else r() for r in self.key[:2])
        if (
            self.key
            and self.key[2] is mesh
            and all(a is b for a, b in zip(alive, (position_ids, attention_mask), strict=True))
        ):
            return True
        self.key = (*refs, mesh)
        return False


_VERDICTS = _Verdicts()


def _agree(problem: str | None, mesh: ContextParallelMesh) -> None:
    """Raise on every rank of the CP group if any of them found a problem (one tiny all-reduce)."""
    if mesh.cp_size > 1:
        flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.cp_group)
        if flag.item() and problem is None:
            problem = "another rank of this CP group refused the batch (see its error)"
    if problem is not None:
        raise ValueError(problem)


def usp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function: local shards in, local shard out.

    ``query`` ``[b, n_q, L, d]``, ``key``/``value`` ``[b, n_kv, L, d]`` (BNSD, RoPE applied,
    L = this rank's tokens as split by :func:`shard_batch`); returns ``([b, L, n_q, d], None)``.
    Raises ValueError (on every rank of the CP group) for what it cannot honour exactly: an
    attention mask, ``sliding_window``, ``softcap``, ``s_aux``, packed sequences, a causality
    that disagrees with ``--attention-mask-type``, or position ids not split like the tokens.
    """
    mesh = get_mesh()
    problem = _local_problem(module, attention_mask, mesh, sliding_window, softcap, kwargs)
    position_ids = kwargs.get("position_ids")
    if not _VERDICTS.seen(position_ids, attention_mask, mesh):
        if problem is None:
            problem = _position_problem(position_ids, query.shape[2], mesh)
        _agree(problem, mesh)
    elif problem is not None:  # the group agreed on these tensors already: same verdict everywhere
        raise ValueError(problem)
    out = context_parallel_attention(
        query, key, value, layout="BNSD", softmax_scale=scaling, dropout_p=dropout, mesh=mesh
    )
    return out.transpose(1, 2), None


# -- the batch ---------------------------------------------------------------------------
def _split_multiple(mesh: ContextParallelMesh, seq_length: int) -> int:
    """The smallest length >= seq_length that this algorithm's split can hold."""
    cfg = mesh.config
    n = seq_length
    while cfg.sequence_errors(n):
        n += 1
    return n


def _is_packed(position_ids: torch.Tensor) -> bool:
    return not bool((position_ids == torch.arange(position_ids.shape[-1])).all())


def shard_batch(
    batch: Mapping[str, torch.Tensor],
    mesh: ContextParallelMesh | None = None,
    *,
    pad: bool = False,
    pad_token_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """This rank's share of a full causal-LM batch (the same full batch on every CP rank).

    ``batch``: ``input_ids`` ``[b, S]`` and optionally ``labels`` ``[b, S]`` (unshifted, as
    transformers takes them; default: ``input_ids``) or ``shift_labels`` (already shifted),
    ``position_ids`` ``[b or 1, S]`` (default ``0..S-1``) and ``attention_mask`` (all ones only:
    a padding mask cannot be honoured). Other entries pass through unchanged unless they look
    like per-token tensors (``[b, S, ...]``), which are refused.

    Labels are shifted on the FULL sequence first (``shift_labels[:, i] = labels[:, i + 1]``,
    ``ignore_index`` at the end), so the target of each shard's last token is kept. Then
    ``input_ids``, ``position_ids`` and ``shift_labels`` are split with
    :func:`usp_npu.split_sequence`; ``labels`` is set to the local ``shift_labels`` only so that
    the model computes its loss (transformers uses ``shift_labels`` when given). ``pad=True``
    pads the sequence at the end to the next length the split can hold (``pad_token_id``,
    labels ``ignore_index``, positions continuing): exact for a causal model, since no real
    token attends to a later one.

    Returns a dict with ``input_ids``, ``position_ids``, ``shift_labels``, ``labels``, ``[b, L]``.
    """
    mesh = mesh or get_mesh()
    batch = dict(batch)
    if "input_ids" not in batch:
        raise ValueError("shard_batch needs input_ids [batch, seq]")
    ids = batch.pop("input_ids")
    b, seq = ids.shape
    mask = batch.pop("attention_mask", None)
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "attention_mask marks padding: usp_npu attention cannot honour a padding mask exactly "
            "under context parallelism; put one sequence per row without padding or use "
            "shard_batch(pad=True) (pads at the end, where a causal model needs no mask)"
        )
    if any(batch.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k")):
        raise ValueError(_PACKED_PENDING)
    position_ids = batch.pop("position_ids", None)
    if position_ids is None:
        position_ids = torch.arange(seq, device=ids.device).expand(b, seq)
    elif _is_packed(position_ids.cpu()):
        raise ValueError(_PACKED_PENDING)
    shift_labels = batch.pop("shift_labels", None)
    labels = batch.pop("labels", None)
    if shift_labels is None:
        labels = ids if labels is None else labels
        shift_labels = torch.full_like(labels, ignore_index)
        shift_labels[:, :-1] = labels[:, 1:]
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (b, seq):
            raise ValueError(
                f"shard_batch does not know how to split the per-token entry {name!r}; split it "
                "with usp_npu.split_sequence(x, seq_dim=1) yourself or drop it"
            )

    total = _split_multiple(mesh, seq) if pad else seq
    if total != seq:
        if not mesh.config.causal:
            raise ValueError(
                "shard_batch(pad=True) needs --attention-mask-type causal: with a general mask "
                "real tokens would attend to the padding"
            )
        extra = total - seq

        def grow(x, value):
            return torch.cat([x, x.new_full((x.shape[0], extra), value)], dim=1)

        ids, shift_labels = grow(ids, pad_token_id), grow(shift_labels, ignore_index)
        tail = torch.arange(seq, total, device=ids.device).expand(position_ids.shape[0], extra)
        position_ids = torch.cat([position_ids, tail], dim=1)
    problems = mesh.config.sequence_errors(total)
    if problems:
        raise ValueError(f"{problems[0]}; or call shard_batch(..., pad=True)")
    local = {
        "input_ids": split_sequence(ids, 1, mesh=mesh),
        "position_ids": split_sequence(position_ids, 1, mesh=mesh),
        "shift_labels": split_sequence(shift_labels, 1, mesh=mesh),
    }
    local["labels"] = local["shift_labels"]
    return {**batch, **local}


# -- the loss ------------------------------------------------------------------------------
class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: every rank holds the group's loss, and
    each rank's backward carries only the gradient of its own tokens' share (the attention's
    backward already routes the cross-rank pieces)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def reduce_loss(
    loss: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    mesh: ContextParallelMesh | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The CP group's token-weighted loss from this rank's loss, differentiable.

    ``loss`` is what the model returned for this rank's shard with labels ``shift_labels``:

    - ``num_items_in_batch=None``: the mean over this rank's valid labels (NaN on a rank whose
      labels are all ``ignore_index``). Returns the mean over every valid label of the CP group,
      exact for ranks holding different numbers of them; a rank with none contributes 0.
    - ``num_items_in_batch=N`` (passed to the model too): the sum over this rank's labels / N, with
      N the valid labels of the FULL batch(es), e.g. every micro-batch of a gradient-accumulation
      step counted before :func:`shard_batch`. Returns the sum over the CP group (= the sum of the
      full batch's losses / N); raises ValueError on every rank if N differs between ranks or is
      smaller than this batch's valid labels (counted per shard by mistake).

    Backward: each rank gets the gradient of its own share; sum the parameter gradients over the
    CP group afterwards (``all_reduce`` on ``mesh.cp_group``), as data parallelism does across
    replicas. The result's value is identical on every rank of the group.
    """
    mesh = mesh or get_mesh()
    group = mesh.cp_group
    count = (shift_labels != ignore_index).sum().to(torch.float64).reshape(1)
    if num_items_in_batch is None:
        stats = count.clone()
        if mesh.cp_size > 1:
            dist.all_reduce(stats, group=group)
        local_sum = torch.where(count[0] > 0, loss * count[0].to(loss.dtype), loss.new_zeros(()))
        total = local_sum if mesh.cp_size == 1 else _SumOverGroup.apply(local_sum, group)
        return total / stats[0].clamp_min(1).to(loss.dtype)
    n = torch.as_tensor(num_items_in_batch, dtype=torch.float64).reshape(1).cpu()
    spread = torch.cat([n, -n])  # max and -min of N over the group
    if mesh.cp_size > 1:
        dist.all_reduce(count, group=group)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=group)
    high, low, held = spread[0].item(), -spread[1].item(), count.item()
    if high != low:
        raise ValueError(
            f"num_items_in_batch differs between the ranks of the CP group ({low:.0f}..{high:.0f}):"
            " count the valid labels of the full batch(es), before shard_batch"
        )
    if high < held:
        raise ValueError(
            f"num_items_in_batch={high:.0f} is below the {held:.0f} valid labels this CP group "
            "holds: count the valid labels of the full batch(es), not of a shard"
        )
    return loss if mesh.cp_size == 1 else _SumOverGroup.apply(loss, group)
