"""Flags and validation of the double ring, KV cache, kvallgather and all-gather-KV options, and
the pure rules behind them (visit order, window groups, cache interval, split). No processes."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from usp_npu import add_context_parallel_args, split_sequence
from usp_npu.algorithms.kv_cache import kv_head_range
from usp_npu.algorithms.routes import double_ring_order
from usp_npu.config import HYBRID, KVALLGATHER, RING, ULYSSES, ContextParallelConfig
from usp_npu.parallel_state import double_ring_rank_lists, mesh_rank_lists


def cfg(cp=4, algo=RING, u=None, **kw) -> ContextParallelConfig:
    return ContextParallelConfig(cp, algo, ulysses_degree_in_cp=u, **kw)


def rejected(config, *fragments, heads=8, seq=64, **kw) -> str:
    with pytest.raises(ValueError) as info:
        config.validate(num_attention_heads=heads, seq_length=seq, **kw)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def ok(config, heads=8, seq=64, **kw) -> None:
    assert config.validate(num_attention_heads=heads, seq_length=seq, **kw) is config


# -- --cp-window-size -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        (cfg(4, RING, cp_window_size=3), ["--cp-window-size 3", "ring degree 4", "1, 2"]),
        (cfg(4, RING, cp_window_size=4), ["--cp-window-size 4", "ring degree 4", "smaller"]),
        (cfg(8, RING, cp_window_size=8), ["--cp-window-size 8", "1, 2, 4"]),
        (cfg(8, HYBRID, 2, cp_window_size=3), ["--cp-window-size 3", "ring degree 4", "/ --ulys"]),
        (cfg(8, HYBRID, 4, cp_window_size=2), ["--cp-window-size 2", "ring degree 2", "valid"]),
        (cfg(4, ULYSSES, cp_window_size=2), ["--cp-window-size 2", "ulysses_cp_algo"]),
        (cfg(4, KVALLGATHER, cp_window_size=2), ["--cp-window-size 2", "kvallgather_cp_algo"]),
        (cfg(4, RING, cp_window_size=0), ["--cp-window-size", "0"]),
        (cfg(4, RING, cp_window_size=True), ["--cp-window-size", "True"]),
    ],
)
def test_bad_window_sizes_name_the_flag_and_values(config, fragments):
    rejected(config, *fragments)


@pytest.mark.parametrize(
    "config",
    [
        cfg(4, RING, cp_window_size=2),
        cfg(8, RING, cp_window_size=2),
        cfg(8, RING, cp_window_size=4),
        cfg(8, HYBRID, 2, cp_window_size=2),
        cfg(4, ULYSSES, cp_window_size=1),
    ],
)
def test_valid_window_sizes(config):
    ok(config)


# -- --context-parallel-kv-cache-policy / --context-parallel-cache-interval ----------------------
@pytest.mark.parametrize(
    ("config", "fragments", "kw"),
    [
        (
            cfg(context_parallel_kv_cache_policy="quarter"),
            ["policy", "full or half", "quarter"],
            {},
        ),
        (cfg(1, context_parallel_kv_cache_policy="full"), ["policy full", "size > 1"], {}),
        (cfg(4, KVALLGATHER, context_parallel_kv_cache_policy="half"), ["half", "kvallgather"], {}),
        (cfg(context_parallel_cache_interval=-1), ["--context-parallel-cache-interval", "-1"], {}),
        (cfg(context_parallel_cache_interval=2), ["cache-interval 2", "--context-parallel-kv"], {}),
        (
            cfg(context_parallel_kv_cache_policy="full", context_parallel_cache_interval=4),
            ["--context-parallel-cache-interval 4", "--num-layers 4"],
            {"num_layers": 4},
        ),
    ],
)
def test_bad_kv_cache_settings_name_the_flag_and_values(config, fragments, kw):
    rejected(config, *fragments, **kw)


@pytest.mark.parametrize("algo", [ULYSSES, RING, HYBRID])
@pytest.mark.parametrize("policy", ["full", "half"])
def test_kv_cache_policies_accepted_where_they_apply(algo, policy):
    u = 2 if algo == HYBRID else None
    ok(cfg(4, algo, u, context_parallel_kv_cache_policy=policy, context_parallel_cache_interval=1))


@pytest.mark.parametrize(
    ("interval", "cached"),
    [(0, [1, 2, 3, 4, 5]), (1, [1, 3, 5]), (2, [1, 4]), (4, [1])],
)
def test_cache_interval_rule(interval, cached):
    # MindSpeed's rule: 0 caches every layer, n > 0 the layers with layer_number % (n + 1) == 1
    c = cfg(context_parallel_kv_cache_policy="half", context_parallel_cache_interval=interval)
    assert [n for n in range(1, 6) if c.kv_cache_policy(n) == "half"] == cached
    assert all(c.kv_cache_policy(n) is None for n in range(1, 6) if n not in cached)
    assert c.kv_cache_policy(None) == "half"  # no layer number: cached
    assert cfg().kv_cache_policy(1) is None  # no policy: nothing cached


# -- --use-ulysses-allgather-kv ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "fragments", "kw"),
    [
        (
            cfg(4, RING, use_ulysses_allgather_kv=True),
            ["--use-ulysses-allgather-kv", "megatron"],
            {},
        ),
        (cfg(4, HYBRID, 2, use_ulysses_allgather_kv=True), ["allgather-kv", "hybrid_cp_algo"], {}),
        (cfg(1, ULYSSES, use_ulysses_allgather_kv=True), ["allgather-kv", "size > 1"], {}),
        (cfg(4, ULYSSES, use_ulysses_allgather_kv=True), ["--num-query-groups None"], {}),
        (
            cfg(4, ULYSSES, use_ulysses_allgather_kv=True),
            ["--num-query-groups 8", "--num-attention-heads 8"],
            {"num_query_groups": 8},
        ),
    ],
)
def test_bad_allgather_kv_settings(config, fragments, kw):
    rejected(config, *fragments, **kw)


def test_allgather_kv_accepted_for_gqa_and_checked_on_local_heads():
    c = cfg(4, ULYSSES, use_ulysses_allgather_kv=True)
    ok(c, num_query_groups=1)
    ok(c, num_query_groups=2)
    assert "--use-ulysses-allgather-kv" in c.local_head_errors(4, 4)[0]
    assert c.local_head_errors(8, 2) == []


@pytest.mark.parametrize(
    ("nq", "nkv", "u"), [(8, 1, 4), (8, 2, 4), (8, 4, 4), (16, 8, 4), (8, 2, 8)]
)
def test_kv_head_range_covers_each_ranks_query_heads(nq, nkv, u):
    group = nq // nkv
    for rank in range(u):
        heads = kv_head_range(nq, nkv, u, rank)
        wanted = sorted({h // group for h in range(rank * nq // u, (rank + 1) * nq // u)})
        assert list(range(heads.start, heads.stop)) == wanted


# -- kvallgather_cp_algo -------------------------------------------------------------------------
def test_kvallgather_is_an_algorithm_with_the_ring_split_rules():
    c = cfg(4, KVALLGATHER)
    assert (c.ulysses_degree, c.ring_degree) == (1, 4)
    ok(c, heads=3, seq=8)  # no head limit, like the ring
    rejected(c, "--seq-length 12", "2 x --context-parallel-size 4", seq=12)
    ok(cfg(4, KVALLGATHER, attention_mask_type="general"), seq=12)


@pytest.mark.parametrize("mask", ["causal", "general"])
def test_split_sequence_gives_kvallgather_the_ring_split(mask):
    x = torch.arange(32)
    for rank in range(4):
        got, want = (
            split_sequence(
                x, 0, mesh=SimpleNamespace(config=cfg(4, a, attention_mask_type=mask), cp_rank=rank)
            )
            for a in (KVALLGATHER, RING)
        )
        assert torch.equal(got, want)
    causal = SimpleNamespace(config=cfg(4, KVALLGATHER), cp_rank=1)
    assert split_sequence(x, 0, mesh=causal).tolist() == [4, 5, 6, 7, 24, 25, 26, 27]  # chunks 1, 6


# -- double ring: groups and visit order ---------------------------------------------------------
def test_double_ring_groups_cut_each_ring_into_windows():
    # tp 1, cp 8, u 2: rings {0,2,4,6} and {1,3,5,7}; windows of 2 ring ranks
    _, _, rings = mesh_rank_lists(8, 1, 8, 2)
    inner, outer = double_ring_rank_lists(rings, 2)
    assert inner == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert outer == [[0, 4], [2, 6], [1, 5], [3, 7]]
    inner, outer = double_ring_rank_lists([list(range(8))], 4)
    assert inner == [[0, 1, 2, 3], [4, 5, 6, 7]] and outer == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize(("size", "window"), [(4, 2), (8, 2), (8, 4), (6, 3), (4, 1), (4, 4)])
def test_double_ring_order_is_consistent_with_its_links(size, window):
    orders = [double_ring_order(i, size, window) for i in range(size)]
    rounds = size // window
    for i, order in enumerate(orders):
        assert order[0] == i and sorted(order) == list(range(size))  # every block once, own first
        win, pos = divmod(i, window)
        for t in range(size - 1):
            s = t % window
            if s + 1 < window:  # came over the inner ring from the previous rank of the window
                sender = win * window + (pos - 1) % window
                assert order[t + 1] == orders[sender][t]
            else:  # came over the outer ring: the previous window's round-start block
                sender = ((win - 1) % rounds) * window + pos
                assert order[t + 1] == orders[sender][t + 1 - window]
    if window in (1, size):  # degenerate windows give the plain ring's order
        assert orders == [[(i - t) % size for t in range(size)] for i in range(size)]


# -- the flags themselves ------------------------------------------------------------------------
def test_parser_takes_no_value_for_the_allgather_kv_switch(capsys):
    # the valued flags' bad values are in test_config's parser test
    parser = add_context_parallel_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--use-ulysses-allgather-kv", "yes"])
    assert "unrecognized arguments: yes" in capsys.readouterr().err


def test_flags_round_trip_into_the_config():
    parser = add_context_parallel_args(argparse.ArgumentParser())
    argv = "--context-parallel-size 8 --context-parallel-algo megatron_cp_algo --cp-window-size 4 "
    argv += "--context-parallel-kv-cache-policy full --context-parallel-cache-interval 2"
    c = ContextParallelConfig.from_args(parser.parse_args(argv.split()))
    assert (c.cp_window_size, c.context_parallel_kv_cache_policy) == (4, "full")
    assert c.context_parallel_cache_interval == 2 and not c.use_ulysses_allgather_kv
    ok(c, num_layers=4)
    args = parser.parse_args(
        ["--context-parallel-size", "4", "--context-parallel-algo", "kvallgather_cp_algo"]
    )
    assert ContextParallelConfig.from_args(args).context_parallel_algo == KVALLGATHER
    args = parser.parse_args(["--context-parallel-size", "4", "--use-ulysses-allgather-kv"])
    c = ContextParallelConfig.from_args(args)
    assert c.use_ulysses_allgather_kv is True
    ok(c, num_query_groups=2)


# -- the demo takes the new flags ----------------------------------------------------------------
def _demo_args(argv: list[str]) -> argparse.Namespace:
    from usp_npu import cli

    parser = argparse.ArgumentParser()
    cli._demo_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", "--seq-length", "64", *argv])


def test_demo_passes_the_new_flags_to_its_case():
    from usp_npu import cli

    argv = "--context-parallel-algo megatron_cp_algo --cp-window-size 2 "
    argv += "--context-parallel-kv-cache-policy half --context-parallel-cache-interval 1"
    case = cli._case_from_args(_demo_args(argv.split()), 4)
    assert (case.window, case.kv_cache, case.cache_interval) == (2, "half", 1)
    argv = ["--use-ulysses-allgather-kv", "--num-query-groups", "2"]
    assert cli._case_from_args(_demo_args(argv), 4).allgather_kv is True


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--context-parallel-algo", "megatron_cp_algo", "--cp-window-size", "3"], "--cp-window-size 3"),
        (["--context-parallel-cache-interval", "2"], "--context-parallel-cache-interval 2"),
        (["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2",
          "--use-ulysses-allgather-kv"], "--use-ulysses-allgather-kv"),
    ],
)  # fmt: skip
def test_demo_rejects_bad_option_values_before_starting_ranks(argv, named, capsys, monkeypatch):
    from usp_npu import cli

    def no_ranks(*args, **kwargs):
        raise AssertionError("ranks were started for an invalid configuration")

    monkeypatch.setattr("usp_npu.testing.launcher.ProcessGroupPool.start", no_ranks)
    assert cli.main(["demo", "--world-size", "4", "--seq-length", "64", *argv]) == 2
    assert named in capsys.readouterr().err
