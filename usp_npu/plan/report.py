"""``usp-npu plan``: every (algo, u, r, window, option, placement) for a model on a cluster,
ranked.

Each configuration is checked by ``ContextParallelConfig.validate`` (a rejected one carries its
message), then priced by ``model.predict`` on the bytes of ``traffic.layer_transfers``.
"""

from __future__ import annotations

from dataclasses import asdict

from usp_npu.config import HYBRID, KVALLGATHER, RING, ULYSSES, ContextParallelConfig
from usp_npu.packing import check_split, normalize_cu_seqlens
from usp_npu.plan.cluster import Cluster
from usp_npu.plan.model import predict
from usp_npu.plan.placement import INTER, INTRA, LINK_CLASSES, node_of_rank
from usp_npu.plan.traffic import ModelShape, bytes_by_class, layer_transfers


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(
    cp: int,
    mask_type: str = "causal",
    kv_cache_policy: str | None = None,
    *,
    windows: tuple[int, ...] | None = None,
    cache_interval: int = 0,
    kvallgather: bool = True,
    allgather_kv: bool = False,
) -> list[ContextParallelConfig]:
    """Ring (u = 1), every hybrid 1 < u < cp and Ulysses (u = cp), in that order; after each
    ring / hybrid its double rings, after the ring kvallgather, after Ulysses its all-gather of
    K/V (``allgather_kv``: grouped-query models). All with the same KV cache policy and interval.

    ``windows``: the ``--cp-window-size`` values to try on every ring degree (an invalid one is
    kept, and ``validate`` rejects it with its message); ``None`` = every valid window of each
    ring degree (the divisors ``1 < w < r``).
    """
    common = dict(
        attention_mask_type=mask_type,
        context_parallel_kv_cache_policy=kv_cache_policy,
        context_parallel_cache_interval=cache_interval,
    )
    out = []
    for u in _divisors(cp):
        r = cp // u
        algo = ULYSSES if u == cp else (RING if u == 1 else HYBRID)
        ud = u if algo == HYBRID else None
        out.append(ContextParallelConfig(cp, algo, ud, **common))
        if algo == ULYSSES:
            if allgather_kv:
                out.append(ContextParallelConfig(cp, algo, use_ulysses_allgather_kv=True, **common))
            continue
        ws = [w for w in _divisors(r) if 1 < w < r] if windows is None else windows
        out += [
            ContextParallelConfig(cp, algo, ud, cp_window_size=w, **common) for w in ws if w > 1
        ]
        if algo == RING and kvallgather:
            out.append(ContextParallelConfig(cp, KVALLGATHER, **common))
    return out


def config_name(cfg: ContextParallelConfig) -> str:
    """``hybrid_cp_algo u=2 r=4 w=2``: the algorithm, degrees and options, for tables."""
    name = f"{cfg.context_parallel_algo} u={cfg.ulysses_degree} r={cfg.ring_degree}"
    if cfg.cp_window_size > 1:
        name += f" w={cfg.cp_window_size}"
    if cfg.use_ulysses_allgather_kv:
        name += " allgather-kv"
    return name


def _flags(cfg: ContextParallelConfig) -> str:
    flags = f"--context-parallel-size {cfg.context_parallel_size} "
    flags += f"--context-parallel-algo {cfg.context_parallel_algo}"
    if cfg.context_parallel_algo == HYBRID:
        flags += f" --ulysses-degree-in-cp {cfg.ulysses_degree_in_cp}"
    if cfg.cp_window_size > 1:
        flags += f" --cp-window-size {cfg.cp_window_size}"
    if cfg.use_ulysses_allgather_kv:
        flags += " --use-ulysses-allgather-kv"
    if cfg.context_parallel_kv_cache_policy:
        flags += f" --context-parallel-kv-cache-policy {cfg.context_parallel_kv_cache_policy}"
    if cfg.context_parallel_cache_interval:
        flags += f" --context-parallel-cache-interval {cfg.context_parallel_cache_interval}"
    return flags


