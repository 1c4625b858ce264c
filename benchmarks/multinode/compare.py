"""Measured vs predicted: feed each run's calibration to ``usp-npu plan`` and compare.

Usage: ``python benchmarks/multinode/compare.py results/n2x2_*.json`` (``run.sh`` calls it).
For every configuration: the measured time (slowest rank, forward + backward), the predicted
time, their ratio, and the bytes per link class counted by the communication layer next to the
plan's. Per scenario (nodes, rate, placement): the predicted best and the measured best. Prints
Markdown and writes ``summary.json`` beside the inputs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from usp_npu.config import HYBRID, ContextParallelConfig
from usp_npu.plan import Cluster, ModelShape, evaluate, rank_configs


def cluster_from(run: dict) -> Cluster:
    """The run's links, and the median of the compute samples taken before each configuration:
    every configuration does the same attention work, and on a shared machine one sample swings
    by several times with the neighbours' load; the median is the steadier rate."""
    samples = [c["calibration"] for c in run["configs"]]
    compute = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    a, cal = run["args"], {**run["calibration"], **compute}
    copy_bw = cal["memory_bandwidth"]
    return Cluster(
        name="this machine, namespaces",
        nodes=a["nodes"],
        devices_per_node=a["ranks_per_node"],
        device_flops=cal["device_flops"],
        device_memory=float(2**40),
        memory_bandwidth=copy_bw,
        intra_node_bandwidth=cal.get("intra_node_bandwidth", copy_bw),
        inter_node_bandwidth=cal.get("inter_node_bandwidth", copy_bw),
        intra_node_latency=cal.get("intra_node_latency", 0.0),
        inter_node_latency=cal.get("inter_node_latency", 0.0),
        call_overhead=cal["call_overhead"],
        backward_flops_ratio=cal["backward_flops_ratio"],
        stat_lanes=1,
    )


def rows_of(run: dict) -> list[dict]:
    a = run["args"]
    shape = ModelShape(
        heads=a["num_attention_heads"], head_dim=a["head_dim"], seq=a["seq_length"],
        kv_heads=a["num_query_groups"], dtype=a["dtype"],
    )  # fmt: skip
    cluster = cluster_from(run)
    rows = []
    for c in run["configs"]:
        cfg = ContextParallelConfig(
            run["world"], c["algo"], c["ulysses_degree"] if c["algo"] == HYBRID else None
        )
        pred = evaluate(shape, cfg, cluster, placement=a["placement"])
        ranks = c["ranks"]
        counted = {
            cls: max(sum(k.get(cls, 0) for k in r["bytes_by_link"].values()) for r in ranks)
            for cls in ("intra_node", "inter_node")
        }
        rows.append(
            {
                "scenario": f"{a['nodes']}x{a['ranks_per_node']} {Path(a['out']).stem.split('_')[1]} {a['placement']}",
                "config": f"{c['algo']} u={c['ulysses_degree']} r={c['ring_degree']}",
                "measured_s": max(r["forward_s"] + r["backward_s"] for r in ranks),
                "predicted_s": pred["predicted_time_s"],
                "exposed_comm_s": pred["exposed_comm_time_s"],
                "counted_bytes": counted,
                "predicted_bytes": pred["bytes_per_rank"],
                "loadavg": c["loadavg"],
                "plan_entry": pred,
            }
        )
    return rows


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    all_rows = [row for run in runs for row in rows_of(run)]
    print("| scenario | config | measured ms | predicted ms | predicted / measured "
          "| MiB intra (counted = predicted) | MiB inter (counted = predicted) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in all_rows:
        same = "yes" if r["counted_bytes"] == r["predicted_bytes"] else "NO"
        print(
            f"| {r['scenario']} | {r['config']} | {r['measured_s'] * 1e3:.0f} "
            f"| {r['predicted_s'] * 1e3:.0f} | {r['predicted_s'] / r['measured_s']:.2f} "
            f"| {r['counted_bytes']['intra_node'] / 2**20:.2f} ({same}) "
            f"| {r['counted_bytes']['inter_node'] / 2**20:.2f} ({same}) |"
        )
    print("\n| scenario | predicted best | measured best | predicted best measured within |"
          " worst abs error | load avg (1, 5, 15 min) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for scenario in dict.fromkeys(r["scenario"] for r in all_rows):
        rs = [r for r in all_rows if r["scenario"] == scenario]
        # the plan's recommendation: fastest, or the fewest inter-node bytes among near-ties
        best_entry = rank_configs([r["plan_entry"] for r in rs])[0]
        pb = next(r for r in rs if r["plan_entry"] is best_entry)
        mb = min(rs, key=lambda r: r["measured_s"])
        gap = pb["measured_s"] / mb["measured_s"] - 1
        worst = max(abs(r["predicted_s"] / r["measured_s"] - 1) for r in rs)
        load = ", ".join(f"{x:.1f}" for x in rs[0]["loadavg"])
        print(
            f"| {scenario} | {pb['config']} | {mb['config']} | {gap:.1%} | {worst:.0%} | {load} |"
        )
    out = Path(paths[0]).parent / "summary.json"
    for r in all_rows:
        del r["plan_entry"]
    out.write_text(json.dumps(all_rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
