"""Convergence views and per-run / per-seed tables over a :func:`analysis.load_runs` frame.

Every function takes the round-level frame of :func:`analysis.load_runs` (one row per
(experiment_dir, run_id, round)) and returns a new tidy DataFrame. Sizes are decimal:
1 MB = 1e6 bytes, 1 GB = 1e9 bytes (the unit ``fedsim run``'s summary uses).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError

KEYS = ["experiment_dir", "run_id"]
UNITS = {"B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9}
_ID = ["experiment_dir", "run_id", "algorithm", "seed"]


def _need(df: pd.DataFrame, columns: Sequence[str]) -> None:
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise AnalysisError(f"the frame has no column(s) {', '.join(lacking)}; pass the frame returned by "
                            "analysis.load_runs")


def _ids(df: pd.DataFrame) -> list[str]:
    return [c for c in _ID if c in df.columns]


def _scale(unit: str) -> float:
    if unit not in UNITS:
        raise AnalysisError(f"unknown size unit {unit!r}; choose one of {', '.join(UNITS)}")
    return UNITS[unit]


def _evaluated(df: pd.DataFrame) -> pd.DataFrame:
    """Rows where the global model was evaluated (test_accuracy not NaN), in round order per run."""
    _need(df, KEYS + ["round", "test_accuracy"])
    out = df[df["test_accuracy"].notna()]
    return out.sort_values(KEYS + ["round"], kind="stable") if not out.empty else out


def accuracy_vs_round(df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy against communication round, one row per evaluated round of each run.

    Returns:
        Columns ``experiment_dir, run_id, algorithm, seed, round`` (int, 0-based: the accuracy of
        the global model after ``round + 1`` rounds) and ``test_accuracy`` (float in [0, 1]).
        Rounds that were not evaluated (``engine.eval_every`` > 1) are left out.

    Raises:
        AnalysisError: ``df`` lacks the load_runs columns.
    """
    ev = _evaluated(df)
    return ev[_ids(ev) + ["round", "test_accuracy"]].reset_index(drop=True)


def accuracy_vs_bytes(df: pd.DataFrame, unit: str = "MB", upload_only: bool = False) -> pd.DataFrame:
    """Test accuracy against cumulative communicated size (the x axis of FedMA's Figure 2).

    Args:
        df: a :func:`analysis.load_runs` frame.
        unit: "B", "KB", "MB" (1e6 bytes) or "GB" (1e9 bytes).
        upload_only: False: both directions (``cum_bytes``, server to clients and back);
            True: client-to-server only (``cum_bytes_up``).

    Returns:
        Columns ``experiment_dir, run_id, algorithm, seed, round``, the size column (float, named
        after the unit, e.g. ``MB`` or ``MB_up``: cumulative size after that round) and
        ``test_accuracy``; only evaluated rounds.

    Raises:
        AnalysisError: unknown unit, or ``df`` lacks the load_runs columns.
    """
    scale = _scale(unit)
    src, name = ("cum_bytes_up", f"{unit}_up") if upload_only else ("cum_bytes", unit)
    _need(df, [src])
    ev = _evaluated(df)
    out = ev[_ids(ev) + ["round"]].copy()
    out[name] = ev[src].to_numpy(dtype=np.float64) / scale
    out["test_accuracy"] = ev["test_accuracy"].to_numpy()
    return out.reset_index(drop=True)


