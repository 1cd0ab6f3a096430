"""Convergence views and per-run / per-seed tables over a :func:`analysis.load_runs` frame.

Every function takes the round-level frame of :func:`analysis.load_runs` (one row per
(experiment_dir, run_id, round)) and returns a new tidy DataFrame. Sizes are decimal:
1 MB = 1e6 bytes, 1 GB = 1e9 bytes (the unit ``fedsim run``'s summary uses).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError, MixedRunsWarning
from analysis.load import DRY_RUN_HINT

KEYS = ["experiment_dir", "run_id"]
UNITS = {"B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9}
_ID = ["experiment_dir", "run_id", "algorithm", "seed"]
# Top-level config keys that may differ between repetitions of one experiment: the seed, and the
# experiment's name and output location (which name where results go, not what was run).
NOT_COMPARED = ("seed", "name", "output_dir")
# clients.parquet ``outcome`` values, in the order fedsim defines them (fedsim/system/clock.py OUTCOMES).
# rounds.parquet ``phase`` of an asynchronous run's server steps (FedBuff, FedAsync).
ASYNC_PHASE = "async"
OUTCOMES = ("aggregated", "dropped_deadline", "dropped_offline", "overselected_unused", "dropped_timeout")


def _need(df: pd.DataFrame, columns: Sequence[str]) -> None:
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise AnalysisError(
            f"the frame has no column(s) {', '.join(lacking)}; pass the frame returned by analysis.load_runs"
        )


def _ids(df: pd.DataFrame) -> list[str]:
    return [c for c in _ID if c in df.columns]


def _scale(unit: str) -> float:
    if unit not in UNITS:
        raise AnalysisError(f"unknown size unit {unit!r}; choose one of {', '.join(UNITS)}")
    return UNITS[unit]


def _is_dry(df: pd.DataFrame) -> pd.Series:
    """True for rows of dry-run projections (``fedsim run --dry-run``); all False without the column."""
    if "dry_run" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["dry_run"].eq(True)


def no_evaluation_message(df: pd.DataFrame) -> str:
    """Why ``df`` has no evaluated round: dry-run projections only, or too few rounds evaluated."""
    dry = _is_dry(df)
    if len(df) and dry.all():
        dirs = list(dict.fromkeys(df["experiment_dir"])) if "experiment_dir" in df.columns else []
        what = (
            f"experiment directory {dirs[0]!r} is"
            if len(dirs) == 1
            else "every run given is"
            if not dirs
            else f"every directory given ({', '.join(dirs)}) is"
        )
        return f"{what} {DRY_RUN_HINT}"
    return (
        "no run has an evaluated round (test_accuracy is null everywhere); run more rounds or lower "
        "engine.eval_every"
    )


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


def _sim_time(df: pd.DataFrame) -> pd.Series:
    """``sim_time_s`` as float64; all NaN for a frame without the column (run logs older than the
    virtual clock)."""
    if "sim_time_s" not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=np.float64)
    return df["sim_time_s"].astype(np.float64)


def has_clock(df: pd.DataFrame) -> bool:
    """True when some row of ``df`` has a simulated time (some run had a ``system:`` section)."""
    return bool(_sim_time(df).notna().any())


def accuracy_vs_time(df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy against simulated time on fedsim's virtual clock, one row per evaluated round.

    ``sim_time_s`` is the simulated second at which the round's global model is ready (cumulative
    within a run, from the clients' devices, exact MACs and bytes; docs/outputs.md). Runs without
    a ``system:`` section have no clock (``sim_time_s`` null, or no such column in older logs) and
    are left out.

    Returns:
        Columns ``experiment_dir, run_id, algorithm, seed, round`` (int, 0-based), ``sim_time_s``
        (float64, simulated seconds) and ``test_accuracy`` (float in [0, 1]); only evaluated rounds
        with a simulated time. Empty (same columns) when no run has a clock.

    Raises:
        AnalysisError: ``df`` lacks the load_runs columns.
    """
    ev = _evaluated(df)
    out = ev[_ids(ev) + ["round"]].copy()
    out["sim_time_s"] = _sim_time(ev)
    out["test_accuracy"] = ev["test_accuracy"].to_numpy()
    return out[out["sim_time_s"].notna()].reset_index(drop=True)


