"""Reading experiment directories (local paths or pyarrow filesystem URIs) into pandas.

An experiment directory, as written by ``fedsim run``, holds ``runs.parquet`` (one row per run),
``rounds.parquet`` (one row per communication round) and ``clients.parquet`` (one row per
(round, client)); the schemas are in ``fedsim/io/runlog.py`` and docs/outputs.md.
Run ids are unique within a directory only, so every table read here gains an ``experiment_dir``
column and runs are keyed by ``(experiment_dir, run_id)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from analysis.errors import AnalysisError

TABLE_NAMES = ("runs", "rounds", "clients")
KEYS = ["experiment_dir", "run_id"]

# Columns analysis relies on; a file without them was not written by fedsim.
_REQUIRED = {
    "runs": {"run_id", "algorithm", "config_json", "seed", "status"},
    "rounds": {
        "run_id",
        "algorithm",
        "round",
        "test_accuracy",
        "bytes_up",
        "bytes_down",
        "cum_bytes_up",
        "cum_bytes_down",
        "cum_bytes",
        "wall_seconds",
    },
    "clients": {"run_id", "round", "client_id"},
}
# Columns of runs.parquet carried into load_runs (config_json is also flattened; versions_json dropped).
_RUN_COLUMNS = [
    "experiment",
    "seed",
    "status",
    "dry_run",
    "message",
    "started_at",
    "finished_at",
    "fedsim_version",
    "config_json",
]
DRY_RUN_HINT = (
    "a dry-run projection ('fedsim run --dry-run': projected traffic and compute, no trained "
    "model), so it has no results to report; run the experiment without --dry-run and use its "
    "directory"
)
_HINT = "pass a directory written by 'fedsim run', e.g. runs/digits-20261121-101500"


@dataclass(frozen=True)
class _Location:
    fs: pafs.FileSystem
    path: str  # inside fs, no trailing slash
    name: str  # what experiment_dir shows: an absolute local path or the URI as given


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _locate(path: str | os.PathLike) -> _Location:
    text = os.fspath(path)
    if "://" in text:
        try:
            fs, inner = pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, ValueError, OSError) as err:
            raise AnalysisError(
                f"cannot open {text!r} ({_first_line(err)}); pass a local directory or a URI "
                "that pyarrow.fs understands, such as s3://bucket/runs/digits-..."
            ) from None
        inner = inner.rstrip("/") or "/"
        # file:// names the same directory as its path: show (and deduplicate) it as that path
        return _Location(fs, inner, inner if isinstance(fs, pafs.LocalFileSystem) else text.rstrip("/"))
    local = os.path.abspath(os.path.expanduser(text))
    return _Location(pafs.LocalFileSystem(), local, local)


def _join(loc: _Location, name: str) -> str:
    return f"{loc.path.rstrip('/')}/{name}"


def _children_with_runs(loc: _Location, limit: int = 200) -> list[str]:
    """Names of sub-directories of ``loc`` that hold a runs.parquet (to suggest them)."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path))
        dirs = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)[:limit]
        found = loc.fs.get_file_info([_join(loc, f"{d}/runs.parquet") for d in dirs])
    except (pa.ArrowException, OSError):
        return []
    return [d for d, i in zip(dirs, found) if i.type == pafs.FileType.File]


