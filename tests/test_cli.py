"""The real ``fedsim`` CLI in a subprocess: the main job (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def fedsim(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def only_run_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_default_experiment_reaches_90_percent_and_prints_the_summary(tmp_path):
    # The built-in main job, unchanged except for the in-process backend (tests/test_engine.py
    # proves both backends give identical results).
    r = fedsim("run", "--set", "engine.backend=sequential", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    for col in ("run", "final_acc", "best_acc", "MB_up", "MB_down", "wall_s"):
        assert col in r.stdout
    run_dir = only_run_dir(tmp_path)
    assert f"results: {run_dir}" in r.stdout
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    final = rounds[rounds.run_id == "fedavg"].sort_values("round")["test_accuracy"].iloc[-1]
    assert final >= 0.90
    assert set(pd.read_parquet(run_dir / "runs.parquet")["algorithm"]) == {"fedavg", "fedprox"}


def test_run_with_ray_backend_and_overrides_writes_three_tables(tmp_path):
    r = fedsim("run", "jobs/digits.yaml", "--set", "runs.0.rounds=2", "--set", "runs.1.rounds=1",
               "--set", "data.num_clients=4", "--set", "engine.clients_per_round=2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run_dir = only_run_dir(tmp_path)
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert rounds.groupby("run_id")["round"].max().to_dict() == {"fedavg": 1, "fedprox": 0}
    clients = pd.read_parquet(run_dir / "clients.parquet")
    assert clients["worker"].str.startswith("worker-").all() and (clients.groupby(["run_id", "round"]).size() == 2).all()
    assert "fedavg" in r.stdout and "|" in r.stderr  # a progress bar was drawn
