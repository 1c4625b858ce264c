"""Emulated ``npu_fusion_attention`` and ``npu_fusion_attention_grad`` (see the package docstring
for the layouts, masks and the choices where the emulation cannot copy the device)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

EMULATED_VERSION = "2.14.0-emulated"
_INT_MAX = 2147483647
_LANES = 8
_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
_COMPRESSED_MODES = (2, 3, 4, 6, 7, 8)
_COMPRESSED_SIZE = 2048
# documented device limits (torch_npu npu_fusion_attention constraints)
MAX_HEADS = 256  # Nq
MAX_HEAD_DIM = 768  # D
MAX_VARLEN_DOCUMENTS = 1024  # entries of actual_seq_qlen in the varlen (TND) case

# ----------------------------------------------------------------------------- dropout RNG

_rng = {"seed": None, "offset": 0}


def reset_dropout_state() -> None:
    """Restart the dropout offset counter (as ``torch.npu.manual_seed`` does on the device)."""
    _rng["seed"] = None
    _rng["offset"] = 0


def _next_rng(numels: int) -> tuple[int, int]:
    seed = torch.initial_seed()
    if _rng["seed"] != seed:
        _rng["seed"], _rng["offset"] = seed, 0
    offset = _rng["offset"]
    _rng["offset"] = offset + numels
    return seed, offset


def dropout_keep_mask(seed: int, offset: int, numels: int, keep_prob: float) -> torch.Tensor:
    """The flat bool keep mask (True = kept) of ``numels`` elements for ``(seed, offset)``.

    Deterministic: the same arguments give the same mask, in any process.
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(offset) * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mixed)
    return torch.rand(int(numels), generator=gen, dtype=torch.float64) < keep_prob


# ----------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class _Spec:
    """The validated arguments shared by the forward and the grad."""

    head_num: int
    layout: str
    atten_mask: torch.Tensor | None
    scale: float
    keep_prob: float
    pre: int
    nxt: int
    sparse_mode: int
    softmax_layout: str
    qlen: object
    kvlen: object
    varlen: bool


