"""Parquet run logs: the product's output (DESIGN.md decision 5).

An experiment directory holds three tables with schemas fixed from round 0:

* ``runs.parquet``: one row per run (id, algorithm, config, seed, versions, status, times);
* ``rounds.parquet``: one row per communication round (accuracy, losses, bytes per direction and
  cumulative, global parameter count, cohort size, wall seconds);
* ``clients.parquet``: one row per (round, client) (examples, loss, bytes, seconds, worker).

Every flush rewrites a table to a temporary file in the same directory and renames it over the
old one (``os.replace`` is atomic on POSIX), so a crash at any moment leaves either the previous
complete file or the new one: never a file pandas cannot read, never a lost completed round.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_TS = pa.timestamp("us", tz="UTC")

RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("experiment", pa.string()), ("algorithm", pa.string()),
    ("config_json", pa.string()), ("seed", pa.int64()), ("fedsim_version", pa.string()),
    ("versions_json", pa.string()), ("status", pa.string()), ("message", pa.string()),
    ("started_at", _TS), ("finished_at", _TS),
])

ROUNDS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("algorithm", pa.string()), ("round", pa.int64()),
    ("phase", pa.string()), ("layer", pa.int64()),
    ("test_accuracy", pa.float64()), ("test_loss", pa.float64()), ("train_loss", pa.float64()),
    ("bytes_up", pa.int64()), ("bytes_down", pa.int64()),
    ("cum_bytes_up", pa.int64()), ("cum_bytes_down", pa.int64()), ("cum_bytes", pa.int64()),
    ("global_params", pa.int64()), ("trainable_params", pa.int64()),
    ("clients", pa.int64()), ("wall_seconds", pa.float64()),
])

CLIENTS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("round", pa.int64()), ("client_id", pa.int64()),
    ("n_examples", pa.int64()), ("train_loss", pa.float64()),
    ("bytes_up", pa.int64()), ("bytes_down", pa.int64()), ("seconds", pa.float64()),
    ("worker", pa.string()), ("attempt", pa.int64()),
])

TABLES = {"runs": RUNS_SCHEMA, "rounds": ROUNDS_SCHEMA, "clients": CLIENTS_SCHEMA}


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunLog:
    """Rows of the three tables of one experiment directory, flushed atomically.

    Rows are dicts keyed by the schema's column names; a missing key is written as null, an
    unknown key raises ``KeyError`` (so a typo never silently drops a column).
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}

    def add(self, table: str, row: dict[str, Any]) -> None:
        """Append one row to ``table`` ("runs", "rounds" or "clients")."""
        unknown = set(row).difference(TABLES[table].names)
        if unknown:
            raise KeyError(f"{table}.parquet has no columns {sorted(unknown)}")
        self.rows[table].append(dict(row))

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Change columns of the runs row of ``run_id`` (e.g. status, finished_at)."""
        for row in self.rows["runs"]:
            if row["run_id"] == run_id:
                row.update(fields)
                return
        raise KeyError(f"no run {run_id!r}")

    def flush(self) -> None:
        """Rewrite all three tables atomically (clients and rounds before runs)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("clients", "rounds", "runs"):
            schema = TABLES[name]
            table = pa.Table.from_pylist(self.rows[name], schema=schema)
            write_atomic(table, self.dir / f"{name}.parquet")
