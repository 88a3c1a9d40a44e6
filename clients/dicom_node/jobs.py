"""The job database: one row per source series, in SQLite (WAL), under the node's data folder.

A job goes received -> complete -> segmenting -> segmented -> sent, or ends skipped (no route, not an image
series) or failed (parked with its reason until replayed). Every change is one transaction, so a
``kill -9`` leaves each job in the last state it reached; :meth:`JobStore.recover` puts a job that was
being segmented back to complete. ``sent`` records (source series, model) pairs, so a series is sent once
per model whatever happens between the send and the commit that records it.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RECEIVED, COMPLETE, SEGMENTING, SEGMENTED, SENT, SKIPPED, FAILED = (
    "received",
    "complete",
    "segmenting",
    "segmented",
    "sent",
    "skipped",
    "failed",
)
STATES = (RECEIVED, COMPLETE, SEGMENTING, SEGMENTED, SENT, SKIPPED, FAILED)
DONE = (SENT, SKIPPED, FAILED)
JOB_ID_HEX = 16

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    origin TEXT NOT NULL,
    state TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    expected_instances INTEGER,
    last_received REAL NOT NULL,
    task TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    model TEXT,
    started REAL,
    finished REAL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    job_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    PRIMARY KEY (job_id, instance)
);
CREATE TABLE IF NOT EXISTS sent (
    series_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    result_uid TEXT NOT NULL,
    sent_at REAL NOT NULL,
    PRIMARY KEY (series_uid, model)
);
"""
MIGRATIONS = {("jobs", "bytes"): "ALTER TABLE jobs ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0"}
"""Columns added since the first schema, added to an older database when it is opened."""


def job_id(series_uid: str) -> str:
    """A series' job id: the first hex digits of its UID's sha256 (what logs and ``status`` show)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:JOB_ID_HEX]


def uid_hash(uid: str) -> str:
    """A UID as logs may show it: hashed (UIDs can be traced back to a patient through the PACS)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Job:
    id: str
    series_uid: str
    study_uid: str
    origin: str
    state: str
    instances: int
    bytes: int
    expected_instances: int | None
    last_received: float
    task: str | None
    reason: str | None
    attempts: int
    next_attempt: float
    model: str | None
    started: float | None
    finished: float | None
    updated: float


