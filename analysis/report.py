"""``fedsim report RUN_DIR [RUN_DIR ...] [--out DIR]``: figures and a Markdown summary of runs.

Writes into DIR (default ``<first RUN_DIR>/report``):

* ``convergence.png`` / ``.svg``: test accuracy against cumulative message size (MB, both
  directions) and against communication rounds, one line per run (FedMA's Figure 2 layout), and
  against simulated time when some run has a virtual clock (a ``system:`` section), and against
  cumulative client updates when some run is asynchronous (FedBuff, FedAsync);
* ``cost.png`` / ``.svg``: final/best accuracy, GB up/down (and TMACs when logged) per run;
* ``partition.png`` / ``.svg`` (``partition-<i>`` for several directories): clients by classes and
  the clients' sizes, from each directory's ``partition.parquet``, where it has one;
* ``summary.md``: the summary table, a table of client outcomes when some client was not
  aggregated (dropped or over-selected), per-seed means when runs repeat, and the figures;

and prints the summary table. Dry-run projections (``fedsim run --dry-run``) have no results and
are left out (a line says so); a report of dry runs only is refused. When runs repeated under one
name differ in more than the seed, or repeat a seed, the mean ± std table is still shown, under a
one-line warning naming what differs. Also runnable without fedsim installed:
``python -m analysis.report RUN_DIR ... [--out DIR]``.

A sweep directory (``fedsim sweep``: it holds ``sweep.parquet``), given alone, gets the sweep
report of :mod:`analysis.sweep` instead: mean and sample std over seeds per grid cell and run, and
``sweep.png`` / ``.svg`` (accuracy against bytes per cell, with a band for the spread).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from analysis.errors import AnalysisError, MixedRunsWarning
from analysis.load import _locate, load_runs, read_partition, read_tables, write_bytes
from analysis.tables import (
    KEYS,
    _is_dry,
    bytes_to_target,
    client_outcomes,
    mixed_runs,
    no_evaluation_message,
    over_seeds,
    run_table,
)

TARGET_FRACTION = 0.9
SUMMARY_COLUMNS = [
    "run",
    "algorithm",
    "final_acc",
    "best_acc",
    "rounds",
    "MB_up",
    "MB_down",
    "wall_s",
    "MB_to_target",
    "rounds_to_target",
]
_FORMATS = {
    "final_acc": "{:.4f}",
    "best_acc": "{:.4f}",
    "MB_up": "{:.2f}",
    "MB_down": "{:.2f}",
    "wall_s": "{:.1f}",
    "MB_to_target": "{:.2f}",
    "rounds_to_target": "{:.0f}",
    "sim_s": "{:.2f}",
    "sim_s_to_target": "{:.2f}",
    "updates": "{:.0f}",
    "updates_to_target": "{:.0f}",
    "staleness": "{:.2f}",
    "TMACs": "{:.3g}",
    "rounds": "{:d}",
    "seed": "{:d}",
}


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced.

    Attributes:
        out_dir: where the files went (absolute local path or URI).
        files: the files written (summary.md, convergence.png/.svg, cost.png/.svg).
        summary: one row per run, columns ``SUMMARY_COLUMNS`` (``experiment`` and ``seed`` added
            after ``algorithm`` when several directories are reported; ``sim_s`` after
            ``wall_s`` and ``sim_s_to_target`` after ``rounds_to_target`` when some run has a
            virtual clock; ``updates`` and ``staleness`` after ``rounds`` and
            ``updates_to_target`` after the other ``*_to_target`` columns when some run is
            asynchronous; ``TMACs`` when logged, ``status`` last); accuracies in [0, 1], sizes
            in MB (1e6 bytes), seconds (``sim_s*``: simulated seconds), ``updates*``: client
            updates aggregated, ``staleness``: server steps.
        seeds: per run name mean/std over repeated runs (:func:`analysis.over_seeds`), or None
            when no run name repeats.
        target: the accuracy ``MB_to_target`` refers to: 0.9 x the best accuracy of any run.
        text: the summary as printed (plain-text table, target line, notes, seeds table).
        dry_run_dirs: directories of dry-run projections that were left out.
        seeds_warning: why ``seeds`` is not a spread over seeds (:func:`analysis.mixed_runs`:
            the runs differ in more than the seed, or repeat one), or None.
        outcomes: client rows per outcome and run (``run``, ``experiment`` when several
            directories are reported, then the counts of :func:`analysis.client_outcomes`), or
            None when every client of every run was aggregated (or clients.parquet has no
            ``outcome`` column).
    """

    out_dir: str
    files: tuple[str, ...]
    summary: pd.DataFrame
    seeds: pd.DataFrame | None
    target: float
    text: str
    dry_run_dirs: tuple[str, ...] = ()
    seeds_warning: str | None = None
    outcomes: pd.DataFrame | None = None


