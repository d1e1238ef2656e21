"""Named crash points, the same names as decree's own participants
(DESIGN.md, "Crash points"; decree_runtime::crash).

A process arms points from ``DECREE_CRASH_AT=name[,name...]`` or
``--crash-at``. Reaching an armed point aborts the process at once with
SIGABRT (``os.abort``): no cleanup, no flush, exactly like a crash.
"""

from __future__ import annotations

import os
from typing import FrozenSet, Iterable

#: Locks taken (and the service's prepare run), prepared record not written.
PREPARE_BEFORE_LOG = "participant.prepare.before_log"
#: Prepared record durable, vote not sent.
PREPARE_AFTER_LOG = "participant.prepare.after_log"
#: Commit received, nothing applied.
COMMIT_BEFORE_APPLY = "participant.commit.before_apply"
#: Commit applied durably, ack not sent.
COMMIT_AFTER_APPLY = "participant.commit.after_apply"
#: Abort received, nothing applied.
ABORT_BEFORE_APPLY = "participant.abort.before_apply"
#: Prepared records loaded, outcome not yet asked.
RECOVERY_BEFORE_RESOLVE = "participant.recovery.before_resolve"

ALL = (
    PREPARE_BEFORE_LOG,
    PREPARE_AFTER_LOG,
    COMMIT_BEFORE_APPLY,
    COMMIT_AFTER_APPLY,
    ABORT_BEFORE_APPLY,
    RECOVERY_BEFORE_RESOLVE,
)

ENV = "DECREE_CRASH_AT"

_armed: FrozenSet[str] = frozenset()


def parse(names: str) -> FrozenSet[str]:
    """The points a comma-separated list names; ValueError for a name not in :data:`ALL`."""
    points = {n.strip() for n in names.split(",") if n.strip()}
    unknown = sorted(points - set(ALL))
    if unknown:
        raise ValueError(f"unknown crash point {unknown[0]!r} (known: {', '.join(ALL)})")
    return frozenset(points)


def arm(names: Iterable[str]) -> None:
    global _armed
    _armed = frozenset(names)


def arm_from_env() -> None:
    arm(parse(os.environ.get(ENV, "")))


def point(name: str) -> None:
    """Aborts the process here if ``name`` is armed."""
    if name in _armed:
        os.write(2, f"decree: crash point {name} reached: aborting\n".encode())
        os.abort()
