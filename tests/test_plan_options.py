"""``usp-npu plan`` with issue 13's options: double ring (``--cp-window-size``), kvallgather,
the Ulysses all-gather of K/V, KV cache policies with ``--context-parallel-cache-interval``.

The byte checks run the real bench on gloo ranks, every rank on a node, and compare each rank's
counted bytes, per kind and per link class, forward and forward + backward, with
``usp_npu.plan.traffic`` exactly; ``comm.volume.expected_bytes`` is checked to be the same sums.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from usp_npu.bench import BenchCase, bench_rank
from usp_npu.comm.volume import expected_bytes
from usp_npu.config import HYBRID, KVALLGATHER, RING, ULYSSES, ContextParallelConfig
from usp_npu.plan import (
    PRESETS,
    ModelShape,
    bytes_by_class,
    counted_by_kind,
    layer_transfers,
    node_of_rank,
    plan,
)
from usp_npu.plan.model import _ring_time, transfer_time
from usp_npu.plan.report import candidate_configs, evaluate
from usp_npu.plan.traffic import Transfer

# (name, BenchCase fields, devices per node, placement)
OPTION_CASES = {
    "ring4-w2": (dict(algo=RING, cp=4, window=2, kv_heads=2), 2, "megatron"),
    "u2-r4-w2": (dict(algo=HYBRID, cp=8, ulysses_degree=2, window=2, kv_heads=2), 4, "megatron"),
    "u2-r4-w2-rr": (
        dict(algo=HYBRID, cp=8, ulysses_degree=2, window=2, kv_heads=4, dtype="bfloat16"),
        4,
        "round_robin",
    ),
    "kvallgather-cp4": (dict(algo=KVALLGATHER, cp=4, kv_heads=2), 2, "megatron"),
    "allgather-kv-u4-kv1": (dict(algo=ULYSSES, cp=4, kv_heads=1, allgather_kv=True), 2, "megatron"),
    # KV cache with an interval: layer 1 cached, layer 2 not (interval 1); layer 4 cached (2)
    "ring4-full-int1-layer1": (
        dict(algo=RING, cp=4, kv_cache="full", cache_interval=1, layer_number=1),
        2,
        "megatron",
    ),
    "ring4-full-int1-layer2": (
        dict(algo=RING, cp=4, kv_cache="full", cache_interval=1, layer_number=2),
        2,
        "megatron",
    ),
    "ring4-w2-half-int2-layer4": (
        dict(algo=RING, cp=4, window=2, kv_cache="half", cache_interval=2, layer_number=4),
        2,
        "megatron",
    ),
    "ulysses4-half-int1-layer3": (
        dict(algo=ULYSSES, cp=4, kv_heads=2, kv_cache="half", cache_interval=1, layer_number=3),
        2,
        "round_robin",
    ),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_option_bytes_equal_counted_bytes(pools, name):
    fields, dpn, placement = OPTION_CASES[name]
    bench = BenchCase(
        seq=32, heads=4, head_dim=8, repeats=1, devices_per_node=dpn, placement=placement,
        **{"dtype": "float32", **fields},
    )  # fmt: skip
    world = bench.world_size
    ranks = pools(world).run(bench_rank, bench)
    shape = ModelShape(heads=4, head_dim=8, seq=32, kv_heads=bench.kv_heads, dtype=bench.dtype)
    cfg = bench.config()
    transfers = layer_transfers(shape, cfg, 1, world, bench.layer_number)
    nodes = node_of_rank(world, dpn, placement)
    both, forward = bytes_by_class(transfers, nodes), bytes_by_class(transfers, nodes, "forward")
    kinds, crosses = set(), False
    for res in ranks:
        rank = res["rank"]
        assert res["bytes"] == counted_by_kind(transfers, rank)
        assert res["bytes_by_link"] == both[rank]
        assert res["forward_bytes_by_link"] == forward[rank]
        kinds |= set(res["bytes"])
        crosses |= any("inter_node" in c for c in res["bytes_by_link"].values())
    assert crosses  # every case puts some traffic on the slow links
    # the option's own traffic is there (not a plain run that happens to agree)
    if bench.window > 1:
        assert {"ring_inner_kv", "ring_outer_kv", "ring_inner_dkv", "ring_outer_dkv"} <= kinds
    if bench.algo == KVALLGATHER or bench.allgather_kv:
        assert {"all_gather", "reduce_scatter"} <= kinds
    cached = cfg.kv_cache_policy(bench.layer_number)
    if bench.kv_cache is not None:
        plain = layer_transfers(
            shape, replace(bench, kv_cache=None, cache_interval=0).config(), 1, world
        )
        same = sum(t.nbytes for t in transfers) == sum(t.nbytes for t in plain)
        assert same == (cached is None), (cached, bench.layer_number)
    # volume.expected_bytes is the same transfers summed (one source of the formulas)
    sizes = (shape.element_bytes, shape.accumulator_bytes)
    fwd, bwd = expected_bytes(cfg, 32, 1, 4, bench.kv_heads or 4, 8, *sizes, bench.layer_number)
    assert fwd == {k: n for k, n in ranks[0]["forward_bytes"].items() if n}
    total = {k: fwd.get(k, 0) + bwd.get(k, 0) for k in fwd.keys() | bwd.keys()}
    assert total == {k: n for k, n in ranks[0]["bytes"].items() if n}


# -- enumeration and the JSON entries -----------------------------------------------------------


def test_plan_enumerates_every_window_kvallgather_and_allgather_kv():
    shape = ModelShape(heads=32, head_dim=128, seq=131072, kv_heads=8)
    cluster = PRESETS["atlas-800t-a2"].with_overrides(nodes=2)
    result = plan(shape, cluster, cp=16)
    got = [
        (c["context_parallel_algo"], c["ulysses_degree"], c["cp_window_size"])
        for c in result["configs"]
    ]
    want = []
    for u in (1, 2, 4, 8, 16):
        r = 16 // u
        algo = ULYSSES if u == 16 else (RING if u == 1 else HYBRID)
        want.append((algo, u, 1))
        want += [(algo, u, w) for w in (2, 4, 8) if w < r and r % w == 0]
        if u == 1:
            want.append((KVALLGATHER, 1, 1))
    want.append((ULYSSES, 16, 1))  # all-gather KV
    assert got == want
    assert [c["use_ulysses_allgather_kv"] for c in result["configs"]].count(True) == 1
    for c in result["configs"]:
        assert c["valid"] and c["error"] is None
        assert set(c["bytes_per_rank"]) == {"intra_node", "inter_node"}
    assert result["recommended"]["valid"] and result["recommended"] in result["configs"]
    # MHA: no all-gather KV entry (validate would reject it for every model without GQA)
    mha = plan(replace(shape, kv_heads=None), cluster, cp=16)["configs"]
    assert not any(c["use_ulysses_allgather_kv"] for c in mha)


def test_rejected_window_carries_the_validation_message():
    cfg = candidate_configs(4, windows=(3,))[1]
    assert (cfg.context_parallel_algo, cfg.cp_window_size) == (RING, 3)
    shape = ModelShape(heads=8, head_dim=64, seq=4096)
    cluster = PRESETS["generic-8gpu"].with_overrides(nodes=1, devices_per_node=4)
    entry = evaluate(shape, cfg, cluster)
    with pytest.raises(ValueError) as err:
        cfg.validate(8, 4096, world_size=4)
    assert entry["valid"] is False and entry["error"] == str(err.value)
    assert "--cp-window-size 3 must divide the ring degree 4" in entry["error"]
    assert entry["predicted_time_s"] is None and entry["cp_window_size"] == 3


def test_double_ring_moves_inter_node_traffic_to_the_outer_ring():
    """2 nodes x 4, ring r=8: the plain ring crosses nodes on 2 of its 8 links (7 hops each),
    the double ring with w=4 (windows = nodes) only on the outer ring (1 hop each of 8 ranks);
    the same bytes in all, split (r - r/w) : (r/w - 1) between inner and outer."""
    shape = ModelShape(heads=8, head_dim=64, seq=8192)
    nodes = node_of_rank(8, 4)
    cfgs = [ContextParallelConfig(8, RING), ContextParallelConfig(8, RING, cp_window_size=4)]
    plain, double = (layer_transfers(shape, cfg, 1, 8) for cfg in cfgs)
    assert sum(t.nbytes for t in plain) == sum(t.nbytes for t in double)

    def inter(transfers, kind):
        return sum(t.nbytes for t in transfers if t.kind == kind and nodes[t.src] != nodes[t.dst])

    def total(transfers, kind):
        return sum(t.nbytes for t in transfers if t.kind == kind)

    assert inter(double, "ring_inner_kv") == inter(double, "ring_inner_dkv") == 0
    assert inter(double, "ring_outer_kv") == total(double, "ring_outer_kv") > 0
    assert total(double, "ring_outer_kv") * 6 == total(double, "ring_inner_kv")
    assert inter(plain, "ring_kv") * 8 == total(plain, "ring_kv") * 2  # 2 of 8 links cross
    assert inter(double, "ring_outer_kv") * 7 == inter(plain, "ring_kv") * 4  # 8 x 1 vs 2 x 7


def test_outer_hop_hides_behind_a_round_and_shows_its_excess():
    """A transfer spanning w steps costs nothing while it fits in them and only its excess
    beyond them otherwise; a one-step transfer is max'd with its own step."""
    cluster = replace(
        PRESETS["generic-8gpu"], nodes=2, devices_per_node=1, inter_node_bandwidth=1e6,
        inter_node_latency=0.0, intra_node_latency=0.0,
    )  # fmt: skip
    nodes = [0, 1]
    compute = [1.0, 1.0]

    def outer(nbytes: int) -> list[Transfer]:
        return [Transfer("ring_outer_kv", "forward", "ring", 0, 0, 1, nbytes, span=2)]

    from usp_npu.plan.model import Prediction

    assert _ring_time(outer(int(1.5e6)), compute, 2, "forward", nodes, cluster, Prediction()) == 2.0
    slow = outer(int(3e6))
    assert transfer_time(slow, nodes, cluster) == pytest.approx(3.0)
    assert _ring_time(slow, compute, 2, "forward", nodes, cluster, Prediction()) == pytest.approx(
        3.0
    )
    one = [Transfer("ring_kv", "forward", "ring", 0, 0, 1, int(1.5e6))]
    assert _ring_time(one, compute, 2, "forward", nodes, cluster, Prediction()) == pytest.approx(
        2.5
    )


