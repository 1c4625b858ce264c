"""Counters of the communication layer (what ``usp-npu bench`` reports): bytes, time waited."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class CommStats:
    """Bytes this rank sent, per kind of traffic, and the seconds it spent blocked waiting for
    ring receives (communication the overlap did not hide).

    Kinds: ``all_to_all`` (Ulysses), ``ring_kv`` / ``ring_dkv`` (the ring's K/V blocks and dK/dV
    accumulators), ``ring_inner_kv`` / ``ring_inner_dkv`` / ``ring_outer_kv`` /
    ``ring_outer_dkv`` (the double ring's links), ``all_gather`` / ``reduce_scatter``
    (kvallgather over the CP group, all-gather KV over the Ulysses group).
    ``usp_npu.comm.volume.expected_bytes`` models each.

    With ``nodes`` (the node of every global rank) and ``rank`` (this rank) set, each send that
    names its peers is also counted per link class in ``by_link[kind]["intra_node" |
    "inter_node"]``: the same bytes, split by whether the peer shares this rank's node.
    """

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ring_wait_s: float = 0.0
    nodes: Sequence[int] | None = None
    rank: int | None = None
    by_link: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )

    def add(self, kind: str, nbytes: int, peers: Sequence[int] = ()) -> None:
        """``nbytes`` sent, split evenly over ``peers`` (global ranks other than this one)."""
        self.sent[kind] += int(nbytes)
        if self.nodes is None or self.rank is None or not peers:
            return
        share = int(nbytes) // len(peers)
        for peer in peers:
            cls = "intra_node" if self.nodes[peer] == self.nodes[self.rank] else "inter_node"
            self.by_link[kind][cls] += share

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.by_link.clear()
        self.ring_wait_s = 0.0
