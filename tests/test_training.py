"""A tiny causal LM trained one step with hybrid USP (u=2, r=2) on 4 ranks vs one process:
same loss and same parameter gradients (float64). Labels are shifted before splitting, position
ids are split with split_sequence, the loss is averaged over every token of the CP group."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import usp_npu
from usp_npu.testing import dense_attention

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS, SEQ, BATCH = 50, 32, 4, 2, 2, 32, 2
HEAD_DIM = HIDDEN // HEADS


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on [B, L, N, D] with explicit positions [B, L]."""
    half = x.shape[-1] // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=x.dtype) / half)
    angles = pos.to(x.dtype)[..., None, None] * inv_freq  # [B, L, 1, half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat(
        [x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], -1
    )


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.wq = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.wkv = nn.Linear(HIDDEN, 2 * KV_HEADS * HEAD_DIM)
        self.wo = nn.Linear(HEADS * HEAD_DIM, HIDDEN)
        self.mlp = nn.Sequential(
            nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN)
        )

    def forward(self, x, pos, attention):
        b, n = x.shape[:2]
        h = self.norm1(x)
        q = self.wq(h).view(b, n, HEADS, HEAD_DIM)
        k, v = self.wkv(h).view(b, n, 2, KV_HEADS, HEAD_DIM).unbind(2)
        a = attention(_rope(q, pos), _rope(k, pos), v)  # BSND
        x = x + self.wo(a.reshape(b, n, -1))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids, pos, attention):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, pos, attention)
        return self.head(self.norm(x))


def _dense_bsnd(q, k, v):
    return dense_attention(*(t.transpose(0, 1) for t in (q, k, v)), causal=True).transpose(0, 1)


def _loss_sum(logits, labels):
    return F.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def _train_step():
    cfg = usp_npu.ContextParallelConfig(4, "hybrid_cp_algo", ulysses_degree_in_cp=2)
    mesh = usp_npu.initialize_context_parallel(cfg)
    torch.manual_seed(0)
    model = TinyLM().double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[
        :, 1:
    ]  # shift BEFORE splitting: the shard-boundary tokens keep their label
    pos = torch.arange(SEQ).expand(BATCH, SEQ)

    ref_loss = _loss_sum(reference(ids, pos, _dense_bsnd), labels) / (labels != -100).sum()
    ref_loss.backward()

    ids_l, labels_l, pos_l = (usp_npu.split_sequence(x, seq_dim=1) for x in (ids, labels, pos))
    count = (labels_l != -100).sum()
    dist.all_reduce(count, group=mesh.cp_group)  # tokens of the whole CP group
    attn = usp_npu.USPAttention(layout="BSND")
    local_loss = _loss_sum(model(ids_l, pos_l, attn), labels_l) / count
    local_loss.backward()
    loss = local_loss.detach().clone()
    dist.all_reduce(loss, group=mesh.cp_group)
    grad_err = 0.0
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        dist.all_reduce(p.grad, group=mesh.cp_group)  # each rank holds its tokens' share
        grad_err = max(grad_err, (p.grad - p_ref.grad).abs().max().item())
    return abs(loss.item() - ref_loss.item()), grad_err, ref_loss.item()


def test_tiny_lm_hybrid_matches_single_process(pools):
    for loss_err, grad_err, loss in pools(4).run(_train_step):
        assert loss > 1.0  # a real cross-entropy over 50 tokens, not a degenerate zero
        assert loss_err <= 1e-9 and grad_err <= 1e-9, (loss_err, grad_err)
