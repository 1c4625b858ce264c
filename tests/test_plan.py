"""``usp-npu plan``: the JSON contract, rejected configurations, the bytes the model predicts
against the bytes the communication layer counts, and the placement of ranks on nodes.

The byte checks run the real bench on gloo ranks (``bench_rank``) with every rank assigned to a
node, and compare each rank's counted bytes, per kind and per link class, forward and forward +
backward, with ``usp_npu.plan.traffic`` exactly.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from usp_npu import cli
from usp_npu.algorithms.usp import pipeline_chunks
from usp_npu.bench import BenchCase, bench_rank
from usp_npu.config import HYBRID, KVALLGATHER, RING, ULYSSES, ContextParallelConfig
from usp_npu.parallel_state import initialize_context_parallel
from usp_npu.plan import (
    PRESETS,
    ModelShape,
    bytes_by_class,
    counted_by_kind,
    layer_transfers,
    node_of_rank,
    plan,
    rank_configs,
    rank_groups,
)
from usp_npu.plan.model import predict, step_pairs
from usp_npu.plan.traffic import rank_shape

CONTRACT = [
    "plan", "--preset", "atlas-800t-a2", "--nodes", "2", "--num-attention-heads", "32",
    "--num-query-groups", "8", "--head-dim", "128", "--seq-length", "131072",
    "--context-parallel-size", "16", "--json",
]  # fmt: skip


def run_plan(argv: list[str], capsys) -> dict:
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "usp-npu plan:" in captured.err  # the table goes to stderr when --json owns stdout
    return json.loads(captured.out)


def test_plan_json_contract(capsys):
    result = run_plan(CONTRACT, capsys)
    configs = result["configs"]
    plain = [  # without the options (double-ring windows, kvallgather, all-gather KV)
        c for c in configs
        if c["cp_window_size"] == 1 and not c["use_ulysses_allgather_kv"]
        and c["context_parallel_algo"] != KVALLGATHER
    ]  # fmt: skip
    assert [(c["context_parallel_algo"], c["ulysses_degree"], c["ring_degree"]) for c in plain] == [
        (RING, 1, 16), (HYBRID, 2, 8), (HYBRID, 4, 4), (HYBRID, 8, 2), (ULYSSES, 16, 1)
    ]  # fmt: skip
    assert len(configs) == 13  # + windows 2, 4, 8 | 2, 4 | 2, kvallgather, all-gather KV
    for c in configs:
        assert c["valid"] is True and c["error"] is None
        assert isinstance(c["predicted_time_s"], float) and c["predicted_time_s"] > 0
        assert set(c["bytes_per_rank"]) == {"intra_node", "inter_node"}
        assert all(isinstance(v, int) and v >= 0 for v in c["bytes_per_rank"].values())
        assert isinstance(c["memory_bytes_per_rank"], int) and c["memory_bytes_per_rank"] > 0
    fastest = min(configs, key=lambda c: c["predicted_time_s"])
    best = result["recommended"]
    assert best in configs and best["predicted_time_s"] <= fastest["predicted_time_s"] * 1.01
    assert isinstance(result["reason"], str) and result["reason"].endswith(".")
    assert best["name"] in result["reason"]
    # the sentence travels with the recommended entry; every other entry has none
    assert best["reason"] == result["reason"]
    assert [c["reason"] for c in configs].count(result["reason"]) == 1
    assert all(c["reason"] is None for c in configs if c != best)
    # Ulysses inside each node, the ring across the two (the USP paper's rule): u=4 r=4 is
    # predicted 0.6% faster (its pipelined all-to-all hides half its exchange), a tie that the
    # 3x fewer inter-node bytes of u=8 r=2 win
    assert (best["context_parallel_algo"], best["ulysses_degree"], best["ring_degree"]) == (
        HYBRID, 8, 2
    )  # fmt: skip
    assert fastest["ulysses_degree"] == 4 and "a tie at this model's accuracy" in result["reason"]
    # 2 nodes x 8: Ulysses over 16 ranks sends 8 of its 15 peer shares off-node; ring r=16 has
    # rank 7 -> 8 and 15 -> 0 crossing nodes, so its busiest rank sends everything inter-node
    uly, ring = plain[-1]["bytes_per_rank"], plain[0]["bytes_per_rank"]
    assert uly["inter_node"] * 7 == uly["intra_node"] * 8
    assert ring["inter_node"] == ring["intra_node"] > 0


def test_plan_rejects_with_the_validation_message(capsys):
    """12 heads on cp 8: Ulysses (u=8) and hybrid u=8... are rejected with validate's own words."""
    argv = ["plan", "--nodes", "1", "--num-attention-heads", "12", "--num-query-groups", "4"]
    argv += ["--head-dim", "64", "--seq-length", "4096", "--json"]
    result = run_plan(argv, capsys)
    by_u = {c["ulysses_degree"]: c for c in result["configs"]}
    assert sorted(by_u) == [1, 2, 4, 8]
    assert by_u[1]["valid"] and by_u[2]["valid"] and by_u[4]["valid"]
    rejected = by_u[8]
    assert rejected["valid"] is False and rejected["predicted_time_s"] is None
    with pytest.raises(ValueError) as err:
        ContextParallelConfig(8, ULYSSES).validate(12, 4096, num_query_groups=4, world_size=8)
    assert rejected["error"] == str(err.value)
    assert "--num-attention-heads 12 must be divisible by" in rejected["error"]
    assert result["recommended"]["valid"] is True


