"""The communication model: bytes each rank sends, per kind of traffic, forward and backward.

The same kinds :class:`~usp_npu.comm.stats.CommStats` counts, so a measurement can be checked
against this model exactly (tests) and tables can show both (benchmarks). The formulas live in
one place, ``usp_npu.plan.traffic`` (per rank, per peer, per ring step: the plain ring, the
double ring's inner / outer links, the KV cache policies, kvallgather and the Ulysses
all-gather of K/V); this module sums one rank's transfers by kind and direction.
"""

from __future__ import annotations

from collections import Counter

from usp_npu.config import ContextParallelConfig

#: bytes of one element -> the dtype ``plan.traffic.ModelShape`` prices
_DTYPE_OF_SIZE = {8: "float64", 4: "float32", 2: "bfloat16"}


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
    Every rank of the context-parallel group sends the same, so rank 0's transfers stand for all.
    """
    from usp_npu.plan.placement import rank_groups
    from usp_npu.plan.traffic import ModelShape, rank_shape, rank_transfers

    if element_size not in _DTYPE_OF_SIZE:
        raise ValueError(
            f"element_size must be one of {sorted(_DTYPE_OF_SIZE)}, got {element_size}"
        )
    shape = ModelShape(
        heads=heads,
        head_dim=head_dim,
        seq=seq,
        kv_heads=kv_heads,
        batch=batch,
        dtype=_DTYPE_OF_SIZE[element_size],
    )
    if accumulator_size != shape.accumulator_bytes:  # fp32 accumulators unless fp64 inputs
        raise ValueError(
            f"accumulator_size {accumulator_size} does not match element_size {element_size} "
            f"(the kernels accumulate dK/dV in {shape.accumulator_bytes}-byte elements)"
        )
    cp = cfg.context_parallel_size
    groups = rank_groups(cp, 1, cp, cfg.ulysses_degree)[0]
    fwd: Counter = Counter()
    bwd: Counter = Counter()
    for t in rank_transfers(shape, rank_shape(shape, cfg, 1, layer_number), groups):
        (fwd if t.direction == "forward" else bwd)[t.kind] += t.nbytes
    return (
        {k: n for k, n in fwd.items() if n},
        {k: n for k, n in bwd.items() if n},
    )
