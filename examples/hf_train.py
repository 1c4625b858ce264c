"""A tiny Llama trained with USP through transformers; prints the CP loss beside one process's.

    torchrun --nproc-per-node 4 examples/hf_train.py
    torchrun --nproc-per-node 4 examples/hf_train.py --context-parallel-algo hybrid_cp_algo \
        --ulysses-degree-in-cp 2

The CP group is every rank (--context-parallel-size defaults to the world size).
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import usp_npu
from usp_npu.integrations.transformers import reduce_loss, register, shard_batch

parser = usp_npu.add_context_parallel_args(argparse.ArgumentParser())
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--seq-length", type=int, default=256)
parser.set_defaults(context_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
args = parser.parse_args()
dist.init_process_group("gloo")
mesh = usp_npu.initialize_context_parallel(usp_npu.ContextParallelConfig.from_args(args))
register()  # attn_implementation="usp_npu"

config = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
torch.manual_seed(0)
single = LlamaForCausalLM(config)  # the one-process run, same weights
model = copy.deepcopy(single)  # deep copy: the config (and its attention choice) too
model.set_attn_implementation("usp_npu")
optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, single)]

for step in range(args.steps):
    g = torch.Generator().manual_seed(step)  # the same full batch on every rank
    batch = {"input_ids": torch.randint(config.vocab_size, (2, args.seq_length), generator=g)}
    local = shard_batch(batch)  # labels shifted on the full sequence, then split
    loss = reduce_loss(model(**local).loss, local["shift_labels"])  # token-weighted over CP
    loss.backward()
    for p in model.parameters():  # each rank holds its own tokens' share of the gradient
        dist.all_reduce(p.grad, group=mesh.cp_group)
    reference = single(**batch, labels=batch["input_ids"]).loss
    reference.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad()
    if dist.get_rank() == 0:
        print(f"step {step}  cp loss {loss.item():.6f}  one-process loss {reference.item():.6f}")
dist.destroy_process_group()