def layer_policies(cfg: ContextParallelConfig, num_layers: int) -> dict[str | None, list[int]]:
    """The layers (1-based, as Megatron counts) of the ``num_layers`` that run each KV cache
    policy (``--context-parallel-cache-interval``)."""
    layers: dict[str | None, list[int]] = {}
    for layer in range(1, num_layers + 1):
        layers.setdefault(cfg.kv_cache_policy(layer), []).append(layer)
    return layers


def evaluate(
    shape: ModelShape,
    cfg: ContextParallelConfig,
    cluster: Cluster,
    tp: int = 1,
    placement: str = "megatron",
) -> dict:
    """One configuration as a JSON-ready entry (``valid`` False with ``error`` when rejected)."""
    world = cluster.world_size
    entry = {
        "context_parallel_algo": cfg.context_parallel_algo,
        "ulysses_degree": cfg.ulysses_degree,
        "ring_degree": cfg.ring_degree,
        "cp_window_size": cfg.cp_window_size,
        "use_ulysses_allgather_kv": cfg.use_ulysses_allgather_kv,
        "kv_cache_policy": cfg.context_parallel_kv_cache_policy,
        "context_parallel_cache_interval": cfg.context_parallel_cache_interval,
        "name": config_name(cfg),
        "placement": placement,
        "flags": _flags(cfg),
        "valid": True,
        "error": None,
        "predicted_time_s": None,
        "predicted_step_time_s": None,
        "bytes_per_rank": None,
        "memory_bytes_per_rank": None,
    }
    try:
        cfg.validate(
            shape.heads,
            shape.seq,
            tensor_model_parallel_size=tp,
            num_query_groups=shape.kv_heads,
            world_size=world,
        )
        if shape.cu_seqlens is not None:  # the packed split's own rules (attention.py's)
            if shape.batch != 1:
                raise ValueError(
                    f"packed documents need --micro-batch-size 1, got {shape.batch}: pack the "
                    "batch into one sequence"
                )
            cu = normalize_cu_seqlens(list(shape.cu_seqlens), shape.seq)
            check_split(cu, cfg.ulysses_degree, cfg.ring_degree, cfg.causal)
    except ValueError as err:
        entry.update(valid=False, error=str(err))
        return entry
    nodes = node_of_rank(world, cluster.devices_per_node, placement)
    # layer 1 stands for the layer (it runs the policy; the interval counts from it); a step
    # prices every layer with its own policy (--context-parallel-cache-interval)
    transfers = layer_transfers(shape, cfg, tp, world, layer_number=1)
    pred = predict(shape, cfg, tp, cluster, nodes, transfers, layer_number=1)
    step_s, held, transient, step_bytes = 0.0, 0, 0, dict.fromkeys(LINK_CLASSES, 0)
    for layers in layer_policies(cfg, shape.num_layers).values():
        layer, count = layers[0], len(layers)
        ts = transfers if layer == 1 else layer_transfers(shape, cfg, tp, world, layer)
        p = pred if layer == 1 else predict(shape, cfg, tp, cluster, nodes, ts, layer)
        step_s += count * p.total_s
        held += count * p.held_bytes
        transient = max(transient, p.transient_bytes)
        for cls, n in _busiest(bytes_by_class(ts, nodes)).items():
            step_bytes[cls] += count * n
    per_rank = bytes_by_class(transfers, nodes)
    by_kind: dict[str, dict[str, int]] = {}
    for kinds in per_rank.values():
        for kind, classes in kinds.items():
            slot = by_kind.setdefault(kind, dict.fromkeys(LINK_CLASSES, 0))
            for cls, n in classes.items():
                slot[cls] = max(slot[cls], n)
    bytes_per_rank = _busiest(per_rank)
    entry.update(
        predicted_time_s=pred.total_s,
        predicted_step_time_s=step_s,
        forward_time_s=pred.forward_s,
        backward_time_s=pred.backward_s,
        ulysses_pipeline_chunks=pred.pipeline_chunks,
        compute_time_s=pred.compute_s,
        exposed_comm_time_s=pred.exposed_comm_s,
        comm_time_s=pred.comm_s,
        bytes_per_rank=bytes_per_rank,
        bytes_per_step=step_bytes,
        bytes_by_kind=by_kind,
        # every layer keeps its activations for the backward; transients are per layer
        memory_bytes_per_rank=held + transient,
        memory_held_bytes=pred.held_bytes,
        memory_transient_bytes=transient,
        fits_in_memory=held + transient <= cluster.device_memory,
        phases=pred.phases,
    )
    return entry