def test_plan_table_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    argv = ["plan", "--preset", "generic-8gpu", "--nodes", "2", "--num-attention-heads", "16"]
    argv += ["--seq-length", "32768", "--placement", "all", "--plot", str(png)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    # cp 16: u = 1..16, the windows of each ring degree (3 + 2 + 1) and kvallgather
    assert out.count("| round_robin |") == out.count("| megatron |") == 5 + 6 + 1
    assert out.count("RECOMMENDED") == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--devices-per-node", "0"], "--devices-per-node"),
        (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3"),
        (["--nodes", "0"], "--nodes"),
    ],
)
def test_plan_bad_cluster_flags(flags, named, capsys):
    argv = ["plan", "--num-attention-heads", "8", "--seq-length", "1024", *flags]
    assert cli.main(argv) == 2
    assert named in capsys.readouterr().err


def test_overlap_hides_a_fast_ring_and_not_a_slow_one():
    """Ring transfers hide behind compute on fast links (exposed ~ 0) and show on slow ones;
    the Ulysses all-to-all is always exposed."""
    shape = ModelShape(heads=32, head_dim=128, seq=131072, kv_heads=8)
    fast = PRESETS["atlas-800t-a2"].with_overrides(nodes=2)
    slow = fast.with_overrides(inter_node_bandwidth=1e9)
    by = {
        name: {c["name"]: c for c in plan(shape, cl, cp=16)["configs"]}
        for name, cl in (("fast", fast), ("slow", slow))
    }
    ring = f"{RING} u=1 r=16"
    ring_fast, ring_slow = by["fast"][ring], by["slow"][ring]
    assert ring_fast["exposed_comm_time_s"] < 0.02 * ring_fast["compute_time_s"]
    assert ring_slow["exposed_comm_time_s"] > ring_slow["compute_time_s"]
    uly = by["fast"][f"{ULYSSES} u=16 r=1"]
    assert uly["exposed_comm_time_s"] >= uly["comm_time_s"] * 0.999


# -- placement ----------------------------------------------------------------------------------


def _my_groups(cp: int, u: int, tp: int) -> tuple:
    algo = ULYSSES if u == cp else (RING if u == 1 else HYBRID)
    cfg = ContextParallelConfig(cp, algo, u if algo == HYBRID else None)
    mesh = initialize_context_parallel(cfg, tensor_model_parallel_size=tp)
    return mesh.rank, mesh.ulysses_ranks, mesh.ring_ranks


@pytest.mark.parametrize(("cp", "u", "tp"), [(8, 2, 1), (4, 2, 2), (2, 2, 4), (4, 1, 2)])
def test_placement_matches_initialize_context_parallel(pools, cp, u, tp):
    """The plan's groups are the ones the ranks build; with Megatron's placement and
    tp * u <= devices per node, every Ulysses group sits on one node."""
    got = pools(8).run(_my_groups, cp, u, tp)
    want = rank_groups(8, tp, cp, u)
    assert [(g.rank, g.ulysses_ranks, g.ring_ranks) for g in want] == [tuple(x) for x in got]
    for dpn in (2, 4, 8):
        nodes = node_of_rank(8, dpn, "megatron")
        for g in want:
            on_one_node = len({nodes[m] for m in g.ulysses_ranks}) == 1
            assert on_one_node == (tp * u <= dpn or u == 1), (dpn, g)


