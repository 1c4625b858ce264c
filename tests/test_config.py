"""ContextParallelConfig validation (REFERENCE.md section 1) and the MindSpeed-style flags.

Every rule is checked from both sides: the clashing combination raises a ValueError whose
message names the ``--dashed-flag`` to change and the clashing values, and its nearest valid
neighbour is accepted. No distributed set-up is needed.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

import pytest

from usp_npu import add_context_parallel_args
from usp_npu.config import (
    ALGORITHMS,
    BACKENDS,
    HYBRID,
    MASK_TYPES,
    RING,
    ULYSSES,
    ContextParallelConfig,
)


def cfg(cp=1, algo=ULYSSES, u=None, mask="causal", **kw) -> ContextParallelConfig:
    return ContextParallelConfig(
        context_parallel_size=cp,
        context_parallel_algo=algo,
        ulysses_degree_in_cp=u,
        attention_mask_type=mask,
        **kw,
    )


def ok(config: ContextParallelConfig, heads=8, seq=32, **kw) -> None:
    """The configuration is accepted (validate returns the config itself)."""
    assert config.validate(num_attention_heads=heads, seq_length=seq, **kw) is config


def rejected(config: ContextParallelConfig, *fragments: str, heads=8, seq=32, **kw) -> str:
    """The configuration raises a ValueError mentioning every fragment; returns the message."""
    with pytest.raises(ValueError) as info:
        config.validate(num_attention_heads=heads, seq_length=seq, **kw)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- cp, algorithm, mask type, backend -----------------------------------------------------------
@pytest.mark.parametrize("cp", [0, -2, 2.0, "2", None])
def test_context_parallel_size_must_be_a_positive_int(cp):
    rejected(cfg(cp=cp), "--context-parallel-size", repr(cp))


@pytest.mark.parametrize("algo", [ULYSSES, RING])
def test_cp_1_is_accepted(algo):
    ok(cfg(cp=1, algo=algo), heads=3, seq=6)


def test_unknown_algorithm_lists_the_choices():
    msg = rejected(cfg(cp=2, algo="zigzag_cp_algo"), "--context-parallel-algo", "'zigzag_cp_algo'")
    for algo in ALGORITHMS:
        assert algo in msg


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_unknown_mask_type(algo):
    u = 2 if algo == HYBRID else None
    rejected(cfg(cp=4, algo=algo, u=u, mask="sliding"), "--attention-mask-type", "'sliding'")
    for mask in MASK_TYPES:
        ok(cfg(cp=4, algo=algo, u=u, mask=mask))


def test_unknown_backend_lists_the_choices():
    msg = rejected(cfg(cp=2, attention_backend="cuda"), "--attention-backend", "'cuda'")
    for backend in BACKENDS:
        assert backend in msg
        ok(cfg(cp=2, attention_backend=backend))


def test_every_settings_problem_is_reported_at_once():
    msg = rejected(cfg(cp=2, mask="sliding", attention_backend="cuda"))
    assert "--attention-mask-type" in msg and "--attention-backend" in msg


# -- world size ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("world", "tp", "cp", "pp"),
    [(12, 2, 2, 2), (6, 1, 4, 1), (8, 2, 4, 2), (8, 3, 1, 1)],
)
def test_world_size_must_be_divisible_by_tp_cp_pp(world, tp, cp, pp):
    rejected(
        cfg(cp=cp),
        f"world size {world}",
        f"--tensor-model-parallel-size {tp}",
        f"--context-parallel-size {cp}",
        f"--pipeline-model-parallel-size {pp}",
        f"= {tp * cp * pp}",
        heads=24,
        seq=96,
        world_size=world,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    # the neighbours: a world of tp * cp * pp, and any multiple of it (data parallel)
    for good in (tp * cp * pp, 3 * tp * cp * pp):
        ok(
            cfg(cp=cp),
            heads=24,
            seq=96,
            world_size=good,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
        )


def test_world_size_is_optional():
    ok(cfg(cp=4), world_size=None)


def test_tensor_parallel_size_must_be_positive():
    rejected(cfg(cp=2), "--tensor-model-parallel-size", "0", tensor_model_parallel_size=0)


def test_pipeline_parallel_size_must_be_positive_and_named_as_a_flag():
    rejected(cfg(cp=2), "--pipeline-model-parallel-size", "0", pipeline_model_parallel_size=0)


# -- ulysses_cp_algo ----------------------------------------------------------------------------
def test_ulysses_sequence_divisible_by_cp():
    rejected(cfg(cp=4), "--seq-length 30", "--context-parallel-size 4", seq=30)
    ok(cfg(cp=4), seq=28)  # contiguous split: 2*cp is not needed even when causal
    ok(cfg(cp=4, mask="general"), seq=28)
    rejected(cfg(cp=4, mask="general"), "--seq-length 30", "--context-parallel-size 4", seq=30)


def test_ulysses_heads_divisible_by_cp_times_tp():
    msg = rejected(
        cfg(cp=4),
        "--num-attention-heads 12",
        "--context-parallel-size 4",
        "--tensor-model-parallel-size 2",
        "= 8",
        heads=12,
        tensor_model_parallel_size=2,
    )
    # it points at the algorithms without the limit
    assert RING in msg and HYBRID in msg
    ok(cfg(cp=4), heads=16, tensor_model_parallel_size=2)
    ok(cfg(cp=4), heads=12, tensor_model_parallel_size=1)
    rejected(cfg(cp=4), "--num-attention-heads 6", "--context-parallel-size 4", heads=6)


# -- megatron_cp_algo (ring) -------------------------------------------------------------------
def test_ring_causal_sequence_divisible_by_2cp():
    rejected(cfg(cp=4, algo=RING), "--seq-length 12", "2 x --context-parallel-size 4", seq=12)
    ok(cfg(cp=4, algo=RING), seq=16)
    ok(cfg(cp=4, algo=RING), seq=8)


def test_ring_general_sequence_divisible_by_cp():
    ok(cfg(cp=4, algo=RING, mask="general"), seq=12)
    rejected(
        cfg(cp=4, algo=RING, mask="general"), "--seq-length 10", "--context-parallel-size 4", seq=10
    )


def test_ring_has_no_ulysses_head_limit():
    ok(cfg(cp=8, algo=RING), heads=3, seq=16)
    ok(cfg(cp=4, algo=RING), heads=6, seq=16, tensor_model_parallel_size=2)


def test_ring_heads_not_divisible_by_tp_names_only_tp():
    # megatron_cp_algo never uses --ulysses-degree-in-cp: the message must not send the user there
    msg = rejected(
        cfg(cp=2, algo=RING),
        "--num-attention-heads 3",
        "--tensor-model-parallel-size 2",
        heads=3,
        tensor_model_parallel_size=2,
    )
    assert "--ulysses-degree-in-cp" not in msg


# -- hybrid_cp_algo ----------------------------------------------------------------------------
def test_hybrid_needs_ulysses_degree_and_lists_valid_values():
    msg = rejected(
        cfg(cp=4, algo=HYBRID), "--ulysses-degree-in-cp", "--context-parallel-size 4", HYBRID
    )
    suggested = re.search(r"below it: ([\d, ]+)\)", msg)
    assert suggested is not None, msg
    values = [int(v) for v in suggested.group(1).split(",")]
    assert values == [1, 2]
    for u in values:  # every suggestion really is accepted
        ok(cfg(cp=4, algo=HYBRID, u=u))


@pytest.mark.parametrize(("cp", "u"), [(4, 3), (8, 3), (6, 4), (4, 0), (4, -2)])
def test_hybrid_ulysses_degree_must_divide_cp(cp, u):
    rejected(
        cfg(cp=cp, algo=HYBRID, u=u),
        f"--ulysses-degree-in-cp {u}",
        f"--context-parallel-size {cp}",
        heads=24,
        seq=96,
    )


@pytest.mark.parametrize(("cp", "u"), [(4, 3), (6, 4)])
def test_hybrid_ulysses_degree_suggestions_are_all_valid(cp, u):
    msg = rejected(cfg(cp=cp, algo=HYBRID, u=u), "valid values:", heads=24, seq=96)
    values = [int(v) for v in re.search(r"valid values: ([\d, ]+)", msg).group(1).split(",")]
    assert values, msg
    for good in values:  # u == cp is plain Ulysses and rejected: it must not be suggested
        ok(cfg(cp=cp, algo=HYBRID, u=good), heads=24, seq=96)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_hybrid_u_equal_cp_is_plain_ulysses(cp):
    msg = rejected(
        cfg(cp=cp, algo=HYBRID, u=cp),
        f"--ulysses-degree-in-cp {cp}",
        f"--context-parallel-size {cp}",
        "plain Ulysses",
        ULYSSES,
    )
    assert "ring degree would be 1" in msg
    ok(cfg(cp=cp, algo=HYBRID, u=cp // 2))
    ok(cfg(cp=cp, algo=ULYSSES))


def test_hybrid_u_1_is_a_pure_ring():
    config = cfg(cp=4, algo=HYBRID, u=1)
    ok(config, heads=3)  # no head limit with u = 1
    assert (config.ulysses_degree, config.ring_degree) == (1, 4)


def test_hybrid_heads_divisible_by_u_times_tp():
    config = cfg(cp=8, algo=HYBRID, u=4)
    rejected(
        config,
        "--num-attention-heads 6",
        "--ulysses-degree-in-cp 4",
        "--tensor-model-parallel-size 1",
        "= 4",
        heads=6,
    )
    msg = rejected(
        config,
        "--num-attention-heads 12",
        "--ulysses-degree-in-cp 4",
        "--tensor-model-parallel-size 2",
        "= 8",
        heads=12,
        tensor_model_parallel_size=2,
    )
    # only u * tp matters, not cp * tp: 8 heads would do with tp=2 although cp * tp = 16
    assert "--context-parallel-size" not in msg
    ok(config, heads=8, tensor_model_parallel_size=2)
    ok(config, heads=4)


def test_hybrid_causal_sequence_rules():
    # cp=4, u=2, r=2: seq % 2r == 0 and (seq / r) % u == 0  <=>  seq % 4 == 0
    config = cfg(cp=4, algo=HYBRID, u=2)
    rejected(config, "--seq-length 6", "--ulysses-degree-in-cp 2", seq=6)
    rejected(config, "--seq-length 10", "--ulysses-degree-in-cp 2", seq=10)
    ok(
        config, seq=12
    )  # MindSpeed's seq % (2 * cp) == 0 would reject 12: the split does not need it
    ok(config, seq=4)
    # cp=6, u=3, r=2: seq=8 passes seq % 2r but (8 / 2) % 3 != 0
    config = cfg(cp=6, algo=HYBRID, u=3)
    rejected(config, "--seq-length 8", "--ulysses-degree-in-cp 3", seq=8, heads=6)
    rejected(config, "--seq-length 18", "--ulysses-degree-in-cp 3", seq=18, heads=6)  # 18 % 4
    ok(config, seq=12, heads=6)
    ok(config, seq=36, heads=6)
    # cp=8, u=4, r=2: seq=4 passes seq % 2r but (4 / 2) % 4 != 0; 8 is enough
    config = cfg(cp=8, algo=HYBRID, u=4)
    rejected(config, "--seq-length 4", "--ulysses-degree-in-cp 4", seq=4)
    ok(config, seq=8)
    # cp=8, u=2, r=4: seq % 8 == 0 needed (2r); 12 has (12 / 4) % 2 != 0 too
    config = cfg(cp=8, algo=HYBRID, u=2)
    rejected(config, "--seq-length 12", "--ulysses-degree-in-cp 2", seq=12)
    ok(config, seq=8)


def test_hybrid_general_sequence_divisible_by_r_times_u():
    config = cfg(cp=4, algo=HYBRID, u=2, mask="general")
    rejected(config, "--seq-length 6", "--ulysses-degree-in-cp 2", seq=6)
    ok(config, seq=4)
    config = cfg(cp=6, algo=HYBRID, u=3, mask="general")
    ok(config, seq=18, heads=6)  # causal would need seq % 12
    rejected(config, "--seq-length 8", "--ulysses-degree-in-cp 3", seq=8, heads=6)


@pytest.mark.parametrize(
    ("config", "seq"),
    [
        (cfg(cp=4), 2),
        (cfg(cp=4), 30),
        (cfg(cp=4, algo=RING), 4),
        (cfg(cp=4, algo=RING), 12),
        (cfg(cp=4, algo=HYBRID, u=2), 2),
        (cfg(cp=6, algo=HYBRID, u=3), 8),
        (cfg(cp=8, algo=HYBRID, u=2, mask="general"), 12),
    ],
    ids=lambda x: str(x) if isinstance(x, int) else None,
)
def test_sequence_suggestions_are_valid(config, seq):
    msg = rejected(config, f"--seq-length {seq}", "nearest valid", heads=24, seq=seq)
    lo, hi = re.search(r"nearest valid: (\d+) or (\d+)", msg).groups()
    suggested = [int(lo), int(hi)]
    for good in suggested:  # never suggest a length that is itself rejected (e.g. 0)
        ok(config, heads=24, seq=good)


def test_sequence_length_must_be_positive():
    rejected(cfg(cp=2), "--seq-length", "0", seq=0)


# -- --ulysses-degree-in-cp with the other algorithms --------------------------------------------
@pytest.mark.parametrize(("algo", "u"), [(RING, 2), (RING, 4), (ULYSSES, 2), (ULYSSES, 8)])
def test_ulysses_degree_with_non_hybrid_algo_is_rejected(algo, u):
    rejected(cfg(cp=4, algo=algo, u=u), f"--ulysses-degree-in-cp {u}", HYBRID, algo)


@pytest.mark.parametrize(("algo", "u"), [(RING, 1), (ULYSSES, 4)])
def test_ulysses_degree_matching_the_fixed_degree_is_tolerated(algo, u):
    # the degree the algorithm implies anyway (ring: 1, ulysses: cp) changes nothing
    config = cfg(cp=4, algo=algo, u=u)
    ok(config)
    assert config.ulysses_degree == (4 if algo == ULYSSES else 1)


# -- GQA: --num-query-groups ---------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_query_groups_must_divide_heads(algo):
    u = 2 if algo == HYBRID else None
    rejected(
        cfg(cp=4, algo=algo, u=u),
        "--num-query-groups 3",
        "--num-attention-heads 8",
        num_query_groups=3,
    )
    rejected(cfg(cp=4, algo=algo, u=u), "--num-query-groups 0", num_query_groups=0)
    ok(cfg(cp=4, algo=algo, u=u), num_query_groups=4)


@pytest.mark.parametrize(
    "config", [cfg(cp=2), cfg(cp=2, algo=RING), cfg(cp=4, algo=HYBRID, u=2)], ids=ALGORITHMS[:3]
)
def test_query_groups_must_be_divisible_by_tp(config):
    rejected(
        config,
        "--num-query-groups 3",
        "--tensor-model-parallel-size 2",
        heads=24,
        num_query_groups=3,
        tensor_model_parallel_size=2,
    )
    ok(config, heads=24, num_query_groups=4, tensor_model_parallel_size=2)


@pytest.mark.parametrize(
    ("algo", "cp", "u", "heads", "groups", "tp", "flag"),
    [
        # kv heads per tp rank (3) and u (2): neither divides the other
        (HYBRID, 4, 2, 12, 3, 1, "--ulysses-degree-in-cp"),
        (HYBRID, 8, 4, 24, 6, 1, "--ulysses-degree-in-cp"),
        (ULYSSES, 4, None, 24, 6, 1, "--context-parallel-size"),
        # with tp=2: 12 kv heads -> 6 per tp rank vs u=4
        (ULYSSES, 4, None, 24, 12, 2, "--context-parallel-size"),
    ],
)
def test_kv_heads_and_ulysses_degree_must_divide_one_another(algo, cp, u, heads, groups, tp, flag):
    config = cfg(cp=cp, algo=algo, u=u)
    degree = config.ulysses_degree
    rejected(
        config,
        "--num-query-groups",
        f"{groups // tp} key/value heads",
        f"Ulysses degree {degree}",
        flag,
        heads=heads,
        seq=64,
        num_query_groups=groups,
        tensor_model_parallel_size=tp,
    )


@pytest.mark.parametrize(
    ("algo", "cp", "u", "heads", "groups", "tp"),
    [
        (HYBRID, 4, 2, 8, 4, 1),  # kv 4 split 2 ways
        (HYBRID, 8, 4, 8, 2, 1),  # kv 2 replicated up to 4
        (HYBRID, 8, 4, 8, 1, 1),  # MQA
        (ULYSSES, 8, None, 8, 2, 1),
        (ULYSSES, 4, None, 16, 8, 2),  # 4 kv heads per tp rank, u=4
        (ULYSSES, 4, None, 16, 2, 2),  # 1 kv head per tp rank
        (RING, 4, None, 12, 3, 1),  # no all-to-all: any group count that divides the heads
    ],
)
def test_valid_gqa_combinations(algo, cp, u, heads, groups, tp):
    ok(
        cfg(cp=cp, algo=algo, u=u),
        heads=heads,
        seq=64,
        num_query_groups=groups,
        tensor_model_parallel_size=tp,
    )


def test_local_head_errors_on_per_rank_counts():
    uly = cfg(cp=4)
    assert uly.local_head_errors(8, 2) == []
    assert uly.local_head_errors(8, 8) == []
    (msg,) = uly.local_head_errors(6, 2)
    assert "6 query heads" in msg and "--context-parallel-size" in msg
    (msg,) = cfg(cp=4, algo=HYBRID, u=2).local_head_errors(3, 1)
    assert "3 query heads" in msg and "--ulysses-degree-in-cp" in msg
    (msg,) = uly.local_head_errors(8, 3)
    assert "8 query heads" in msg and "3 key/value heads" in msg
    (msg,) = uly.local_head_errors(12, 6)
    assert "6 key/value heads" in msg
    assert cfg(cp=4, algo=RING).local_head_errors(3, 3) == []


def test_validate_returns_self_for_chaining():
    config = cfg(cp=2)
    assert config.validate(8, 16) is config


# -- derived degrees ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "u", "r"),
    [
        (cfg(cp=1), 1, 1),
        (cfg(cp=4), 4, 1),
        (cfg(cp=8, algo=ULYSSES), 8, 1),
        (cfg(cp=1, algo=RING), 1, 1),
        (cfg(cp=4, algo=RING), 1, 4),
        (cfg(cp=8, algo=HYBRID, u=2), 2, 4),
        (cfg(cp=8, algo=HYBRID, u=4), 4, 2),
        (cfg(cp=6, algo=HYBRID, u=3), 3, 2),
        (cfg(cp=4, algo=HYBRID, u=1), 1, 4),
    ],
)
def test_ulysses_and_ring_degree(config, u, r):
    assert (config.ulysses_degree, config.ring_degree) == (u, r)
    assert config.ulysses_degree * config.ring_degree == config.context_parallel_size


def test_causal_property():
    assert cfg(mask="causal").causal is True
    assert cfg(mask="general").causal is False


# -- flags ---------------------------------------------------------------------------------------
def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def test_flags_have_mindspeed_names_defaults_and_choices():
    parser = add_context_parallel_args(argparse.ArgumentParser())
    actions = _actions(parser)
    expected = {
        "--context-parallel-size": ("context_parallel_size", 1, None),
        "--context-parallel-algo": ("context_parallel_algo", ULYSSES, set(ALGORITHMS)),
        "--ulysses-degree-in-cp": ("ulysses_degree_in_cp", None, None),
        "--attention-mask-type": ("attention_mask_type", "causal", {"causal", "general"}),
        "--attention-backend": ("attention_backend", "auto", set(BACKENDS)),
        "--use-cp-send-recv-overlap": ("use_cp_send_recv_overlap", False, None),
        "--megatron-cp-in-bnsd": ("megatron_cp_in_bnsd", False, None),
        "--use-fused-ring-attention-update": ("use_fused_ring_attention_update", None, None),
        "--cp-window-size": ("cp_window_size", 1, None),
        "--context-parallel-kv-cache-policy": (
            "context_parallel_kv_cache_policy",
            None,
            {"full", "half"},
        ),
        "--context-parallel-cache-interval": ("context_parallel_cache_interval", 0, None),
        "--use-ulysses-allgather-kv": ("use_ulysses_allgather_kv", False, None),
    }
    for flag, (dest, default, choices) in expected.items():
        assert flag in actions, flag
        action = actions[flag]
        assert action.dest == dest
        assert action.default == default, flag
        assert (set(action.choices) if action.choices else None) == choices, flag
    assert set(ALGORITHMS) == {
        "ulysses_cp_algo",
        "megatron_cp_algo",
        "hybrid_cp_algo",
        "kvallgather_cp_algo",
    }
    # integer flags parse as int, switches take no value
    args = parser.parse_args(
        ["--context-parallel-size", "4", "--ulysses-degree-in-cp", "2", "--megatron-cp-in-bnsd"]
    )
    assert args.context_parallel_size == 4 and args.ulysses_degree_in_cp == 2
    assert args.megatron_cp_in_bnsd is True and args.use_cp_send_recv_overlap is False
    # the fused merge is tri-state: auto (None), forced on, forced off
    assert args.use_fused_ring_attention_update is None
    for argv, want in (
        (["--use-fused-ring-attention-update"], True),
        (["--no-use-fused-ring-attention-update"], False),
    ):
        assert parser.parse_args(argv).use_fused_ring_attention_update is want


@pytest.mark.parametrize(
    "argv",
    [
        ["--context-parallel-algo", "ring"],
        ["--attention-mask-type", "sliding"],
        ["--attention-backend", "cuda"],
        ["--context-parallel-size", "two"],
        ["--ulysses-degree-in-cp", "1.5"],
        ["--cp-window-size", "two"],
        ["--context-parallel-kv-cache-policy", "quarter"],
        ["--context-parallel-cache-interval", "1.5"],
        ["--context-parallel-algo", "kvallgather"],
    ],
)
def test_bad_flag_values_are_refused_by_the_parser(argv, capsys):
    parser = add_context_parallel_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_every_config_field_has_a_flag():
    parser = add_context_parallel_args(argparse.ArgumentParser())
    dests = {a.dest for a in parser._actions}
    for f in fields(ContextParallelConfig):
        assert f.name in dests, f"{f.name} has no command-line flag"


def test_defaults_round_trip_to_default_config():
    args = add_context_parallel_args(argparse.ArgumentParser()).parse_args([])
    assert ContextParallelConfig.from_args(args) == ContextParallelConfig()


def test_from_args_round_trips_every_field():
    parser = add_context_parallel_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--context-parallel-size",
            "8",
            "--context-parallel-algo",
            "hybrid_cp_algo",
            "--ulysses-degree-in-cp",
            "2",
            "--attention-mask-type",
            "general",
            "--attention-backend",
            "torch",
            "--use-cp-send-recv-overlap",
            "--megatron-cp-in-bnsd",
            "--no-use-fused-ring-attention-update",
            "--cp-window-size",
            "2",
            "--context-parallel-kv-cache-policy",
            "half",
            "--context-parallel-cache-interval",
            "1",
            "--ulysses-pipeline-chunks",
            "2",
            "--ulysses-all-to-all",
            "p2p",
        ]
    )
    config = ContextParallelConfig.from_args(args)
    assert config == ContextParallelConfig(
        context_parallel_size=8,
        context_parallel_algo=HYBRID,
        ulysses_degree_in_cp=2,
        attention_mask_type="general",
        attention_backend="torch",
        use_cp_send_recv_overlap=True,
        megatron_cp_in_bnsd=True,
        use_fused_ring_attention_update=False,
        cp_window_size=2,
        context_parallel_kv_cache_policy="half",
        context_parallel_cache_interval=1,
        ulysses_pipeline_chunks=2,
        ulysses_all_to_all="p2p",
    )
    for f in fields(ContextParallelConfig):
        if f.name == "use_ulysses_allgather_kv":  # Ulysses only: round-tripped in test_options
            continue
        value = getattr(config, f.name)
        assert value == getattr(args, f.name)
        assert value != f.default, f"{f.name} was not exercised by the round trip"
    ok(config, seq=64)


def test_from_args_ignores_foreign_attributes_and_defaults_missing_ones():
    ns = argparse.Namespace(context_parallel_size=4, num_layers=24, seq_length=4096)
    assert ContextParallelConfig.from_args(ns) == ContextParallelConfig(context_parallel_size=4)


def test_existing_context_parallel_size_flag_is_kept():
    # a Megatron parser already defines --context-parallel-size: no argparse conflict, its
    # definition (here: another default and help) is left alone
    parser = argparse.ArgumentParser()
    parser.add_argument("--context-parallel-size", type=int, default=2, help="megatron's own")
    add_context_parallel_args(parser)
    owners = [a for a in parser._actions if "--context-parallel-size" in a.option_strings]
    assert len(owners) == 1 and owners[0].help == "megatron's own"
    args = parser.parse_args(["--context-parallel-algo", "megatron_cp_algo"])
    config = ContextParallelConfig.from_args(args)
    assert config.context_parallel_size == 2 and config.context_parallel_algo == RING
    args = parser.parse_args(["--context-parallel-size", "4"])
    assert ContextParallelConfig.from_args(args).context_parallel_size == 4


def test_adding_the_flags_twice_does_not_clash():
    parser = add_context_parallel_args(argparse.ArgumentParser())
    assert add_context_parallel_args(parser) is parser
    assert parser.parse_args(["--context-parallel-size", "2"]).context_parallel_size == 2
