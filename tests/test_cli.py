"""The real ``fedsim`` CLI in a subprocess: the main job, and bad input (exit 2, one line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

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


BAD_INPUTS = [
    (["--set", "data.dataset=imagenet"], "imagenet"),
    (["--set", "model.name=resnet1000"], "resnet1000"),
    (["--set", "runs.0.algorithm=fedsgd"], "fedsgd"),
    (["--set", "data.colour=blue"], "data.colour"),
    (["--set", "runs.0.lr=fast"], "runs.0.lr"),
    (["--set", "data.alpha=0"], "data.alpha"),
    (["--set", "data.alpha=-1"], "data.alpha"),
    (["--set", "data.num_clients=5000"], "clients"),
    (["--set", "engine.clients_per_round=11"], "clients_per_round"),
    (["--set", "engine.gpus_per_worker=0.5", "--set", "engine.backend=sequential"], "gpus_per_worker"),
    (["--set", "data.dataset=mnist", "--set", "data.data_dir=/nonexistent/fedsim-data"], "data_dir"),
    (["--set", "data.partition=natural"], "natural"),
    (["--set", "runs.0=3"], "runs.0"),
    (["--set", "runs.9.rounds=1"], "runs"),
    (["--set", "noequals"], "key=value"),
    (["missing-file.yaml"], "missing-file.yaml"),
    (["--bogus-flag"], "bogus"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, needle, tmp_path):
    out = tmp_path / "out"
    r = fedsim("run", *args, "--out", str(out), timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsim: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists() or not any(out.iterdir())


def test_yaml_that_is_not_a_mapping_exits_2(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    r = fedsim("run", str(bad), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "mapping" in r.stderr and not (tmp_path / "out").exists()