def test_round_robin_places_neighbours_on_different_nodes():
    assert node_of_rank(8, 4, "round_robin") == [0, 1, 0, 1, 0, 1, 0, 1]
    assert node_of_rank(8, 4, "megatron") == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="--placement must be one of"):
        node_of_rank(8, 4, "random")


# -- predicted bytes == counted bytes -----------------------------------------------------------

BYTE_CASES = [
    # (world, tp, u, heads, kv_heads, dtype, devices_per_node, placement)
    (4, 1, 1, 4, None, "float32", 2, "megatron"),  # ring over 2 nodes
    (4, 1, 2, 4, 2, "float32", 2, "megatron"),  # hybrid, GQA, Ulysses inside nodes
    (4, 1, 2, 4, 2, "float32", 2, "round_robin"),  # the same, Ulysses across nodes
    (4, 1, 4, 4, 2, "float32", 2, "megatron"),  # Ulysses u=4 > 2 K/V heads: replicated
    (8, 2, 2, 8, 2, "bfloat16", 4, "megatron"),  # tp 2: 1 K/V head per tp rank, u=2; fp32 dK/dV
    (8, 1, 2, 4, 4, "bfloat16", 2, "round_robin"),  # cp 8, hybrid 2 x 4
    (8, 2, 1, 4, None, "float64", 2, "megatron"),  # tp 2 ring, fp64 dK/dV accumulators
]
# KV cache policies: (world, u, policy); the ring skips (full) or halves (half) the backward's
# K/V resend; pure Ulysses gathers the kept K/V (full) or K (half) again in the backward
CACHE_CASES = [(4, 1, "full"), (4, 2, "half"), (4, 4, "full"), (4, 4, "half")]


@pytest.mark.parametrize("case", BYTE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_predicted_bytes_equal_counted_bytes(pools, case):
    world, tp, u, heads, kv_heads, dtype, dpn, placement = case
    cp = world // tp
    algo = ULYSSES if u == cp else (RING if u == 1 else HYBRID)
    bench = BenchCase(
        algo=algo, cp=cp, ulysses_degree=u if algo == HYBRID else None, seq=32, heads=heads,
        kv_heads=kv_heads, head_dim=8, dtype=dtype, repeats=1, tp=tp, devices_per_node=dpn,
        placement=placement,
    )  # fmt: skip
    ranks = pools(world).run(bench_rank, bench)
    shape = ModelShape(heads=heads, head_dim=8, seq=32, kv_heads=kv_heads, dtype=dtype)
    transfers = layer_transfers(shape, bench.config(), tp, world)
    nodes = node_of_rank(world, dpn, placement)
    both, forward = bytes_by_class(transfers, nodes), bytes_by_class(transfers, nodes, "forward")
    crosses = False
    for res in ranks:
        rank = res["rank"]
        assert res["bytes"] == counted_by_kind(transfers, rank)
        assert res["bytes_by_link"] == both.get(rank, {})
        assert res["forward_bytes_by_link"] == forward.get(rank, {})
        crosses |= any("inter_node" in c for c in res["bytes_by_link"].values())
    assert crosses  # every case puts some traffic on the slow links


def test_plan_entry_bytes_are_the_busiest_ranks(pools):
    """``bytes_per_rank`` of a plan entry = the per-class maximum over ranks of what they count."""
    bench = BenchCase(algo=RING, cp=4, seq=32, heads=4, head_dim=8, repeats=1, devices_per_node=2)
    ranks = pools(4).run(bench_rank, bench)
    cluster = replace(PRESETS["generic-8gpu"], nodes=2, devices_per_node=2)
    shape = ModelShape(heads=4, head_dim=8, seq=32, dtype="float32")
    entry = plan(shape, cluster, cp=4)["configs"][0]
    assert (entry["context_parallel_algo"], entry["ring_degree"]) == (RING, 4)
    for cls in ("intra_node", "inter_node"):
        counted = max(sum(k.get(cls, 0) for k in r["bytes_by_link"].values()) for r in ranks)
        assert entry["bytes_per_rank"][cls] == counted > 0


# -- packed documents (cu_seqlens) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("cp", "u", "cu"),
    [(4, 1, (0, 8, 32)), (4, 2, (0, 16, 32)), (4, 4, (0, 4, 12, 32)), (2, 1, (0, 4, 32))],
)
def test_packed_work_is_the_in_document_causal_pairs(cp, u, cu):
    """The schedule's blocks, summed over the ring ranks, are exactly each document's causal
    triangle: the model prices no pair across documents and misses none."""
    shape = ModelShape(heads=4, head_dim=8, seq=32, cu_seqlens=cu)
    algo = ULYSSES if u == cp else (RING if u == 1 else HYBRID)
    cfg = ContextParallelConfig(cp, algo, u if algo == HYBRID else None)
    pairs = step_pairs(shape, rank_shape(shape, cfg, 1), causal=True)
    docs = [b - a for a, b in itertools.pairwise(cu)]
    assert sum(p for per_rank in pairs for _, p in per_rank) == sum(n * (n + 1) / 2 for n in docs)
    dense = step_pairs(replace(shape, cu_seqlens=None), rank_shape(shape, cfg, 1), causal=True)
    assert sum(p for per_rank in dense for _, p in per_rank) == 32 * 33 / 2