def is_async(df: pd.DataFrame) -> bool:
    """True when some row of ``df`` is a server step of an asynchronous run (``phase`` ==
    ``"async"``: FedBuff, FedAsync); False for a frame without a ``phase`` column."""
    return "phase" in df.columns and bool(df["phase"].eq(ASYNC_PHASE).any())


def _client_updates(df: pd.DataFrame) -> np.ndarray:
    """Cumulative client updates aggregated per run, in round order, as float64 aligned with the
    rows of ``df``: the running sum of ``clients`` (a synchronous round's aggregated clients, an
    asynchronous server step's consumed updates). NaN from a run's first null ``clients`` on (the
    count is unknown from there); all NaN without the column."""
    _need(df, KEYS + ["round"])
    if "clients" not in df.columns:
        return np.full(len(df), np.nan)
    flat = df[KEYS + ["round", "clients"]].reset_index(drop=True)
    ordered = flat.sort_values(KEYS + ["round"], kind="stable")
    count = ordered["clients"].astype(np.float64)
    by_run = [ordered[k] for k in KEYS]
    cum = count.fillna(0.0).groupby(by_run, sort=False).cumsum()
    unknown = count.isna().groupby(by_run, sort=False).cumsum() > 0
    return cum.mask(unknown).sort_index().to_numpy()