def _check_dir(loc: _Location) -> None:
    try:
        info = loc.fs.get_file_info(loc.path)
        files = loc.fs.get_file_info([_join(loc, f"{t}.parquet") for t in TABLE_NAMES])
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(
            f"cannot read {loc.name!r} ({_first_line(err)}); check the path and your access to it"
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise AnalysisError(f"experiment directory {loc.name!r} does not exist; {_HINT}")
    if info.type != pafs.FileType.Directory:
        raise AnalysisError(f"{loc.name!r} is not a directory; {_HINT}")
    missing = [f"{t}.parquet" for t, i in zip(TABLE_NAMES, files) if i.type != pafs.FileType.File]
    if len(missing) == len(TABLE_NAMES):
        children = _children_with_runs(loc)
        if children:
            raise AnalysisError(
                f"{loc.name!r} is not a fedsim experiment directory but holds {len(children)} "
                f"of them; pass those instead, e.g. {_join(loc, children[0])}"
            )
        raise AnalysisError(
            f"{loc.name!r} is not a fedsim experiment directory (no runs.parquet, "
            f"rounds.parquet, clients.parquet); {_HINT}"
        )
    if missing:
        raise AnalysisError(
            f"{loc.name!r} lacks {', '.join(missing)}, so it is not a complete fedsim "
            f"experiment directory; {_HINT}"
        )


def _read_table(loc: _Location, name: str) -> pa.Table:
    where = f"{loc.name}/{name}.parquet"
    try:
        table = ds.dataset(_join(loc, f"{name}.parquet"), filesystem=loc.fs, format="parquet").to_table()
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(
            f"{where} is not a readable Parquet file ({_first_line(err)}); re-run the "
            "experiment or copy the file again"
        ) from None
    lacking = sorted(_REQUIRED[name].difference(table.column_names))
    if lacking:
        raise AnalysisError(
            f"{where} has no column(s) {', '.join(lacking)}, so it was not written by fedsim; {_HINT}"
        )
    return table.append_column("experiment_dir", pa.array([loc.name] * table.num_rows, pa.string()))


def _locations(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[_Location]:
    if isinstance(paths, (str, os.PathLike, PurePath)):
        paths = [paths]
    locs, seen = [], set()
    for p in paths:
        loc = _locate(p)
        if loc.name not in seen:
            seen.add(loc.name)
            locs.append(loc)
    if not locs:
        raise AnalysisError(f"no experiment directory given; {_HINT}")
    for loc in locs:
        _check_dir(loc)
    return locs


def read_tables(
    paths: str | os.PathLike | Iterable[str | os.PathLike], tables: Iterable[str] = TABLE_NAMES
) -> dict[str, pd.DataFrame]:
    """Read the raw tables of one or many experiment directories, concatenated.

    Args:
        paths: one experiment directory or several: local paths, or URIs that
            ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://``, ``gs://``, ``hdfs://``,
            ``file://``). Duplicates are read once.
        tables: which of "runs", "rounds", "clients" to read.

    Returns:
        ``{name: DataFrame}`` with each file's columns (see fedsim/io/runlog.py) plus
        ``experiment_dir`` (str: the absolute local path, or the URI as given), rows in the order
        of ``paths`` then of the file. Columns that only some directories have (a newer schema)
        are null elsewhere.

    Raises:
        AnalysisError: no path; a path that does not exist, is not a directory, or lacks one of
            the three Parquet files; an unreadable file or one without fedsim's columns.
    """
    tables = list(tables)
    unknown = sorted(set(tables).difference(TABLE_NAMES))
    if unknown:
        raise AnalysisError(f"unknown table(s) {', '.join(unknown)}; choose from {', '.join(TABLE_NAMES)}")
    return _read(_locations(paths), tables)


def _read(locs: list[_Location], tables: Iterable[str]) -> dict[str, pd.DataFrame]:
    out = {}
    for name in tables:
        parts = [_read_table(loc, name) for loc in locs]
        out[name] = pa.concat_tables(parts, promote_options="permissive").to_pandas()
    return out


def _flatten_config(config_json: str, where: str) -> dict:
    """``{"data.alpha": 0.5, "run.lr": 0.05, ...}`` from a runs.parquet ``config_json`` value.

    Every mapping section of the experiment (data, model, engine, ...) is flattened with dotted
    names; the run's own entry (``runs[0]``) becomes ``run.*``. Top-level scalars (name, seed,
    output_dir) are left out: the runs table already has ``experiment`` and ``seed``.
    """
    try:
        cfg = json.loads(config_json)
    except (TypeError, ValueError):
        raise AnalysisError(
            f"{where}: config_json is not JSON; the runs table is damaged, re-run the experiment"
        ) from None
    sections = {k: v for k, v in cfg.items() if isinstance(v, dict)}
    runs = cfg.get("runs")
    if isinstance(runs, list) and len(runs) == 1 and isinstance(runs[0], dict):
        sections["run"] = runs[0]
    flat = pd.json_normalize(sections, sep=".")
    return flat.iloc[0].to_dict() if len(flat) else {}


def load_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (experiment directory, run, round), with the run's metadata and config joined in.

    Args:
        paths: one or many experiment directories written by ``fedsim run``: local paths or URIs
            understood by ``pyarrow.fs.FileSystem.from_uri``.

    Returns:
        A DataFrame sorted by directory (in the order given), run (in the order the experiment ran
        them) and round, with

        * ``experiment_dir`` (str), then every rounds.parquet column: ``run_id``, ``algorithm``,
            ``round`` (int, 0-based), ``test_accuracy`` (float in [0, 1]; NaN in rounds that were not
            evaluated), ``test_loss``/``train_loss`` (nats), ``bytes_up``/``bytes_down`` (bytes in
            that round), ``cum_bytes_up``/``cum_bytes_down``/``cum_bytes`` (bytes since round 0,
            ``cum_bytes`` = both directions), ``wall_seconds`` (the round's own seconds), ...
            and any newer column such as ``flops`` when present;
        * ``cum_wall_seconds`` (float, seconds): running sum of ``wall_seconds`` within the run;
        * from runs.parquet: ``experiment``, ``seed``, ``status`` (running / finished / diverged /
            failed / interrupted / dry_run), ``dry_run`` (bool: a ``fedsim run --dry-run`` projection, whose rounds
            carry projected bytes and flops but no accuracy; False where an older runs.parquet has no
            such column), ``message``, ``started_at``, ``finished_at``, ``fedsim_version``,
            ``config_json`` (the run's full config as written, seed and name included);
        * the run's resolved config flattened from ``config_json``: ``data.alpha``,
            ``data.num_clients``, ``model.name``, ``engine.clients_per_round``, ``run.lr``,
            ``run.rounds``, ``run.mu`` (NaN for algorithms without it), ...

        Runs that logged no round yet have no rows.

    Raises:
        AnalysisError: see :func:`read_tables`; also a directory whose rounds table is empty, or
            a damaged ``config_json``.
    """
    locs = _locations(paths)
    t = _read(locs, ("runs", "rounds"))
    runs, rounds = t["runs"], t["rounds"]
    # a run is a dry run if flagged so, or (an older file without the column) if its status says so
    flagged = runs["dry_run"].eq(True) if "dry_run" in runs.columns else False
    runs = runs.assign(dry_run=(runs["status"] == "dry_run") | flagged)
    logged = set(rounds["experiment_dir"])
    for loc in locs:
        if loc.name not in logged:
            mine = runs[runs["experiment_dir"] == loc.name]
            if len(mine) and mine["dry_run"].all():
                raise AnalysisError(f"experiment directory {loc.name!r} is {DRY_RUN_HINT}")
            raise AnalysisError(
                f"experiment directory {loc.name!r} has no completed round yet; wait for "
                "its first round or pass another directory"
            )
    dir_order = {loc.name: i for i, loc in enumerate(locs)}
    runs = runs.assign(
        _dir=runs["experiment_dir"].map(dir_order), _run=runs.groupby("experiment_dir").cumcount()
    )
    config = pd.DataFrame(
        [
            _flatten_config(c, f"{d}/runs.parquet (run {r!r})")
            for c, d, r in zip(runs["config_json"], runs["experiment_dir"], runs["run_id"])
        ],
        index=runs.index,
    )
    meta = pd.concat([runs[KEYS + ["_dir", "_run"] + [c for c in _RUN_COLUMNS if c in runs]], config], axis=1)
    df = rounds.merge(meta, on=KEYS, how="left", validate="many_to_one")
    df = df.sort_values(["_dir", "_run", "round"], kind="stable").drop(columns=["_dir", "_run"])
    df = df.reset_index(drop=True)
    df.insert(
        df.columns.get_loc("wall_seconds") + 1,
        "cum_wall_seconds",
        df.groupby(KEYS, sort=False)["wall_seconds"].cumsum(),
    )
    first = ["experiment_dir"] + [c for c in rounds.columns if c != "experiment_dir"]
    return df[first + [c for c in df.columns if c not in first]]


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, shown: str) -> None:
    """Write ``data`` to ``path`` on ``fs`` (``shown`` names it in errors).

    Raises:
        AnalysisError: the file cannot be written.
    """
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(
            f"cannot write {shown} ({_first_line(err)}); pass --out with a writable directory"
        ) from None


#: The partition file fedsim writes into an experiment directory (fedsim.io.partition_log).
PARTITION_FILE = "partition.parquet"
_PARTITION_COLUMNS = {"client", "client_name", "label", "examples"}


def read_partition(path: str | os.PathLike) -> pd.DataFrame | None:
    """The ``partition.parquet`` of one experiment directory (one row per client and class it
    holds: ``client``, ``client_name``, ``label``, ``examples``), or None where there is none
    (directories written before fedsim logged partitions, dry runs).

    Raises:
        AnalysisError: the file exists but is unreadable or lacks those columns.
    """
    loc = _locate(path)
    where = f"{loc.name}/{PARTITION_FILE}"
    try:
        if loc.fs.get_file_info(_join(loc, PARTITION_FILE)).type != pafs.FileType.File:
            return None
        table = ds.dataset(_join(loc, PARTITION_FILE), filesystem=loc.fs, format="parquet").to_table()
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(f"{where} is not a readable Parquet file ({_first_line(err)}); {_HINT}") from None
    if not _PARTITION_COLUMNS <= set(table.column_names):
        raise AnalysisError(f"{where} lacks the columns {', '.join(sorted(_PARTITION_COLUMNS))}; {_HINT}")
    return table.to_pandas()
