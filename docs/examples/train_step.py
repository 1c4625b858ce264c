"""One training step of a tiny causal LM with context parallelism, checked against one process.

Run on CPU with gloo (any of the three algorithms)::

    torchrun --nproc-per-node 4 docs/examples/train_step.py \
        --context-parallel-size 4 --context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 2

On Ascend use the ``hccl`` backend and ``npu`` tensors; on CUDA ``nccl`` and ``cuda`` tensors.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import usp_npu

VOCAB, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 8
HIDDEN = HEADS * HEAD_DIM


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, L, N, D] at explicit positions ``pos`` [B, L]."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=x.dtype) / half)
    angle = pos.to(x.dtype)[..., None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1)


class TinyLM(nn.Module):
    """Embedding, one attention layer (GQA), LM head. ``attention`` is swappable."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.wq = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.wkv = nn.Linear(HIDDEN, 2 * KV_HEADS * HEAD_DIM)
        self.wo = nn.Linear(HEADS * HEAD_DIM, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.attention = attention

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        x = self.embed(ids)
        q = self.wq(x).view(b, n, HEADS, HEAD_DIM)
        k, v = self.wkv(x).view(b, n, 2, KV_HEADS, HEAD_DIM).unbind(2)
        a = self.attention(rope(q, pos), rope(k, pos), v)  # BSND in, BSND out
        return self.head(x + self.wo(a.reshape(b, n, -1)))


class DenseAttention(nn.Module):
    """Single-process causal attention on BSND tensors, for the comparison."""

    def forward(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)


def cp_train_step(model, ids, labels, pos, mesh) -> torch.Tensor:
    """Loss of this CP group's sequence; leaves the full-sequence gradient on every CP rank."""
    ids_l, labels_l, pos_l = (usp_npu.split_sequence(t, seq_dim=1) for t in (ids, labels, pos))
    tokens = (labels_l != -100).sum()
    dist.all_reduce(tokens, group=mesh.cp_group)  # loss is averaged over the whole sequence
    logits = model(ids_l, pos_l)
    loss = F.cross_entropy(logits.flatten(0, 1), labels_l.flatten(), reduction="sum") / tokens
    loss.backward()
    for p in model.parameters():  # each rank holds its tokens' share of every gradient
        dist.all_reduce(p.grad, group=mesh.cp_group)
    loss = loss.detach()
    dist.all_reduce(loss, group=mesh.cp_group)
    return loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv``, run one step with CP and one without; returns both losses, gradient gap.

    Under torchrun it creates the gloo group itself; in a process that already has one (the
    test's rank pool) it uses that group and leaves it alive.
    """
    parser = usp_npu.add_context_parallel_args(argparse.ArgumentParser())
    parser.add_argument("--seq-length", type=int, default=64)
    args = parser.parse_args(argv)
    owns_group = not dist.is_initialized()

    cfg = usp_npu.ContextParallelConfig.from_args(args)
    cfg.validate(  # raises ValueError naming the flag to change, before any communication
        num_attention_heads=HEADS,
        seq_length=args.seq_length,
        num_query_groups=KV_HEADS,
        world_size=int(os.environ["WORLD_SIZE"]) if owns_group else dist.get_world_size(),
    )
    if owns_group:
        dist.init_process_group("gloo")
    mesh = usp_npu.initialize_context_parallel(cfg, tensor_model_parallel_size=1)

    torch.manual_seed(0)  # same weights and data on every rank
    model = TinyLM(usp_npu.USPAttention(layout="BSND")).double()
    ids = torch.randint(VOCAB, (2, args.seq_length))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # shift BEFORE splitting: boundary tokens keep their label
    pos = torch.arange(args.seq_length).expand_as(ids)

    loss = cp_train_step(model, ids, labels, pos, mesh)

    reference = copy.deepcopy(model)
    reference.attention = DenseAttention()
    reference.zero_grad()
    ref_logits = reference(ids, pos)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())  # ignore_index -100
    ref_loss.backward()
    grad_err = max(
        (p.grad - r.grad).abs().max().item()
        for p, r in zip(model.parameters(), reference.parameters(), strict=True)
    )
    if mesh.rank == 0:
        print(f"{cfg.context_parallel_algo} u={cfg.ulysses_degree} r={cfg.ring_degree}")
        print(f"loss {loss.item():.10f}  single process {ref_loss.item():.10f}")
        print(f"largest gradient difference {grad_err:.2e}")
    usp_npu.destroy_context_parallel()
    if owns_group:
        dist.destroy_process_group()
    return {"loss": loss.item(), "reference_loss": ref_loss.item(), "gradient_error": grad_err}


if __name__ == "__main__":
    main()
