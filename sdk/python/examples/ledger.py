"""A ledger service that takes part in decree transactions, on the Python SDK.

A branch's payload is JSON: ``{"changes": {"<account>": <delta>, ...}}``. The
branch votes NO if an account would go below zero. Balances, and every txid
applied, live in the participant's SQLite database, written in the same synced
commit as the framework's commit record: each decision applies exactly once.

    python ledger.py --coordinator http://127.0.0.1:7000 --name ledger \\
        --listen 127.0.0.1:7101 --data-dir /tmp/ledger
    python ledger.py --show --data-dir /tmp/ledger     # balances and applied txids, as JSON
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Dict, Sequence

import decree
import decree.participant


def changes(payload: bytes) -> Dict[str, int]:
    try:
        body = json.loads(payload)
        found = body["changes"]
        if not isinstance(found, dict) or not all(isinstance(v, int) for v in found.values()):
            raise ValueError("changes must map accounts to integers")
        return {str(k): int(v) for k, v in found.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise decree.Refused(f"bad ledger payload: {err}") from None


class Ledger(decree.Service):
    def open(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS balance (account TEXT PRIMARY KEY, amount INTEGER NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS applied (txid TEXT PRIMARY KEY)")

    def keys(self, payload: bytes) -> Sequence[str]:
        return sorted(changes(payload))

    def prepare(self, db: sqlite3.Connection, txid: str, payload: bytes) -> object:
        found = changes(payload)
        for account, delta in sorted(found.items()):
            row = db.execute("SELECT amount FROM balance WHERE account = ?", (account,)).fetchone()
            if (row[0] if row else 0) + delta < 0:
                raise decree.Refused(f"insufficient funds in {account}")
        return decree.Ready(redo=payload) if found else decree.READ_ONLY

    def commit(self, db: sqlite3.Connection, txid: str, redo: bytes) -> None:
        for account, delta in sorted(changes(redo).items()):
            db.execute(
                "INSERT INTO balance VALUES (?, ?) ON CONFLICT(account) DO UPDATE SET amount = amount + ?",
                (account, delta, delta),
            )
        db.execute("INSERT INTO applied VALUES (?)", (txid,))  # a second apply would fail here


def show(data_dir: str) -> None:
    db = sqlite3.connect(f"file:{os.path.join(data_dir, 'decree.sqlite')}?mode=ro", uri=True)
    print(
        json.dumps(
            {
                "balances": dict(db.execute("SELECT account, amount FROM balance ORDER BY account").fetchall()),
                "applied": [t for (t,) in db.execute("SELECT txid FROM applied ORDER BY txid")],
                "in_doubt": [t for (t,) in db.execute("SELECT txid FROM decree_prepared ORDER BY txid")],
            }
        )
    )


if __name__ == "__main__":
    if "--show" in sys.argv:
        show(sys.argv[sys.argv.index("--data-dir") + 1])
    else:
        decree.participant.main(Ledger())
