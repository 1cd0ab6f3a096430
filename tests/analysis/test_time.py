"""analysis/ on the virtual clock: accuracy against simulated time, time to target, client outcomes.

Every expectation here is worked out by hand from the made-up numbers of ``_tiny_dir``: accuracy
0.5 + 0.1 seed + 0.05 round + 0.01 (fedprox), 1000 bytes each way per round, and the simulated
times given below.
"""

from __future__ import annotations

import io
import math
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from analysis import (
    AnalysisError,
    accuracy_vs_time,
    bytes_to_target,
    client_outcomes,
    load_runs,
    plot_convergence,
    run_table,
    time_to_target,
)
from analysis import report as report_mod
from tests.analysis.test_analysis import SVG_NS, _tiny_dir

# simulated seconds at which each round's model was ready, per run (increasing within a run)
CLOCK = {"fedavg": [3.0, 7.5, 9.0, 14.25], "fedprox": [4.0, 8.0, 12.0, 16.0]}
CLOCK_SEED1 = {"fedavg": [6.0, 15.0, 18.0, 28.5], "fedprox": [8.0, 16.0, 24.0, 32.0]}


@pytest.fixture
def clocked(tmp_path):
    """Seed 0, 4 rounds, round 1 not evaluated, with a clock: fedavg 0.50, -, 0.60, 0.65 at
    3.0, 7.5, 9.0, 14.25 s; fedprox 0.51, -, 0.61, 0.66 at 4, 8, 12, 16 s."""
    return _tiny_dir(tmp_path / "clocked", seed=0, rounds=4, sim_time_s=CLOCK, unevaluated=(1,))


@pytest.fixture
def old(tmp_path):
    """Seed 1, 4 rounds, rounds.parquet without a sim_time_s column (a log from before the clock):
    fedavg 0.60, 0.65, 0.70, 0.75; fedprox 0.61, 0.66, 0.71, 0.76."""
    return _tiny_dir(tmp_path / "old", seed=1, rounds=4)


def test_accuracy_vs_time_keeps_only_evaluated_rounds_of_runs_with_a_clock(clocked, old):
    got = accuracy_vs_time(load_runs([clocked, old]))
    assert list(got.columns) == [
        "experiment_dir",
        "run_id",
        "algorithm",
        "seed",
        "round",
        "sim_time_s",
        "test_accuracy",
    ]
    assert (got["experiment_dir"] == str(clocked)).all()  # the run without a clock is left out
    assert got["run_id"].tolist() == ["fedavg"] * 3 + ["fedprox"] * 3
    assert got["round"].tolist() == [0, 2, 3, 0, 2, 3]  # round 1 was not evaluated
    assert got["sim_time_s"].tolist() == [3.0, 9.0, 14.25, 4.0, 12.0, 16.0]
    assert got["sim_time_s"].dtype == np.float64
    assert got["test_accuracy"].tolist() == pytest.approx([0.50, 0.60, 0.65, 0.51, 0.61, 0.66])


def test_accuracy_vs_time_is_empty_without_a_clock_column_or_with_nulls_only(old, tmp_path):
    assert accuracy_vs_time(load_runs(old)).empty
    nulls = _tiny_dir(tmp_path / "nulls", sim_time_s={}, rounds=2)  # the column, all null
    assert "sim_time_s" in load_runs(nulls).columns
    assert accuracy_vs_time(load_runs(nulls)).empty


def test_time_to_target_is_the_clock_at_the_first_round_reaching_the_target(clocked, old):
    df = load_runs([clocked, old])
    got = time_to_target(df, 0.605)
    assert got["run_id"].tolist() == ["fedavg", "fedprox", "fedavg", "fedprox"]
    # clocked: fedavg first >= 0.605 in round 3 (0.65), fedprox in round 2 (0.61);
    # old: fedavg in round 1 (0.65), fedprox in round 0 (0.61), but no clock to read
    assert got["reached"].tolist() == [True, True, True, True]
    np.testing.assert_array_equal(got["round"], [3.0, 2.0, 1.0, 0.0])
    np.testing.assert_array_equal(got["sim_time_s"], [14.25, 12.0, np.nan, np.nan])
    assert "cum_bytes" not in got.columns and got["target"].eq(0.605).all()
    never = time_to_target(df, 0.99)
    assert not never["reached"].any() and never["sim_time_s"].isna().all()


