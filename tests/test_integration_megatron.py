"""Megatron-core integration: a tiny GPTModel (2 layers, hidden 64, 4 heads, 2 query groups) with
USPCoreAttention, batches split by Megatron's own get_batch_on_this_cp_rank and RoPE sliced by
Megatron, trained three SGD steps: loss and every gradient equal to the same model with cp = 1
and tp = 1 (Megatron's own DotProductAttention), float64. World 4: cp 4 with each algorithm; world 8: tp 2, cp 4
hybrid u2. Plus: usp_npu's CP groups equal megatron's, and a mismatch is refused."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("megatron.core")
pytest.importorskip("einops")

import usp_npu
from usp_npu.parallel_state import mesh_rank_lists
from usp_npu.testing.process_groups import live_process_groups, released_process_groups

VOCAB, SEQ, BATCH, STEPS, LR, SEED = 64, 64, 2, 3, 0.05, 1234


def _gpt(usp: bool, tp: int, cp: int):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from usp_npu.integrations.megatron import patch_spec

    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        use_cpu_initialization=True,
        params_dtype=torch.float64,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec()  # cp = 1: Megatron's own DotProductAttention
    if usp:
        patch_spec(spec)  # the one line a user adds
    torch.manual_seed(SEED)  # CPU initialisation draws every full weight, then keeps its TP slice
    tensor_parallel.model_parallel_cuda_manual_seed(SEED, inference_rng_tracker=True)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    return model.double()  # a few norms are created in float32 whatever params_dtype says


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    data = torch.randint(VOCAB, (BATCH, SEQ + 1), generator=g)
    return {
        "tokens": data[:, :-1],
        "labels": data[:, 1:],  # Megatron's labels are shifted by the data pipeline
        "attention_mask": torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1),  # True = masked
    }


def _train(model, cp_group) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Three SGD steps; per step the group's loss and the (CP-summed) gradients."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    losses, grads = [], []
    for step in range(STEPS):
        batch = get_batch_on_this_cp_rank(_batch(step))  # Megatron's own zigzag split
        logits = model(  # under CP the causal mask arrives split too; USPCoreAttention ignores it
            batch["tokens"], None, batch["attention_mask"], runtime_gather_output=True
        )
        loss = F.cross_entropy(
            logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="sum"
        ) / (BATCH * SEQ)
        loss.backward()
        total = loss.detach().clone()
        if cp_group is not None:
            dist.all_reduce(total, group=cp_group)
            for p in model.parameters():  # each CP rank holds its tokens' share
                dist.all_reduce(p.grad, group=cp_group)
        losses.append(total.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        _sgd(model)
    return losses, grads


def _sgd(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
            p.grad = None


def _tp_slice(full: torch.Tensor, param, tp: int, tp_rank: int) -> torch.Tensor:
    if getattr(param, "tensor_model_parallel", False):
        return full.chunk(tp, dim=param.partition_dim)[tp_rank]
    return full


@released_process_groups()  # Megatron's groups outlive destroy_model_parallel
def _megatron_parity(tp: int, cp: int, algo: str, u: int | None) -> dict:
    from megatron.core import parallel_state as ps

    from usp_npu.integrations.megatron import megatron_on_cpu

    warnings.filterwarnings("ignore", module="megatron")
    rank = dist.get_rank()
    with megatron_on_cpu():
        try:
            ps.initialize_model_parallel(1, 1, context_parallel_size=1)  # the reference, rank 0
            reference = _train(_gpt(False, 1, 1), None) if rank == 0 else None
            ps.destroy_model_parallel()
            shared = [reference]
            dist.broadcast_object_list(shared, src=0)
            ref_losses, ref_grads = shared[0]

            ps.initialize_model_parallel(tp, 1, context_parallel_size=cp)
            cfg = usp_npu.ContextParallelConfig(cp, algo, ulysses_degree_in_cp=u)
            mesh = usp_npu.initialize_context_parallel(cfg, tensor_model_parallel_size=tp)
            model = _gpt(True, tp, cp)
            losses, grads = _train(model, mesh.cp_group)
        finally:
            ps.destroy_model_parallel()
    return _errors((losses, grads), (ref_losses, ref_grads), list(model.parameters()), tp)


def _errors(got, reference, params, tp: int = 1) -> dict:
    """Largest relative loss and gradient errors of ``got`` = (losses, grads) per step."""
    (losses, grads), (ref_losses, ref_grads) = got, reference
    tp_rank, grad_err = dist.get_rank() % tp, 0.0
    for step_grads, full in zip(grads, ref_grads, strict=True):
        for g, f, p in zip(step_grads, full, params, strict=True):
            r = _tp_slice(f, p, tp, tp_rank)
            grad_err = max(grad_err, ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    loss_err = max(abs(a - b) / b for a, b in zip(losses, ref_losses, strict=True))
    return {"loss_err": loss_err, "grad_err": grad_err, "losses": losses}


CASES = {
    "w4-ulysses-cp4": (4, 1, 4, "ulysses_cp_algo", None),
    "w4-ring-cp4": (4, 1, 4, "megatron_cp_algo", None),
    "w4-hybrid-cp4-u2": (4, 1, 4, "hybrid_cp_algo", 2),
    "w8-tp2-hybrid-cp4-u2": (8, 2, 4, "hybrid_cp_algo", 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_gpt_training_matches_cp1(pools, name):
    world, *case = CASES[name]
    for rank, res in enumerate(pools(world).run(_megatron_parity, *case)):
        assert all(loss > 3.0 for loss in res["losses"]), res  # ~ln(64): a real cross-entropy
        assert res["loss_err"] <= 1e-10 and res["grad_err"] <= 1e-10, (rank, res)


# -- THD packed sequences -----------------------------------------------------------------------
DOCS = (13, 24, 19)  # actual document lengths; padded per document to a multiple of 2 cp


def _documents(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randint(VOCAB, (n + 1,), generator=g) for n in DOCS]  # tokens + next target


def _train_documents(model) -> tuple[list[float], list[list[torch.Tensor]]]:
    """The reference: every document alone (no packing, no CP), Megatron's DotProductAttention."""
    losses, grads = [], []
    for step in range(STEPS):
        loss = 0.0
        for doc in _documents(step):
            n = doc.numel() - 1
            mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)
            logits = model(doc[None, :-1], None, mask, runtime_gather_output=True)
            loss = loss + F.cross_entropy(logits[0], doc[1:], reduction="sum") / sum(DOCS)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        _sgd(model)
    return losses, grads


