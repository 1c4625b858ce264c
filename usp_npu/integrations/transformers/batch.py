"""``shard_batch``: this rank's share of a full causal-LM batch, packed or not."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from usp_npu.packing import (
    check_split,
    cu_seqlens_from_position_ids,
    normalize_cu_seqlens,
    pad_packed,
    positions_from_cu_seqlens,
    split_multiple,
)
from usp_npu.parallel_state import ContextParallelMesh, get_mesh
from usp_npu.sharding import split_sequence

IGNORE_INDEX = -100


def _padded_length(mesh: ContextParallelMesh, seq_length: int) -> int:
    """The smallest length >= seq_length that this algorithm's (unpacked) split can hold."""
    n = seq_length
    while mesh.config.sequence_errors(n):
        n += 1
    return n


def _document_bounds(batch: dict, position_ids, rows: int, seq: int) -> tuple[int, ...] | None:
    """The packed documents' ``cu_seqlens`` (leading 0, last = S), or None for one per row.

    From ``cu_seq_lens_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) or
    from ``position_ids`` restarting at 0; pops the flash-attention keys from ``batch``.
    """
    cu_q, cu_k = batch.pop("cu_seq_lens_q", None), batch.pop("cu_seq_lens_k", None)
    batch.pop("max_length_q", None)
    batch.pop("max_length_k", None)
    arange = torch.arange(seq)
    packed = position_ids is not None and not bool((position_ids.cpu() == arange).all())
    if cu_q is None and cu_k is None and not packed:
        return None
    if cu_q is not None and cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ; self-attention needs one set")
    if rows != 1:
        raise ValueError(
            f"a packed batch must be one row [1, S] (as DataCollatorWithFlattening makes it); "
            f"got {rows} rows"
        )
    given = cu_q if cu_q is not None else cu_k
    if given is None:
        given = cu_seqlens_from_position_ids(position_ids)
    cu = normalize_cu_seqlens(given.cpu(), seq)
    if position_ids is not None and not torch.equal(
        position_ids.reshape(-1).cpu(), positions_from_cu_seqlens(cu)
    ):
        raise ValueError("position_ids do not restart at 0 where cu_seq_lens_q says documents do")
    return cu


def _shift(batch: dict, ids: torch.Tensor, ignore_index: int) -> torch.Tensor:
    shift_labels = batch.pop("shift_labels", None)
    labels = batch.pop("labels", None)
    if shift_labels is None:
        labels = ids if labels is None else labels
        shift_labels = torch.full_like(labels, ignore_index)
        shift_labels[:, :-1] = labels[:, 1:]
    return shift_labels


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

    Packed rows (several documents in one row ``[1, S]``: ``position_ids`` restarting at 0, or
    ``cu_seq_lens_q/k`` from ``DataCollatorWithFlattening``) are split with the packed split
    (:func:`usp_npu.split_sequence` with ``cu_seqlens``), and the result carries
    ``cu_seq_lens_q``/``cu_seq_lens_k``: the FULL sequence's document bounds, which the usp_npu
    attention needs to keep attention inside each document.

    Labels are shifted on the FULL sequence first (``shift_labels[:, i] = labels[:, i + 1]``,
    ``ignore_index`` at the end of the row and of every document), so the target of each shard's
    last token is kept and no token learns the next document's first. Then ``input_ids``,
    ``position_ids`` and ``shift_labels`` are split; ``labels`` is set to the local
    ``shift_labels`` only so that the model computes its loss (transformers uses
    ``shift_labels`` when given). ``pad=True`` pads to what the split can hold (``pad_token_id``,
    labels ``ignore_index``): at the end of the row, positions continuing, or for packed rows at
    the end of each document (:func:`usp_npu.pad_packed`); exact for a causal model, since no
    real token attends to a later one.

    Returns a dict with ``input_ids``, ``position_ids``, ``shift_labels``, ``labels`` ``[b, L]``
    (and ``cu_seq_lens_q/k`` when packed).
    """
    mesh = mesh or get_mesh()
    cfg = mesh.config
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
    position_ids = batch.pop("position_ids", None)
    cu = _document_bounds(batch, position_ids, b, seq)
    if position_ids is None:
        position_ids = torch.arange(seq, device=ids.device).expand(b, seq)
    shift_labels = _shift(batch, ids, ignore_index)
    if cu is not None:  # a document's last token has no target in the next document
        shift_labels[:, [end - 1 for end in cu[1:]]] = ignore_index
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (b, seq):
            raise ValueError(
                f"shard_batch does not know how to split the per-token entry {name!r}; split it "
                "with usp_npu.split_sequence(x, seq_dim=1) yourself or drop it"
            )

    if pad and cu is not None:
        u, r = cfg.ulysses_degree, cfg.ring_degree
        padded_cu, index = pad_packed(
            cu, split_multiple(u, r, cfg.causal), per_document=cfg.causal and r > 1
        )
        keep, src = (index >= 0).to(ids.device), index.clamp(min=0).to(ids.device)
        ids = torch.where(keep, ids[:, src], pad_token_id)
        shift_labels = torch.where(keep, shift_labels[:, src], ignore_index)
        cu = tuple(padded_cu.tolist())
        position_ids = positions_from_cu_seqlens(cu).to(ids.device)[None]
    elif pad and _padded_length(mesh, seq) != seq:
        if not cfg.causal:
            raise ValueError(
                "shard_batch(pad=True) needs --attention-mask-type causal: with a general mask "
                "real tokens would attend to the padding"
            )
        extra = _padded_length(mesh, seq) - seq

        def grow(x, value):
            return torch.cat([x, x.new_full((x.shape[0], extra), value)], dim=1)

        ids, shift_labels = grow(ids, pad_token_id), grow(shift_labels, ignore_index)
        tail = torch.arange(seq, seq + extra, device=ids.device).expand(position_ids.shape[0], -1)
        position_ids = torch.cat([position_ids, tail], dim=1)

    if cu is None:
        problems = cfg.sequence_errors(ids.shape[1])
        if problems:
            raise ValueError(f"{problems[0]}; or call shard_batch(..., pad=True)")
    else:
        try:
            check_split(cu, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
        except ValueError as e:
            raise ValueError(f"{e}; or call shard_batch(..., pad=True)") from None
    local = {
        name: split_sequence(x, 1, cu_seqlens=cu, mesh=mesh)
        for name, x in (
            ("input_ids", ids),
            ("position_ids", position_ids),
            ("shift_labels", shift_labels),
        )
    }
    local["labels"] = local["shift_labels"]
    if cu is not None:
        local["cu_seq_lens_q"] = local["cu_seq_lens_k"] = torch.tensor(cu, dtype=torch.int32)
    return {**batch, **local}
