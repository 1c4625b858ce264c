"""Byte counters for the communication layer (what ``usp-npu bench`` reports)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CommStats:
    """Bytes this rank sent, per kind of traffic (``all_to_all``, ``ring_kv``, ``ring_dkv``)."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] += int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
