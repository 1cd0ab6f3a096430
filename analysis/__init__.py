"""Analysis of fedsim run logs: pandas tables and matplotlib figures over the Parquet files.

This package reads ``runs.parquet``, ``rounds.parquet`` and ``clients.parquet`` and never imports
fedsim itself, so it works on a machine with only pandas, pyarrow and matplotlib::

    from analysis import load_runs, bytes_to_target, time_to_target, accuracy_vs_updates
    df = load_runs(["runs/digits-20261121-101500", "s3://bucket/runs/digits-seed1"])
    df.pivot_table(index="round", columns="run_id", values="test_accuracy")
    sweep = load_sweep("runs/digits-grid-sweep-20261205-104228")  # + trial_id and the grid's columns
    time_to_target(df, 0.8)  # simulated seconds to 80% accuracy (runs with a ``system:`` section)
    accuracy_vs_updates(df)  # against cumulative client updates (asynchronous and synchronous runs)
"""

from analysis.errors import AnalysisError, MixedRunsWarning
from analysis.load import load_runs, read_tables
from analysis.sweep import load_sweep
from analysis.tables import (
    accuracy_vs_bytes,
    accuracy_vs_round,
    accuracy_vs_time,
    accuracy_vs_updates,
    bytes_to_target,
    client_outcomes,
    is_async,
    mixed_runs,
    over_seeds,
    run_table,
    time_to_target,
)

__all__ = [
    "AnalysisError",
    "MixedRunsWarning",
    "accuracy_vs_bytes",
    "accuracy_vs_round",
    "accuracy_vs_time",
    "accuracy_vs_updates",
    "bytes_to_target",
    "client_outcomes",
    "figure_bytes",
    "is_async",
    "load_runs",
    "load_sweep",
    "mixed_runs",
    "over_seeds",
    "plot_convergence",
    "plot_cost",
    "read_tables",
    "run_table",
    "save_figure",
    "time_to_target",
]

_PLOTS = {"plot_convergence", "plot_cost", "save_figure", "figure_bytes"}


def __getattr__(name: str):
    # matplotlib is imported on first use of a plotting function, not by ``import analysis``
    if name in _PLOTS:
        from analysis import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