def _fmt(value, spec: str | None) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if spec is None:
        return str(value)
    try:
        return spec.format(int(value) if spec == "{:d}" else value)
    except (TypeError, ValueError):
        return str(value)


def _shown(df: pd.DataFrame, formats: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: [_fmt(v, formats.get(c)) for v in df[c]] for c in df.columns})


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a frame of strings (pipes in cells escaped)."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, df.columns)) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def real_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """``df`` without dry-run projections, and the directories of those left out.

    Raises:
        AnalysisError: every run of ``df`` is a dry-run projection (nothing to report).
    """
    dry = _is_dry(df)
    if len(df) and dry.all():
        raise AnalysisError(no_evaluation_message(df))
    return df[~dry], tuple(dict.fromkeys(df.loc[dry, "experiment_dir"]))


def _per_run(df: pd.DataFrame, target_fraction: float) -> tuple[pd.DataFrame, list[str], float, str]:
    """The full per-run table, the summary's columns, the target and its note, for ``df`` with
    its dry-run projections already left out (:func:`real_runs`)."""
    table = run_table(df)
    if table["best_acc"].isna().all():
        raise AnalysisError(no_evaluation_message(df))
    best = table.loc[table["best_acc"].idxmax()]
    target = target_fraction * float(best["best_acc"])
    reach = bytes_to_target(df, target)
    if "client_updates" not in reach.columns:  # rounds.parquet without a clients column
        reach["client_updates"] = float("nan")
    reach = reach[KEYS + ["cum_bytes", "round", "sim_time_s", "client_updates"]]
    table = table.merge(reach.rename(columns={"round": "_round"}), on=KEYS, how="left")
    table["MB_to_target"] = table["cum_bytes"] / 1e6
    table["rounds_to_target"] = table.pop("_round") + 1  # communication rounds, counting the one reaching it
    reached_at = table.pop("sim_time_s")
    updates_at = table.pop("client_updates")
    table = table.rename(columns={"run_id": "run"})
    cols = list(SUMMARY_COLUMNS)
    clocked = "sim_s" in table.columns  # run_table adds it when some run has a virtual clock
    if clocked:
        table["sim_s_to_target"] = reached_at
        cols.insert(cols.index("wall_s") + 1, "sim_s")
        cols.insert(cols.index("rounds_to_target") + 1, "sim_s_to_target")
    asynchronous = "updates" in table.columns  # run_table adds it when some run is asynchronous
    if asynchronous:
        table["updates_to_target"] = updates_at
        cols[cols.index("rounds") + 1 : cols.index("rounds") + 1] = ["updates", "staleness"]
        cols.insert(cols.index("sim_s_to_target" if clocked else "rounds_to_target") + 1, "updates_to_target")
    if table["experiment_dir"].nunique() > 1:
        table["experiment"] = table["experiment_dir"].map(lambda d: d.rstrip("/").rsplit("/", 1)[-1])
        cols[2:2] = ["experiment", "seed"]
    cols += [c for c in ("TMACs", "status") if c in table.columns]
    where = f" in {best['experiment_dir']}" if table["experiment_dir"].nunique() > 1 else ""
    note = (
        f"MB_to_target: cumulative traffic (up + down, MB = 1e6 bytes) when test accuracy first "
        f"reached {target:.4f} = {target_fraction:.0%} of the best accuracy observed "
        f"({float(best['best_acc']):.4f}, run {best['run_id']}{where}); rounds_to_target: the "
        "communication rounds it took (the reaching round included)"
    )
    if clocked:
        note += (
            "; sim_s: simulated seconds on the virtual clock when the run's last model was ready; "
            "sim_s_to_target: simulated seconds when it first reached the target ('-' also for a "
            "run without a system: section, which has no clock)"
        )
    if asynchronous:
        note += (
            "; rounds and rounds_to_target count server steps in an asynchronous run; updates: client "
            "updates aggregated over the run (a synchronous round adds the clients it aggregated, an "
            "asynchronous server step the updates it consumed); updates_to_target: cumulative client "
            "updates when it first reached the target; staleness: mean over the run's server steps "
            "of their mean staleness (server steps between the model an update was trained from and "
            "the one it was applied to; '-' for a synchronous run)"
        )
    note += "; '-': never reached"
    return table.reset_index(drop=True), cols, target, note


def summarize(df: pd.DataFrame, target_fraction: float = TARGET_FRACTION) -> tuple[pd.DataFrame, float, str]:
    """The report's per-run table, its target accuracy, and a sentence saying where it came from.

    The target is ``target_fraction`` x the best test accuracy observed in any run of ``df``, a
    common bar for every run; ``MB_to_target`` is each run's cumulative traffic (both
    directions, 1e6 bytes) when it first reached it (NaN: never). Dry-run projections are left
    out.

    Raises:
        AnalysisError: every run of ``df`` is a dry-run projection, or no run was ever evaluated.
    """
    table, cols, target, note = _per_run(real_runs(df)[0], target_fraction)
    return table[cols], target, note


def _seed_table(table: pd.DataFrame) -> tuple[pd.DataFrame | None, str | None]:
    """Mean/std per run name over repeated runs of the full per-run ``table`` (or None if no name
    repeats), and the warning of :func:`analysis.mixed_runs` (or None)."""
    if "seed" not in table.columns or not table["run"].duplicated().any():
        return None, None
    metrics = ["final_acc", "best_acc", "MB_to_target", "rounds_to_target"]
    if "sim_s" in table.columns:  # some run has a virtual clock
        metrics += ["sim_s", "sim_s_to_target"]
    if "updates" in table.columns:  # some run is asynchronous
        metrics += ["updates", "updates_to_target", "staleness"]
    runs = table.rename(columns={"run": "run_id"})
    problem = mixed_runs(runs, "run_id")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixedRunsWarning)  # reported once, as ``problem``
        seeds = over_seeds(runs, metrics).rename(columns={"run_id": "run"})
    seeds["reached"] = table.groupby("run", sort=False)["MB_to_target"].count().to_numpy()
    return seeds, problem


def _outcome_table(paths: Sequence, table: pd.DataFrame) -> pd.DataFrame | None:
    """Client rows per outcome for each run of the full per-run ``table`` (``run``, ``experiment``
    when it has that column, then the counts of :func:`analysis.client_outcomes`), or None when
    clients.parquet has no ``outcome`` column or every client of these runs was aggregated."""
    clients = read_tables(paths, ["clients"])["clients"]
    if "outcome" not in clients.columns:
        return None
    ids = ["run"] + [c for c in ("experiment",) if c in table.columns]
    runs = table[["experiment_dir"] + ids].assign(run_id=table["run"])
    clients = clients.merge(runs[KEYS], on=KEYS, how="inner")  # the reported runs (no dry runs)
    if clients["outcome"].dropna().eq("aggregated").all():
        return None
    counts = client_outcomes(clients)
    out = runs.merge(counts, on=KEYS, how="left")
    named = [c for c in counts.columns if c not in KEYS]
    out[named] = out[named].fillna(0).astype("int64")
    return out[ids + named].reset_index(drop=True)


def _seed_shown(seeds: pd.DataFrame) -> pd.DataFrame:
    out = seeds[["run", "algorithm", "n_runs"]].astype(str)
    out["seeds"] = seeds["seeds"].map(lambda s: ", ".join(map(str, s)))
    for m, spec in (
        ("final_acc", "{:.4f}"),
        ("best_acc", "{:.4f}"),
        ("MB_to_target", "{:.2f}"),
        ("rounds_to_target", "{:.1f}"),
        ("sim_s", "{:.2f}"),
        ("sim_s_to_target", "{:.2f}"),
        ("updates", "{:.1f}"),
        ("updates_to_target", "{:.1f}"),
        ("staleness", "{:.2f}"),
    ):
        if f"{m}_mean" not in seeds.columns:
            continue
        out[m] = [f"{_fmt(a, spec)} ± {_fmt(s, spec)}" for a, s in zip(seeds[f"{m}_mean"], seeds[f"{m}_std"])]
    out["reached"] = [f"{k}/{n}" for k, n in zip(seeds["reached"], seeds["n_runs"])]
    return out


def _out_location(paths: Sequence[str], out: str | os.PathLike | None):
    if out is None:
        first = _locate(paths[0])
        out_text = f"{first.name}/report"
    else:
        out_text = os.fspath(out)
    loc = _locate(out_text)
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type not in (pafs.FileType.NotFound, pafs.FileType.Directory):
            raise AnalysisError(
                f"report location {loc.name!r} exists and is not a directory; pass --out "
                "with a directory path"
            )
        loc.fs.create_dir(loc.path, recursive=True)
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(
            f"cannot create report directory {loc.name!r} "
            f"({str(err).strip().splitlines()[0]}); pass --out with a writable directory"
        ) from None
    return loc


def write_report(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike | None = None,
    target_fraction: float = TARGET_FRACTION,
) -> Report:
    """Load the runs of ``paths``, write the figures and ``summary.md`` into ``out``.

    Args:
        paths: experiment directories (local paths or pyarrow filesystem URIs).
        out: report directory (local path or URI), created if needed; default
            ``<first path>/report``. Existing report files there are overwritten.
        target_fraction: ``MB_to_target`` is measured at this fraction of the best accuracy.

    Returns:
        A :class:`Report`, or for one sweep directory an :class:`analysis.sweep.SweepReport`
        (:func:`analysis.sweep.write_sweep_report`).

    Raises:
        AnalysisError: a path that is missing, empty or not a fedsim experiment directory; an
            unwritable ``out``; only dry-run projections; no evaluated round anywhere; a sweep
            directory given with other paths.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    from analysis import sweep

    swept = [p for p in paths if sweep.is_sweep_dir(p)]
    if swept:
        if len(paths) > 1:
            raise AnalysisError(
                f"{os.fspath(swept[0])!r} is a sweep directory; report it alone (its report pools "
                "its trials over seeds), or pass its trial directories instead"
            )
        return sweep.write_sweep_report(paths[0], out, target_fraction)
    df, dry_dirs = real_runs(load_runs(paths))
    full, cols, target, note = _per_run(df, target_fraction)
    summary = full[cols]
    seeds, problem = _seed_table(full)
    outcomes = _outcome_table(paths, full)
    timed = "sim_s" in full.columns  # some run has a virtual clock
    asynchronous = "updates" in full.columns  # some run is asynchronous
    from analysis.plots import figure_bytes, plot_convergence, plot_cost, plot_partition  # matplotlib (slow)

    loc = _out_location([os.fspath(p) for p in paths], out)
    title = ", ".join(dict.fromkeys(df["experiment"].dropna())) if "experiment" in df.columns else None
    figures = {
        "convergence": plot_convergence(df, unit="MB", target=target, title=title),
        "cost": plot_cost(df, title=title),
    }
    partitions = _partitions(df)
    for stem, (where, part) in partitions.items():
        figures[stem] = plot_partition(part, title=f"partition of {where.rsplit('/', 1)[-1]}")
    files = []
    for stem, fig in figures.items():
        for fmt in ("png", "svg"):
            path = f"{loc.path}/{stem}.{fmt}"
            write_bytes(loc.fs, path, figure_bytes(fig, fmt), f"{loc.name}/{stem}.{fmt}")
            files.append(f"{loc.name}/{stem}.{fmt}")
    shown = _shown(summary, _FORMATS)
    text = shown.to_string(index=False) + "\n" + note
    md = ["# fedsim report", "", "Experiment directories:", ""]
    md += [f"- `{d}`" for d in dict.fromkeys(df["experiment_dir"])]
    md += ["", "## Runs", "", markdown_table(shown), "", note.replace("'-'", "`-`"), ""]
    if dry_dirs:
        left_out = (
            f"left out: {', '.join(dry_dirs)} (dry-run projection{'s' if len(dry_dirs) > 1 else ''}, "
            "no results)"
        )
        text += "\n" + left_out
        md += [left_out, ""]
    if outcomes is not None:
        outcome_shown = _shown(
            outcomes, {c: "{:d}" for c in outcomes.columns if c not in ("run", "experiment")}
        )
        text += "\nclient outcomes (clients.parquet rows per run):\n" + outcome_shown.to_string(index=False)
        md += [
            "## Client outcomes",
            "",
            "Client rows of `clients.parquet` per run and `outcome`, over all rounds: `aggregated`; "
            "`dropped_deadline` (could not arrive by the round's deadline); `dropped_offline` (went "
            "offline before arriving); `overselected_unused` (over-selected, arrived after the first "
            "k); `dropped_timeout` (still training when the round passed `engine.round_timeout_s`, "
            "in wall-clock seconds, under `timeout_policy: drop`).",
            "",
            markdown_table(outcome_shown),
            "",
        ]
    if seeds is not None:
        seed_shown = _seed_shown(seeds)
        text += "\n"
        if problem:
            text += f"\nwarning: {problem}"
        text += "\nmean ± sample std over repeated runs:\n" + seed_shown.to_string(index=False)
        md += ["## Over seeds", ""]
        md += [f"**Warning:** {problem}.", ""] if problem else []
        to_target = ["MB_to_target"] + ["sim_s_to_target"] * timed + ["updates_to_target"] * asynchronous
        md += [
            "Mean ± sample standard deviation over runs of the same name; "
            + (", ".join(to_target[:-1]) + " and " if len(to_target) > 1 else "")
            + f"{to_target[-1]} over the runs that reached the target (`reached`: how many did).",
            "",
            markdown_table(seed_shown),
            "",
        ]
    axes = (
        "cumulative message size (MB, up + down), against communication rounds and, for the runs "
        "with a virtual clock (a `system:` section), against simulated time (`sim_time_s`, seconds)"
        if timed
        else "cumulative message size (MB, up + down) and against communication rounds"
    )
    if asynchronous:
        axes += (
            " and, for every run, against cumulative client updates aggregated (`client_updates`; "
            "an asynchronous run's rounds are its server steps)"
        )
    md += [
        "## Figures",
        "",
        f"Test accuracy against {axes}; the dotted line is the target accuracy.",
        "",
        "![convergence](convergence.png)",
        "",
        "Accuracy and cost per run (bars: mean over repeated runs, error bars: sample std).",
        "",
        "![cost](cost.png)",
        "",
        "Vector versions: `convergence.svg`, `cost.svg`.",
        "",
    ]
    for stem, (where, part) in partitions.items():
        md += [
            f"### Partition of `{where}`",
            "",
            partition_summary(part),
            "Left: each client's examples per class as a share of its own; right: its training examples.",
            "",
            f"![{stem}]({stem}.png)",
            "",
        ]
    write_bytes(loc.fs, f"{loc.path}/summary.md", "\n".join(md).encode(), f"{loc.name}/summary.md")
    files.insert(0, f"{loc.name}/summary.md")
    return Report(
        out_dir=loc.name,
        files=tuple(files),
        summary=summary,
        seeds=seeds,
        target=target,
        text=text,
        dry_run_dirs=dry_dirs,
        seeds_warning=problem,
        outcomes=outcomes,
    )


