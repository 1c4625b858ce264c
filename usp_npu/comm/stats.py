"""Counters of the communication layer (what ``usp-npu bench`` reports): bytes, time waited."""

from __future__ import annotations

from collections import defaultdict
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
    """

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ring_wait_s: float = 0.0

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] += int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.ring_wait_s = 0.0
