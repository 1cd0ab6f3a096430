"""Sweep directories written by ``fedsim sweep``: one tidy frame of every trial's runs, a table
of mean and sample std over seeds per grid cell and run, and a figure of accuracy against bytes
with a band for the spread over seeds.

A sweep directory holds ``sweep.parquet`` (one row per trial: ``trial_id``, one column per grid
key, ``seed``, ``status``, ``message``, ``experiment_dir`` relative to the sweep directory,
``wall_seconds``, ``overrides``) and one fedsim experiment directory per trial, so every
function of :mod:`analysis` also works on a trial's directory. Like the rest of :mod:`analysis`,
this module never imports fedsim.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.errors import AnalysisError
from analysis.load import _first_line, _locate, load_runs, write_bytes

INDEX = "sweep.parquet"
INDEX_COLUMNS = ("trial_id", "seed", "status", "message", "experiment_dir", "wall_seconds", "overrides")
TARGET_FRACTION = 0.9
#: panels per row of the sweep figure (one panel per run name)
PANELS_PER_ROW = 4
METRICS = ("final_acc", "best_acc", "MB_to_target", "rounds_to_target", "TMACs")
_SPECS = {
    "final_acc": "{:.4f}",
    "best_acc": "{:.4f}",
    "MB_to_target": "{:.2f}",
    "rounds_to_target": "{:.1f}",
    "TMACs": "{:.3g}",
}


def is_sweep_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a ``sweep.parquet`` (a directory written by ``fedsim sweep``)."""
    try:
        loc = _locate(path)
        return loc.fs.get_file_info(f"{loc.path}/{INDEX}").type == pafs.FileType.File
    except (AnalysisError, pa.ArrowException, OSError):
        return False


