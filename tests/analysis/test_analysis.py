"""analysis/: loading real run logs, convergence tables, seeds, figures, and ``fedsim report``."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis import (
    AnalysisError,
    MixedRunsWarning,
    accuracy_vs_bytes,
    bytes_to_target,
    load_runs,
    over_seeds,
    plot_convergence,
    plot_cost,
    run_table,
)
from fedsim import cli, config
from fedsim.engine import api
from fedsim.io.runlog import RunLog
from tests.helpers import tiny_experiment

ROOT = Path(__file__).resolve().parents[2]
RUNS = [
    {"algorithm": "fedavg", "rounds": 3, "local_epochs": 1, "lr": 0.05, "batch_size": 16},
    {"algorithm": "fedprox", "rounds": 3, "local_epochs": 1, "lr": 0.05, "batch_size": 16, "mu": 0.01},
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_NS = "{http://www.w3.org/2000/svg}"


def _run(seed: int, out: Path) -> Path:
    # a real experiment: digits, 6 clients, 3 per round, 3 rounds, FedAvg + FedProx, sequential backend
    cfg = config.parse(tiny_experiment(seed=seed, runs=RUNS))
    run_dir = api.new_run_dir(out, cfg.name)
    events = list(api.execute(cfg, api.prepare(cfg), run_dir))
    assert [e["status"] for e in events if e["kind"] == "end"] == ["finished", "finished"]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two real experiment directories that differ only in their seed (3 and 4)."""
    out = tmp_path_factory.mktemp("analysis")
    return _run(3, out / "seed3"), _run(4, out / "seed4")


def _rounds(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "rounds.parquet")


def _first_reach(rounds: pd.DataFrame, run_id: str, target: float) -> tuple[float, float]:
    """(round, bytes up + down so far) when ``run_id`` first has accuracy >= target, by a plain loop."""
    total = 0
    for row in rounds[rounds.run_id == run_id].sort_values("round").itertuples():
        total += row.bytes_up + row.bytes_down
        if row.test_accuracy >= target:
            return float(row.round), float(total)
    return float("nan"), float("nan")


