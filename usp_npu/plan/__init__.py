"""``usp-npu plan``: a cost model of context-parallel attention on a cluster.

- :mod:`~usp_npu.plan.cluster`: the cluster's numbers and the presets;
- :mod:`~usp_npu.plan.placement`: which node each rank lives on, link classes;
- :mod:`~usp_npu.plan.traffic`: bytes per rank, per collective, per peer (the byte formulas);
- :mod:`~usp_npu.plan.model`: time (compute, overlap, exposed communication) and memory;
- :mod:`~usp_npu.plan.report`: every configuration ranked, table, JSON, plot.
"""

from usp_npu.plan.cluster import PRESETS, Cluster
from usp_npu.plan.placement import PLACEMENTS, node_of_rank, rank_groups
from usp_npu.plan.report import evaluate, format_plan, plan, plot_plan, rank_configs
from usp_npu.plan.traffic import ModelShape, bytes_by_class, counted_by_kind, layer_transfers

__all__ = [
    "PLACEMENTS",
    "PRESETS",
    "Cluster",
    "ModelShape",
    "bytes_by_class",
    "counted_by_kind",
    "evaluate",
    "format_plan",
    "layer_transfers",
    "node_of_rank",
    "plan",
    "plot_plan",
    "rank_configs",
    "rank_groups",
]