def test_bytes_to_target_gains_sim_time_s_beside_the_bytes(clocked, old):
    got = bytes_to_target(load_runs([clocked, old]), 0.605)
    np.testing.assert_array_equal(got["sim_time_s"], [14.25, 12.0, np.nan, np.nan])
    np.testing.assert_array_equal(got["cum_bytes"], [8000.0, 6000.0, 4000.0, 2000.0])
    assert got["sim_time_s"].dtype == np.float64
    assert bytes_to_target(load_runs(old), 0.605)["sim_time_s"].isna().all()


def test_run_table_has_sim_s_the_last_rounds_clock_only_when_some_run_has_one(clocked, old):
    table = run_table(load_runs([clocked, old]))
    np.testing.assert_array_equal(table["sim_s"], [14.25, 16.0, np.nan, np.nan])
    assert "sim_s" not in run_table(load_runs(old)).columns


def test_client_outcomes_counts_each_outcome_per_run_in_fedsims_order():
    clients = pd.DataFrame(
        {
            "experiment_dir": ["x", "x", "x", "x", "x", "x", "y"],
            "run_id": ["a", "a", "a", "b", "b", "b", "a"],
            "outcome": [
                "aggregated",
                "dropped_deadline",
                "aggregated",
                "overselected_unused",
                "zz_future",
                None,
                "dropped_offline",
            ],
        }
    )
    got = client_outcomes(clients)
    expected = pd.DataFrame(
        {
            "experiment_dir": ["x", "x", "y"],
            "run_id": ["a", "b", "a"],
            "aggregated": [2, 0, 0],
            "dropped_deadline": [1, 0, 0],
            "dropped_offline": [0, 0, 1],
            "overselected_unused": [0, 1, 0],
            "zz_future": [0, 1, 0],  # an outcome analysis does not know yet: counted, after the known ones
        }
    )
    pd.testing.assert_frame_equal(got, expected)


def test_client_outcomes_refuses_a_clients_table_without_outcomes():
    with pytest.raises(AnalysisError, match="no outcome column"):
        client_outcomes(pd.DataFrame({"experiment_dir": ["x"], "run_id": ["a"], "round": [0]}))


def test_convergence_has_a_simulated_time_panel_with_the_clocked_runs_only(clocked, old):
    fig = plot_convergence(load_runs([clocked, old]))
    assert [ax.get_xlabel() for ax in fig.axes] == [
        "message size (cumulative MB, up + down)",
        "communication rounds",
        "simulated time (s)",
    ]
    assert fig.axes[2].get_ylabel() == "test accuracy"
    assert len(fig.axes[1].lines) == 4 and len(fig.axes[2].lines) == 2  # 2 runs x 2 directories; 2 clocked
    (x0, y0), (x1, y1) = (line.get_data() for line in fig.axes[2].lines)
    np.testing.assert_array_equal(x0, [3.0, 9.0, 14.25])
    np.testing.assert_array_equal(x1, [4.0, 12.0, 16.0])
    np.testing.assert_allclose(y0, [0.50, 0.60, 0.65])
    np.testing.assert_allclose(y1, [0.51, 0.61, 0.66])
    assert len(plot_convergence(load_runs(old)).axes) == 2  # no clock: FedMA's two panels only


def _svg_texts(path) -> set[str]:
    return {"".join(t.itertext()).strip() for t in ET.parse(path).getroot().iter(f"{SVG_NS}text")}