def fedsim(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_load_runs_joins_config_columns_one_row_per_run_and_round(runs):
    run_dir = runs[0]
    df = load_runs(run_dir)
    raw = _rounds(run_dir)
    assert len(df) == len(raw) == 6
    assert not df.duplicated(["run_id", "round"]).any()
    assert sorted(zip(df.run_id, df["round"])) == sorted(zip(raw.run_id, raw["round"]))
    assert (df["experiment_dir"] == str(run_dir)).all()
    assert (df["data.alpha"] == 0.5).all() and (df["data.num_clients"] == 6).all()
    assert (df["engine.clients_per_round"] == 3).all() and (df["model.name"] == "digits_cnn").all()
    assert (df["run.lr"] == 0.05).all() and (df["seed"] == 3).all() and (df["status"] == "finished").all()
    by_run = df.groupby("run_id")
    assert by_run["algorithm"].first().to_dict() == {"fedavg": "fedavg", "fedprox": "fedprox"}
    assert by_run["run.mu"].first().fillna(-1).to_dict() == {"fedavg": -1, "fedprox": 0.01}
    for run_id, g in raw.groupby("run_id"):
        mine = df[df.run_id == run_id].sort_values("round")
        running, expected = 0.0, []
        for s in g.sort_values("round")["wall_seconds"]:
            running += s
            expected.append(running)
        np.testing.assert_allclose(mine["cum_wall_seconds"], expected, rtol=1e-12)
        np.testing.assert_array_equal(mine["test_accuracy"], g.sort_values("round")["test_accuracy"])


def test_load_runs_keeps_runs_of_two_directories_apart_and_reads_file_uris(runs):
    df = load_runs([str(runs[0]), f"file://{runs[1]}", runs[0]])  # the duplicate is read once
    assert len(df) == 12
    assert df.groupby("experiment_dir")["seed"].first().to_dict() == {str(runs[0]): 3, str(runs[1]): 4}
    assert df.groupby(["experiment_dir", "run_id"]).size().tolist() == [3, 3, 3, 3]


def test_bytes_to_target_matches_the_first_crossing_computed_by_hand(runs):
    run_dir = runs[0]
    raw = _rounds(run_dir)
    df = load_runs(run_dir)
    reachable = float(np.median(raw["test_accuracy"]))
    never = float(raw["test_accuracy"].max()) + 1e-6
    observed = float(raw[raw.run_id == "fedavg"].sort_values("round")["test_accuracy"].iloc[1])  # ties count
    for target in (reachable, observed, never):
        got = bytes_to_target(df, target).set_index("run_id")
        for run_id in ("fedavg", "fedprox"):
            rnd, total = _first_reach(raw, run_id, target)
            assert got.loc[run_id, "reached"] == (rnd == rnd)
            np.testing.assert_equal(got.loc[run_id, ["round", "cum_bytes"]].to_numpy(float), [rnd, total])
    assert bytes_to_target(df, never)["cum_bytes"].isna().all()
    assert bytes_to_target(df, reachable)["reached"].any()


def test_bytes_to_target_rejects_a_target_outside_0_1(runs):
    with pytest.raises(AnalysisError, match="between 0 and 1"):
        bytes_to_target(load_runs(runs[0]), 90)


def test_accuracy_vs_bytes_counts_both_directions_or_upload_only(runs):
    raw = _rounds(runs[0]).sort_values(["run_id", "round"])
    df = load_runs(runs[0])
    both = accuracy_vs_bytes(df, unit="MB").sort_values(["run_id", "round"])
    up = accuracy_vs_bytes(df, unit="GB", upload_only=True).sort_values(["run_id", "round"])
    for run_id, g in raw.groupby("run_id"):
        total = np.cumsum((g["bytes_up"] + g["bytes_down"]).to_numpy())
        np.testing.assert_allclose(both[both.run_id == run_id]["MB"], total / 1e6)
        np.testing.assert_allclose(
            up[up.run_id == run_id]["GB_up"], np.cumsum(g["bytes_up"].to_numpy()) / 1e9
        )


def test_run_table_reports_final_and_best_accuracy_per_run(runs):
    raw = _rounds(runs[0])
    table = run_table(load_runs(runs[0])).set_index("run_id")
    for run_id, g in raw.groupby("run_id"):
        acc = g.sort_values("round")["test_accuracy"].tolist()
        assert table.loc[run_id, "final_acc"] == acc[-1]
        assert table.loc[run_id, "best_acc"] == max(acc)
        assert table.loc[run_id, "rounds"] == 3
        assert table.loc[run_id, "MB_up"] == pytest.approx(g["bytes_up"].sum() / 1e6)


def test_over_seeds_gives_mean_and_sample_std_over_two_seeds(runs):
    table = over_seeds(run_table(load_runs(list(runs)))).set_index("run_id")
    raws = [_rounds(d) for d in runs]
    finals = {
        r: [raw[raw.run_id == r].sort_values("round")["test_accuracy"].iloc[-1] for raw in raws]
        for r in ("fedavg", "fedprox")
    }
    for run_id, (a, b) in finals.items():
        assert table.loc[run_id, "n_runs"] == 2 and table.loc[run_id, "seeds"] == [3, 4]
        assert table.loc[run_id, "final_acc_mean"] == pytest.approx((a + b) / 2)
        assert table.loc[run_id, "final_acc_std"] == pytest.approx(statistics.stdev([a, b]))
    assert finals["fedavg"][0] != finals["fedavg"][1]  # the seeds really gave different runs


def test_convergence_figure_has_fedma_figure_2_panels(runs):
    raw = _rounds(runs[0])
    fig = plot_convergence(load_runs(runs[0]))
    ax_bytes, ax_rounds = fig.axes
    assert ax_bytes.get_xlabel() == "message size (cumulative MB, up + down)"
    assert ax_rounds.get_xlabel() == "communication rounds"
    assert ax_bytes.get_ylabel() == ax_rounds.get_ylabel() == "test accuracy"
    assert [t.get_text() for t in ax_rounds.get_legend().get_texts()] == ["fedavg", "fedprox"]
    fedavg = raw[raw.run_id == "fedavg"].sort_values("round")
    x, y = ax_rounds.lines[0].get_data()
    np.testing.assert_array_equal(x, [1, 2, 3])
    np.testing.assert_array_equal(y, fedavg["test_accuracy"])
    np.testing.assert_allclose(
        ax_bytes.lines[0].get_xdata(), np.cumsum(fedavg["bytes_up"] + fedavg["bytes_down"]) / 1e6
    )


def test_cost_figure_has_a_compute_panel_only_when_rounds_have_flops(runs, tmp_path):
    df = load_runs(runs[0])
    fig = plot_cost(df)  # the engine logs flops (multiply-accumulates) for every round
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "test accuracy",
        "communication (MB)",
        "compute (10^12 MACs)",
    ]
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["fedavg", "fedprox"]
    raw = _rounds(runs[0])
    per_run = raw.groupby("run_id")["flops"].sum() / 1e12
    assert run_table(df).set_index("run_id")["TMACs"].to_dict() == pytest.approx(per_run.to_dict())
    copy = tmp_path / "without-flops"
    shutil.copytree(runs[0], copy)
    rounds = pq.read_table(copy / "rounds.parquet")
    pq.write_table(rounds.drop(["flops"]), copy / "rounds.parquet")
    plain = plot_cost(load_runs(copy))
    assert [ax.get_ylabel() for ax in plain.axes] == ["test accuracy", "communication (MB)"]


