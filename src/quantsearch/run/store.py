"""The run store: one SQLite database per run directory, the single writer of a run's outputs.

Every evaluation is committed as it completes, so a crash loses at most the candidate in flight. The CSV and JSON
files in the run directory are views of the store, each written atomically (temporary file, then rename).
"""
from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..files import write_atomic
from ..search.bound import Bound
from ..search.problem import Evaluation

__all__ = ["StoreError", "RunStore", "write_atomic", "STORE_NAME"]

STORE_NAME = "run.sqlite"
SCHEMA_VERSION = 2  # 2: the images each evaluation ran (early rejection stops part-way)


class StoreError(ValueError):
    """A run directory that cannot be used: another run's, corrupted, or from different settings."""


class RunStore:
    """Evaluations and settings of one run, in ``<run_dir>/run.sqlite``."""

    def __init__(self, run_dir: str | os.PathLike, connection: sqlite3.Connection):
        self.run_dir = Path(run_dir)
        self._db = connection

    # -- opening -----------------------------------------------------------------------------------------------
    @staticmethod
    def check_free(run_dir: str | os.PathLike, overwrite: bool = False) -> None:
        """Refuse a directory that already holds a run, unless ``overwrite`` (checked before any work starts)."""
        path = Path(run_dir) / STORE_NAME
        if path.exists() and path.stat().st_size > 0 and not overwrite:  # an empty file holds no run
            raise StoreError(f"{run_dir} already holds a run: use --resume to continue it or --overwrite")

    @classmethod
    def create(cls, run_dir: str | os.PathLike, settings: Mapping, overwrite: bool = False) -> "RunStore":
        """A new store; refuses a directory that already holds a run unless ``overwrite``.

        The store is built under a temporary name and renamed into place whole, so a reader (or a crash) never
        meets a half-made store, and an old one is replaced in one step. The caller owns the directory
        (:class:`~quantsearch.run.lock.RunLock`), so no other process creates or opens one meanwhile."""
        run_dir = Path(run_dir)
        path = run_dir / STORE_NAME
        cls.check_free(run_dir, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{STORE_NAME}.new"
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp)
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE evaluations (
                id INTEGER PRIMARY KEY, genome TEXT UNIQUE NOT NULL, accuracy REAL NOT NULL, costs TEXT NOT NULL,
                generation INTEGER NOT NULL, seconds REAL NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL,
                samples INTEGER);
        """)
        with db:
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema_version", json.dumps(SCHEMA_VERSION)), ("settings", json.dumps(dict(settings)))])
        db.close()
        os.replace(tmp, path)
        for stale in [run_dir / "run.json", *(run_dir / "pareto").glob("point_*.json")]:  # an overwritten run's
            stale.unlink(missing_ok=True)  # results: none may outlive it or pass for the new run's
        return cls(run_dir, sqlite3.connect(path, timeout=30))

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> "RunStore":
        """An existing store, checked for integrity."""
        path = Path(run_dir) / STORE_NAME
        if not path.is_file():
            raise StoreError(f"{run_dir} holds no run store ({STORE_NAME})")
        try:
            db = sqlite3.connect(path, timeout=30)  # a live run's writer holds it for a commit at most
            ok = db.execute("PRAGMA integrity_check").fetchone()[0]
            version = json.loads(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
            raise StoreError(f"run store {path} is corrupted: {exc}") from None
        if ok != "ok":
            raise StoreError(f"run store {path} is corrupted: {ok}")
        if version != SCHEMA_VERSION:
            raise StoreError(f"run store {path} was written with store schema v{version}; this quantsearch reads "
                             f"v{SCHEMA_VERSION}: start a new run")
        return cls(run_dir, db)

    def close(self) -> None:
        self._db.close()

    # -- settings ----------------------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key: str, value) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def settings(self) -> dict:
        return self.get("settings", {})

    # -- evaluations -------------------------------------------------------------------------------------------
    def record(self, evaluation: Evaluation, generation: int) -> None:
        """Commit one evaluation (a configuration already stored is kept as first recorded)."""
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO evaluations"
                " (genome, accuracy, costs, generation, seconds, status, message, samples)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (json.dumps(list(evaluation.bits)), evaluation.accuracy, json.dumps(dict(evaluation.costs)),
                 generation, evaluation.seconds, evaluation.status, evaluation.message,
                 (evaluation.extra or {}).get("samples")))

    def evaluations(self) -> list[tuple[Evaluation, int]]:
        """Every stored evaluation with its generation, in the order they were recorded."""
        rows = self._db.execute(
            "SELECT genome, accuracy, costs, generation, seconds, status, message, samples FROM evaluations"
            " ORDER BY id")
        return [(Evaluation(tuple(json.loads(g)), a, json.loads(c), s, st, m, {} if n is None else {"samples": n}),
                 gen)
                for g, a, c, gen, s, st, m, n in rows]

    def cache(self) -> dict[tuple[int, ...], Evaluation]:
        return {e.bits: e for e, _ in self.evaluations()}

    # -- views -------------------------------------------------------------------------------------------------
    def write_json(self, name: str, payload) -> Path:
        path = self.run_dir / name
        write_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
        return path

    def write_csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        path = self.run_dir / name
        write_atomic(path, buffer.getvalue())
        return path

    def write_evaluations_csv(self, quantizer_names: Sequence[str], bound: Bound | float) -> Path:
        """``evaluations.csv``: one row per evaluated configuration, bits per quantizer, in evaluation order;
        ``feasible`` says whether it meets ``bound``."""
        bound = Bound.of(bound)
        evaluations = self.evaluations()
        cost_names = list(evaluations[0][0].costs) if evaluations else []
        header = ["index", "generation", "accuracy", *cost_names, "feasible", "status", "samples", "message",
                  "seconds", *quantizer_names]
        rows = [[i, gen, f"{e.accuracy:.6f}", *[f"{e.costs[c]:g}" for c in cost_names],
                 int(e.status == "ok" and bound.holds(e.accuracy)), e.status,
                 (e.extra or {}).get("samples", ""), e.message, f"{e.seconds:.3f}", *e.bits]
                for i, (e, gen) in enumerate(evaluations)]
        return self.write_csv("evaluations.csv", header, rows)

    def write_file(self, name: str, data: bytes | str) -> Path:
        path = self.run_dir / name
        write_atomic(path, data)
        return path