# -- memory and the step over --num-layers -------------------------------------------------------


def _entry(cfg: ContextParallelConfig, layers: int = 1, kv: int | None = 2) -> dict:
    shape = ModelShape(heads=8, head_dim=64, seq=8192, kv_heads=kv, num_layers=layers)
    cluster = PRESETS["generic-8gpu"].with_overrides(nodes=1, devices_per_node=4)
    return evaluate(shape, cfg, cluster)


def test_memory_follows_the_options():
    """Held bytes: the ring cache keeps the r - 1 received K/V blocks (full) or their K (half),
    kvallgather the gathered K/V; the Ulysses cache keeps the K/V before the all-to-all (the
    differences ``tests/test_kv_cache.py`` measures)."""
    held = {
        p: _entry(ContextParallelConfig(4, RING, context_parallel_kv_cache_policy=p))[
            "memory_held_bytes"
        ]
        for p in (None, "full", "half")
    }
    block = 8192 // 4 * 2 * 64 * 2  # one of K or V of one ring rank: L x Nkv x D x bf16
    assert held["full"] - held[None] == 3 * 2 * block
    assert held["half"] - held[None] == 3 * block
    kvag = _entry(ContextParallelConfig(4, KVALLGATHER))["memory_held_bytes"]
    assert kvag == held["full"]  # both keep every K/V block for the backward
    uly = {
        p: _entry(ContextParallelConfig(4, ULYSSES, context_parallel_kv_cache_policy=p))[
            "memory_held_bytes"
        ]
        for p in (None, "full", "half")
    }
    post, pre = 8192 * 1 * 64 * 2, 8192 // 4 * 2 * 64 * 2  # 2 K/V heads replicated to u=4
    assert uly[None] - uly["full"] == 2 * (post - pre) > 0
    assert uly[None] - uly["half"] == post - pre
    ag = _entry(ContextParallelConfig(4, ULYSSES, use_ulysses_allgather_kv=True))
    assert ag["memory_held_bytes"] - uly[None] == 2 * (8192 * 2 * 64 * 2 - post)


