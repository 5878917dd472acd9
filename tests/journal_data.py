"""Synthetic journals written with plain SQL (10^5 series in a few seconds), for the HTML report's tests.

Series i is issued `gap_s * i` after `t0` and takes 0.3-1.8 s (every 997th 20 s more);
every `short_every`th has one short attempt, every `fail_every`th fails after 3 attempts
(its reason names its PatientID, which the page must blank out), every `throttle_every`th
halves the in-flight limit (2 → 1) and the limit grows back half a period later. The
truths the tests compare against are read back from the journal with SQL, not from here.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_transfer.journal import Journal

T0 = 1772477400.0  # 2026-03-02 18:50 UTC = 19:50 in Zurich, ten minutes before a 20:00 window opens


@dataclass(frozen=True)
class Plan:
    n: int
    t0: float = T0
    gap_s: float = 0.35
    per: int = 10
    short_every: int = 50
    fail_every: int = 1000
    throttle_every: int = 5000

    def seconds(self, i: int) -> float:
        return 0.3 + (i * 2654435761 % 1000) / 1000 * 1.5 + (20.0 if i % 997 == 0 else 0.0)

    def failed(self, i: int) -> bool:
        return i % self.fail_every == 3

    def uid(self, i: int) -> str:
        return f"1.2.826.0.1.3680043.10.999.{i}"

    def patient(self, i: int) -> str:
        return f"PAT-{i // 20:05d}"

    def issued(self, i: int) -> float:
        return self.t0 + i * self.gap_s


def _series(p: Plan) -> Iterator[tuple[Any, ...]]:
    for i in range(p.n):
        at, secs, failed = p.issued(i), p.seconds(i), p.failed(i)
        reason = f"short: 3/{p.per} after 3 attempts (patient {p.patient(i)})" if failed else None
        yield (
            i + 1, p.uid(i), f"1.2.826.0.1.3680043.10.998.{i // 5}", p.patient(i), i + 2,
            "failed" if failed else "complete", p.per, 3 if failed else p.per, 3 if failed else 1,
            None if failed else "count", at, at, None if failed else at + secs, None if failed else secs,
            at + secs, reason,
        )  # fmt: skip


def _events(p: Plan) -> Iterator[tuple[Any, ...]]:
    yield (p.t0 - 1, None, "run.start", None, None, json.dumps({"method": "retrieve-job", "limit": 2}))
    for i in range(p.n):
        uid, at, secs = p.uid(i), p.issued(i), p.seconds(i)
        yield (at, uid, "queried", "pending", "queried", None)
        yield (at, uid, "issued", "queried", "moving", "attempt=1")
        if i % p.short_every == 7:
            yield (at + 0.2, uid, "short", "moving", "waiting_retry", f"short: {i % (p.per - 1) + 1}/{p.per}")
        if p.failed(i):
            yield (at + secs, uid, "give_up", "verifying", "failed", f"short: 3/{p.per} after 3 attempts")
        else:
            yield (at + secs, uid, "arrived", "verifying", "complete", f"count={p.per}")
        if i % p.throttle_every == p.throttle_every - 1:
            drop = {"from": 2, "to": 1, "why": "nothing delivered", "kind": "down"}
            yield (at, None, "throttle", None, None, json.dumps(drop))
        if i % p.throttle_every == p.throttle_every // 2 and i > p.throttle_every:
            yield (at, None, "throttle", None, None, json.dumps({"from": 1, "to": 2, "why": "recovered", "kind": "up"}))
            # the learned ceiling lifted: the limit stays, the mark is an upward one
            lift = {"from": 2, "to": 2, "why": "ceiling lifted", "kind": "up"}
            yield (at + 0.1, None, "throttle", None, None, json.dumps(lift))
    end = p.issued(p.n - 1) + p.seconds(p.n - 1) + 0.1
    yield (end, None, "run.stop", None, None, json.dumps({"stopped": False, "reason": None}))


def write_journal(path: Path, plan: Plan) -> Path:
    """A finished run's journal of `plan.n` series (schema made by Journal itself)."""
    Journal(path).close()
    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "INSERT INTO series (seq, uid, study_uid, patient_id, batch_line, state, expected, received, attempts,"
            " verified, issued_at, first_issued_at, finished_at, seconds, updated_at, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _series(plan),
        )
        db.executemany(
            "INSERT INTO events (at, uid, event, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?, ?)",
            _events(plan),
        )
        db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('batch', 'series.csv'), ('planned_at', ?)", (repr(plan.t0 - 60),)
        )
        # Rows written behind the journal's back: its per-state tallies are made again from them.
        for table in ("state_counts", "run_times"):
            db.execute(f"DROP TABLE IF EXISTS {table}")
        for trigger in ("series_state_counts", "series_run_times"):
            db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    Journal(path).close()  # a writable open adds the tallies, filled from `series`
    return path
