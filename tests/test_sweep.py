"""``fedsim sweep`` (Ray Tune trials) and the sweep report: a trial equals ``fedsim run --set``,
bad input fails before anything starts, a killed worker and a killed sweep are recovered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from fedsim import config
from fedsim.engine import api
from tests.helpers import only_dir, tables, tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
TWO_RUNS = [
    {"algorithm": "fedavg", "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 32},
    {"algorithm": "fedprox", "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 32, "mu": 0.01},
]
DATA = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 4}


def _write(tmp_path: Path, raw: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _assert_same_tables(a: Path, b: Path, drop: tuple[str, ...] = ()) -> None:
    ta, tb = tables(a), tables(b)
    for name in ("runs", "rounds", "clients"):
        x, y = (t[name].drop(columns=[c for c in drop if c in t[name].columns]) for t in (ta, tb))
        pd.testing.assert_frame_equal(x, y, check_dtype=False, obj=f"{a.name}/{name}")


def _direct_run(base: dict, overrides: list[str], out: Path) -> Path:
    """The experiment as `fedsim run --set ...` runs it: config.parse + api.prepare + api.execute."""
    cfg = config.parse(base, overrides)
    run_dir = api.new_run_dir(out, cfg.name)
    list(api.execute(cfg, api.prepare(cfg), run_dir))
    return run_dir


# --- (1) a 2 x 2 grid x 2 seeds: 8 trials, each equal to its direct run; the report by hand --------


def test_grid_of_8_trials_equals_direct_runs_and_the_report_pools_seeds(ray_local, tmp_path, capsys):
    from analysis import load_sweep
    from analysis.report import write_report
    from fedsim.cli import main

    # in-process trials (fast; tests/engine/test_engine.py: both backends give the same tables); the Ray
    # pool inside a trial's placement group is the next tests' subject
    base = tiny_experiment(data=DATA, runs=TWO_RUNS, engine={"backend": "sequential", "clients_per_round": 3})
    cfg_file = _write(tmp_path, base)
    code = main(
        [
            "sweep",
            str(cfg_file),
            "--grid",
            "runs.0.lr=0.02,0.1",
            "--grid",
            "data.alpha=0.3,1.0",
            "--seeds",
            "0,1",
            "--max-concurrent",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    cap = capsys.readouterr()
    assert code == 0, cap.err
    sweep_dir = only_dir(tmp_path / "out")
    assert f"results: {sweep_dir}" in cap.out
    for i in range(8):  # one line as each trial starts and one as it ends
        assert f"trial-0{i} started: " in cap.err and f"trial-0{i} finished in " in cap.err

    index = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert list(index.columns) == [
        "trial_id",
        "runs.0.lr",
        "data.alpha",
        "seed",
        "status",
        "message",
        "experiment_dir",
        "wall_seconds",
        "overrides",
    ]
    cells = [(lr, a, s) for lr in (0.02, 0.1) for a in (0.3, 1.0) for s in (0, 1)]
    assert list(zip(index["runs.0.lr"], index["data.alpha"], index["seed"])) == cells
    assert (index["status"] == "finished").all() and (index["wall_seconds"] > 0).all()
    assert index["experiment_dir"].tolist() == [f"trial-0{i}" for i in range(8)]

    direct = tmp_path / "direct"
    for row in index.itertuples():
        sets = json.loads(row.overrides)
        assert sets == [f"runs.0.lr={row[2]}", f"data.alpha={row[3]}", f"seed={row.seed}"]
        trial_dir = sweep_dir / row.experiment_dir
        ref = _direct_run(base, sets, direct)
        _assert_same_tables(ref, trial_dir)
        assert yaml.safe_load((trial_dir / "config.yaml").read_text()) == yaml.safe_load(
            (ref / "config.yaml").read_text()
        )

    # the report, against a computation by hand from the trials' own tables
    report = write_report(sweep_dir)
    per_run = []
    for row in index.itertuples():
        rounds = pd.read_parquet(sweep_dir / row.experiment_dir / "rounds.parquet")
        for run_id, g in rounds.groupby("run_id", sort=False):
            acc = g.sort_values("round")["test_accuracy"].dropna()
            per_run.append(
                {
                    "lr": row[2],
                    "alpha": row[3],
                    "run": run_id,
                    "final": acc.iloc[-1],
                    "best": acc.max(),
                    "tmacs": g["flops"].sum() / 1e12,
                    "g": g.sort_values("round"),
                }
            )
    hand = pd.DataFrame(per_run)
    target = 0.9 * hand["best"].max()
    hand["mb"] = [
        g.loc[g["test_accuracy"] >= target, "cum_bytes"].iloc[0] / 1e6
        if (g["test_accuracy"] >= target).any()
        else float("nan")
        for g in hand["g"]
    ]
    hand["rounds_to_target"] = [  # communication rounds up to and including the first reaching one
        g.loc[g["test_accuracy"] >= target, "round"].iloc[0] + 1
        if (g["test_accuracy"] >= target).any()
        else float("nan")
        for g in hand["g"]
    ]
    expect = (
        hand.groupby(["lr", "alpha", "run"], sort=False)
        .agg(
            final_mean=("final", "mean"),
            final_std=("final", "std"),
            best_mean=("best", "mean"),
            best_std=("best", "std"),
            mb_mean=("mb", "mean"),
            rounds_mean=("rounds_to_target", "mean"),
            tmacs_mean=("tmacs", "mean"),
            tmacs_std=("tmacs", "std"),
        )
        .reset_index()
    )
    got = report.table
    assert len(got) == 8 and report.target == pytest.approx(target)
    assert got["run"].tolist() == expect["run"].tolist()
    assert (
        got["runs.0.lr"].tolist() == expect["lr"].tolist()
        and got["data.alpha"].tolist() == expect["alpha"].tolist()
    )
    for mine, theirs in (
        ("final_acc_mean", "final_mean"),
        ("final_acc_std", "final_std"),
        ("best_acc_mean", "best_mean"),
        ("best_acc_std", "best_std"),
        ("MB_to_target_mean", "mb_mean"),
        ("rounds_to_target_mean", "rounds_mean"),
        ("TMACs_mean", "tmacs_mean"),
        ("TMACs_std", "tmacs_std"),
    ):
        assert got[mine].to_numpy() == pytest.approx(expect[theirs].to_numpy(), nan_ok=True), mine
    summary = (sweep_dir / "report" / "summary.md").read_text()
    assert "## Per grid cell and run" in summary and "![sweep](sweep.png)" in summary
    assert (sweep_dir / "report" / "sweep.png").stat().st_size > 0

    tidy = load_sweep(sweep_dir)  # one row per trial x run x round, grid columns and seed in front
    assert list(tidy.columns[:3]) == ["trial_id", "runs.0.lr", "data.alpha"] and "seed" in tidy.columns
    assert len(tidy) == 8 * 2 * 2 and not tidy.duplicated(["trial_id", "run_id", "round"]).any()
    first = tidy[tidy["trial_id"] == "trial-05"]
    assert (
        set(first["runs.0.lr"]) == {0.1} and set(first["data.alpha"]) == {0.3} and set(first["seed"]) == {1}
    )


# --- (2) bad input: one line, exit 2, nothing written, nothing started ------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--grid", "runs.0.lrr=0.1,0.2"], "runs.0.lrr"),
        (["--grid", "data.num_clients=4,abc"], "data.num_clients"),
        (["--grid", "runs.0.lr="], "empty value list"),
        ([], "grid is empty"),
        (["--grid", "engine.clients_per_round=3,5"], "clients_per_round"),
        (["--grid", "seed=1,2"], "--seeds"),
        (["--seeds", "0,x"], "--seeds"),
        (["--grid", "runs.0.lr=0.1", "--max-concurrent", "0"], "max-concurrent"),
        ("section:{grid: {runs.0.lr: []}}", "no values"),
        ("section:{grid: {runs.0.lr: [0.1]}, seeds: [1, 1]}", "repeat"),
        ("section:{grid: {runs.0.lr: [0.1]}, max_concurent: 2}", "sweep.max_concurent"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "empty-values",
        "empty-grid",
        "invalid-cell",
        "seed-in-grid",
        "bad-seeds",
        "zero-concurrency",
        "section-empty-values",
        "section-repeated-seed",
        "section-unknown-key",
    ],
)
def test_bad_sweep_input_fails_before_anything_starts(tmp_path, monkeypatch, capsys, args, needle):
    from fedsim.cli import main

    def boom(*a, **k):
        raise AssertionError("nothing may start before every trial is validated")

    monkeypatch.setattr(api, "start_ray", boom)
    raw = tiny_experiment(data=DATA, runs=TWO_RUNS[:1])
    if isinstance(args, str):
        raw["sweep"] = config.load_yaml(args.removeprefix("section:"))
        args = []
    out = tmp_path / "out"
    code = main(["sweep", str(_write(tmp_path, raw)), *args, "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("fedsim: error:"), err
    assert needle in err[0]
    assert not out.exists()


# --- worker pools inside the trials' placement groups; a diverging trial is recorded, others go on --


@pytest.mark.timeout(180)  # a pool placed outside its trial's group would wait forever for a CPU
def test_two_one_cpu_trials_run_side_by_side_on_two_cpus_and_a_diverging_one_is_recorded(
    ray_local, tmp_path, capsys
):
    from fedsim.cli import main

    one_round = [{"algorithm": "fedavg", "rounds": 1, "local_epochs": 1, "lr": 0.05, "batch_size": 32}]
    base = tiny_experiment(
        data=DATA, runs=one_round, engine={"backend": "ray", "clients_per_round": 3, "num_workers": 1}
    )
    assert ray_local.cluster_resources()["CPU"] == 2  # the two trials' groups together hold every CPU
    code = main(
        [
            "sweep",
            str(_write(tmp_path, base)),
            "--grid",
            "runs.0.lr=0.05,1e9",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fedsim: trial-")]
    assert code == 1, lines  # not every trial finished
    assert [ln.split()[2] for ln in lines[:2]] == ["started:", "started:"], lines  # side by side
    sweep_dir = only_dir(tmp_path / "out")
    index = pd.read_parquet(sweep_dir / "sweep.parquet").set_index("trial_id")
    assert index.loc["trial-00", "status"] == "finished" and index.loc["trial-00", "message"] == ""
    assert (
        index.loc["trial-01", "status"] == "diverged"
        and "'fedavg' diverged: round 0" in index.loc["trial-01", "message"]
    )
    assert any(ln.startswith("fedsim: trial-01 diverged in ") for ln in lines), lines
    workers = pd.read_parquet(sweep_dir / "trial-00" / "clients.parquet")["worker"]
    assert set(workers) == {"worker-0"}  # one worker, as its group reserved


# --- (3) a trial whose worker is SIGKILLed completes: the engine retries the client on a new worker -


def _client_worker_pids() -> set[int]:
    return {
        p.pid for p in psutil.process_iter(["cmdline"]) if "ClientWorker" in " ".join(p.info["cmdline"] or [])
    }


SLOW = [{"algorithm": "fedavg", "rounds": 3, "local_epochs": 8, "lr": 0.05, "batch_size": 8}]


@pytest.mark.timeout(300)
def test_a_trial_whose_worker_is_killed_completes_with_the_clean_result(ray_local, tmp_path, capsys):
    from fedsim.cli import main

    # Two workers of one CPU each: the trial's placement group reserves both CPUs of the session's
    # Ray, so the replacement can only start inside the group, in the CPU the dead worker released
    # (a replacement scheduled outside the group would wait for a free CPU forever).
    base = tiny_experiment(
        runs=SLOW,
        engine={"backend": "ray", "clients_per_round": 3, "num_workers": 2, "cpus_per_worker": 1},
    )
    out = tmp_path / "out"
    earlier = _client_worker_pids()
    killed: list[int] = []
    stop = threading.Event()

    def kill_once_round_0_is_written():  # round 1 is then training (the loop writes a round after
        pid = None  # submitting the next one)
        while not stop.is_set():
            pid = pid or min(_client_worker_pids() - earlier, default=None)
            written = False
            for f in out.glob("*/trial-00/rounds.parquet"):
                try:
                    written = len(pd.read_parquet(f)) >= 1
                except Exception:  # replaced atomically, but may vanish between checks
                    pass
            if pid and written:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # a worker of another Ray on this machine that ended: next
                    earlier.add(pid)
                    pid = None
                    continue
                killed.append(pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_once_round_0_is_written, daemon=True)
    watcher.start()
    try:
        code = main(
            [
                "sweep",
                str(_write(tmp_path, base)),
                "--grid",
                "runs.0.lr=0.05",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert code == 0, capsys.readouterr().err
    assert killed, "no ClientWorker was killed"
    trial = only_dir(out) / "trial-00"
    clients = pd.read_parquet(trial / "clients.parquet")
    assert clients["attempt"].max() >= 1  # the lost clients were retried on a new worker
    assert (pd.read_parquet(trial / "runs.parquet")["status"] == "finished").all()
    # the clean run: in-process (tests/engine/test_engine.py: the two backends give identical tables)
    clean = _direct_run(base, ["runs.0.lr=0.05", "seed=3", "engine.backend=sequential"], tmp_path / "clean")
    _assert_same_tables(clean, trial, drop=("attempt", "config_json"))


# --- (4) a SIGKILLed `fedsim sweep` resumes to the tables of an uninterrupted sweep ------------------

RESUMABLE = [{"algorithm": "fedavg", "rounds": 4, "local_epochs": 3, "lr": 0.05, "batch_size": 8}]


def test_a_killed_sweep_resumes_to_the_uninterrupted_tables(ray_local, tmp_path, capsys):
    from fedsim.cli import main

    base = tiny_experiment(
        data=DATA, runs=RESUMABLE, engine={"backend": "sequential", "clients_per_round": 3}
    )
    cfg_file = _write(tmp_path, base)
    grid = ["--grid", "runs.0.lr=0.02,0.05,0.1", "--max-concurrent", "1", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", "sweep", str(cfg_file), *grid, "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, sweep_dir = time.monotonic() + 300, None
    while time.monotonic() < deadline and proc.poll() is None:  # kill once trial-00 ended, mid trial-01
        found = list((tmp_path / "out").glob("*/sweep.parquet"))
        if found:
            sweep_dir = found[0].parent
            try:
                first_done = (
                    pd.read_parquet(found[0]).set_index("trial_id").loc["trial-00", "status"] == "finished"
                )
                mid = first_done and len(pd.read_parquet(sweep_dir / "trial-01" / "rounds.parquet")) >= 1
            except Exception:  # not written yet (or replaced between checks)
                mid = False
            if mid:
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert sweep_dir is not None, proc.stderr.read()
    time.sleep(1.0)  # the local Ray it started goes down with it
    runs = pd.read_parquet(sweep_dir / "trial-01" / "runs.parquet")
    assert (runs["status"] == "running").all(), "trial-01 ended before the sweep could be killed"
    assert not (sweep_dir / "trial-02").exists()
    kept = {p: p.stat().st_mtime_ns for p in (sweep_dir / "trial-00").rglob("*")}
    round0 = pd.read_parquet(sweep_dir / "trial-01" / "rounds.parquet")["wall_seconds"].iloc[0]

    capsys.readouterr()
    assert main(["sweep", "--resume", str(sweep_dir), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "trial-00 started" not in err and "trial-01 started" in err and "trial-02 started" in err, err
    assert kept == {
        p: p.stat().st_mtime_ns for p in (sweep_dir / "trial-00").rglob("*")
    }  # finished: untouched
    after = pd.read_parquet(sweep_dir / "trial-01" / "rounds.parquet")
    assert after["wall_seconds"].iloc[0] == round0  # resumed from its checkpoint: round 0 not recomputed
    index = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert (index["status"] == "finished").all() and index["runs.0.lr"].tolist() == [0.02, 0.05, 0.1]

    # An uninterrupted sweep's trials are their direct runs (test 1); the resumed ones equal them.
    for row in index.itertuples():
        _assert_same_tables(
            _direct_run(base, json.loads(row.overrides), tmp_path / "clean"), sweep_dir / row.experiment_dir
        )


# --- dry run and submit of a file with a sweep: section ---------------------------------------------


def test_dry_run_projects_every_trial_of_a_sweep_section_and_submit_sweep_runs_it_as_one_job(
    tmp_path, capsys
):
    from fedsim import dryrun
    from fedsim.cli import main
    from fedsim.submit import build_submission

    job = ROOT / "jobs" / "sweep_digits.yaml"
    assert main(["run", "--dry-run", str(job), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sweep: 12 trials (4 grid cell(s) x 3 seed(s)), at most 2 at a time" in out
    raw = config.load_yaml(job.read_text())
    raw.pop("sweep")
    up = down = macs = 0
    for alpha in ("0.1", "1.0"):
        for cohort in (5, 10):
            for seed in (0, 1, 2):
                cfg = config.parse(
                    raw, [f"data.alpha={alpha}", f"engine.clients_per_round={cohort}", f"seed={seed}"]
                )
                runs = dryrun.project_experiment(cfg)[1]
                up += sum(r.bytes_up for r in runs)
                down += sum(r.bytes_down for r in runs)
                macs += sum(r.flops for r in runs)
    assert (
        f"whole sweep: bytes up {up:,} " in out
        and f"bytes down {down:,} " in out
        and f"compute {macs:.4e} MACs" in out
    )

    assert (
        build_submission(str(job), working_dir=str(ROOT), sweep=True).entrypoint
        == "fedsim sweep jobs/sweep_digits.yaml --no-progress"
    )
    assert (
        build_submission(str(job), working_dir=str(ROOT)).entrypoint
        == "fedsim run jobs/sweep_digits.yaml --no-progress"
    )
