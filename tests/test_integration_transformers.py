"""Hugging Face transformers integration: a tiny Llama trained on 4 gloo ranks with
attn_implementation="usp_npu" (hybrid u2 r2, ring cp4, Ulysses cp4 with 2 KV heads < u = 4)
against the same model in one process (sdpa): three SGD steps, gradient accumulation 2,
loss and every parameter gradient equal in float64. Plus a packed batch of 3 documents (as
DataCollatorWithFlattening makes it, with and without padding), a rank whose labels are all -100,
and the refusals (padding mask, unsplit position ids, bad packed input) raised on every rank."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("transformers")

import usp_npu
from usp_npu.integrations import transformers as hf

VOCAB, SEQ, BATCH, STEPS, ACCUMULATION, LR = 128, 256, 1, 3, 2, 0.05
ALGOS = {
    "hybrid-u2-r2": ("hybrid_cp_algo", 2),
    "ring-cp4": ("megatron_cp_algo", None),
    "ulysses-cp4": ("ulysses_cp_algo", None),
}


def _loss64(
    logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_
):
    """transformers' ForCausalLMLoss without its float32 upcast, so float64 parity is testable."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.reshape(-1, vocab_size),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _tiny_llama(attn_implementation: str):
    """2 layers, hidden 64, 4 heads, 2 KV heads, RoPE; a fresh config per model (transformers
    stores the attention implementation on the config object)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    model.set_attn_implementation(attn_implementation)
    model.loss_function = _loss64
    return model


def _micro_batches(step: int) -> list[dict]:
    """Same on every rank. Row 0 has a 40-token prompt without labels (uneven counts per rank)."""
    g = torch.Generator().manual_seed(100 + step)
    batches = []
    for _ in range(ACCUMULATION):
        ids = torch.randint(VOCAB, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[0, :40] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _valid_labels(batches: list[dict]) -> int:
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _sgd(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
            p.grad = None
    return grads


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _train_parity(algo: str, u: int | None) -> list[tuple[float, float, float]]:
    """Per step: (loss relative error, max parameter-gradient relative error, loss)."""
    mesh = usp_npu.initialize_context_parallel(
        usp_npu.ContextParallelConfig(4, algo, ulysses_degree_in_cp=u)
    )
    hf.register()
    reference, model = _tiny_llama("sdpa"), _tiny_llama("usp_npu")
    out = []
    for step in range(STEPS):
        batches = _micro_batches(step)
        n = torch.tensor(_valid_labels(batches))  # the FULL batches' count, as Trainer passes it
        ref_loss = cp_loss = 0.0
        for batch in batches:
            loss = reference(**batch, num_items_in_batch=n).loss
            loss.backward()
            ref_loss += loss.item()
            local = hf.shard_batch(batch)
            loss = hf.reduce_loss(
                model(**local, num_items_in_batch=n).loss,
                local["shift_labels"],
                num_items_in_batch=n,
            )
            loss.backward()
            cp_loss += loss.item()
        for p in model.parameters():  # each rank holds its tokens' share of every gradient
            dist.all_reduce(p.grad, group=mesh.cp_group)
        ref_grads, grads = _sgd(reference), _sgd(model)
        grad_err = max(_rel(g, r) for g, r in zip(grads, ref_grads, strict=True))
        out.append((abs(cp_loss - ref_loss) / ref_loss, grad_err, ref_loss))
    return out


@pytest.mark.parametrize("name", list(ALGOS))
def test_tiny_llama_training_matches_one_process(pools, name):
    for rank, steps in enumerate(pools(4).run(_train_parity, *ALGOS[name])):
        for step, (loss_err, grad_err, loss) in enumerate(steps):
            assert loss > 1.0, (rank, step, loss)  # a real cross-entropy over 128 tokens
            assert loss_err <= 1e-8 and grad_err <= 1e-8, (rank, step, loss_err, grad_err)


def _rank_without_labels() -> dict:
    """Hybrid u2 r2, mean loss: every label CP rank 0 holds is -100 (its local mean is NaN)."""
    mesh = usp_npu.initialize_context_parallel(
        usp_npu.ContextParallelConfig(4, "hybrid_cp_algo", ulysses_degree_in_cp=2)
    )
    hf.register()
    reference, model = _tiny_llama("sdpa"), _tiny_llama("usp_npu")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(VOCAB, (2, SEQ), generator=g)
    shift = torch.full_like(ids, -100)
    shift[:, :-1] = ids[:, 1:]
    shift[:, usp_npu.sharding.token_indices(SEQ, 0, 2, 2, True)] = -100
    ref_loss = reference(input_ids=ids, labels=shift, shift_labels=shift).loss
    ref_loss.backward()
    local = hf.shard_batch({"input_ids": ids, "shift_labels": shift})
    local_loss = model(**local).loss
    loss = hf.reduce_loss(local_loss, local["shift_labels"])
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=mesh.cp_group)
    grads = [p.grad for p in model.parameters()]
    return {
        "local_nan": bool(local_loss.isnan()),
        "finite": all(bool(torch.isfinite(x).all()) for x in grads),
        "loss_err": abs(loss.item() - ref_loss.item()) / ref_loss.item(),
        "grad_err": max(
            _rel(x, p.grad) for x, p in zip(grads, reference.parameters(), strict=True)
        ),
    }


def test_rank_whose_labels_are_all_ignored(pools):
    results = pools(4).run(_rank_without_labels)
    assert results[0]["local_nan"] and not any(r["local_nan"] for r in results[1:])
    for rank, res in enumerate(results):
        assert res["finite"], rank
        assert res["loss_err"] <= 1e-8 and res["grad_err"] <= 1e-8, (rank, res)


def _packed_parity(algo: str, u: int | None, lengths: tuple[int, ...], pad: bool) -> dict:
    """One row of 3 documents: position ids restart at 0 and cu_seq_lens_q/k are given, as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them; mean loss. The
    reference is the unpadded row in one process, where transformers masks by documents itself."""
    mesh = usp_npu.initialize_context_parallel(
        usp_npu.ContextParallelConfig(4, algo, ulysses_degree_in_cp=u)
    )
    hf.register()
    reference, model = _tiny_llama("sdpa"), _tiny_llama("usp_npu")
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    shift = torch.full_like(ids, -100)  # each document predicts only its own next tokens
    for a, b in itertools.pairwise(cu.tolist()):
        shift[0, a : b - 1] = ids[0, a + 1 : b]
    # use_cache=False: with a cache transformers skips its own packed-sequence mask
    ref_loss = reference(
        input_ids=ids, position_ids=pos, labels=shift, shift_labels=shift, use_cache=False
    ).loss
    ref_loss.backward()
    batch = {"input_ids": ids, "labels": ids, "position_ids": pos}
    batch |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths)}
    local = hf.shard_batch(batch, pad=pad)
    loss = hf.reduce_loss(model(**local).loss, local["shift_labels"])
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=mesh.cp_group)
    return {
        "loss_err": abs(loss.item() - ref_loss.item()) / ref_loss.item(),
        "grad_err": max(
            _rel(p.grad, r.grad)
            for p, r in zip(model.parameters(), reference.parameters(), strict=True)
        ),
        "local_tokens": local["input_ids"].shape[1],
    }


PACKED = {
    "hybrid-u2-r2": ("hybrid_cp_algo", 2, (96, 64, 96), False),
    "ring-cp4-padded": ("megatron_cp_algo", None, (90, 70, 93), True),
    "ulysses-cp4": ("ulysses_cp_algo", None, (100, 61, 95), False),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_batch_of_three_documents(pools, name):
    algo, u, lengths, pad = PACKED[name]
    for rank, res in enumerate(pools(4).run(_packed_parity, algo, u, lengths, pad)):
        assert res["loss_err"] <= 1e-8 and res["grad_err"] <= 1e-8, (rank, res)
        # ring cp4 pads every document to a multiple of 2 x 4: 96 + 72 + 96 tokens
        assert res["local_tokens"] == (66 if pad else sum(lengths) // 4), res


def _refusals() -> list[str]:
    usp_npu.initialize_context_parallel(usp_npu.ContextParallelConfig(4, "ulysses_cp_algo"))
    hf.register()
    model = _tiny_llama("usp_npu")
    ids = torch.randint(VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    local = hf.shard_batch({"input_ids": ids})
    docs = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)])[None]
    padding = torch.ones_like(ids).index_fill_(1, torch.tensor([60, 61, 62, 63]), 0)
    packed = hf.shard_batch({"input_ids": ids, "position_ids": docs})
    packed.pop("cu_seq_lens_k")
    attempts = {
        "padding mask in shard_batch": lambda: hf.shard_batch(
            {"input_ids": ids, "attention_mask": padding}
        ),
        "padding mask in the model": lambda: model(
            input_ids=local["input_ids"],
            position_ids=local["position_ids"],
            attention_mask=padding,
        ),
        "position ids not split": lambda: model(input_ids=local["input_ids"]),
        "packed, two rows": lambda: hf.shard_batch(
            {"input_ids": ids.expand(2, -1), "position_ids": docs.expand(2, -1)}
        ),
        "packed, bounds not given": lambda: model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"]
        ),
        "packed, local bounds": lambda: model(
            **{**packed, "cu_seq_lens_q": torch.tensor([0, 5, 12, 16])}
        ),
        "sliding window": lambda: hf.usp_attention_forward(
            model.model.layers[0].self_attn,
            *(torch.zeros(1, 4, 16, 16),) * 3,
            None,
            sliding_window=8,
        ),
        "num_items per shard": lambda: hf.reduce_loss(
            torch.tensor(1.0),
            local["shift_labels"],
            num_items_in_batch=(local["shift_labels"] != -100).sum(),
        ),
        "num_items too small": lambda: hf.reduce_loss(
            torch.tensor(1.0), local["shift_labels"], num_items_in_batch=10
        ),
        "odd length": lambda: hf.shard_batch({"input_ids": ids[:, :30]}),
    }
    messages = []
    for name, attempt in attempts.items():
        try:
            attempt()
            messages.append(f"{name}: accepted")
        except ValueError as e:
            messages.append(f"{name}: {e}")
    padded = hf.shard_batch({"input_ids": ids[:, :30]}, pad=True)  # 30 -> 32 tokens, 8 per rank
    messages.append(f"padded: {tuple(padded['input_ids'].shape)}")
    return messages


def test_refusals_are_raised_on_every_rank(pools):
    for rank, messages in enumerate(pools(4).run(_refusals)):
        text = "\n".join(messages)
        assert "accepted" not in text, (rank, text)
        assert text.count("cannot honour a padding mask") == 1, text
        assert "it cannot be honoured exactly" in text or "another rank" in text, text
        assert "position_ids on CP rank" in text or "another rank" in text, text
        assert "a packed batch must be one row" in text, text
        assert (
            "position_ids on CP rank"
            in text.split("packed, local bounds")[0].split("packed, bounds not given")[1]
            or "another rank" in text
        ), text
        assert "FULL packed sequence (64 tokens)" in text, text
        assert "sliding_window=8" in text and "differs between the ranks" in text, text
        assert "num_items_in_batch=10 is below the 63 valid labels" in text, text
        assert "pad=True" in text and "padded: (1, 8)" in text, text
