"""Counters of the communication layer (what ``usp-npu bench`` reports): bytes, time waited."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CommStats:
    """Bytes this rank sent, per kind of traffic (``all_to_all``, ``ring_kv``, ``ring_dkv``), and
    the seconds it spent blocked waiting for ring receives (communication the overlap did not hide).
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