def _busiest(per_rank: dict[int, dict[str, dict[str, int]]]) -> dict[str, int]:
    """Per link class, the most bytes one rank sends (``bytes_by_class``'s output)."""
    return {
        cls: max((sum(c.get(cls, 0) for c in kinds.values()) for kinds in per_rank.values()), default=0)
        for cls in LINK_CLASSES
    }  # fmt: skip


#: predictions closer than this (relative) are a tie: far inside the model's accuracy (the
#: simulated multi-node runs put single predictions within 25% of the measurement)
TIE = 0.01


def rank_configs(configs: list[dict]) -> list[dict]:
    """Best first: by predicted time, except that the configurations predicted within
    :data:`TIE` of the fastest come first, ordered by the bytes each rank sends between nodes
    (then by time): among equals, the one that leans least on the links the model knows least
    and other jobs share."""
    by_time = sorted(configs, key=lambda c: (c["predicted_time_s"], c["bytes_per_rank"][INTER]))
    if not by_time:
        return []
    limit = by_time[0]["predicted_time_s"] * (1 + TIE)
    tied = [c for c in by_time if c["predicted_time_s"] <= limit]
    tied.sort(key=lambda c: (c["bytes_per_rank"][INTER], c["predicted_time_s"]))
    return tied + by_time[len(tied) :]


def _runner_up(ranked: list[dict]) -> dict | None:
    """What the recommendation is compared with: the fastest configuration when a tie gave the
    recommendation to a slower one, else the second best."""
    fastest = min(ranked, key=lambda c: c["predicted_time_s"])
    if fastest is not ranked[0]:
        return fastest
    return ranked[1] if len(ranked) > 1 else None


def _reason(best: dict, runner_up: dict | None, cluster: Cluster) -> str:
    b = best["bytes_per_rank"]
    where = (
        f"its {b[INTRA] / 2**20:.1f} MiB per rank of intra-node traffic and "
        f"{b[INTER] / 2**20:.1f} MiB of inter-node traffic leave "
        f"{best['exposed_comm_time_s'] * 1e3:.3g} ms exposed next to "
        f"{best['compute_time_s'] * 1e3:.3g} ms of compute"
    )
    name = f"{best['name']} ({best['placement']} placement)"
    if runner_up is None:
        return f"{name} is the only valid configuration: {where}."
    gap = runner_up["predicted_time_s"] / best["predicted_time_s"] - 1
    other = runner_up["name"]
    devices = f"on {cluster.nodes} x {cluster.devices_per_node} devices"
    if gap < 0:  # a tie (rank_configs) that a faster configuration lost on inter-node bytes
        return (
            f"{name} is recommended at {best['predicted_time_s'] * 1e3:.3g} ms per layer, "
            f"{-gap * 100:.1f}% behind {other} (a tie at this model's accuracy) with less "
            f"inter-node traffic: {where} {devices}."
        )
    return (
        f"{name} is predicted fastest at {best['predicted_time_s'] * 1e3:.3g} ms per layer: {where} "
        f"{devices}, {gap * 100:.1f}% ahead of {other}."
    )