def _svg_texts(path: Path) -> set[str]:
    root = ET.parse(path).getroot()  # raises if the SVG is not well-formed XML
    assert root.tag == f"{SVG_NS}svg"
    return {"".join(t.itertext()).strip() for t in root.iter(f"{SVG_NS}text")}


def test_report_cli_writes_valid_png_svg_markdown_and_prints_the_table(runs, tmp_path):
    out = tmp_path / "report"
    r = fedsim("report", str(runs[0]), str(runs[1]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert header[:2] == ["run", "algorithm"] and {
        "final_acc",
        "best_acc",
        "rounds",
        "MB_up",
        "MB_down",
        "wall_s",
        "MB_to_target",
    } <= set(header)
    for stem in ("convergence", "cost"):
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert {
        "message size (cumulative MB, up + down)",
        "communication rounds",
        "test accuracy",
        "fedavg (2 runs)",
        "fedprox (2 runs)",
    } <= _svg_texts(out / "convergence.svg")
    assert {"test accuracy", "communication (MB)", "fedavg", "fedprox"} <= _svg_texts(out / "cost.svg")
    md = (out / "summary.md").read_text()
    assert (
        "| run | algorithm | experiment | seed | final_acc | best_acc | rounds | MB_up | MB_down | wall_s | "
        "MB_to_target |" in md
    )
    assert "![convergence](convergence.png)" in md and "## Over seeds" in md
    # every run's final accuracy and MB to 90% of the best accuracy, computed here from the Parquet files
    raws = [_rounds(d) for d in runs]
    target = 0.9 * max(float(raw["test_accuracy"].max()) for raw in raws)
    for raw, seed in zip(raws, (3, 4)):
        for run_id, g in raw.groupby("run_id"):
            final = f"{g.sort_values('round')['test_accuracy'].iloc[-1]:.4f}"
            _, total = _first_reach(raw, run_id, target)
            mb = "-" if total != total else f"{total / 1e6:.2f}"
            row = [
                line
                for line in md.splitlines()
                if line.startswith(f"| {run_id} |") and line.split(" | ")[3] == str(seed)
            ]
            assert len(row) == 1 and f"| {final} |" in row[0] and row[0].split(" | ")[10] == mb, row
            assert any(
                line.split()[:1] == [run_id] and final in line.split() for line in r.stdout.splitlines()
            )


def test_report_defaults_to_the_first_run_dir(runs, tmp_path, capsys):
    copy = tmp_path / "exp"
    shutil.copytree(runs[0], copy)
    assert cli.main(["report", str(copy)]) == 0
    assert sorted(p.name for p in (copy / "report").iterdir()) == [
        "convergence.png",
        "convergence.svg",
        "cost.png",
        "cost.svg",
        "partition.png",  # the experiment directory's partition.parquet, drawn
        "partition.svg",
        "summary.md",
    ]
    assert f"report: {copy / 'report' / 'summary.md'}" in capsys.readouterr().out


def _no_rounds(path: Path) -> Path:
    log = RunLog(path)
    log.add(
        "runs",
        {"run_id": "fedavg", "algorithm": "fedavg", "config_json": "{}", "seed": 0, "status": "running"},
    )
    log.flush()
    return path


def _damaged(path: Path, runs) -> Path:
    shutil.copytree(runs[0], path)
    (path / "rounds.parquet").write_bytes(b"not parquet")
    return path


BAD_DIRS = [
    ("empty", lambda p, runs: (p / "empty").mkdir() or p / "empty", "not a fedsim experiment directory"),
    (
        "other files",
        lambda p, runs: (p / "x.csv").write_text("a,b\n") and p,
        "not a fedsim experiment directory",
    ),
    ("no rounds yet", lambda p, runs: _no_rounds(p / "fresh"), "no completed round"),
    ("damaged table", lambda p, runs: _damaged(p / "bad", runs), "not a readable Parquet file"),
]


def test_report_on_a_missing_directory_exits_2_with_one_line(tmp_path):
    r = fedsim("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"fedsim: error: experiment directory '{tmp_path / 'nope'}' does not exist; "
        "pass a directory written by 'fedsim run', e.g. runs/digits-20261121-101500"
    ]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_DIRS], ids=[b[0] for b in BAD_DIRS])