def _partitions(df: pd.DataFrame) -> dict[str, tuple[str, pd.DataFrame]]:
    """Figure stem -> (experiment directory, its partition.parquet frame), for the directories
    that have one: ``partition`` for one, ``partition-1``, ``partition-2``... for several."""
    found = []
    for where in dict.fromkeys(df["experiment_dir"]):
        part = read_partition(where)
        if part is not None and len(part):
            found.append((where, part))
    if len(found) == 1:
        return {"partition": found[0]}
    return {f"partition-{i}": item for i, item in enumerate(found, start=1)}


def partition_summary(part: pd.DataFrame) -> str:
    """One Markdown line: clients, their sizes (min, median, max) and classes per client."""
    sizes = part.groupby("client")["examples"].sum()
    classes = part.groupby("client")["label"].nunique()
    return (
        f"{sizes.shape[0]} clients, {int(sizes.sum()):,} training examples; examples per client "
        f"min {int(sizes.min()):,}, median {float(sizes.median()):,.0f}, max {int(sizes.max()):,}; "
        f"classes per client min {int(classes.min())}, mean {float(classes.mean()):.1f}, max {int(classes.max())}.\n"
    )


def run(paths: Sequence[str], out: str | None = None, stream: TextIO | None = None) -> Report:
    """:func:`write_report`, then print the summary and where the report went to ``stream``
    (default stdout). The body of ``fedsim report``.

    Raises:
        AnalysisError: see :func:`write_report`.
    """
    report = write_report(paths, out)
    stream = stream or sys.stdout
    print(report.text, file=stream)
    print(f"report: {report.out_dir}/summary.md", file=stream)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.report RUN_DIR ... [--out DIR]`` (no fedsim needed); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="experiment directories or URIs")
    parser.add_argument("--out", help="report directory (default: <first RUN_DIR>/report)")
    args = parser.parse_args(argv)
    try:
        run(args.run_dirs, args.out)
    except AnalysisError as err:
        print(f"analysis: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
