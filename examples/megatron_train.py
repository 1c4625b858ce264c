"""A tiny Megatron-core GPTModel trained with USP; prints the CP loss beside one process's.

    torchrun --nproc-per-node 4 examples/megatron_train.py --context-parallel-algo hybrid_cp_algo \
        --ulysses-degree-in-cp 2
    torchrun --nproc-per-node 8 examples/megatron_train.py --tensor-model-parallel-size 2 \
        --context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 2

--context-parallel-size defaults to world size / tp. --packed trains THD packed rows of three
documents (padded per document to a multiple of 2 cp) against every document alone. CPU only:
megatron_on_cpu() patches the CUDA calls megatron-core 0.16 makes on this path (see
docs/integration_megatron.md).
"""

import argparse
import itertools
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core import utils as megatron_utils
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

import usp_npu
from usp_npu.integrations.megatron import config_from_args, megatron_on_cpu, patch_spec

parser = usp_npu.add_context_parallel_args(argparse.ArgumentParser())  # extra_args_provider
parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--seq-length", type=int, default=256)
parser.add_argument("--packed", action="store_true", help="THD packed documents")
parser.set_defaults(context_parallel_size=None)
args = parser.parse_args()
tp, vocab = args.tensor_model_parallel_size, 128
cp = args.context_parallel_size = args.context_parallel_size or int(os.environ["WORLD_SIZE"]) // tp


def train(use_usp: bool, tp: int, cp: int) -> list[float]:
    spec = get_gpt_layer_local_spec()
    if use_usp:
        usp_npu.initialize_context_parallel(config_from_args(args), tp)
        patch_spec(spec)  # the one line that switches core attention to USP
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=args.seq_length,
        position_embedding_type="rope",
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cp_group, losses = parallel_state.get_context_parallel_group(), []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        loss = (packed_loss if args.packed else batch_loss)(model, g, use_usp)
        loss.backward()
        for p in model.parameters():  # what Megatron's DDP does over the dp x cp group
            dist.all_reduce(p.grad, group=cp_group)
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        losses.append(total.item())
    return losses


def causal(n: int) -> torch.Tensor:
    return torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)  # True = masked


def batch_loss(model, g: torch.Generator, use_usp: bool) -> torch.Tensor:
    data = torch.randint(vocab, (2, args.seq_length + 1), generator=g)
    batch = {
        "tokens": data[:, :-1],
        "labels": data[:, 1:],
        "attention_mask": causal(data.shape[1] - 1),
    }
    batch = get_batch_on_this_cp_rank(batch)  # Megatron's own split, for every algorithm
    per_token = model(batch["tokens"], None, batch["attention_mask"], labels=batch["labels"])
    return per_token.sum() / data[:, 1:].numel()  # this rank's share of the mean


def packed_loss(model, g: torch.Generator, use_usp: bool) -> torch.Tensor:
    lengths = [args.seq_length // 4 - 3, args.seq_length // 2, args.seq_length // 4 + 1]
    docs = [torch.randint(vocab, (n + 1,), generator=g) for n in lengths]
    if not use_usp:  # the reference: every document alone, unpacked
        return sum(model(d[None, :-1], None, causal(d.numel() - 1), labels=d[None, 1:]).sum()
                   for d in docs) / sum(lengths)  # fmt: skip
    cu = torch.tensor(list(itertools.accumulate(lengths, initial=0)))
    padded, index = usp_npu.pad_packed(cu, 2 * cp)  # every document to a multiple of 2 cp
    keep, src = index >= 0, index.clamp(min=0)
    batch = {
        "tokens": torch.cat([d[:-1] for d in docs])[src][None],
        "labels": torch.cat([d[1:] for d in docs])[src][None],
        "loss_mask": keep[None].float(),  # padding carries no loss
    }
    batch, packed = megatron_utils.get_thd_batch_on_this_cp_rank(  # Megatron's THD split
        batch, cu.int(), padded.int(), padded.diff().max()[None]
    )
    per_token = model(batch["tokens"], None, None, labels=batch["labels"], packed_seq_params=packed)
    return (per_token * batch["loss_mask"]).sum() / sum(lengths)


dist.init_process_group("gloo")
with megatron_on_cpu():
    parallel_state.initialize_model_parallel(1, 1)  # every rank builds the groups,
    single = [train(False, 1, 1) if dist.get_rank() == 0 else None]  # rank 0 alone trains
    dist.broadcast_object_list(single, src=0)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1, context_parallel_size=cp)
    usp = train(True, tp, cp)
if dist.get_rank() == 0:
    for step, (a, b) in enumerate(zip(usp, single[0], strict=True)):
        print(f"step {step}  cp loss {a:.6f}  one-process loss {b:.6f}")
dist.destroy_process_group()