def _make_spec(query, key, value, head_num, layout, extra: dict, **kw) -> _Spec:
    """Check what the docs state (layout, head_num, keep_prob, sparse_mode, dtypes, shapes)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"input_layout must be one of {_LAYOUTS}, got {layout!r}")
    if isinstance(head_num, bool) or not isinstance(head_num, int) or head_num <= 0:
        raise ValueError(f"head_num must be a positive int, got {head_num!r}")
    if not 0.0 < kw["keep_prob"] <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {kw['keep_prob']}")
    mode = kw["sparse_mode"]
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 8:
        raise ValueError(f"sparse_mode must be an int in 0..8, got {mode!r}")
    if mode in (7, 8) and layout != "TND":
        raise ValueError(f"sparse_mode={mode} is only supported with input_layout='TND'")
    if mode in (5, 6, 7, 8) or extra.get("prefix") is not None:
        raise NotImplementedError(f"sparse_mode={mode} / prefix is not emulated")
    if extra.get("pse") is not None or extra.get("padding_mask") is not None:
        raise NotImplementedError("pse and padding_mask are not emulated")
    if kw["softmax_layout"] not in (("", "TND") if layout == "TND" else ("",)):
        raise ValueError(f"softmax_layout={kw['softmax_layout']!r} is invalid with {layout}")
    mask = kw["atten_mask"]
    if mask is not None and mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"atten_mask must be bool or uint8, got {mask.dtype}")
    if mask is not None and mode in _COMPRESSED_MODES:
        _check_compressed(mask, mode)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes differ: {tuple(key.shape)} vs {tuple(value.shape)}")
    return _Spec(head_num=head_num, layout=layout, varlen=layout == "TND", **kw)


def _to_c(x: torch.Tensor, layout: str, heads: int | None, d: int) -> torch.Tensor:
    """Canonical ``[B, N, S, D]`` view (TND: ``[1, N, T, D]``); ``heads`` None: from ``d``."""
    want = 3 if layout in ("BSH", "SBH", "TND") else 4
    if x.dim() != want:
        raise ValueError(f"{layout} tensors must be {want}-D, got shape {tuple(x.shape)}")
    if layout == "TND":
        return x.permute(1, 0, 2).unsqueeze(0)
    if layout in ("BSH", "SBH"):
        n = x.shape[2] // d if heads is None else heads
        if x.shape[2] != n * d:
            raise ValueError(f"hidden size {x.shape[2]} of a {layout} tensor is not heads * {d}")
        x = x.view(x.shape[0], x.shape[1], n, d)
        return x.permute(0, 2, 1, 3) if layout == "BSH" else x.permute(1, 2, 0, 3)
    return x.permute(0, 2, 1, 3) if layout == "BSND" else x


def _from_c(x: torch.Tensor, layout: str) -> torch.Tensor:
    n, d = x.shape[1], x.shape[3]
    if layout == "TND":
        return x[0].permute(1, 0, 2).contiguous()
    if layout in ("BSH", "BSND"):
        x = x.permute(0, 2, 1, 3)
    elif layout == "SBH":
        x = x.permute(2, 0, 1, 3)
    return x.reshape(*x.shape[:2], n * d) if layout in ("BSH", "SBH") else x.contiguous()


def _views(spec: _Spec, query, key, value):
    """(q, k, v) canonical, after the head_num / shape consistency checks."""
    n = spec.head_num
    if spec.layout in ("BSH", "SBH") and (query.dim() != 3 or query.shape[2] % n):
        raise ValueError(f"{spec.layout}: query hidden size {query.shape[-1]} % head_num={n} != 0")
    d = query.shape[2] // n if spec.layout in ("BSH", "SBH") else query.shape[-1]
    q = _to_c(query, spec.layout, n if spec.layout in ("BSH", "SBH") else None, d)
    k, v = _to_c(key, spec.layout, None, d), _to_c(value, spec.layout, None, d)
    if q.shape[1] != n:
        raise ValueError(f"head_num={n} but the {spec.layout} query has {q.shape[1]} heads")
    if n > MAX_HEADS or d > MAX_HEAD_DIM:
        raise ValueError(
            f"the device takes at most {MAX_HEADS} query heads and head dim {MAX_HEAD_DIM}; got "
            f"{n} heads of dim {d}"
        )
    if k.shape[0] != q.shape[0] or k.shape[3] != d:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on B/D")
    if n % k.shape[1]:
        raise ValueError(f"head_num={n} is not a multiple of the key/value heads {k.shape[1]}")
    return q, k, v


def _doc_bounds(cum: object, name: str, total: int) -> list[tuple[int, int]]:
    """[(start, end)] per document from cumulative lengths without a leading 0."""
    if cum is None:
        raise ValueError(f"input_layout='TND' needs {name} (cumulative lengths, no leading 0)")
    if isinstance(cum, torch.Tensor) or not isinstance(cum, Sequence):
        raise TypeError(f"{name} must be a list of python ints, got {type(cum).__name__}")
    bounds, prev, ended = [], 0, False
    for c in cum:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"{name} must hold python ints, got {c!r}")
        if ended or (c == 0 and prev > 0):  # trailing zeros: documents that do not take part
            if c != 0:
                raise ValueError(f"{name}: after a trailing 0 every entry must be 0: {list(cum)}")
            ended = True
        elif c < prev:
            raise ValueError(f"{name} must be non-decreasing: {list(cum)}")
        else:
            bounds.append((prev, c))
            prev = c
    if prev > total:
        raise ValueError(f"{name} ends at {prev} but the tensor has only {total} tokens")
    return bounds


def _docs(spec: _Spec, sq: int, sk: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Query/key row ranges of each attention problem (one unless TND)."""
    if not spec.varlen:
        return [((0, sq), (0, sk))]
    qb = _doc_bounds(spec.qlen, "actual_seq_qlen", sq)
    kb = _doc_bounds(spec.kvlen, "actual_seq_kvlen", sk)
    if len(qb) != len(kb) or len(spec.qlen) != len(spec.kvlen):
        raise ValueError("actual_seq_qlen and actual_seq_kvlen describe different documents")
    if len(spec.qlen) > MAX_VARLEN_DOCUMENTS:
        raise ValueError(
            f"actual_seq_qlen has {len(spec.qlen)} entries; the varlen case takes at most "
            f"{MAX_VARLEN_DOCUMENTS} (split the call)"
        )
    return list(zip(qb, kb, strict=True))