def _thd_batch(step: int, cp: int):
    """One packed row of the step's documents, each padded at its end to a multiple of 2 cp,
    split by Megatron's get_thd_batch_on_this_cp_rank (its CPU stand-in under megatron_on_cpu)."""
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    docs = _documents(step)
    padded, index = usp_npu.pad_packed(list(itertools.accumulate(DOCS, initial=0)), 2 * cp)
    keep, src = index >= 0, index.clamp(min=0)
    tokens = torch.where(keep, torch.cat([d[:-1] for d in docs])[src], 0)
    labels = torch.where(keep, torch.cat([d[1:] for d in docs])[src], -100)  # padding: no target
    cu = torch.tensor(list(itertools.accumulate(DOCS, initial=0)), dtype=torch.int32)
    longest = torch.tensor([int(padded.diff().max())])  # RoPE covers the padded documents
    batch = {"tokens": tokens[None], "labels": labels[None]}
    return get_thd_batch_on_this_cp_rank(batch, cu, padded.int(), longest)


def _train_thd(model, cp: int, cp_group) -> tuple[list[float], list[list[torch.Tensor]]]:
    losses, grads = [], []
    for step in range(STEPS):
        batch, packed = _thd_batch(step, cp)
        logits = model(
            batch["tokens"], None, None, packed_seq_params=packed, runtime_gather_output=True
        )
        loss = F.cross_entropy(logits[0], batch["labels"][0], reduction="sum") / sum(DOCS)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=cp_group)
        losses.append(total.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        _sgd(model)
    return losses, grads


@released_process_groups()  # Megatron's groups outlive destroy_model_parallel
def _thd_parity(cp: int, algo: str, u: int | None) -> dict:
    from megatron.core import parallel_state as ps

    from usp_npu.integrations.megatron import megatron_on_cpu

    warnings.filterwarnings("ignore", module="megatron")
    with megatron_on_cpu():
        try:
            ps.initialize_model_parallel(1, 1, context_parallel_size=1)
            reference = _train_documents(_gpt(False, 1, 1)) if dist.get_rank() == 0 else None
            ps.destroy_model_parallel()
            shared = [reference]
            dist.broadcast_object_list(shared, src=0)

            ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
            cfg = usp_npu.ContextParallelConfig(cp, algo, ulysses_degree_in_cp=u)
            mesh = usp_npu.initialize_context_parallel(cfg)
            model = _gpt(True, 1, cp)
            got = _train_thd(model, cp, mesh.cp_group)
        finally:
            ps.destroy_model_parallel()
    return _errors(got, shared[0], list(model.parameters()))


THD_CASES = {
    "cp2-ulysses": (2, "ulysses_cp_algo", None),
    "cp2-ring": (2, "megatron_cp_algo", None),
    "cp4-ulysses": (4, "ulysses_cp_algo", None),
    "cp4-ring": (4, "megatron_cp_algo", None),
    "cp4-hybrid-u2": (4, "hybrid_cp_algo", 2),
}


@pytest.mark.parametrize("name", list(THD_CASES))
def test_tiny_gpt_thd_packed_training_matches_documents_alone(pools, name):
    cp, *case = THD_CASES[name]
    for rank, res in enumerate(pools(cp).run(_thd_parity, cp, *case)):
        assert all(loss > 3.0 for loss in res["losses"]), res  # ~ln(64): a real cross-entropy
        assert res["loss_err"] <= 1e-10 and res["grad_err"] <= 1e-10, (rank, res)


@pytest.mark.parametrize("world", [4, 8, 16])
def test_cp_groups_equal_megatron_rank_generator(world):
    from usp_npu.integrations.megatron import megatron_cp_groups

    for tp, cp, pp in itertools.product((1, 2, 4), (1, 2, 4, 8), (1, 2)):
        if world % (tp * cp * pp) == 0:
            ours = mesh_rank_lists(world, tp, cp, 1, pp)[0]
            assert sorted(ours) == sorted(megatron_cp_groups(world, tp, cp, pp)), (tp, cp, pp)
    assert megatron_cp_groups(8, 2, 2) == [[0, 2], [1, 3], [4, 6], [5, 7]]


@released_process_groups()  # Megatron's groups outlive destroy_model_parallel
def _groups_against_parallel_state() -> list[str]:
    from megatron.core import parallel_state as ps

    from usp_npu.integrations.megatron import check_megatron_mesh

    report = []
    for tp, cp, pp in [(2, 2, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]:
        ps.initialize_model_parallel(tp, pp, context_parallel_size=cp)
        theirs = [None] * dist.get_world_size()
        dist.all_gather_object(theirs, list(ps.get_context_parallel_global_ranks()))
        ours = mesh_rank_lists(dist.get_world_size(), tp, cp, 1, pp)[0]
        mesh = usp_npu.initialize_context_parallel(
            usp_npu.ContextParallelConfig(cp, "megatron_cp_algo"),
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
        )
        check_megatron_mesh(mesh)
        same = sorted(set(map(tuple, theirs))) == sorted(map(tuple, ours))  # one entry per rank
        report.append(f"{tp},{cp},{pp}: {same}")
        ps.destroy_model_parallel()
    # cp outside dp in megatron's order: the groups differ, and every rank says so
    ps.initialize_model_parallel(1, 1, context_parallel_size=2, order="tp-dp-cp-pp")
    mesh = usp_npu.initialize_context_parallel(usp_npu.ContextParallelConfig(2, "megatron_cp_algo"))
    try:
        check_megatron_mesh(mesh)
        report.append("mismatch accepted")
    except ValueError as e:
        report.append(str(e))
    finally:
        ps.destroy_model_parallel()
    return report


def test_cp_groups_equal_megatron_parallel_state(pools):
    for rank, report in enumerate(pools(8).run(_groups_against_parallel_state)):
        assert report[:4] == ["2,2,1: True", "1,8,1: True", "2,4,1: True", "2,2,2: True"], report
        assert report[4].startswith(f"rank {rank}: Megatron's context-parallel group is"), report


@released_process_groups()  # Megatron's groups outlive destroy_model_parallel
def _construction_variants() -> list[str]:
    """USPCoreAttention built with the keywords of 0.16 (pg_collection), 0.14 (model_comm_pgs)
    and none (parallel_state), and what it refuses."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from usp_npu.integrations.megatron import USPCoreAttention

    ps.initialize_model_parallel(1, 1, context_parallel_size=4)
    usp_npu.initialize_context_parallel(usp_npu.ContextParallelConfig(4, "ulysses_cp_algo"))
    groups = SimpleNamespace(
        cp=ps.get_context_parallel_group(), tp=ps.get_tensor_model_parallel_group()
    )

    def config(cp=4, **kw):
        return TransformerConfig(
            num_layers=1, hidden_size=64, num_attention_heads=4, context_parallel_size=cp, **kw
        )

    causal = {"layer_number": 1, "attn_mask_type": AttnMaskType.causal, "attention_type": "self"}
    out = []
    try:
        USPCoreAttention(
            config=config(), **causal, cp_comm_type="p2p", softmax_scale=0.3, pg_collection=groups
        )
        USPCoreAttention(
            config=config(), **causal, cp_comm_type=None, softmax_scale=None, model_comm_pgs=groups
        )
        module = USPCoreAttention(config=config(), **causal, attention_dropout=0.0)
        out.append("built")
        attempts = {
            "padding mask type": lambda: USPCoreAttention(
                config=config(), **{**causal, "attn_mask_type": AttnMaskType.padding}
            ),
            "cp size": lambda: USPCoreAttention(config=config(cp=2), **causal),
            "window": lambda: USPCoreAttention(config=config(window_size=(8, 0)), **causal),
            "packed": lambda: module(
                *(torch.zeros(4, 1, 4, 16),) * 3, None, packed_seq_params=object()
            ),
            **_thd_refusals(module),
            "bias": lambda: module(
                *(torch.zeros(4, 1, 4, 16),) * 3, None, attention_bias=torch.zeros(1)
            ),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
                out.append(f"{name}: accepted")
            except ValueError as e:
                out.append(f"{name}: {e}")
    finally:
        ps.destroy_model_parallel()
    return out


def _thd_refusals(module) -> dict:
    """THD packed_seq_params USPCoreAttention cannot honour (cp 4: 4 local tokens, 16 in all)."""
    from dataclasses import replace

    from megatron.core.packed_seq_params import PackedSeqParams

    def cu(*values):
        return torch.tensor(values, dtype=torch.int32)

    good = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu(0, 16), cu_seqlens_kv=cu(0, 16), max_seqlen_q=16
    )
    thd = torch.zeros(4, 4, 16)

    def call(x=thd, **fields):
        return lambda: module(x, thd, thd, None, packed_seq_params=replace(good, **fields))

    return {
        "thd sbhd": call(qkv_format="sbhd"),
        "thd q/kv": call(cu_seqlens_kv=cu(0, 8, 16)),
        "thd padded short": call(
            cu_seqlens_q=cu(0, 10, 14), cu_seqlens_kv=cu(0, 10, 14),
            cu_seqlens_q_padded=cu(0, 8, 16), cu_seqlens_kv_padded=cu(0, 8, 16),
        ),
        "thd total": call(cu_seqlens_q=cu(0, 12), cu_seqlens_kv=cu(0, 12)),
        "thd not 2cp": call(cu_seqlens_q=cu(0, 4, 16), cu_seqlens_kv=cu(0, 4, 16)),
        "thd dynamic cp": call(local_cp_size=2),
        "thd batch": call(x=torch.zeros(4, 2, 4, 16)),
    }  # fmt: skip


def test_core_attention_keyword_variants_and_refusals(pools):
    for out in pools(4).run(_construction_variants):
        text = "\n".join(out)
        assert out[0] == "built" and "accepted" not in text, text
        assert "causal self-attention" in text and "--context-parallel-size 2 differs" in text
        assert "window_size=(8, 0)" in text and "packed_seq_params" in text, text
        assert "attention_bias" in text, text
        said = dict(line.split(": ", 1) for line in out[1:])
        assert said["thd sbhd"].startswith("packed_seq_params.qkv_format='sbhd'"), said
        assert "cu_seqlens_q [0, 16] differs from cu_seqlens_kv [0, 8, 16]" in said["thd q/kv"]
        assert "cu_seqlens_q_padded [0, 8, 16] does not pad" in said["thd padded short"], said
        assert said["thd total"].startswith("packed_seq_params.cu_seqlens_q: cu_seqlens ends at")
        assert "document length 4" in said["thd not 2cp"], said
        assert "cu_seqlens_q_padded" in said["thd not 2cp"], said
        assert "packed_seq_params.local_cp_size=2" in said["thd dynamic cp"], said
        assert "expects query [t, heads, head_dim]" in said["thd batch"], said


def test_config_from_megatron_lm_args():
    """Megatron-LM parses --attention-backend to its AttnBackend enum; ours stays auto."""
    import argparse

    from megatron.core.transformer.enums import AttnBackend

    from usp_npu.integrations.megatron import config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--context-parallel-size", type=int, default=1)  # Megatron-LM's own two
    parser.add_argument(
        "--attention-backend", type=lambda b: AttnBackend[b], default=AttnBackend.auto
    )
    usp_npu.add_context_parallel_args(parser)  # as extra_args_provider, after Megatron's groups
    args = parser.parse_args(
        [
            "--context-parallel-size",
            "4",
            "--context-parallel-algo",
            "hybrid_cp_algo",
            "--ulysses-degree-in-cp",
            "2",
            "--attention-backend",
            "flash",
        ]
    )
    with pytest.raises(ValueError, match="--attention-backend"):
        usp_npu.ContextParallelConfig.from_args(args).validate(4, 64)
    cfg = config_from_args(args).validate(num_attention_heads=4, seq_length=64)
    assert (cfg.context_parallel_size, cfg.ulysses_degree, cfg.attention_backend) == (4, 2, "auto")


def _live_group_count() -> int:
    return len(live_process_groups())


def test_megatron_jobs_release_their_process_groups(pools):
    """Each initialize_model_parallel adds ~35 gloo groups (about 5 file descriptors each) that
    destroy_model_parallel keeps; a pool that runs every test ran out of descriptors and hung."""
    pool = pools(4)
    pool.run(_construction_variants)  # usp_npu's own cached groups exist from here on
    before = pool.run(_live_group_count)
    pool.run(_construction_variants)
    assert pool.run(_live_group_count) == before
