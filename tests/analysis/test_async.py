"""analysis/ on asynchronous runs: accuracy against client updates, updates and staleness in the report.

Every expectation here is worked out by hand from the made-up numbers of ``_tiny_dir``: accuracy
0.5 + 0.1 seed + 0.05 round + 0.01 (fedbuff), and the per-step ``clients`` and staleness below.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from analysis import (
    accuracy_vs_updates,
    bytes_to_target,
    is_async,
    load_runs,
    plot_convergence,
    run_table,
    time_to_target,
)
from analysis import report as report_mod
from tests.analysis.test_analysis import _tiny_dir
from tests.analysis.test_time import _svg_texts

RUN_IDS = ("fedavg", "fedbuff")
PHASES = {"fedavg": ["full"] * 4, "fedbuff": ["async"] * 4}
CLOCK = {"fedavg": [3.0, 7.5, 9.0, 14.25], "fedbuff": [1.0, 2.0, 2.5, 4.0]}


def _mixed(path, seed=0, fedbuff_clients=(2, 2, 1, 2), fedbuff_staleness=(0.0, 0.5, 1.0, 1.5)):
    """4 rounds, round 1 not evaluated: synchronous fedavg, 3 clients a round; asynchronous
    fedbuff, ``fedbuff_clients`` updates and ``fedbuff_staleness`` mean staleness a step."""
    return _tiny_dir(
        path,
        seed=seed,
        rounds=4,
        run_ids=RUN_IDS,
        sim_time_s=CLOCK,
        unevaluated=(1,),
        columns={
            "phase": PHASES,
            "clients": {"fedavg": [3, 3, 3, 3], "fedbuff": list(fedbuff_clients)},
            "staleness_mean": {"fedbuff": list(fedbuff_staleness)},
            "staleness_max": {"fedbuff": [math.ceil(s) for s in fedbuff_staleness]},
        },
    )


def test_accuracy_vs_updates_counts_every_rounds_clients_and_keeps_evaluated_rounds(tmp_path):
    got = accuracy_vs_updates(load_runs(_mixed(tmp_path / "a")))
    assert list(got.columns) == [
        "experiment_dir",
        "run_id",
        "algorithm",
        "seed",
        "round",
        "client_updates",
        "test_accuracy",
    ]
    assert got["run_id"].tolist() == ["fedavg"] * 3 + ["fedbuff"] * 3
    assert got["round"].tolist() == [0, 2, 3, 0, 2, 3]
    # fedavg 3 a round: 3, (6), 9, 12; fedbuff 2, 2, 1, 2: 2, (4), 5, 7; round 1 counted, not shown
    assert got["client_updates"].tolist() == [3, 9, 12, 2, 5, 7]
    assert got["client_updates"].dtype == np.int64
    assert got["test_accuracy"].tolist() == pytest.approx([0.50, 0.60, 0.65, 0.51, 0.61, 0.66])


def test_accuracy_vs_updates_leaves_out_rows_after_an_unknown_count(tmp_path):
    holes = _tiny_dir(
        tmp_path / "holes",
        rounds=3,
        run_ids=RUN_IDS,
        columns={"phase": PHASES, "clients": {"fedavg": [3, 3, 3], "fedbuff": [2, None, 1]}},
    )
    got = accuracy_vs_updates(load_runs(holes))
    assert list(zip(got["run_id"], got["round"], got["client_updates"])) == [
        ("fedavg", 0, 3),
        ("fedavg", 1, 6),
        ("fedavg", 2, 9),
        ("fedbuff", 0, 2),  # round 1's count is null: rounds 1 and 2 have no known total
    ]
    assert accuracy_vs_updates(load_runs(_tiny_dir(tmp_path / "old", rounds=2))).empty  # no clients column


def test_is_async_looks_for_an_async_phase(tmp_path):
    assert is_async(load_runs(_mixed(tmp_path / "a")))
    sync = _tiny_dir(tmp_path / "s", rounds=2, columns={"phase": {"fedavg": ["full"] * 2}})
    assert not is_async(load_runs(sync))
    assert not is_async(load_runs(_tiny_dir(tmp_path / "old", rounds=2)))  # no phase column


def test_bytes_to_target_gains_the_client_updates_of_the_reaching_round(tmp_path):
    df = load_runs(_mixed(tmp_path / "a"))
    # 0.605: fedavg first in round 3 (0.65, 12 updates), fedbuff in round 2 (0.61, 5 updates)
    np.testing.assert_array_equal(bytes_to_target(df, 0.605)["client_updates"], [12.0, 5.0])
    assert "client_updates" not in time_to_target(df, 0.605).columns


def test_run_table_has_updates_and_staleness_only_when_some_run_is_asynchronous(tmp_path):
    table = run_table(load_runs(_mixed(tmp_path / "a")))
    assert table["updates"].tolist() == [12, 7]  # 4 x 3; 2 + 2 + 1 + 2
    np.testing.assert_array_equal(table["staleness"], [np.nan, 0.75])  # (0 + 0.5 + 1 + 1.5) / 4
    sync = _tiny_dir(tmp_path / "s", rounds=2, columns={"phase": {"fedavg": ["full"] * 2}, "clients": {}})
    assert not {"updates", "staleness"} & set(run_table(load_runs(sync)).columns)


def test_convergence_gains_a_client_updates_panel_with_every_run_when_one_is_asynchronous(tmp_path):
    fig = plot_convergence(load_runs(_mixed(tmp_path / "a")))
    assert [ax.get_xlabel() for ax in fig.axes] == [
        "message size (cumulative MB, up + down)",
        "communication rounds",
        "simulated time (s)",
        "client updates (cumulative)",
    ]
    assert fig.axes[3].get_ylabel() == "test accuracy"
    (x0, y0), (x1, y1) = (line.get_data() for line in fig.axes[3].lines)  # synchronous fedavg too
    np.testing.assert_array_equal(x0, [3, 9, 12])
    np.testing.assert_array_equal(x1, [2, 5, 7])
    np.testing.assert_allclose(y0, [0.50, 0.60, 0.65])
    np.testing.assert_allclose(y1, [0.51, 0.61, 0.66])
    sync = _tiny_dir(
        tmp_path / "s",
        rounds=2,
        sim_time_s={"fedavg": [1.0, 2.0]},
        columns={"phase": {"fedavg": ["full"] * 2}, "clients": {"fedavg": [3, 3]}},
    )
    assert [ax.get_xlabel() for ax in plot_convergence(load_runs(sync)).axes][2:] == ["simulated time (s)"]


def test_report_gives_updates_to_target_and_staleness_per_run_and_over_seeds(tmp_path):
    a = _mixed(tmp_path / "a", seed=0)
    b = _mixed(tmp_path / "b", seed=1, fedbuff_clients=(3, 3, 3, 3), fedbuff_staleness=(1.0, 1.0, 2.0, 2.0))
    stream = io.StringIO()
    rep = report_mod.run([a, b], tmp_path / "out", stream=stream)
    # target 0.9 x 0.76 (fedbuff, seed 1, round 3) = 0.684: seed 0 never reaches it (best 0.66);
    # seed 1 reaches it in round 2: fedavg 0.70 after 3 x 3 = 9 updates, fedbuff 0.71 after 9
    assert rep.target == pytest.approx(0.684)
    s = rep.summary
    cols = list(s.columns)
    assert cols[cols.index("rounds") + 1 : cols.index("rounds") + 3] == ["updates", "staleness"]
    assert cols.index("updates_to_target") == cols.index("sim_s_to_target") + 1
    assert s["updates"].tolist() == [12, 7, 12, 12]
    np.testing.assert_array_equal(s["staleness"], [np.nan, 0.75, np.nan, 1.5])
    np.testing.assert_array_equal(s["updates_to_target"], [np.nan, np.nan, 9.0, 9.0])
    printed = stream.getvalue().splitlines()
    assert printed[0].split() == cols
    assert printed[1].split()[cols.index("staleness")] == "-"  # synchronous
    assert printed[2].split()[cols.index("staleness")] == "0.75"
    assert printed[2].split()[cols.index("updates")] == "7"
    assert printed[3].split()[cols.index("updates_to_target")] == "9"
    # over seeds: fedbuff updates (7 + 12) / 2 = 9.5, sample std 5 / sqrt(2); staleness
    # (0.75 + 1.5) / 2 = 1.125, std 0.75 / sqrt(2); updates_to_target over the one run reaching it
    seeds = rep.seeds.set_index("run")
    assert seeds.loc["fedbuff", "updates_mean"] == pytest.approx(9.5)
    assert seeds.loc["fedbuff", "updates_std"] == pytest.approx(5 / math.sqrt(2))
    assert seeds.loc["fedbuff", "staleness_mean"] == pytest.approx(1.125)
    assert seeds.loc["fedbuff", "staleness_std"] == pytest.approx(0.75 / math.sqrt(2))
    assert seeds.loc["fedbuff", "updates_to_target_mean"] == 9.0
    assert math.isnan(seeds.loc["fedavg", "staleness_mean"])
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "updates_to_target: cumulative client updates" in md and "staleness: mean over" in md
    over_seeds = md.split("## Over seeds")[1]
    assert "| updates | updates_to_target | staleness |" in over_seeds
    assert "| fedbuff | fedbuff | 2 | 0, 1 |" in over_seeds and "| 1.12 ± 0.53 |" in over_seeds
    assert "client updates (cumulative)" in _svg_texts(tmp_path / "out" / "convergence.svg")
