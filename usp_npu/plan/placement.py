"""Which node each global rank lives on, and which link class a transfer uses.

``megatron``: the launcher's order, ``devices_per_node`` consecutive global ranks per node
(torchrun's ``--node-rank``). With Megatron's rank order (tp innermost, then cp; REFERENCE.md
section 2) and Ulysses groups made of consecutive CP members, Ulysses stays inside a node as long
as ``tp * u <= devices_per_node``.
``round_robin``: global rank ``g`` on node ``g % nodes``: neighbours in rank order sit on
different nodes, so the Ulysses all-to-all crosses nodes and the ring stays inside them (the
placement that flips the winner in ``docs/plan.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from usp_npu.parallel_state import mesh_rank_lists

PLACEMENTS = ("megatron", "round_robin")
INTRA, INTER = "intra_node", "inter_node"
LINK_CLASSES = (INTRA, INTER)


def node_of_rank(world_size: int, devices_per_node: int, placement: str = "megatron") -> list[int]:
    """``nodes[g]`` = the node of global rank ``g``."""
    if devices_per_node < 1 or world_size % devices_per_node:
        raise ValueError(
            f"--devices-per-node {devices_per_node} must divide the world size {world_size}"
        )
    nodes = world_size // devices_per_node
    if placement == "megatron":
        return [g // devices_per_node for g in range(world_size)]
    if placement == "round_robin":
        return [g % nodes for g in range(world_size)]
    raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")


def link_class(nodes: list[int], src: int, dst: int) -> str:
    return INTRA if nodes[src] == nodes[dst] else INTER


@dataclass(frozen=True)
class RankGroups:
    """One global rank's Ulysses and ring groups (global ranks, group order)."""

    rank: int
    ulysses_ranks: tuple[int, ...]
    ring_ranks: tuple[int, ...]

    @property
    def ulysses_rank(self) -> int:
        return self.ulysses_ranks.index(self.rank)

    @property
    def ring_rank(self) -> int:
        return self.ring_ranks.index(self.rank)


def rank_groups(world_size: int, tp: int, cp: int, u: int) -> list[RankGroups]:
    """Every global rank's groups, from the same arithmetic ``initialize_context_parallel`` uses."""
    _, ulysses, rings = mesh_rank_lists(world_size, tp, cp, u)
    mine_u = {g: tuple(group) for group in ulysses for g in group}
    mine_r = {g: tuple(group) for group in rings for g in group}
    return [RankGroups(g, mine_u[g], mine_r[g]) for g in range(world_size)]