def test_packed_plan_rejects_with_the_split_message(capsys):
    argv = ["plan", "--nodes", "1", "--devices-per-node", "4", "--num-attention-heads", "4"]
    argv += ["--seq-length", "64", "--document-lengths", "58", "6", "--json"]
    result = run_plan(argv, capsys)
    by_u = {c["ulysses_degree"]: c for c in result["configs"]}
    assert by_u[4]["valid"]  # Ulysses splits the whole sequence: 64 % 4 == 0
    for u in (1, 2):  # the causal ring cuts every document into 2r chunks
        assert not by_u[u]["valid"]
        assert "cu_seqlens cannot be split for the causal ring" in by_u[u]["error"]
        assert "not divisible by 2 x ring degree" in by_u[u]["error"]
    assert result["recommended"]["ulysses_degree"] == 4


@pytest.mark.parametrize(("u", "cu"), [(1, (0, 8, 32)), (2, (0, 16, 32))])
def test_packed_bytes_equal_counted_bytes(pools, u, cu):
    """Packing changes the work per step, not what travels: the bench's packed run counts the
    model's bytes."""
    algo = RING if u == 1 else HYBRID
    bench = BenchCase(
        algo=algo, cp=4, ulysses_degree=u if algo == HYBRID else None, seq=32, heads=4,
        kv_heads=2, head_dim=8, repeats=1, devices_per_node=2, cu_seqlens=cu,
    )  # fmt: skip
    ranks = pools(4).run(bench_rank, bench)
    shape = ModelShape(heads=4, head_dim=8, seq=32, kv_heads=2, dtype="float32", cu_seqlens=cu)
    transfers = layer_transfers(shape, bench.config(), 1, 4)
    both = bytes_by_class(transfers, node_of_rank(4, 2))
    for res in ranks:
        assert res["bytes_by_link"] == both[res["rank"]]


@pytest.mark.parametrize(("world", "u", "policy"), CACHE_CASES, ids=str)
def test_kv_cache_bytes_equal_counted_bytes(pools, world, u, policy):
    algo = ULYSSES if u == world else (RING if u == 1 else HYBRID)
    bench = BenchCase(
        algo=algo, cp=world, ulysses_degree=u if algo == HYBRID else None, seq=32, heads=4,
        kv_heads=2, head_dim=8, repeats=1, devices_per_node=2, kv_cache=policy,
    )  # fmt: skip
    ranks = pools(world).run(bench_rank, bench)
    shape = ModelShape(heads=4, head_dim=8, seq=32, kv_heads=2, dtype="float32")
    transfers = layer_transfers(shape, bench.config(), 1, world)
    nodes = node_of_rank(world, 2)
    plain = layer_transfers(shape, replace(bench, kv_cache=None).config(), 1, world)
    assert sum(t.nbytes for t in transfers) != sum(t.nbytes for t in plain)
    both, forward = bytes_by_class(transfers, nodes), bytes_by_class(transfers, nodes, "forward")
    for res in ranks:
        assert res["bytes"] == counted_by_kind(transfers, res["rank"])
        assert res["bytes_by_link"] == both[res["rank"]]
        assert res["forward_bytes_by_link"] == forward[res["rank"]]