def test_report_on_a_bad_directory_exits_2_with_one_line(runs, tmp_path, capsys, make, message):
    bad = make(tmp_path, runs)
    assert cli.main(["report", str(bad), "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("fedsim: error: ") and message in err and str(bad) in err
    assert not (tmp_path / "out").exists()


def test_analysis_never_imports_fedsim(runs, tmp_path):
    # fedsim is made unimportable; analysis must still load runs and write a whole report
    code = (
        "import sys; sys.modules['fedsim'] = None\n"
        "import analysis, analysis.report\n"
        f"assert analysis.report.main([{str(runs[0])!r}, '--out', {str(tmp_path)!r}]) == 0\n"
        "assert not [m for m in sys.modules if m.startswith('fedsim') and sys.modules[m] is not None]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "summary.md").is_file() and "fedavg" in r.stdout


# ---- dry runs and runs that differ in more than the seed, on tiny tables written here --------------------------


def _tiny_dir(
    path: Path,
    *,
    seed: int = 0,
    rounds: int = 3,
    dry_run: bool = False,
    name: str = "tiny",
    output_dir: str = "runs",
    run_ids: tuple[str, ...] = ("fedavg", "fedprox"),
    sim_time_s: dict[str, list[float]] | None = None,
    unevaluated: tuple[int, ...] = (),
    outcomes: dict[str, list[str]] | None = None,
    columns: dict[str, dict[str, list]] | None = None,
) -> Path:
    """An experiment directory as fedsim writes it, with made-up numbers: accuracy 0.5 + 0.1 seed +
    0.05 round + 0.01 run index (null in a dry run and in the ``unevaluated`` rounds), 1000 bytes
    each way and 1e9 flops per round; ``sim_time_s`` (run id -> one simulated time per round)
    adds that rounds.parquet column (absent otherwise, as in logs older than the virtual clock);
    ``outcomes`` (run id -> outcomes) writes one clients.parquet row per outcome, in round 0, with
    an ``outcome`` column (otherwise clients.parquet is empty and has no such column); ``columns``
    (column -> run id -> one value per round; null for a run not listed) adds rounds.parquet
    columns, e.g. ``phase``, ``clients`` and ``staleness_mean``."""
    import json

    import pyarrow as pa

    path.mkdir(parents=True)
    runs, rows = [], []
    for k, run_id in enumerate(run_ids):
        cfg = {
            "name": name,
            "seed": seed,
            "output_dir": output_dir,
            "data": {"alpha": 0.5, "num_clients": 4},
            "model": {"name": "digits_cnn", "widths": None},
            "runs": [{"algorithm": run_id, "name": None, "rounds": rounds, "lr": 0.05}],
        }
        runs.append(
            {
                "run_id": run_id,
                "experiment": name,
                "algorithm": run_id,
                "config_json": json.dumps(cfg, sort_keys=True),
                "seed": seed,
                "status": "dry_run" if dry_run else "finished",
                "dry_run": dry_run,
            }
        )
        for r in range(rounds):
            rows.append(
                {
                    "run_id": run_id,
                    "algorithm": run_id,
                    "round": r,
                    "test_accuracy": None
                    if dry_run or r in unevaluated
                    else 0.5 + 0.1 * seed + 0.05 * r + 0.01 * k,
                    "bytes_up": 1000,
                    "bytes_down": 1000,
                    "cum_bytes_up": 1000 * (r + 1),
                    "cum_bytes_down": 1000 * (r + 1),
                    "cum_bytes": 2000 * (r + 1),
                    "flops": 10**9,
                    "wall_seconds": None if dry_run else 1.0,
                }
            )
            if sim_time_s is not None:
                rows[-1]["sim_time_s"] = sim_time_s.get(run_id, [None] * rounds)[r]
            for column, values in (columns or {}).items():
                rows[-1][column] = values.get(run_id, [None] * rounds)[r]
    schema = {
        "test_accuracy": pa.float64(),
        "wall_seconds": pa.float64(),
        "sim_time_s": pa.float64(),
        "phase": pa.string(),
        "clients": pa.int64(),
        "staleness_mean": pa.float64(),
        "staleness_max": pa.int64(),
    }
    rounds_table = pa.Table.from_pylist(rows)
    rounds_table = rounds_table.cast(
        pa.schema([pa.field(f.name, schema.get(f.name, f.type)) for f in rounds_table.schema])
    )
    pq.write_table(pa.Table.from_pylist(runs), path / "runs.parquet")
    pq.write_table(rounds_table, path / "rounds.parquet")
    clients = {
        "run_id": pa.array([], pa.string()),
        "round": pa.array([], pa.int64()),
        "client_id": pa.array([], pa.int64()),
    }
    if outcomes is not None:
        listed = [(run_id, i, o) for run_id, os_ in outcomes.items() for i, o in enumerate(os_)]
        clients = {
            "run_id": pa.array([r for r, _, _ in listed], pa.string()),
            "round": pa.array([0] * len(listed), pa.int64()),
            "client_id": pa.array([i for _, i, _ in listed], pa.int64()),
            "outcome": pa.array([o for _, _, o in listed], pa.string()),
        }
    pq.write_table(pa.table(clients), path / "clients.parquet")
    return path


def test_over_seeds_leaves_out_dry_run_projections(tmp_path):
    dirs = [
        _tiny_dir(tmp_path / "digits-0", seed=0),
        _tiny_dir(tmp_path / "digits-1", seed=1),
        _tiny_dir(tmp_path / "digits-dry-run-0", seed=0, dry_run=True),
    ]
    table = run_table(load_runs(dirs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedRunsWarning)  # two distinct seeds, one config: no warning
        got = over_seeds(table).set_index("run_id")
    assert got.loc["fedavg", "n_runs"] == 2 and got.loc["fedavg", "seeds"] == [0, 1]
    assert got.loc["fedavg", "final_acc_mean"] == pytest.approx((0.6 + 0.7) / 2)
    assert got.loc["fedavg", "final_acc_std"] == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert table["dry_run"].tolist() == [False, False, False, False, True, True]  # run_table keeps them


def test_over_seeds_refuses_a_table_of_dry_runs_only(tmp_path):
    table = run_table(load_runs(_tiny_dir(tmp_path / "digits-dry-run-0", dry_run=True)))
    with pytest.raises(AnalysisError, match=r"dry-run projection .*no results"):
        over_seeds(table)


def test_report_leaves_out_dry_runs_and_says_which(tmp_path, capsys):
    real = [_tiny_dir(tmp_path / "digits-0", seed=0), _tiny_dir(tmp_path / "digits-1", seed=1)]
    dry = _tiny_dir(tmp_path / "digits-dry-run-0", seed=0, dry_run=True)
    assert cli.main(["report", str(real[0]), str(dry), str(real[1]), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    table = out.split("\nMB_to_target:")[0].splitlines()
    assert len(table) == 5 and not any("dry" in line for line in table)  # header + 2 runs x 2 seeds
    assert f"left out: {dry} (dry-run projection, no results)" in out.splitlines()
    seeds = out.split("mean ± sample std over repeated runs:\n")[1].splitlines()
    # target 0.9 x 0.71 (fedprox, seed 1): fedavg's seed-1 run reaches it, its seed-0 run (best 0.60) does not
    assert seeds[1].split()[:5] == ["fedavg", "fedavg", "2", "0,", "1"] and seeds[1].split()[-1] == "1/2"
    assert "warning:" not in out


def test_report_on_dry_runs_only_says_it_is_a_dry_run_projection(tmp_path, capsys):
    dry = _tiny_dir(tmp_path / "digits-dry-run-0", dry_run=True)
    assert cli.main(["report", str(dry), "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"fedsim: error: experiment directory '{dry}' is a dry-run projection")
    assert "no results to report" in err and "eval_every" not in err
    assert not (tmp_path / "out").exists()


def test_over_seeds_warns_only_when_runs_differ_in_more_than_seed_name_and_output_dir(tmp_path):
    same = [
        _tiny_dir(tmp_path / "a", seed=0, name="tiny", output_dir="runs"),
        _tiny_dir(tmp_path / "b", seed=1, name="tiny-again", output_dir="/elsewhere"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedRunsWarning)
        assert over_seeds(run_table(load_runs(same)))["n_runs"].tolist() == [2, 2]
    longer = _tiny_dir(tmp_path / "c", seed=2, rounds=5)
    with pytest.warns(MixedRunsWarning) as caught:
        got = over_seeds(run_table(load_runs([same[0], longer])))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "differ in more than the seed (run.rounds: 3 vs 5)" in message and "\n" not in message
    assert got["n_runs"].tolist() == [2, 2]  # a warning, not a refusal


def test_over_seeds_warns_when_runs_repeat_a_seed(tmp_path):
    dirs = [_tiny_dir(tmp_path / "a", seed=0), _tiny_dir(tmp_path / "b", seed=0)]
    with pytest.warns(MixedRunsWarning, match="repeat seed 0") as caught:
        over_seeds(run_table(load_runs(dirs)))
    assert "differ in more than the seed" not in str(caught[0].message)  # the configs are equal


def test_report_warns_in_one_line_naming_what_differs(tmp_path, capsys):
    dirs = [_tiny_dir(tmp_path / "eight", seed=0, rounds=8), _tiny_dir(tmp_path / "five", seed=0, rounds=5)]
    out_dir = tmp_path / "out"
    assert cli.main(["report", *map(str, dirs), "--out", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # said once, in the report, not also as a Python warning
    lines = out.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning:")]
    assert len(warned) == 1 and lines[warned[0] + 1] == "mean ± sample std over repeated runs:"
    assert "run.rounds: 8 vs 5" in lines[warned[0]] and "repeat seed 0" in lines[warned[0]]
    md = (out_dir / "summary.md").read_text()
    assert "**Warning:** " in md and "run.rounds: 8 vs 5" in md.split("## Over seeds")[1]


def test_docs_report_example_prints_the_columns_the_report_prints(tmp_path, capsys):
    page = (ROOT / "docs" / "outputs.md").read_text()
    analysis_section = page.split("\n## Analysis\n")[1].split("\n## ")[0]
    example = [line for line in analysis_section.splitlines() if line.split()[:2] == ["run", "algorithm"]]
    assert len(example) == 1
    assert cli.main(["report", str(_tiny_dir(tmp_path / "exp")), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert example[0].split() == printed.split()