def bytes_to_target(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Communication needed to first reach a test accuracy, per run.

    A run reaches ``target`` in the first evaluated round whose ``test_accuracy >= target``; the
    cost is the cumulative traffic up to and including that round.

    Args:
        df: a :func:`analysis.load_runs` frame (one or many experiment directories).
        target: test accuracy in [0, 1].

    Returns:
        One row per run (``experiment_dir, run_id, algorithm, seed``), in the frame's order, with
        ``target`` (float), ``reached`` (bool), and, at the first round reaching it (all NaN when
        the run never did): ``round`` (0-based), ``cum_bytes`` (bytes, both directions),
        ``cum_bytes_up``, ``cum_bytes_down`` (bytes) and ``cum_wall_seconds`` (seconds), as float.
        Average per algorithm with ``.groupby("algorithm")``.

    Raises:
        AnalysisError: ``target`` outside [0, 1], or ``df`` lacks the load_runs columns.
    """
    if not 0.0 <= float(target) <= 1.0:
        raise AnalysisError(f"target accuracy must be between 0 and 1 (got {target}); e.g. 0.9 for 90%")
    _need(df, KEYS + ["round", "test_accuracy", "cum_bytes", "cum_bytes_up", "cum_bytes_down"])
    cost = ["round", "cum_bytes", "cum_bytes_up", "cum_bytes_down"] + (
        ["cum_wall_seconds"] if "cum_wall_seconds" in df.columns else [])
    runs = df[_ids(df)].drop_duplicates(KEYS).reset_index(drop=True)
    hit = _evaluated(df)
    hit = hit[hit["test_accuracy"] >= target].drop_duplicates(KEYS, keep="first")[KEYS + cost]
    out = runs.merge(hit, on=KEYS, how="left")
    out[cost] = out[cost].astype(np.float64)
    out.insert(len(runs.columns), "target", float(target))
    out.insert(len(runs.columns) + 1, "reached", out["round"].notna())
    return out


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: final and best accuracy, rounds, traffic, time (and compute when logged).

    Returns:
        Columns ``experiment_dir, run_id, algorithm, seed``, ``status`` (if loaded), ``rounds``
        (int: rounds logged), ``final_acc`` (accuracy at the last evaluated round), ``best_acc``
        (max over evaluated rounds; both NaN if none was evaluated), ``MB_up``, ``MB_down``
        (total traffic in 1e6 bytes), ``wall_s`` (sum of round seconds), and ``TMACs`` (sum of
        the per-round ``flops`` column / 1e12) when rounds.parquet has a non-null ``flops``.

    Raises:
        AnalysisError: ``df`` lacks the load_runs columns.
    """
    _need(df, KEYS + ["round", "test_accuracy", "cum_bytes_up", "cum_bytes_down", "wall_seconds"])
    ordered = df.sort_values(KEYS + ["round"], kind="stable")
    g = ordered.groupby(KEYS, sort=False)
    out = g[_ids(df)[2:] + (["status"] if "status" in df.columns else [])].first()
    out["rounds"] = g["round"].size()
    acc = ordered[ordered["test_accuracy"].notna()].groupby(KEYS, sort=False)["test_accuracy"]
    out["final_acc"] = acc.last()
    out["best_acc"] = acc.max()
    out["MB_up"] = g["cum_bytes_up"].last() / 1e6
    out["MB_down"] = g["cum_bytes_down"].last() / 1e6
    out["wall_s"] = g["wall_seconds"].sum()
    if "flops" in df.columns and df["flops"].notna().any():
        out["TMACs"] = g["flops"].sum(min_count=1) / 1e12
    order = df[KEYS].drop_duplicates()
    return order.merge(out.reset_index(), on=KEYS, how="left").reset_index(drop=True)


def over_seeds(table: pd.DataFrame, metrics: Sequence[str] = ("final_acc", "best_acc"),
               by: str = "run_id") -> pd.DataFrame:
    """Mean and standard deviation of per-run metrics over repeated runs (different seeds).

    Runs of the same ``by`` value (the run name, which defaults to the algorithm) from different
    experiment directories are treated as repetitions of one configuration.

    Args:
        table: :func:`run_table` output, or a :func:`bytes_to_target` frame.
        metrics: numeric columns to summarise.
        by: the grouping column, "run_id" or "algorithm".

    Returns:
        One row per group, in first-seen order: ``by``, ``algorithm`` (when ``by`` is "run_id"),
        ``n_runs`` (int), ``seeds`` (sorted list of int), then ``<metric>_mean`` and
        ``<metric>_std`` per metric. The std is the sample standard deviation (ddof = 1), NaN
        for a single run; NaN metrics (e.g. a target never reached) are skipped.

    Raises:
        AnalysisError: ``by`` or a metric is not a column of ``table``.
    """
    _need(table, [by, *metrics])
    g = table.groupby(by, sort=False)
    out = pd.DataFrame(index=g.size().index)
    if by != "algorithm" and "algorithm" in table.columns:
        out["algorithm"] = g["algorithm"].first()
    out["n_runs"] = g.size()
    if "seed" in table.columns:
        out["seeds"] = g["seed"].agg(lambda s: sorted(int(x) for x in s.dropna()))
    for m in metrics:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
    return out.reset_index()
