"""The communication model: bytes each rank sends, per kind of traffic, forward and backward.

The same kinds :class:`~usp_npu.comm.stats.CommStats` counts, so a measurement can be checked
against this model exactly (tests) and tables can show both (benchmarks). REFERENCE.md section 7
gives the plain algorithms; here also the double ring (inner / outer links), the KV cache
policies, kvallgather and the Ulysses all-gather of K/V.
"""

from __future__ import annotations

from collections import Counter

from usp_npu.config import KVALLGATHER, ContextParallelConfig


def expected_bytes(
    cfg: ContextParallelConfig,
    seq: int,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    element_size: int,
    accumulator_size: int = 4,
    layer_number: int | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """``(forward, backward)`` bytes one rank sends, by kind; zero kinds left out.

    ``heads`` / ``kv_heads``: this tensor-parallel rank's query / K/V heads; ``element_size``:
    bytes of one q/k/v element; ``accumulator_size``: bytes of one dK/dV accumulator element (4,
    or 8 for float64 inputs). ``layer_number`` picks the KV cache policy for the interval rule.
    """
    u, r, cp = cfg.ulysses_degree, cfg.ring_degree, cfg.context_parallel_size
    policy = cfg.kv_cache_policy(layer_number)
    local = seq // cp  # tokens per CP rank before the all-to-all
    row = batch * head_dim * element_size  # one token of one head
    fwd: Counter = Counter()
    bwd: Counter = Counter()
    ring_kv_heads = kv_heads
    if u > 1:
        a2a = (u - 1) * local * row // u  # per head of every all-to-all'd tensor
        if cfg.use_ulysses_allgather_kv:
            gather = (u - 1) * local * row * kv_heads  # one of K, V
            fwd["all_to_all"] += 2 * heads * a2a  # q in, output back
            fwd["all_gather"] += 2 * gather
            bwd["all_to_all"] += 2 * heads * a2a
            bwd["reduce_scatter"] += 2 * gather
            resend = {"full": 2, "half": 1}.get(policy, 0) if r == 1 else 0
            bwd["all_gather"] += resend * gather
        else:
            replicated = kv_heads if kv_heads % u == 0 else u
            fwd["all_to_all"] += (2 * heads + 2 * replicated) * a2a
            bwd["all_to_all"] += (2 * heads + 2 * replicated) * a2a
            resend = {"full": 2, "half": 1}.get(policy, 0) if r == 1 else 0
            bwd["all_to_all"] += resend * replicated * a2a
            ring_kv_heads = replicated // u
    if r > 1:
        ring_len = seq // r
        block = 2 * ring_len * batch * ring_kv_heads * head_dim  # K and V elements
        kv, dkv = block * element_size, block * accumulator_size
        again = {None: 1.0, "full": 0.0, "half": 0.5}[policy]
        if cfg.context_parallel_algo == KVALLGATHER:
            fwd["all_gather"] += (r - 1) * kv
            bwd["reduce_scatter"] += (r - 1) * dkv
        elif cfg.cp_window_size > 1:
            w = cfg.cp_window_size
            for link, hops in (("inner", r - r // w), ("outer", r // w - 1)):
                fwd[f"ring_{link}_kv"] += hops * kv
                bwd[f"ring_{link}_kv"] += int(hops * kv * again)
                bwd[f"ring_{link}_dkv"] += hops * dkv
        else:
            fwd["ring_kv"] += (r - 1) * kv
            bwd["ring_kv"] += int((r - 1) * kv * again)
            bwd["ring_dkv"] += (r - 1) * dkv
    return (
        {k: n for k, n in fwd.items() if n},
        {k: n for k, n in bwd.items() if n},
    )