def test_cache_interval_prices_each_layer_with_its_policy():
    """4 layers, full cache, interval 1: layers 1 and 3 cached, 2 and 4 not; the step's bytes,
    time and held memory are the sums of two cached and two uncached layers."""
    cached = _entry(ContextParallelConfig(4, RING, context_parallel_kv_cache_policy="full"))
    plain = _entry(ContextParallelConfig(4, RING))
    mixed = _entry(
        ContextParallelConfig(
            4, RING, context_parallel_kv_cache_policy="full", context_parallel_cache_interval=1
        ),
        layers=4,
    )
    for cls in ("intra_node", "inter_node"):
        want = 2 * cached["bytes_per_rank"][cls] + 2 * plain["bytes_per_rank"][cls]
        assert mixed["bytes_per_step"][cls] == want
    assert mixed["bytes_per_rank"] == cached["bytes_per_rank"]  # layer 1 stands for the layer
    assert mixed["predicted_step_time_s"] == pytest.approx(
        2 * cached["predicted_time_s"] + 2 * plain["predicted_time_s"]
    )
    assert (
        mixed["memory_bytes_per_rank"] - mixed["memory_transient_bytes"]
        == 2 * cached["memory_held_bytes"] + 2 * plain["memory_held_bytes"]
    )
    assert "--context-parallel-cache-interval 1" in mixed["flags"]
