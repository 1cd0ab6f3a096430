"""Figures over a :func:`analysis.load_runs` frame, rendered with matplotlib's Agg canvas.

Figures are built as ``matplotlib.figure.Figure`` objects on a ``FigureCanvasAgg`` (never through
pyplot, so no global backend or figure registry is touched) and returned to the caller, who can
inspect or save them. SVGs keep text as ``<text>`` elements (``svg.fonttype: none``) so labels
stay searchable and editable.
"""

from __future__ import annotations

import io
import os

import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.errors import AnalysisError
from analysis.load import write_bytes
from analysis.tables import (
    KEYS,
    _is_dry,
    accuracy_vs_bytes,
    accuracy_vs_round,
    accuracy_vs_time,
    accuracy_vs_updates,
    is_async,
    no_evaluation_message,
    run_table,
)

ROUNDS_LABEL = "communication rounds"
ACCURACY_LABEL = "test accuracy"
TIME_LABEL = "simulated time (s)"
UPDATES_LABEL = "client updates (cumulative)"


def bytes_label(unit: str = "MB", upload_only: bool = False) -> str:
    """The x label of the message-size panel, e.g. ``"message size (cumulative MB, up + down)"``."""
    return f"message size (cumulative {unit}, {'upload only' if upload_only else 'up + down'})"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(run_ids: list[str]) -> dict[str, tuple]:
    cycle = matplotlib.colormaps["tab10"].colors
    return {r: cycle[i % len(cycle)] for i, r in enumerate(dict.fromkeys(run_ids))}


