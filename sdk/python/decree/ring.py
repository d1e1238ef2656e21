"""The consistent-hash ring keys are routed by, exactly as every decree
client routes them (docs/elasticity.md).

Each member owns ``weight x vnodes`` points on a 64-bit ring, at
``hash("<name>#<i>")``. A key belongs to the owner of the first point at or
after ``hash(key)``, wrapping around. ``hash`` is the 64-bit FNV-1a of the
UTF-8 bytes followed by MurmurHash3's ``fmix64``. While a migration moves keys
to a ``target`` ring, a key whose owner differs between the two lives at its
target owner when it sorts (as UTF-8 bytes) before the cursor.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

VNODES = 2048
"""Points per unit of weight in rings made by this version."""
MAX_WEIGHT = 64
MAX_VNODES = 16_384
MAX_POINTS = 1 << 23

_MASK = (1 << 64) - 1


def hash64(data: bytes) -> int:
    """FNV-1a (64-bit) followed by MurmurHash3's fmix64."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _MASK
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK
    return h ^ (h >> 33)


class Ring:
    """A ring over ``(name, weight)`` members with ``vnodes`` points per unit of weight."""

    def __init__(self, members: Iterable[Tuple[str, int]], vnodes: int = VNODES) -> None:
        kept: Dict[str, int] = {}
        for name, weight in members:
            kept.setdefault(name, min(max(weight, 1), MAX_WEIGHT))
        self.vnodes = max(vnodes, 1)
        self.names: List[str] = sorted(kept)
        self.weights: List[int] = [kept[n] for n in self.names]
        points = sum(self.weights) * self.vnodes
        if self.vnodes > MAX_VNODES or points > MAX_POINTS:
            raise ValueError(f"a ring of {points} points at {self.vnodes} per weight is out of bounds")
        pairs = sorted(
            (hash64(f"{name}#{v}".encode()), i)
            for i, (name, weight) in enumerate(zip(self.names, self.weights))
            for v in range(weight * self.vnodes)
        )
        self._points = [p for p, _ in pairs]
        self._owners = [i for _, i in pairs]

    @classmethod
    def of(cls, names: Iterable[str]) -> "Ring":
        """A ring over ``names``, each of weight 1."""
        return cls(((n, 1) for n in names), VNODES)

    @classmethod
    def from_wire(cls, ring) -> "Ring":  # a decree.v1.RingDescriptor
        return cls(((m.name, m.weight) for m in ring.members), ring.vnodes or VNODES)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def route(self, key: str) -> Optional[str]:
        """The member that owns ``key``; None on an empty ring."""
        if not self._points:
            return None
        at = bisect.bisect_left(self._points, hash64(key.encode()))
        return self.names[self._owners[at % len(self._points)]]


@dataclass
class Routing:
    """Where every key lives at one ring epoch: ``current``, except for keys a
    migration to ``target`` has moved already (those before ``cursor``)."""

    epoch: int = 0
    current: Ring = field(default_factory=lambda: Ring([]))
    target: Optional[Ring] = None
    cursor: bytes = b""
    cursor_end: bool = False

    @classmethod
    def from_wire(cls, routing) -> "Routing":  # a decree.v1.Routing
        return cls(
            epoch=routing.epoch,
            current=Ring.from_wire(routing.current),
            target=Ring.from_wire(routing.target) if routing.HasField("target") else None,
            cursor=routing.cursor.encode(),
            cursor_end=routing.cursor_end,
        )

    def _passed(self, key: str) -> bool:
        return self.cursor_end or key.encode() < self.cursor

    def route(self, key: str) -> Optional[str]:
        """The owner of ``key`` now."""
        current = self.current.route(key)
        if self.target is not None and self._passed(key):
            return self.target.route(key) or current
        return current

    def members(self) -> Sequence[str]:
        return self.current.names
