"""The cluster a plan is made for: device rate and memory, link bandwidths and latencies.

Units are SI base units (bytes, seconds, FLOP/s, bytes/s). The presets' numbers and their public
sources are listed in ``docs/plan.md``; numbers marked *estimate* there are this project's
assumptions, not vendor figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    """``nodes`` x ``devices_per_node`` devices (global rank ``g`` is device ``g % devices_per_node``
    of node ``g // devices_per_node`` under the default placement).

    Attributes:
        device_flops: attention FLOP/s one device sustains (matmul FLOPs of the block kernel).
        device_memory: bytes of memory per device.
        memory_bandwidth: bytes/s of device memory (the fused merge streams at this rate).
        intra_node_bandwidth: bytes/s one device sends to the devices of its own node, all
            peers together.
        intra_node_link_bandwidth: bytes/s to any ONE peer of its node (a full mesh of
            point-to-point links caps a ring at this); None = no per-peer cap.
        inter_node_bandwidth: bytes/s one node sends to other nodes, all its NICs together: the
            ranks of a node that send off-node at the same time share it.
        intra_node_latency / inter_node_latency: seconds per message (per collective call).
        call_overhead: seconds per block-kernel call (launch, layout changes).
        backward_flops_ratio: backward FLOPs / forward FLOPs of a block (5 matmuls vs 2).
    """

    name: str
    nodes: int
    devices_per_node: int
    device_flops: float
    device_memory: float
    memory_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_latency: float
    inter_node_latency: float
    call_overhead: float = 30e-6
    intra_node_link_bandwidth: float | None = None
    backward_flops_ratio: float = 2.5
    stat_lanes: int = 8  # softmax statistics lanes: 8 on NPU, 1 for the CPU/CUDA kernels

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def with_overrides(self, **values: float | int | None) -> Cluster:
        """A copy with every non-None value replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Cluster] = {
    # Atlas 800T A2: 8 x Ascend 910B, HCCS full mesh inside the node, one 200GE RoCE port per NPU.
    "atlas-800t-a2": Cluster(
        name="atlas-800t-a2",
        nodes=1,
        devices_per_node=8,
        device_flops=280e12,  # 910B BF16/FP16 peak
        device_memory=64 * 2**30,  # HBM2e
        memory_bandwidth=1.6e12,
        intra_node_bandwidth=392 * GB,  # HCCS full mesh: 7 links x 56 GB/s
        intra_node_link_bandwidth=56 * GB,
        inter_node_bandwidth=8 * 25 * GB,  # 8 NPU ports x 200 Gbit/s
        intra_node_latency=10e-6,
        inter_node_latency=20e-6,
        call_overhead=40e-6,
        stat_lanes=8,
    ),
    # A generic 8-GPU node with the numbers of an NVIDIA DGX H100: 8 x H100 SXM (NVLink 4 through
    # NVSwitch), one 400 Gbit/s NIC per GPU.
    "generic-8gpu": Cluster(
        name="generic-8gpu",
        nodes=1,
        devices_per_node=8,
        device_flops=989e12,  # H100 SXM dense BF16
        device_memory=80 * 2**30,  # HBM3
        memory_bandwidth=3.35e12,
        intra_node_bandwidth=450 * GB,  # NVLink 4: 900 GB/s both directions together
        inter_node_bandwidth=8 * 50 * GB,  # 8 x 400 Gbit/s
        intra_node_latency=5e-6,
        inter_node_latency=10e-6,
        call_overhead=20e-6,
        stat_lanes=1,
    ),
}