def test_report_gives_simulated_seconds_to_target_per_run_and_seed_and_client_outcomes(tmp_path):
    a = _tiny_dir(
        tmp_path / "a",
        seed=0,
        rounds=4,
        sim_time_s=CLOCK,
        unevaluated=(1,),
        outcomes={"fedavg": ["aggregated", "aggregated", "dropped_deadline"], "fedprox": ["aggregated"]},
    )
    b = _tiny_dir(
        tmp_path / "b",
        seed=1,
        rounds=4,
        sim_time_s=CLOCK_SEED1,
        unevaluated=(1,),
        outcomes={"fedavg": ["aggregated"] * 3, "fedprox": ["dropped_offline", "overselected_unused"]},
    )
    stream = io.StringIO()
    rep = report_mod.run([a, b], tmp_path / "out", stream=stream)
    # target 0.9 x 0.76 (fedprox, seed 1, round 3) = 0.684: seed 0 never reaches it (best 0.66);
    # seed 1 reaches it in round 2 (fedavg 0.70 at 18 s, fedprox 0.71 at 24 s)
    assert rep.target == pytest.approx(0.684)
    s = rep.summary
    cols = list(s.columns)
    assert cols.index("sim_s") == cols.index("wall_s") + 1
    assert cols.index("sim_s_to_target") == cols.index("rounds_to_target") + 1
    np.testing.assert_array_equal(s["sim_s"], [14.25, 16.0, 28.5, 32.0])
    np.testing.assert_array_equal(s["sim_s_to_target"], [np.nan, np.nan, 18.0, 24.0])
    printed = stream.getvalue().splitlines()
    assert printed[0].split() == cols
    assert printed[3].split()[cols.index("sim_s")] == "28.50"
    assert printed[3].split()[cols.index("sim_s_to_target")] == "18.00"
    assert printed[1].split()[cols.index("sim_s_to_target")] == "-"
    # over seeds: fedavg sim_s (14.25 + 28.5) / 2 = 21.375, sample std 14.25 / sqrt(2)
    seeds = rep.seeds.set_index("run")
    assert seeds.loc["fedavg", "sim_s_mean"] == pytest.approx(21.375)
    assert seeds.loc["fedavg", "sim_s_std"] == pytest.approx(14.25 / math.sqrt(2))
    assert seeds.loc["fedprox", "sim_s_to_target_mean"] == 24.0  # the one run that reached it
    assert math.isnan(seeds.loc["fedprox", "sim_s_to_target_std"])
    # client outcomes: the rows of clients.parquet per run and outcome
    assert rep.outcomes.to_dict("list") == {
        "run": ["fedavg", "fedprox", "fedavg", "fedprox"],
        "experiment": ["a", "a", "b", "b"],
        "aggregated": [2, 1, 3, 0],
        "dropped_deadline": [1, 0, 0, 0],
        "dropped_offline": [0, 0, 0, 1],
        "overselected_unused": [0, 0, 0, 1],
    }
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| fedavg | a | 2 | 1 | 0 | 0 |" in md.split("## Client outcomes")[1]
    assert (
        "sim_s_to_target: simulated seconds" in md and "| sim_s_to_target |" in md.split("## Over seeds")[1]
    )
    assert "simulated time (s)" in _svg_texts(tmp_path / "out" / "convergence.svg")


def test_report_without_a_clock_or_a_dropped_client_has_no_time_columns_or_outcomes(tmp_path):
    plain = _tiny_dir(tmp_path / "plain", outcomes={"fedavg": ["aggregated"] * 2, "fedprox": ["aggregated"]})
    rep = report_mod.write_report(plain, tmp_path / "out")
    assert list(rep.summary.columns) == report_mod.SUMMARY_COLUMNS + ["TMACs", "status"]
    assert rep.outcomes is None
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "sim_s" not in md and "Client outcomes" not in md and "simulated" not in md
    assert "simulated time (s)" not in _svg_texts(tmp_path / "out" / "convergence.svg")