def read_index(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """sweep.parquet of a sweep directory, and its grid keys (in grid order).

    Returns:
        (one row per trial, the grid keys). Grid values that are not numbers, strings or booleans
        (lists, mappings, mixed types) are JSON text.

    Raises:
        AnalysisError: no readable sweep.parquet there.
    """
    loc = _locate(path)
    try:
        with loc.fs.open_input_file(f"{loc.path}/{INDEX}") as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(
            f"{loc.name!r} is not a readable fedsim sweep directory ({_first_line(err)}); pass "
            "the directory that 'fedsim sweep' printed after 'results:'"
        ) from None
    meta = table.schema.metadata or {}
    if b"fedsim.sweep.grid_keys" in meta:
        keys = json.loads(meta[b"fedsim.sweep.grid_keys"])
    else:
        keys = [c for c in table.column_names if c not in INDEX_COLUMNS]
    return table.to_pandas(), keys


def _has_rounds(loc, rel: str) -> bool:
    base = f"{loc.path}/{rel}"
    try:
        infos = loc.fs.get_file_info([f"{base}/{t}.parquet" for t in ("runs", "rounds", "clients")])
        if any(i.type != pafs.FileType.File for i in infos):
            return False
        with loc.fs.open_input_file(f"{base}/rounds.parquet") as f:
            return pq.ParquetFile(f).metadata.num_rows > 0
    except (pa.ArrowException, OSError):
        return False


def load_sweep(path: str | os.PathLike) -> pd.DataFrame:
    """One row per (trial, run, round) of a sweep directory: :func:`analysis.load_runs` over the
    trials' experiment directories, with ``trial_id`` and one column per grid key (named by the
    key, e.g. ``runs.0.lr``; a key that load_runs already flattens from the config, such as
    ``data.alpha``, is replaced by the grid's column, equal in value) in front. ``seed`` is the
    trial's seed. Trials that completed no round (failed at start, not yet run) have no rows.

    Raises:
        AnalysisError: not a sweep directory, or no trial completed a round.
    """
    loc = _locate(path)
    index, keys = read_index(path)
    with_rounds = index[[_has_rounds(loc, rel) for rel in index["experiment_dir"]]]
    if with_rounds.empty:
        raise AnalysisError(
            f"no trial of the sweep {loc.name!r} has completed a round yet; wait for one, or "
            "continue the sweep with 'fedsim sweep --resume'"
        )
    dirs = [f"{loc.name}/{rel}" for rel in with_rounds["experiment_dir"]]
    df = load_runs(dirs)
    names = [_locate(d).name for d in dirs]
    trial_of = dict(zip(names, with_rounds["trial_id"]))
    front = pd.DataFrame({"trial_id": df["experiment_dir"].map(trial_of)})
    by_trial = with_rounds.set_index("trial_id")
    for k in keys:
        front[k] = front["trial_id"].map(by_trial[k]).to_numpy()
    rest = df.drop(columns=[k for k in keys if k in df.columns])
    return pd.concat([front, rest], axis=1)


def _cell_labels(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """``"data.alpha=0.1, engine.clients_per_round=5"`` per row of ``df`` (each column keeps its
    own type: a row-wise apply would print the integers of a mixed row as floats)."""
    if not keys:
        return ["all trials"] * len(df)
    return [", ".join(f"{k}={v}" for k, v in zip(keys, row)) for row in df[keys].itertuples(index=False)]


def cell_table(
    df: pd.DataFrame, keys: list[str], target_fraction: float = TARGET_FRACTION
) -> tuple[pd.DataFrame, float, str]:
    """Mean and sample std over seeds per grid cell and run, of the per-run metrics that
    ``fedsim report`` computes (:func:`analysis.report._per_run`: final and best accuracy,
    ``MB_to_target`` and ``rounds_to_target`` at ``target_fraction`` x the best accuracy of any
    run of the sweep, and
    ``TMACs`` = logged multiply-accumulates / 1e12 when logged), pooled with
    :func:`analysis.over_seeds`.

    Args:
        df: a :func:`load_sweep` frame; keys: its grid keys.

    Returns:
        (the table, the target accuracy, a sentence on the target). The table has the grid
        columns, ``run``, ``algorithm``, ``n_seeds``, ``seeds`` (sorted list), ``<metric>_mean`` and
        ``<metric>_std`` (ddof = 1; NaN for one seed) per metric, and ``reached`` (seeds whose
        run reached the target; ``MB_to_target`` is over those).

    Raises:
        AnalysisError: no run was evaluated.
    """
    from analysis.report import _per_run
    from analysis.tables import over_seeds

    table, _, target, note = _per_run(df, target_fraction)
    trials = df.drop_duplicates("experiment_dir").set_index("experiment_dir")
    for k in ["trial_id", *keys]:
        table[k] = table["experiment_dir"].map(trials[k]).to_numpy()
    table["_key"] = [json.dumps([c, r]) for c, r in zip(_cell_labels(table, keys), table["run"])]
    metrics = [m for m in METRICS if m in table.columns]
    seeds = over_seeds(table, metrics, by="_key")
    first = table.drop_duplicates("_key").set_index("_key")
    out = pd.DataFrame({k: seeds["_key"].map(first[k]).to_numpy() for k in keys})
    out["run"] = seeds["_key"].map(first["run"]).to_numpy()
    out["algorithm"] = seeds["algorithm"].to_numpy()
    out["n_seeds"] = seeds["n_runs"].to_numpy()
    out["seeds"] = seeds["seeds"].to_numpy()
    for m in metrics:
        out[f"{m}_mean"] = seeds[f"{m}_mean"].to_numpy()
        out[f"{m}_std"] = seeds[f"{m}_std"].to_numpy()
    out["reached"] = (
        table.groupby("_key", sort=False)["MB_to_target"].count().reindex(seeds["_key"]).to_numpy()
    )
    return out, target, note


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return spec.format(value)


def shown_table(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """:func:`cell_table` as strings: ``mean ± std`` per metric."""
    out = table[[*keys, "run"]].astype(str)
    out["seeds"] = table["seeds"].map(lambda s: ", ".join(map(str, s)))
    for m, spec in _SPECS.items():
        if f"{m}_mean" in table.columns:
            out[m] = [
                f"{_fmt(a, spec)} ± {_fmt(s, spec)}" for a, s in zip(table[f"{m}_mean"], table[f"{m}_std"])
            ]
    out["reached"] = [f"{r}/{n}" for r, n in zip(table["reached"], table["n_seeds"])]
    return out


def plot_sweep(
    df: pd.DataFrame, keys: list[str], unit: str = "MB", target: float | None = None, title: str | None = None
):
    """Test accuracy against cumulative message size (both directions), one panel per run name,
    one line per grid cell: at each round the mean over seeds of the accuracy against the mean
    cumulative size, with a band of ± one sample std of the accuracy (no band for one seed);
    :data:`PANELS_PER_ROW` panels per row.

    Returns:
        A matplotlib Figure (Agg canvas, as :mod:`analysis.plots` makes them).

    Raises:
        AnalysisError: unknown unit, or no evaluated round.
    """
    from analysis.plots import ACCURACY_LABEL, _colors, _figure, bytes_label
    from analysis.tables import UNITS

    if unit not in UNITS:
        raise AnalysisError(f"unknown size unit {unit!r}; choose one of {', '.join(UNITS)}")
    ev = df[df["test_accuracy"].notna()].copy()
    if ev.empty:
        raise AnalysisError(
            "no run of the sweep has an evaluated round; run more rounds or lower engine.eval_every"
        )
    ev["_cell"] = _cell_labels(ev, keys)
    ev["_size"] = ev["cum_bytes"].astype(float) / UNITS[unit]
    runs = list(dict.fromkeys(ev["run_id"]))
    colors = _colors(list(dict.fromkeys(ev["_cell"])))
    cols = min(len(runs), PANELS_PER_ROW)
    rows = -(-len(runs) // cols)
    fig = _figure(max(5.0, 4.6 * cols) + 2.5, 4.2 * rows)
    grid = fig.subplots(rows, cols, squeeze=False, sharey=True)
    axes = list(grid.ravel())
    for ax in axes[len(runs) :]:  # the last row's unused panels
        ax.set_visible(False)
    for ax, run in zip(axes, runs):
        mine = ev[ev["run_id"] == run]
        for cell, g in mine.groupby("_cell", sort=False):
            per_round = g.groupby("round").agg(
                acc=("test_accuracy", "mean"),
                sd=("test_accuracy", "std"),
                size=("_size", "mean"),
                n=("seed", "nunique"),
            )
            n = int(per_round["n"].max())
            ax.plot(
                per_round["size"],
                per_round["acc"],
                color=colors[cell],
                marker="o",
                markersize=3,
                linewidth=1.5,
                label=f"{cell} ({n} seed{'s' if n > 1 else ''})",
            )
            if n > 1:
                sd = per_round["sd"].fillna(0.0)
                ax.fill_between(
                    per_round["size"],
                    per_round["acc"] - sd,
                    per_round["acc"] + sd,
                    color=colors[cell],
                    alpha=0.18,
                    linewidth=0,
                )
        if target is not None:
            ax.axhline(target, color="0.4", linestyle=":", linewidth=1)
        ax.set_title(run)
        ax.set_xlabel(bytes_label(unit))
        ax.grid(True, alpha=0.3)
    for row in grid:
        row[0].set_ylabel(ACCURACY_LABEL)
    axes[len(runs) - 1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


@dataclass(frozen=True)
class SweepReport:
    """What :func:`write_sweep_report` produced.

    Attributes:
        out_dir: where the files went; files: summary.md, sweep.png, sweep.svg.
        table: :func:`cell_table`; keys: the grid keys; target: its target accuracy.
        text: the summary as printed; left_out: trials without a completed round (id: status).
    """

    out_dir: str
    files: tuple[str, ...]
    table: pd.DataFrame
    keys: tuple[str, ...]
    target: float
    text: str
    left_out: tuple[str, ...] = ()


def write_sweep_report(
    path: str | os.PathLike, out: str | os.PathLike | None = None, target_fraction: float = TARGET_FRACTION
) -> SweepReport:
    """Write ``summary.md`` (the per-cell table, the trials, the figure) and ``sweep.png``/``.svg``
    for a sweep directory into ``out`` (default ``<sweep dir>/report``).

    Raises:
        AnalysisError: not a sweep directory, no trial with a completed round, no evaluated round,
            or an unwritable ``out``.
    """
    from analysis.plots import figure_bytes
    from analysis.report import _out_location, markdown_table

    loc = _locate(path)
    index, keys = read_index(path)
    df = load_sweep(path)
    table, target, note = cell_table(df, keys, target_fraction)
    shown = shown_table(table, keys)
    fig = plot_sweep(
        df, keys, target=target, title=df["experiment"].iloc[0] if "experiment" in df.columns else None
    )
    dest = _out_location([os.fspath(path)], out)
    files = []
    for fmt in ("png", "svg"):
        write_bytes(dest.fs, f"{dest.path}/sweep.{fmt}", figure_bytes(fig, fmt), f"{dest.name}/sweep.{fmt}")
        files.append(f"{dest.name}/sweep.{fmt}")
    logged = set(df["trial_id"])
    left_out = tuple(
        f"{r.trial_id} ({r.status}{': ' + r.message if r.message else ''})"
        for r in index.itertuples()
        if r.trial_id not in logged
    )
    counts = index["status"].value_counts()
    status_line = (
        f"{len(index)} trials: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"; grid {', '.join(keys) if keys else '(seeds only)'}"
    )
    mean_note = (
        "mean ± sample std over seeds (ddof = 1; '-' for one seed); MB_to_target over the seeds that "
        "reached the target (reached); TMACs = 10^12 multiply-accumulates of local training"
    )
    text = "\n".join(
        [status_line, shown.to_string(index=False), note, mean_note]
        + ([f"left out (no completed round): {', '.join(left_out)}"] if left_out else [])
    )
    trials = index[["trial_id", *keys, "seed", "status", "message", "experiment_dir", "wall_seconds"]].copy()
    trials["wall_seconds"] = trials["wall_seconds"].map(lambda v: _fmt(v, "{:.1f}"))
    md = [
        "# fedsim sweep report",
        "",
        f"Sweep directory: `{loc.name}`",
        "",
        status_line,
        "",
        "## Per grid cell and run",
        "",
        markdown_table(shown),
        "",
        note.replace("'-'", "`-`"),
        "",
        mean_note.replace("'-'", "`-`") + ".",
        "",
    ]
    if left_out:
        md += [f"Left out (no completed round): {', '.join(left_out)}", ""]
    md += [
        "## Accuracy against bytes",
        "",
        "Mean test accuracy over seeds against the mean cumulative message size (MB = 1e6 bytes, up + "
        "down), one panel per run, one line per grid cell; the band is ± one sample std over seeds, the "
        "dotted line the target accuracy.",
        "",
        "![sweep](sweep.png)",
        "",
        "Vector version: `sweep.svg`.",
        "",
        "## Trials",
        "",
        markdown_table(trials.astype(str)),
        "",
    ]
    write_bytes(dest.fs, f"{dest.path}/summary.md", "\n".join(md).encode(), f"{dest.name}/summary.md")
    files.insert(0, f"{dest.name}/summary.md")
    return SweepReport(
        out_dir=dest.name,
        files=tuple(files),
        table=table,
        keys=tuple(keys),
        target=target,
        text=text,
        left_out=left_out,
    )


def run(
    path: str | os.PathLike, out: str | os.PathLike | None = None, stream: TextIO | None = None
) -> SweepReport:
    """:func:`write_sweep_report`, then print the summary and where it went (default stdout).

    Raises:
        AnalysisError: see :func:`write_sweep_report`.
    """
    report = write_sweep_report(path, out)
    stream = stream or sys.stdout
    print(report.text, file=stream)
    print(f"report: {report.out_dir}/summary.md", file=stream)
    return report