def accuracy_vs_updates(df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy against cumulative client updates aggregated, one row per evaluated round.

    The x axis on which FedBuff (Nguyen et al., AISTATS 2022, Figure 2 and Table 2) compares
    asynchronous and synchronous training: the server has aggregated ``client_updates`` client
    updates when the row's model is ready. A synchronous round contributes the clients it
    aggregated, an asynchronous server step (``phase`` "async") the updates it consumed: the
    running sum of rounds.parquet's ``clients`` over the run's rows in round order, evaluated or
    not.

    Returns:
        Columns ``experiment_dir, run_id, algorithm, seed, round`` (int, 0-based),
        ``client_updates`` (int64, cumulative client updates including this round's) and
        ``test_accuracy`` (float in [0, 1]); only evaluated rounds. Rows whose count is unknown
        (a null ``clients`` in that or an earlier round of the run, or no ``clients`` column)
        are left out.

    Raises:
        AnalysisError: ``df`` lacks the load_runs columns.
    """
    ev = _evaluated(df.assign(client_updates=_client_updates(df)))
    ev = ev[ev["client_updates"].notna()]
    out = ev[_ids(ev) + ["round", "client_updates", "test_accuracy"]].reset_index(drop=True)
    return out.astype({"client_updates": np.int64})


def bytes_to_target(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Communication needed to first reach a test accuracy, per run.

    A run reaches ``target`` in the first evaluated round whose ``test_accuracy >= target``; the
    cost is the cumulative traffic up to and including that round.

    Args:
        df: a :func:`analysis.load_runs` frame (one or many experiment directories).
        target: test accuracy in [0, 1].

    Returns:
        One row per run (``experiment_dir, run_id, algorithm, seed``, and ``dry_run`` when
        loaded), in the frame's order, with ``target`` (float), ``reached`` (bool), and, at the
        first round reaching it (all NaN when the run never did): ``round`` (0-based),
        ``cum_bytes`` (bytes, both directions), ``cum_bytes_up``, ``cum_bytes_down`` (bytes),
        ``cum_wall_seconds`` (seconds) and ``sim_time_s`` (simulated seconds on the virtual clock
        when that round's model was ready; NaN also for a run without a ``system:`` section), and
        ``client_updates`` (client updates aggregated up to and including that round, see
        :func:`accuracy_vs_updates`; only when rounds.parquet has a ``clients`` column), as
        float; then ``config_json`` when loaded (what :func:`over_seeds` compares). A dry-run
        projection never reaches a target. Average over seeds with :func:`over_seeds`.

    Raises:
        AnalysisError: ``target`` outside [0, 1], or ``df`` lacks the load_runs columns.
    """
    if not 0.0 <= float(target) <= 1.0:
        raise AnalysisError(f"target accuracy must be between 0 and 1 (got {target}); e.g. 0.9 for 90%")
    _need(df, KEYS + ["round", "test_accuracy", "cum_bytes", "cum_bytes_up", "cum_bytes_down"])
    cost = ["round", "cum_bytes", "cum_bytes_up", "cum_bytes_down"] + (
        ["cum_wall_seconds"] if "cum_wall_seconds" in df.columns else []
    )
    cost += ["sim_time_s"] + (["client_updates"] if "clients" in df.columns else [])
    ids = _ids(df) + [c for c in ("dry_run",) if c in df.columns]
    tail = [c for c in ("config_json",) if c in df.columns]
    runs = df[ids + tail].drop_duplicates(KEYS).reset_index(drop=True)
    hit = _evaluated(df.assign(sim_time_s=_sim_time(df), client_updates=_client_updates(df)))
    hit = hit[hit["test_accuracy"] >= target].drop_duplicates(KEYS, keep="first")[KEYS + cost]
    out = runs.merge(hit, on=KEYS, how="left")
    out[cost] = out[cost].astype(np.float64)
    out["target"] = float(target)
    out["reached"] = out["round"].notna()
    return out[ids + ["target", "reached"] + cost + tail]


def time_to_target(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Simulated seconds until a run first reaches a test accuracy: the time-to-accuracy measure
    of FedScale (Lai et al., ICML 2022) on fedsim's virtual clock.

    The columns of :func:`bytes_to_target` that concern time, for reading or for
    :func:`over_seeds` (``over_seeds(time_to_target(df, 0.8), ["sim_time_s"])``).

    Args:
        df: a :func:`analysis.load_runs` frame.
        target: test accuracy in [0, 1].

    Returns:
        One row per run (``experiment_dir, run_id, algorithm, seed``, and ``dry_run`` when
        loaded), in the frame's order, with ``target`` (float), ``reached`` (bool), ``round``
        (0-based, float: NaN when never reached) and ``sim_time_s`` (float64, simulated seconds
        at which the first round reaching ``target`` had its model ready; NaN when the run never
        reached it or has no clock, i.e. no ``system:`` section, even if it reached the target);
        then ``config_json`` when loaded.

    Raises:
        AnalysisError: ``target`` outside [0, 1], or ``df`` lacks the load_runs columns.
    """
    out = bytes_to_target(df, target)
    keep = [
        c
        for c in out.columns
        if c not in ("cum_bytes", "cum_bytes_up", "cum_bytes_down", "cum_wall_seconds", "client_updates")
    ]
    return out[keep]


def client_outcomes(clients: pd.DataFrame) -> pd.DataFrame:
    """How many client rows of each ``outcome`` every run logged (over all its rounds).

    ``outcome`` is what a round did with a dispatched client: ``aggregated``,
    ``dropped_deadline`` (could not arrive by the round's deadline), ``dropped_offline`` (went
    offline before it arrived), ``overselected_unused`` (over-selection's late arrivals),
    ``dropped_timeout`` (still training when the round passed ``engine.round_timeout_s``, in
    wall-clock seconds, under ``timeout_policy: drop``); docs/outputs.md.

    Args:
        clients: the ``clients`` frame of :func:`analysis.read_tables` (one row per (run, round,
            client), with ``experiment_dir``).

    Returns:
        One row per run (``experiment_dir``, ``run_id``, in the frame's order), then one int64
        column per outcome: those of :data:`OUTCOMES` in that order, then any other value
        alphabetically; 0 where a run had none of it. Rows with a null outcome are not counted.

    Raises:
        AnalysisError: ``clients`` has no ``outcome`` column (a log written before the virtual
            clock) or lacks ``experiment_dir`` / ``run_id``.
    """
    if "outcome" not in clients.columns:
        raise AnalysisError(
            "the clients table has no outcome column (written by a fedsim older than the virtual "
            "clock); re-run the experiment with this fedsim"
        )
    _need(clients, KEYS)
    order = clients[KEYS].drop_duplicates()
    counts = clients.groupby(KEYS + ["outcome"], sort=False).size().unstack("outcome", fill_value=0)
    seen = set(counts.columns)
    columns = [o for o in OUTCOMES if o in seen] + sorted(seen.difference(OUTCOMES))
    counts = counts.reindex(columns=columns).reset_index()
    out = order.merge(counts, on=KEYS, how="left")
    out[columns] = out[columns].fillna(0).astype(np.int64)
    out.columns.name = None
    return out.reset_index(drop=True)


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: final and best accuracy, rounds, traffic, time (and compute when logged).

    Returns:
        Columns ``experiment_dir, run_id, algorithm, seed``, ``status`` and ``dry_run`` (if
        loaded), ``rounds`` (int: rounds logged), ``final_acc`` (accuracy at the last evaluated
        round), ``best_acc`` (max over evaluated rounds; both NaN if none was evaluated, as in a
        dry-run projection), ``MB_up``, ``MB_down`` (total traffic in 1e6 bytes), ``wall_s`` (sum
        of round seconds), ``TMACs`` (sum of the per-round ``flops`` column / 1e12) when
        rounds.parquet has a non-null ``flops``, ``sim_s`` (simulated seconds on the virtual
        clock when the run's last round had its model ready; NaN for a run without a clock)
        when some run has a non-null ``sim_time_s``; when some run is asynchronous (``phase``
        "async", :func:`is_async`), ``updates`` (client updates aggregated over the run: the sum
        of ``clients``; NaN when the run logged none) and ``staleness`` (mean over the run's server steps of
        ``staleness_mean``, in server steps; NaN for a synchronous run); and ``config_json`` (the run's full config, what
        :func:`over_seeds` compares) if loaded. Dry-run projections are kept, one row each
        (``dry_run`` True); :func:`over_seeds` leaves them out.

    Raises:
        AnalysisError: ``df`` lacks the load_runs columns.
    """
    _need(df, KEYS + ["round", "test_accuracy", "cum_bytes_up", "cum_bytes_down", "wall_seconds"])
    ordered = df.sort_values(KEYS + ["round"], kind="stable")
    g = ordered.groupby(KEYS, sort=False)
    out = g[_ids(df)[2:] + [c for c in ("status", "dry_run") if c in df.columns]].first()
    out["rounds"] = g["round"].size()
    acc = ordered[ordered["test_accuracy"].notna()].groupby(KEYS, sort=False)["test_accuracy"]
    out["final_acc"] = acc.last()
    out["best_acc"] = acc.max()
    out["MB_up"] = g["cum_bytes_up"].last() / 1e6
    out["MB_down"] = g["cum_bytes_down"].last() / 1e6
    out["wall_s"] = g["wall_seconds"].sum()
    if "flops" in df.columns and df["flops"].notna().any():
        out["TMACs"] = g["flops"].sum(min_count=1) / 1e12
    if has_clock(df):
        out["sim_s"] = ordered.assign(_sim=_sim_time(ordered)).groupby(KEYS, sort=False)["_sim"].last()
    if is_async(df):
        out["updates"] = g["clients"].sum(min_count=1) if "clients" in df.columns else np.nan
        stale = "staleness_mean" in df.columns
        out["staleness"] = g["staleness_mean"].mean() if stale else np.nan
    if "config_json" in df.columns:
        out["config_json"] = g["config_json"].first()
    order = df[KEYS].drop_duplicates()
    return order.merge(out.reset_index(), on=KEYS, how="left").reset_index(drop=True)


def _flatten(value, name: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{name}.{k}" if name else str(k), out)
    elif name == "runs" and isinstance(value, list) and len(value) == 1:
        _flatten(value[0], "run", out)  # a run's own entry, named as load_runs names it
    else:
        out[name] = json.dumps(value, sort_keys=True, default=str)


def compared_config(config_json) -> dict[str, str] | None:
    """A run's config as ``{"data.alpha": "0.5", "run.rounds": "8", ...}`` (values as JSON text),
    without :data:`NOT_COMPARED` (seed, name, output_dir); None if ``config_json`` is not a JSON
    object (missing or damaged)."""
    try:
        cfg = json.loads(config_json)
    except (TypeError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    out: dict[str, str] = {}
    _flatten({k: v for k, v in cfg.items() if k not in NOT_COMPARED}, "", out)
    return out


def _listed(items: Sequence, limit: int = 3, sep: str = ", ") -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(map(str, items[:limit])) + more


def _shown_value(text: str | None) -> str:
    """A compared config value for a message: strings bare, others as JSON, a missing key '(unset)'."""
    if text is None:
        return "(unset)"
    value = json.loads(text)
    return value if isinstance(value, str) else text


def mixed_runs(table: pd.DataFrame, by: str = "run_id") -> str | None:
    """Why averaging ``table``'s runs per ``by`` value would not be an average over seeds, or None.

    Runs pooled under one ``by`` value are repetitions over seeds only if their configs (the
    ``config_json`` column, compared without seed, name and output_dir) are equal and their
    seeds distinct. Dry-run projections are not looked at (:func:`over_seeds` leaves them out).

    Returns:
        One line naming the groups, the config keys that differ (with their values) and the
        repeated seeds; None when every group is fine (or has one run). Without a
        ``config_json`` column only the seeds are checked.
    """
    table = table[~_is_dry(table)]
    if by not in table.columns:
        return None
    differ: dict[str, list[str]] = {}  # config key -> distinct values, first seen first
    differ_groups, repeat_groups, repeated = [], [], []
    for name, g in table.groupby(by, sort=False, dropna=False):
        if len(g) < 2:
            continue
        if "config_json" in g.columns:
            configs = [c for c in map(compared_config, g["config_json"]) if c is not None]
            keys = list(dict.fromkeys(k for c in configs for k in c))
            diff = {k: list(dict.fromkeys(c.get(k) for c in configs)) for k in keys}
            diff = {k: v for k, v in diff.items() if len(v) > 1}
            if diff:
                differ_groups.append(name)
                for k, values in diff.items():
                    differ.setdefault(k, [])
                    differ[k] += [v for v in values if v not in differ[k]]
        if "seed" in g.columns:
            seeds = g["seed"].dropna().astype(int)
            dup = list(dict.fromkeys(seeds[seeds.duplicated()]))
            if dup:
                repeat_groups.append(name)
                repeated += [s for s in dup if s not in repeated]
    parts = []
    if differ:
        keys = [f"{k}: {_listed(map(_shown_value, v), 4, ' vs ')}" for k, v in differ.items()]
        parts.append(f"the runs of {_listed(differ_groups)} differ in more than the seed ({_listed(keys)})")
    if repeated:
        plural = "s" if len(repeated) > 1 else ""
        parts.append(f"the runs of {_listed(repeat_groups)} repeat seed{plural} {_listed(repeated)}")
    if not parts:
        return None
    return (
        "; ".join(parts) + ": their mean ± std is not a spread over seeds; pass experiment "
        "directories that differ only in the seed"
    )


def over_seeds(
    table: pd.DataFrame, metrics: Sequence[str] = ("final_acc", "best_acc"), by: str = "run_id"
) -> pd.DataFrame:
    """Mean and standard deviation of per-run metrics over repeated runs (different seeds).

    Runs of the same ``by`` value (the run name, which defaults to the algorithm) from different
    experiment directories are treated as repetitions of one configuration. Dry-run projections
    (``dry_run`` True) are left out: they have no results. When the runs of one group differ in
    more than the seed (their ``config_json`` compared without seed, name and output_dir, e.g.
    an 8-round and a 5-round experiment) or repeat a seed, the mean and std are still computed
    but a :class:`analysis.MixedRunsWarning` names what differs (see :func:`mixed_runs`).

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
        AnalysisError: ``by`` or a metric is not a column of ``table``; every run of ``table``
            is a dry-run projection.
    """
    _need(table, [by, *metrics])
    dry = _is_dry(table)
    if len(table) and dry.all():
        raise AnalysisError(f"every run of the table is {DRY_RUN_HINT}")
    table = table[~dry]
    problem = mixed_runs(table, by)
    if problem:
        warnings.warn(problem, MixedRunsWarning, stacklevel=2)
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