@pytest.mark.parametrize(
    ("cp", "u", "tp", "heads", "kv", "dtype", "policy"),
    [
        (8, 1, 1, 8, 2, "bfloat16", None), (8, 2, 1, 8, 2, "float32", None),
        (8, 8, 1, 8, 2, "float32", None), (4, 2, 2, 8, 4, "float64", None),
        (4, 1, 1, 4, 4, "float32", "half"), (4, 4, 1, 8, 2, "bfloat16", "full"),
        (8, 2, 1, 8, 8, "float32", "full"),
    ],
)  # fmt: skip
def test_per_peer_traffic_agrees_with_the_volume_model(cp, u, tp, heads, kv, dtype, policy):
    """``usp_npu.comm.volume.expected_bytes`` sums one rank's per-peer transfers (tp 1, heads
    per tp rank); every rank of the whole tp x cp mesh sends the same per kind and direction, so
    the per-rank model the #13 tests check stands for all of them."""
    from usp_npu.comm.volume import expected_bytes

    algo = ULYSSES if u == cp else (RING if u == 1 else HYBRID)
    cfg = ContextParallelConfig(
        cp, algo, u if algo == HYBRID else None, context_parallel_kv_cache_policy=policy
    )
    shape = ModelShape(heads=heads, head_dim=16, seq=64, kv_heads=kv, dtype=dtype)
    transfers = layer_transfers(shape, cfg, tp, tp * cp)
    want_fwd, want_bwd = expected_bytes(
        cfg, 64, 1, heads // tp, kv // tp, 16, shape.element_bytes, shape.accumulator_bytes
    )
    for rank in range(tp * cp):
        for direction, want in (("forward", want_fwd), ("backward", want_bwd)):
            got: dict[str, int] = {}
            for t in transfers:
                if t.src == rank and t.direction == direction:
                    got[t.kind] = got.get(t.kind, 0) + t.nbytes
            assert got == want, (rank, direction)


def test_pipelined_ulysses_hides_all_but_one_chunk_of_each_exchange():
    """With C head chunks the forward costs the packing, chunk 0's exchange in, C chunk steps of
    max(ring / C, next exchange in + previous exchange out) and the last exchange out; C = 1
    keeps every exchange exposed. Checked against the phases of the unpipelined prediction."""
    shape = ModelShape(heads=16, head_dim=128, seq=8192, kv_heads=8, dtype="float32")
    cluster = PRESETS["generic-8gpu"].with_overrides(
        nodes=2, devices_per_node=1, inter_node_bandwidth=5e9, inter_node_latency=0.0
    )
    nodes = node_of_rank(2, 1, "megatron")

    def run(chunks):
        cfg = ContextParallelConfig(2, ULYSSES, ulysses_pipeline_chunks=chunks)
        return predict(shape, cfg, 1, cluster, nodes, layer_transfers(shape, cfg, 1, 2))

    whole, piped = run(1), run(4)
    assert (whole.pipeline_chunks, piped.pipeline_chunks) == (1, 4)
    for direction, first, last in (
        ("forward", "a2a_in", "a2a_out"),
        ("backward", "a2a_dout", "a2a_dqkv"),
    ):
        ph = {p["phase"]: p for p in whole.phases if p["direction"] == direction}
        ring = ph["ring step 0"]["compute_s"]  # one step: no ring transfers (r = 1)
        x_in, x_out = ph[first]["comm_s"] / 4, ph[last]["comm_s"] / 4  # no latency here
        pack = ph[first]["compute_s"] + ph[last]["compute_s"]
        steps = sum(
            max(ring / 4, (x_in if c < 3 else 0) + (x_out if c > 0 else 0)) for c in range(4)
        )
        got = piped.forward_s if direction == "forward" else piped.backward_s
        full = whole.forward_s if direction == "forward" else whole.backward_s
        assert full == pytest.approx(pack + 4 * x_in + ring + 4 * x_out)
        assert got == pytest.approx(pack + x_in + steps + x_out)
        assert got < full
    # the rule picks the chunks the code path runs with
    rule = run(None)
    assert rule.pipeline_chunks == pipeline_chunks((4096, 1, 16, 128), 8, 2, 4) > 1


def _entry(name: str, seconds: float, inter: int) -> dict:
    return {"name": name, "predicted_time_s": seconds, "bytes_per_rank": {"inter_node": inter}}


def test_near_ties_go_to_fewer_inter_node_bytes():
    a, b, c, d = (
        _entry("a", 1.000, 300),
        _entry("b", 1.009, 100),  # within 1% of a: a tie, won on inter-node bytes
        _entry("c", 1.011, 10),  # beyond 1%: slower, whatever it sends
        _entry("d", 1.005, 100),  # tied with b on bytes: the faster first
    )
    assert [e["name"] for e in rank_configs([a, b, c, d])] == ["d", "b", "a", "c"]
    assert rank_configs([c, a]) == [a, c]
    assert rank_configs([]) == []
