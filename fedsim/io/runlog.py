"""Parquet run logs: the product's output (docs/design.md decision 5).

An experiment directory holds three tables with schemas fixed from round 0:

* ``runs.parquet``: one row per run (id, algorithm, config, seed, versions, status, times);
* ``rounds.parquet``: one row per communication round (accuracy, losses, bytes per direction and
  cumulative, global parameter count, cohort size, wall seconds, simulated time);
* ``clients.parquet``: one row per (round, client) (examples, loss, bytes, seconds, worker,
  multiply-accumulates, simulated dispatch and arrival, outcome).

With a ``system:`` section the experiment directory also holds ``devices.parquet``, one row per
client (:data:`fedsim.system.world.DEVICES_COLUMNS`).

Every flush rewrites each changed table whole; rows already converted to Arrow are kept as record
batches, so a flush converts only the rows added since the last one (a flush of a 1,000-round run
costs the Parquet encoding of its rows, not their conversion from Python). The experiment
directory is a local path or a URI (``s3://bucket/prefix``, ``file:///shared/runs``; see
:mod:`fedsim.io.storage`): locally a table goes to a temporary file in the same directory that
is renamed over the old one (``os.replace`` is atomic on POSIX); on an object store it is one
upload, which becomes visible only when complete. Either way a crash at any moment leaves the
previous complete file or the new one: never a file pandas cannot read, never a lost completed
round.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fedsim.io import storage

_TS = pa.timestamp("us", tz="UTC")

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("experiment", pa.string()),
        ("algorithm", pa.string()),
        ("config_json", pa.string()),
        ("seed", pa.int64()),
        ("fedsim_version", pa.string()),
        ("versions_json", pa.string()),
        ("status", pa.string()),
        ("message", pa.string()),
        ("started_at", _TS),
        ("finished_at", _TS),
        ("dry_run", pa.bool_()),
    ]
)

ROUNDS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("algorithm", pa.string()),
        ("round", pa.int64()),
        ("phase", pa.string()),
        ("layer", pa.int64()),
        ("test_accuracy", pa.float64()),
        ("test_loss", pa.float64()),
        ("train_loss", pa.float64()),
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
        ("cum_bytes_up", pa.int64()),
        ("cum_bytes_down", pa.int64()),
        ("cum_bytes", pa.int64()),
        ("global_params", pa.int64()),
        ("trainable_params", pa.int64()),
        ("flops", pa.int64()),
        ("test_accuracy_clients_mean", pa.float64()),
        ("clients", pa.int64()),
        ("wall_seconds", pa.float64()),
        ("sim_time_s", pa.float64()),
        ("staleness_mean", pa.float64()),
        ("staleness_max", pa.int64()),
        ("bytes_up_raw", pa.int64()),
        ("bytes_down_raw", pa.int64()),
        ("bytes_secagg", pa.int64()),
    ]
)

CLIENTS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("round", pa.int64()),
        ("client_id", pa.int64()),
        ("n_examples", pa.int64()),
        ("local_steps", pa.int64()),
        ("train_loss", pa.float64()),
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
        ("seconds", pa.float64()),
        ("worker", pa.string()),
        ("attempt", pa.int64()),
        ("dropped", pa.bool_()),
        ("macs", pa.int64()),
        ("sim_dispatch_s", pa.float64()),
        ("sim_arrival_s", pa.float64()),
        ("outcome", pa.string()),
        ("model_version", pa.int64()),
        ("staleness", pa.int64()),
        ("bytes_up_raw", pa.int64()),
        ("bytes_down_raw", pa.int64()),
        ("bytes_secagg", pa.int64()),
        ("residual_norm", pa.float64()),
        ("secagg_clipped", pa.int64()),
        ("secagg_overflow", pa.int64()),
    ]
)

TABLES = {"runs": RUNS_SCHEMA, "rounds": ROUNDS_SCHEMA, "clients": CLIENTS_SCHEMA}


def write_atomic(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write ``table`` as Parquet to a local path or URI; no reader ever sees a partial file
    (local: temporary file + atomic rename; object store: one upload).

    Raises:
        OSError: the file cannot be written.
    """
    storage.write_table(table, path)