def _segments(bounds: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    end = bounds[-1][1] if bounds else 0
    return [*bounds, (end, total)] if end < total else list(bounds)


# ----------------------------------------------------------------------------- masks


@functools.cache
def _compressed_ref(dtype: torch.dtype) -> torch.Tensor:
    return torch.ones(_COMPRESSED_SIZE, _COMPRESSED_SIZE, dtype=torch.bool).triu(1).to(dtype)


def _check_compressed(mask: torch.Tensor, sparse_mode: int) -> None:
    n = _COMPRESSED_SIZE
    if tuple(mask.shape) != (n, n) or not torch.equal(mask.cpu(), _compressed_ref(mask.dtype)):
        raise ValueError(
            f"sparse_mode={sparse_mode} takes the compressed atten_mask: a 2048x2048 "
            f"torch.triu(ones, diagonal=1) bool tensor; got shape {tuple(mask.shape)} "
            "or other contents (pass sparse_mode=1 for an explicit mask)"
        )


def _band(sq: int, sk: int, pre: int, nxt: int, anchor: int) -> torch.Tensor:
    """True where key j lies outside ``-pre <= j - i - anchor <= nxt``."""
    rel = torch.arange(sk).view(1, sk) - torch.arange(sq).view(sq, 1) - anchor
    return (rel > nxt) | (rel < -pre)


def _user_mask(spec: _Spec, b: int, n: int, sq: int, sk: int) -> torch.Tensor:
    """The caller's mask as bool broadcastable to [b, n, sq, sk]."""
    m = spec.atten_mask.bool()
    if spec.varlen:  # one [maxSq, maxSkv] mask, cut per document
        if m.dim() != 2 or m.shape[0] < sq or m.shape[1] < sk:
            raise ValueError(f"TND atten_mask must be 2-D [maxSq, maxSkv], got {tuple(m.shape)}")
        return m[:sq, :sk]
    four = m.dim() == 4 and m.shape[0] in (1, b) and m.shape[1] in (1, n)
    if m.shape[-2:] != (sq, sk) or not (m.dim() == 2 or four):
        raise ValueError(
            f"atten_mask shape {tuple(m.shape)} is none of SS/11SS/B1SS/BNSS for "
            f"B={b}, N={n}, Sq={sq}, Skv={sk}"
        )
    return m


def _build_mask(spec: _Spec, b: int, n: int, sq: int, sk: int) -> torch.Tensor | None:
    """Bool mask broadcastable to [b, n, sq, sk] (True = masked); None = full attention."""
    mode, pre, nxt = spec.sparse_mode, spec.pre, spec.nxt
    if spec.atten_mask is None:
        return None
    if mode in (0, 4):
        if nxt < 0 and (pre < -nxt or -nxt >= sk):
            raise ValueError(f"next_tockens={nxt} < 0 needs pre_tockens >= {-nxt}, |next| < {sk}")
        if pre < 0 and (nxt < -pre or -pre >= sq):
            raise ValueError(f"pre_tockens={pre} < 0 needs next_tockens >= {-pre}, |pre| < {sq}")
    if mode in (0, 1):
        masked = _user_mask(spec, b, n, sq, sk)
        if mode == 0:
            masked = masked | _band(sq, sk, pre, nxt, 0)
        if spec.varlen and sk and bool(masked.all(-1).any()):
            # the varlen kernel has no invalid-row handling: a padded (all-masked) row is refused
            raise ValueError("TND atten_mask must not mask a whole query row of a document")
        return masked
    if mode == 2:
        return _band(sq, sk, _INT_MAX, 0, 0)
    if mode == 3:
        return _band(sq, sk, _INT_MAX, 0, sk - sq)
    return _band(sq, sk, pre, nxt, sk - sq)  # 4: band anchored bottom-right


# ----------------------------------------------------------------------------- core math


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.repeat_interleave(n // x.shape[1], dim=1) if x.shape[1] != n else x


def _probs(q, k, masked, scale, row_max, row_sum):
    """``(P, max, sum)``: ``P = exp(s - max) / sum``, 0 where masked or the row sees no key.

    ``row_max``/``row_sum`` None: computed from the scores ``s`` (forward); else used as given.
    """
    s = torch.matmul(q, _expand_kv(k, q.shape[1]).transpose(-1, -2)) * scale
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    if row_max is None:  # a row with no key (or no key at all) gets -inf
        row_max = s.amax(dim=-1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
    valid = torch.isfinite(row_max)
    m_safe = torch.where(valid, row_max, torch.zeros_like(row_max)).unsqueeze(-1)
    e = torch.exp(s - m_safe)
    if row_sum is None:
        row_sum = e.sum(dim=-1)
    valid = valid & (row_sum > 0)
    l_safe = torch.where(valid, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
    p = torch.where(valid.unsqueeze(-1), e / l_safe, torch.zeros_like(e))
    return p, row_max, row_sum


def _forward_core(q, k, v, masked, scale, keep, keep_prob):
    """q [B,N,Sq,D], k/v [B,Nkv,Sk,D] in the accumulation dtype -> (out, max, sum [B,N,Sq])."""
    p, m, total = _probs(q, k, masked, scale, None, None)
    if keep is not None:
        p = p * keep.view_as(p).to(p.dtype) / keep_prob
    return torch.matmul(p, _expand_kv(v, q.shape[1])), m, total


def _grad_core(q, k, v, dy, out, m, total, masked, scale, keep, keep_prob):
    """FlashAttention-2 backward from the GIVEN row statistics ``m``, ``total`` ([B, N, Sq])."""
    b, n, _, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    p, _, _ = _probs(q, k, masked, scale, m, total)
    dp = torch.matmul(dy, _expand_kv(v, n).transpose(-1, -2))
    pd = p
    if keep is not None:
        kf = keep.view_as(p).to(p.dtype) / keep_prob
        pd, dp = p * kf, dp * kf
    ds = p * (dp - (dy * out).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, _expand_kv(k, n)) * scale
    dk = (torch.matmul(ds.transpose(-1, -2), q) * scale).view(b, nkv, n // nkv, sk, d).sum(2)
    dv = torch.matmul(pd.transpose(-1, -2), dy).view(b, nkv, n // nkv, sk, d).sum(2)
    return dq, dk, dv


# ----------------------------------------------------------------------------- statistics


def _pack_stats(spec: _Spec, rows: torch.Tensor, docs) -> torch.Tensor:
    """Row stats [B, N, Sq] (TND: [1, N, T]) -> the op's layout, 8 lanes (TND: module doc)."""
    if not spec.varlen or spec.softmax_layout == "TND":
        x = rows[0].t() if spec.varlen else rows
        return x.unsqueeze(-1).expand(*x.shape, _LANES).contiguous()
    n, t = rows.shape[1], rows.shape[2]
    segs = _segments([qd for qd, _ in docs], t)
    parts = [rows[0, :, a:e].unsqueeze(-1).expand(n, e - a, _LANES).reshape(-1) for a, e in segs]
    return (torch.cat(parts) if parts else rows.new_zeros(0)).view(t, n, _LANES)


def _unpack_stats(spec: _Spec, stats: torch.Tensor, b: int, n: int, sq: int, docs):
    """Inverse of :func:`_pack_stats` (lane 0), with a shape check."""
    want = (sq, n, _LANES) if spec.varlen else (b, n, sq, _LANES)
    if tuple(stats.shape) != want:
        raise ValueError(f"softmax_max/softmax_sum must be {list(want)}, got {list(stats.shape)}")
    if not spec.varlen:
        return stats[..., 0]
    segs = _segments([qd for qd, _ in docs], sq)
    return _unpack_tnd(stats, segs, spec.softmax_layout).t().unsqueeze(0)


def _unpack_tnd(stats: torch.Tensor, segs, softmax_layout: str) -> torch.Tensor:
    """[T, N, 8] in a TND softmax layout -> per-token lane 0 [T, N]."""
    n = stats.shape[1]
    if softmax_layout == "TND":
        return stats[..., 0]
    flat, rows, pos = stats.reshape(-1), [], 0
    for a, e in segs:
        rows.append(flat[pos : pos + n * (e - a) * _LANES].view(n, e - a, _LANES)[..., 0].t())
        pos += n * (e - a) * _LANES
    return torch.cat(rows) if rows else stats.new_zeros(0, n)


def _keep_masks(spec: _Spec, docs, b: int, n: int, rng: tuple[int, int, int] | None):
    """Per-document dropout keep masks; ``rng`` None draws a new (seed, offset)."""
    sizes = [b * n * (qe - qa) * (ke - ka) for (qa, qe), (ka, ke) in docs]
    numels = sum(sizes) if spec.keep_prob < 1.0 else 0
    seed, offset, given = (*_next_rng(numels), numels) if rng is None else rng
    if given != numels:
        raise ValueError(f"numels={given} is not this call's {numels}: pass the forward's numels")
    if not numels:
        return [None] * len(docs), (seed, offset, numels)
    flat = dropout_keep_mask(seed, offset, numels, spec.keep_prob)
    return list(torch.split(flat, sizes)), (seed, offset, numels)


# ----------------------------------------------------------------------------- the ops


# fmt: off
def npu_fusion_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int, input_layout: str,
    pse: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None, scale: float = 1.0, keep_prob: float = 1.0,
    pre_tockens: int = _INT_MAX, next_tockens: int = _INT_MAX, inner_precise: int = 0,
    prefix: list[int] | None = None, actual_seq_qlen: list[int] | None = None,
    actual_seq_kvlen: list[int] | None = None, sparse_mode: int = 0,
    gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    # fmt: on
    """Emulated ``torch_npu.npu_fusion_attention``; see the module docstring for the contract.

    Returns ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``:
    ``attention_out`` in the layout and dtype of ``query``; statistics ``[B, N, Sq, 8]``
    (TND: ``[T, N, 8]``) fp32 (fp64 for fp64 inputs); ``softmax_out`` an empty placeholder.
    ``inner_precise``, ``gen_mask_parallel`` and ``sync`` change nothing here.
    """
    extra = {"pse": pse, "padding_mask": padding_mask, "prefix": prefix}
    spec = _make_spec(
        query, key, value, head_num, input_layout, extra, atten_mask=atten_mask, scale=scale,
        keep_prob=keep_prob, pre=pre_tockens, nxt=next_tockens, sparse_mode=sparse_mode,
        softmax_layout=softmax_layout, qlen=actual_seq_qlen, kvlen=actual_seq_kvlen,
    )  # fmt: skip
    acc = _acc_dtype(query.dtype)
    q, k, v = (t.to(acc) for t in _views(spec, query, key, value))
    b, n, sq, _ = q.shape
    docs = _docs(spec, sq, k.shape[2])
    keeps, (seed, offset, numels) = _keep_masks(spec, docs, b, n, None)
    out = torch.zeros_like(q)
    m = q.new_full((b, n, sq), float("-inf"))
    total = q.new_zeros(b, n, sq)
    for ((qa, qe), (ka, ke)), keep in zip(docs, keeps, strict=True):
        masked = _build_mask(spec, b, n, qe - qa, ke - ka)
        o, m[:, :, qa:qe], total[:, :, qa:qe] = _forward_core(
            q[:, :, qa:qe], k[:, :, ka:ke], v[:, :, ka:ke], masked, scale, keep, keep_prob
        )
        out[:, :, qa:qe] = o
    smax, ssum = _pack_stats(spec, m, docs), _pack_stats(spec, total, docs)
    out = _from_c(out.to(query.dtype), input_layout)
    return out, smax, ssum, query.new_empty(0), seed, offset, numels


# fmt: off
def npu_fusion_attention_grad(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dy: torch.Tensor, head_num: int,
    input_layout: str, *, pse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None, atten_mask: torch.Tensor | None = None,
    softmax_max: torch.Tensor | None = None, softmax_sum: torch.Tensor | None = None,
    softmax_in: torch.Tensor | None = None, attention_in: torch.Tensor | None = None,
    scale_value: float = 1.0, keep_prob: float = 1.0, pre_tockens: int = _INT_MAX,
    next_tockens: int = _INT_MAX, inner_precise: int = 0, seed: int = 0, offset: int = 0,
    numels: int = 0, prefix: list[int] | None = None, actual_seq_qlen: list[int] | None = None,
    actual_seq_kvlen: list[int] | None = None, sparse_mode: int = 0,
    gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # fmt: on
    """Emulated ``torch_npu.npu_fusion_attention_grad`` -> ``(dq, dk, dv, dpse)``.

    Uses the GIVEN ``softmax_max``/``softmax_sum`` (lane 0) and ``attention_in`` (the output
    whose gradient ``dy`` is): ``P = exp(s - max) / sum``, ``D = rowsum(dy * attention_in)``.
    ``dy``/``attention_in`` have the layout of ``query``; ``dq``/``dk``/``dv`` come back in the
    layouts and dtype of the inputs; ``dpse`` is an empty placeholder. Dropout replays the keep
    mask of ``(seed, offset, numels)``.
    """
    extra = {"pse": pse, "padding_mask": padding_mask, "prefix": prefix}
    spec = _make_spec(
        query, key, value, head_num, input_layout, extra, atten_mask=atten_mask, scale=scale_value,
        keep_prob=keep_prob, pre=pre_tockens, nxt=next_tockens, sparse_mode=sparse_mode,
        softmax_layout=softmax_layout, qlen=actual_seq_qlen, kvlen=actual_seq_kvlen,
    )  # fmt: skip
    if softmax_max is None or softmax_sum is None or attention_in is None:
        raise ValueError("npu_fusion_attention_grad needs softmax_max, softmax_sum, attention_in")
    if dy.shape != query.shape or attention_in.shape != query.shape:
        raise ValueError(
            f"dy {tuple(dy.shape)} and attention_in {tuple(attention_in.shape)} must have the "
            f"shape of query {tuple(query.shape)}"
        )
    acc = _acc_dtype(query.dtype)
    q, k, v = (t.to(acc) for t in _views(spec, query, key, value))
    b, n, sq, d = q.shape
    heads = n if input_layout in ("BSH", "SBH") else None
    dyc, outc = (_to_c(t, input_layout, heads, d).to(acc) for t in (dy, attention_in))
    docs = _docs(spec, sq, k.shape[2])
    m, total = (_unpack_stats(spec, t, b, n, sq, docs).to(acc) for t in (softmax_max, softmax_sum))
    keeps, _ = _keep_masks(spec, docs, b, n, (seed, offset, numels))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for ((qa, qe), (ka, ke)), keep in zip(docs, keeps, strict=True):
        rows, cols = slice(qa, qe), slice(ka, ke)
        dq[:, :, rows], dk[:, :, cols], dv[:, :, cols] = _grad_core(
            q[:, :, rows], k[:, :, cols], v[:, :, cols], dyc[:, :, rows], outc[:, :, rows],
            m[:, :, rows], total[:, :, rows], _build_mask(spec, b, n, qe - qa, ke - ka),
            scale_value, keep, keep_prob,
        )  # fmt: skip
    grads = (dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype))
    return (*(_from_c(g, input_layout) for g in grads), query.new_empty(0))