def plan(
    shape: ModelShape,
    cluster: Cluster,
    cp: int | None = None,
    tp: int = 1,
    placements: tuple[str, ...] = ("megatron",),
    mask_type: str = "causal",
    kv_cache_policy: str | None = None,
    windows: tuple[int, ...] | None = None,
    cache_interval: int = 0,
) -> dict:
    """The whole plan: ``{"model", "cluster", "configs", "recommended", "reason"}``; every entry
    of ``configs`` has a ``reason`` too: the recommendation's sentence in the recommended entry
    (and so in ``recommended``, its copy), ``None`` in the others.

    ``cp`` defaults to every device not used by tensor parallelism (world / tp). The recommended
    entry is the fastest valid one that fits in device memory (the fastest valid one when none
    fits), where predictions within 1% count as a tie that goes to fewer inter-node bytes
    (:func:`rank_configs`). ``windows``: the ``--cp-window-size`` values
    to try (``None``: every valid one); kvallgather is tried beside the ring, the Ulysses
    all-gather of K/V beside Ulysses when the model has fewer K/V heads than query heads.
    """
    cp = cp or cluster.world_size // tp
    configs = [
        evaluate(shape, cfg, cluster, tp, placement)
        for placement in placements
        for cfg in candidate_configs(
            cp,
            mask_type,
            kv_cache_policy,
            windows=windows,
            cache_interval=cache_interval,
            allgather_kv=shape.kv_heads is not None and shape.kv_heads < shape.heads,
        )
    ]
    valid = [c for c in configs if c["valid"]]
    pool = [c for c in valid if c["fits_in_memory"]] or valid
    ranked = rank_configs(pool)
    reason = (
        _reason(ranked[0], _runner_up(ranked), cluster)
        if ranked
        else "no configuration is valid: see each entry's error"
    )
    # the sentence also sits in its entry, so `recommended` stays an exact copy of one entry
    for c in configs:
        c["reason"] = reason if ranked and c is ranked[0] else None
    return {
        "model": asdict(shape),
        "cluster": cluster.as_dict(),
        "context_parallel_size": cp,
        "tensor_model_parallel_size": tp,
        "configs": configs,
        "recommended": dict(ranked[0]) if ranked else None,
        "reason": reason,
    }


def format_plan(result: dict) -> str:
    """Markdown table of every configuration, then the recommendation."""
    lines = [
        "| config | placement | ms / layer | ms / step | compute ms | exposed comm ms "
        "| MiB intra | MiB inter | GiB memory | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        name = c["name"]
        if not c["valid"]:
            msg = (
                c["error"].replace("\n", " ").replace("invalid context-parallel settings:   - ", "")
            )
            lines.append(
                f"| {name} | {c['placement']} | - | - | - | - | - | - | - | rejected: {msg} |"
            )
            continue
        b = c["bytes_per_rank"]
        note = "" if c["fits_in_memory"] else "does not fit in device memory"
        if result["recommended"] and all(
            c[k] == result["recommended"][k] for k in ("flags", "placement")
        ):
            note = ("RECOMMENDED " + note).strip()
        lines.append(
            f"| {name} | {c['placement']} | {c['predicted_time_s'] * 1e3:.3f} "
            f"| {c['predicted_step_time_s'] * 1e3:.2f} | {c['compute_time_s'] * 1e3:.3f} "
            f"| {c['exposed_comm_time_s'] * 1e3:.3f} | {b[INTRA] / 2**20:.1f} "
            f"| {b[INTER] / 2**20:.1f} | {c['memory_bytes_per_rank'] / 2**30:.2f} | {note} |"
        )
    return "\n".join(lines) + f"\n\n{result['reason']}"


def plot_plan(result: dict, path: str) -> None:
    """Bar per valid configuration: compute and exposed communication, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = [c for c in result["configs"] if c["valid"]]
    labels = [
        f"{c['context_parallel_algo'].split('_')[0]}\nu={c['ulysses_degree']} r={c['ring_degree']}"
        + ("\n" + c["placement"] if len({x["placement"] for x in valid}) > 1 else "")
        for c in valid
    ]
    compute = [c["compute_time_s"] * 1e3 for c in valid]
    exposed = [c["exposed_comm_time_s"] * 1e3 for c in valid]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(valid)), 4))
    ax.bar(labels, compute, label="compute")
    ax.bar(labels, exposed, bottom=compute, label="exposed communication")
    ax.set_ylabel("ms per layer (forward + backward)")
    ax.set_title(result["reason"][:90] + ("..." if len(result["reason"]) > 90 else ""), fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