class RunLog:
    """Rows of the three tables of one experiment directory, flushed atomically.

    Rows are dicts keyed by the schema's column names; a missing key is written as null, an
    unknown key raises ``KeyError`` (so a typo never silently drops a column).
    """

    def __init__(self, run_dir: str | Path):
        """``run_dir``: a local path or a URI (``s3://bucket/prefix/run``, ``file:///...``)."""
        self.dir: str | Path = run_dir if storage.is_uri(run_dir) else Path(run_dir)
        self._made = False
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
        self._dirty = set(TABLES)  # tables whose rows changed since the last flush
        # rows[name][:_converted[name]] as Arrow record batches; reset when a row changes
        self._batches: dict[str, list[pa.RecordBatch]] = {name: [] for name in TABLES}
        self._converted = {name: 0 for name in TABLES}

    def _changed(self, table: str) -> None:
        """Rows of ``table`` were removed or edited: its Arrow batches are rebuilt at the next flush."""
        self._batches[table], self._converted[table] = [], 0
        self._dirty.add(table)

    def add(self, table: str, row: dict[str, Any]) -> None:
        """Append one row to ``table`` ("runs", "rounds" or "clients"). A runs row without
        ``dry_run`` is a real run: ``dry_run`` False (``fedsim run --dry-run`` sets True)."""
        unknown = set(row).difference(TABLES[table].names)
        if unknown:
            raise KeyError(f"{table}.parquet has no columns {sorted(unknown)}")
        row = dict(row)
        if table == "runs":
            row.setdefault("dry_run", False)
        self.rows[table].append(row)
        self._dirty.add(table)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunLog:
        """The log of an existing experiment directory, its rows read back from the Parquet files.

        Raises:
            FileNotFoundError: a table is missing.
        """
        log = cls(run_dir)
        for name, schema in TABLES.items():
            data = storage.read_bytes(storage.join(log.dir, f"{name}.parquet"))
            table = pq.read_table(pa.BufferReader(data))
            for f in schema:  # a table written before a column existed: the column as nulls
                if f.name not in table.column_names:
                    table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
            table = table.select(schema.names).cast(schema)
            log.rows[name] = table.to_pylist()
            log._batches[name], log._converted[name] = table.to_batches(), len(log.rows[name])
        log._dirty = set()
        return log

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        """The runs row of ``run_id``, or None."""
        return next((row for row in self.rows["runs"] if row["run_id"] == run_id), None)

    def truncate(self, run_id: str, after_round: int) -> None:
        """Drop the rounds and clients rows of ``run_id`` whose round is > ``after_round``."""
        for name in ("rounds", "clients"):
            self.rows[name] = [
                r for r in self.rows[name] if r["run_id"] != run_id or r["round"] <= after_round
            ]
            self._changed(name)

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Change columns of the runs row of ``run_id`` (e.g. status, finished_at)."""
        for row in self.rows["runs"]:
            if row["run_id"] == run_id:
                row.update(fields)
                self._changed("runs")
                return
        raise KeyError(f"no run {run_id!r}")

    def flush(self) -> None:
        """Rewrite, atomically, every table whose rows changed (clients and rounds before runs)."""
        if not self._made:  # a local directory is re-created if it vanished; a remote one once
            storage.make_dirs(self.dir)
            self._made = storage.local_path(self.dir) is None
        for name in ("clients", "rounds", "runs"):
            if name not in self._dirty:
                continue
            new = self.rows[name][self._converted[name] :]
            if new:
                self._batches[name].append(pa.RecordBatch.from_pylist(new, schema=TABLES[name]))
                self._converted[name] = len(self.rows[name])
            table = pa.Table.from_batches(self._batches[name], schema=TABLES[name])
            if len(self._batches[name]) > 8:  # many small chunks make Parquet encoding slow
                table = table.combine_chunks()
                self._batches[name] = table.to_batches()
            write_atomic(table, storage.join(self.dir, f"{name}.parquet"))
        self._dirty.clear()