class JobStore:
    """The job database at ``path``. Safe from several threads: each call opens its own connection."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: set once per database file
            db.executescript(SCHEMA)
            for (table, column), statement in MIGRATIONS.items():
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(statement)
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged instance's row survives a power cut
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def add_instance(
        self,
        series_uid: str,
        study_uid: str,
        instance_uid: str,
        origin: str,
        expected: int | None = None,
        size: int = 0,
    ) -> tuple[Job, bool]:
        """Record one received instance of a series (``size`` bytes on disk), creating its job; returns the job
        and whether the instance is new to it. An instance of a job that is done changes nothing (the caller
        drops it)."""
        now = time.time()
        identifier = job_id(series_uid)
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (id, series_uid, study_uid, origin, state, expected_instances,"
                " last_received, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (identifier, series_uid, study_uid, origin, RECEIVED, expected, now, now),
            )
            job = self._get(db, identifier)
            if job.state not in (RECEIVED, COMPLETE):
                return job, False
            new = db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?)", (identifier, instance_uid)).rowcount
            db.execute(  # a late instance of a complete series that has not started yet reopens it
                "UPDATE jobs SET state = ?, instances = instances + ?, bytes = bytes + ?, last_received = ?,"
                " updated = ? WHERE id = ?",
                (RECEIVED, new, size * new, now, now, identifier),
            )
            return self._get(db, identifier), bool(new)

    def skip_series(self, series_uid: str, study_uid: str, origin: str, reason: str) -> None:
        """Record a series that is skipped before any instance is fetched (so it is not looked at again)."""
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (id, series_uid, study_uid, origin, state, reason, last_received,"
                " updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id(series_uid), series_uid, study_uid, origin, SKIPPED, reason, now, now),
            )

    def has_instance(self, identifier: str, instance_uid: str) -> bool:
        with self._transaction() as db:
            row = db.execute("SELECT 1 FROM instances WHERE job_id = ? AND instance = ?", (identifier, instance_uid))
            return row.fetchone() is not None

    def get(self, identifier: str) -> Job | None:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (identifier,)).fetchone()
            return Job(**row) if row else None

    def _get(self, db: sqlite3.Connection, identifier: str) -> Job:
        return Job(**db.execute("SELECT * FROM jobs WHERE id = ?", (identifier,)).fetchone())

    def jobs(self, states: tuple[str, ...] = STATES) -> list[Job]:
        marks = ",".join("?" * len(states))
        with self._transaction() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY updated", states)
            return [Job(**row) for row in rows]

    def complete_settled(self, settle_s: float) -> list[str]:
        """Mark complete every received series whose instance count is reached or that has been quiet for
        ``settle_s``; returns their ids."""
        now = time.time()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE state = ? AND (last_received <= ? OR"
                " (expected_instances IS NOT NULL AND instances >= expected_instances))",
                (RECEIVED, now - settle_s),
            ).fetchall()
            ids = [row["id"] for row in rows]
            db.executemany("UPDATE jobs SET state = ?, updated = ? WHERE id = ?", [(COMPLETE, now, i) for i in ids])
            return ids

    def next_due(self) -> Job | None:
        """The oldest complete or segmented job whose wait is over, or ``None``."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) AND next_attempt <= ? ORDER BY last_received LIMIT 1",
                (COMPLETE, SEGMENTED, time.time()),
            ).fetchone()
            return Job(**row) if row else None

    def move(self, identifier: str, state: str, **values: object) -> Job:
        """Set a job's state (and any other columns given) in one transaction."""
        columns = {"state": state, "updated": time.time(), **values}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*columns.values(), identifier))
            return self._get(db, identifier)

    def record_sent(self, job: Job, model: str, result_uid: str) -> None:
        """The job's result reached the destination: one transaction records it and marks the job sent."""
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?, ?, ?)", (job.series_uid, model, result_uid, now))
            db.execute(
                "UPDATE jobs SET state = ?, finished = ?, updated = ?, reason = NULL WHERE id = ?",
                (SENT, now, now, job.id),
            )

    def was_sent(self, series_uid: str, model: str) -> bool:
        with self._transaction() as db:
            row = db.execute("SELECT 1 FROM sent WHERE series_uid = ? AND model = ?", (series_uid, model))
            return row.fetchone() is not None

    def recover(self) -> list[str]:
        """After a crash: jobs caught segmenting go back to complete (their attempt is not counted)."""
        with self._transaction() as db:
            ids = [row["id"] for row in db.execute("SELECT id FROM jobs WHERE state = ?", (SEGMENTING,))]
            db.execute("UPDATE jobs SET state = ?, updated = ? WHERE state = ?", (COMPLETE, time.time(), SEGMENTING))
            return ids

    def replay(self, identifier: str) -> Job:
        """Send a parked or skipped job through again, its attempts reset."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, attempts = 0, next_attempt = 0, reason = NULL, updated = ?"
                " WHERE id = ? AND state IN (?, ?)",
                (COMPLETE, time.time(), identifier, FAILED, SKIPPED),
            )
            return self._get(db, identifier)

    def forget(self, identifier: str) -> None:
        """Remove a job and its instances, so that its series is taken as new when it comes again."""
        with self._transaction() as db:
            db.execute("DELETE FROM instances WHERE job_id = ?", (identifier,))
            db.execute("DELETE FROM jobs WHERE id = ?", (identifier,))

    def spool_bytes(self) -> int:
        """The bytes received for series not yet done (the spool that max_spool_bytes bounds)."""
        marks = ",".join("?" * len(DONE))
        with self._transaction() as db:
            row = db.execute(f"SELECT COALESCE(SUM(bytes), 0) FROM jobs WHERE state NOT IN ({marks})", DONE)
            return int(row.fetchone()[0])

    def instance_count(self) -> int:
        with self._transaction() as db:
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._transaction() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            found = {row["state"]: row["n"] for row in rows}
        return {state: found.get(state, 0) for state in STATES}