def plot_convergence(
    df: pd.DataFrame,
    unit: str = "MB",
    upload_only: bool = False,
    target: float | None = None,
    title: str | None = None,
) -> Figure:
    """Test accuracy against message size and against rounds, the shape of FedMA's Figure 2,
    against simulated time when the runs have a virtual clock, and against client updates when
    some run is asynchronous.

    Wang et al., "Federated Learning with Matched Averaging" (ICLR 2020), Figure 2 compares
    methods by test accuracy against the cumulative size of the messages exchanged and against
    communication rounds; this draws the same two panels, one line per run name. Repeated runs of
    one name (several experiment directories, e.g. seeds) share its colour and legend entry.
    When some run has a clock (a ``system:`` section: non-null ``sim_time_s`` in rounds.parquet),
    a third panel draws accuracy against simulated seconds, the time-to-accuracy view of FedScale
    (Lai et al., ICML 2022); runs without a clock are left out of that panel only. When some run
    is asynchronous (``phase`` "async" in rounds.parquet: FedBuff, FedAsync), a last panel draws
    accuracy against cumulative client updates aggregated (:func:`analysis.accuracy_vs_updates`),
    FedBuff's comparison axis (Nguyen et al., AISTATS 2022), for every run, synchronous ones
    included, so both kinds share one axis.

    Args:
        df: a :func:`analysis.load_runs` frame.
        unit: size unit of the left panel: "B", "KB", "MB" (1e6 bytes) or "GB" (1e9 bytes).
        upload_only: left panel x = ``cum_bytes_up`` instead of ``cum_bytes`` (both directions).
        target: optional test accuracy in [0, 1] drawn as a dotted horizontal line.
        title: optional figure title.

    Returns:
        A Figure with two Axes: [0] x = ``bytes_label(unit, upload_only)``, [1] x =
        ``"communication rounds"`` (rounds completed, i.e. ``round + 1``); and, when some run
        has a clock, [2] x = ``"simulated time (s)"`` (``sim_time_s``); and, when some run is
        asynchronous, a last one, x = ``"client updates (cumulative)"`` (``client_updates``);
        y = ``"test accuracy"``.

    Raises:
        AnalysisError: unknown unit, or ``df`` lacks the load_runs columns or has no evaluated round.
    """
    by_bytes = accuracy_vs_bytes(df, unit=unit, upload_only=upload_only)
    by_round = accuracy_vs_round(df)
    if by_round.empty:
        raise AnalysisError(no_evaluation_message(df))
    by_time = accuracy_vs_time(df)
    by_updates = accuracy_vs_updates(df) if is_async(df) else None
    xcol = by_bytes.columns[-2]
    timed = not by_time.empty
    n_panels = 2 + timed + (by_updates is not None)
    fig = _figure(5.0 * n_panels + 1.0, 4.2)
    axes = list(fig.subplots(1, n_panels, sharey=True))
    ax_bytes, ax_rounds = axes[:2]
    colors = _colors(by_round["run_id"].tolist())
    labelled: set[str] = set()
    counts = by_round.drop_duplicates(KEYS)["run_id"].value_counts()
    curves_in_time = dict(tuple(by_time.groupby(KEYS, sort=False)))
    curves_in_updates = {} if by_updates is None else dict(tuple(by_updates.groupby(KEYS, sort=False)))
    for (exp_dir, run_id), curve in by_round.groupby(KEYS, sort=False):
        sized = by_bytes[(by_bytes["experiment_dir"] == exp_dir) & (by_bytes["run_id"] == run_id)]
        label = None
        if run_id not in labelled:
            labelled.add(run_id)
            label = run_id if counts[run_id] == 1 else f"{run_id} ({counts[run_id]} runs)"
        style = dict(
            color=colors[run_id],
            marker="o",
            markersize=3,
            linewidth=1.5,
            alpha=1.0 if counts[run_id] == 1 else 0.7,
        )
        ax_bytes.plot(sized[xcol], sized["test_accuracy"], label=label, **style)
        ax_rounds.plot(curve["round"] + 1, curve["test_accuracy"], label=label, **style)
        in_time = curves_in_time.get((exp_dir, run_id))
        if in_time is not None:
            axes[2].plot(in_time["sim_time_s"], in_time["test_accuracy"], **style)
        in_updates = curves_in_updates.get((exp_dir, run_id))
        if in_updates is not None:
            axes[-1].plot(in_updates["client_updates"], in_updates["test_accuracy"], **style)
    ax_bytes.set_xlabel(bytes_label(unit, upload_only))
    ax_rounds.set_xlabel(ROUNDS_LABEL)
    if timed:
        axes[2].set_xlabel(TIME_LABEL)
    if by_updates is not None:
        axes[-1].set_xlabel(UPDATES_LABEL)
        axes[-1].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.set_ylabel(ACCURACY_LABEL)
        ax.grid(True, alpha=0.3)
        if target is not None:
            ax.axhline(target, color="0.4", linestyle=":", linewidth=1)
    ax_rounds.xaxis.get_major_locator().set_params(integer=True)
    ax_rounds.legend(loc="lower right", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_cost(df: pd.DataFrame, unit: str = "auto", title: str | None = None) -> Figure:
    """Accuracy and cost per run as grouped bars, in the spirit of FedPart's result tables.

    Wang et al., "Why Go Full? Elevating Federated Learning Through Partial Network Updates"
    (NeurIPS 2024) report accuracy next to communication and computation cost per method; this
    draws, per run name, bars of final and best test accuracy, of total traffic up and down, and,
    when rounds.parquet has a non-null ``flops`` column, of total compute (TMACs: the sum of the
    per-round ``flops`` / 1e12). Repeated runs of one name (seeds) are averaged, with the sample
    standard deviation as error bars. Dry-run projections are left out when ``df`` holds any
    real run (their projected cost is drawn when it holds nothing else).

    Args:
        df: a :func:`analysis.load_runs` frame.
        unit: traffic unit, "GB" (1e9 bytes), "MB" (1e6 bytes), or "auto": GB when some run
            moved at least 1 GB in one direction, else MB.
        title: optional figure title.

    Returns:
        A Figure with two Axes (y ``"test accuracy"``; ``"communication (GB)"`` or ``"(MB)"``) or
        three (``"compute (10^12 MACs)"`` added), whose x tick labels are the run names.

    Raises:
        AnalysisError: unknown unit, or ``df`` lacks the load_runs columns.
    """
    if unit not in ("auto", "MB", "GB"):
        raise AnalysisError(f"unknown traffic unit {unit!r}; choose auto, MB or GB")
    if not _is_dry(df).all():
        df = df[~_is_dry(df)]
    table = run_table(df)
    if unit == "auto":
        unit = "GB" if max(table["MB_up"].max(), table["MB_down"].max()) >= 1e3 else "MB"
    scale = 1e3 if unit == "GB" else 1.0
    table["up"], table["down"] = table["MB_up"] / scale, table["MB_down"] / scale
    panels = [
        ("test accuracy", ["final_acc", "best_acc"], ["final", "best"]),
        (f"communication ({unit})", ["up", "down"], ["up", "down"]),
    ]
    if "TMACs" in table.columns:
        panels.append(("compute (10^12 MACs)", ["TMACs"], ["total"]))
    g = table.groupby("run_id", sort=False)
    names = list(g.size().index)
    panel_width = max(3.2, 0.9 * len(names) + 1.4)
    fig = _figure(panel_width * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x = np.arange(len(names))
    crowded = len(names) * 2 > 8
    for ax, (ylabel, cols, legend) in zip(axes, panels):
        width = 0.8 / len(cols)
        for k, (col, name) in enumerate(zip(cols, legend)):
            mean, std = g[col].mean().to_numpy(), g[col].std(ddof=1).to_numpy()
            yerr = None if np.all(np.isnan(std)) else np.nan_to_num(std)
            bars = ax.bar(
                x + (k - (len(cols) - 1) / 2) * width,
                np.nan_to_num(mean),
                width,
                yerr=yerr,
                capsize=3,
                label=name,
            )
            ax.bar_label(
                bars,
                labels=["n/a" if np.isnan(v) else f"{v:.3g}" for v in mean],
                fontsize="xx-small" if crowded else "x-small",
                rotation=90 if crowded else 0,
                padding=2,
            )
        ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        if len(cols) > 1:
            ax.legend(
                loc="lower center",
                bbox_to_anchor=(0.5, 1.0),
                ncols=len(cols),
                fontsize="small",
                frameon=False,
            )
        ax.grid(True, axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_partition(partition: pd.DataFrame, title: str | None = None) -> Figure:
    """The data heterogeneity of a run: clients by classes, and the clients' sizes.

    Left: each client's training examples per class as a share of its own examples (a heatmap,
    clients as rows in client order, classes as columns; white: none). Right: the clients' sizes
    (training examples), one bar per client. The label-skew pictures of Hsu, Qi and Brown (2019)
    and of Flower Datasets' ``plot_label_distributions`` have this shape.

    Args:
        partition: :func:`analysis.load.read_partition`'s frame (``client``, ``label``,
            ``examples``).
        title: optional figure title.
    """
    clients = int(partition["client"].max()) + 1
    classes = int(partition["label"].max()) + 1
    counts = np.zeros((clients, classes), dtype=np.float64)
    counts[partition["client"].to_numpy(), partition["label"].to_numpy()] = partition["examples"].to_numpy()
    sizes = counts.sum(axis=1)
    share = np.where(counts > 0, counts / np.maximum(sizes, 1)[:, None], np.nan)
    fig = _figure(10.0, min(2.0 + 0.18 * clients, 9.0))
    left, right = fig.subplots(1, 2, width_ratios=[3, 1], sharey=True)
    image = left.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    left.set_xlabel("class")
    left.set_ylabel("client")
    fig.colorbar(image, ax=left, label="share of the client's examples")
    right.barh(np.arange(clients), sizes, color="0.4", height=1.0 if clients > 50 else 0.8)
    right.set_xlabel("training examples")
    if title:
        fig.suptitle(title)
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure encoded as ``fmt`` ("png" at 150 dpi, or "svg" with text kept as text).

    Raises:
        AnalysisError: another format.
    """
    if fmt not in ("png", "svg"):
        raise AnalysisError(f"unsupported figure format {fmt!r}; use png or svg")
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fedsim"}):
        fig.savefig(buf, format=fmt, dpi=150, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def save_figure(fig: Figure, directory: str | os.PathLike, stem: str) -> list[str]:
    """Save ``fig`` as ``<directory>/<stem>.png`` and ``.svg`` (local directory, created if needed).

    Returns:
        The two file paths written.

    Raises:
        AnalysisError: the directory cannot be created or written.
    """
    directory = os.path.abspath(os.fspath(directory))
    fs = pafs.LocalFileSystem()
    try:
        fs.create_dir(directory, recursive=True)
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(
            f"cannot create {directory!r} ({str(err).strip().splitlines()[0]}); pass a writable directory"
        ) from None
    paths = []
    for fmt in ("png", "svg"):
        path = f"{directory}/{stem}.{fmt}"
        write_bytes(fs, path, figure_bytes(fig, fmt), path)
        paths.append(path)
    return paths
