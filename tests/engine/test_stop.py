"""Stopping a run by hand, for real: SIGTERM and SIGINT sent to the whole process group of a
``fedsim run`` subprocess (what ``ray job stop``, Kubernetes, Slurm and a terminal's Ctrl-C do),
then ``--resume`` to the end; and what a dead cluster leaves behind (a stale
``ray_current_cluster`` record, a stale ``RAY_ADDRESS``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from fedsim import config
from fedsim.engine import api
from tests.helpers import WIDTHS, run_all, tables

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 14


def _experiment(backend: str) -> dict:
    """FedAvg on 4 digits clients, every client in every round (about 0.1 s a round on one core:
    long enough to stop the run in the middle)."""
    return {
        "name": "stop",
        "seed": 4,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 4},
        "model": {"name": "digits_cnn", "widths": WIDTHS},
        "engine": {"backend": backend, "clients_per_round": 4, "num_workers": 2},
        "runs": [{"algorithm": "fedavg", "rounds": ROUNDS, "local_epochs": 2, "lr": 0.05, "batch_size": 8}],
    }


@pytest.fixture(scope="module")
def ray_tmpdir():
    """A Ray temp directory of this module's own (short: Ray's socket paths must fit 107 bytes),
    holding the record a cluster that died without ``ray stop`` leaves behind: its address, where
    nothing listens any more. Without an address, ``fedsim run`` must start its own local Ray
    anyway (Ray itself would try to join the dead cluster)."""
    with tempfile.TemporaryDirectory(prefix="fs31-", dir="/tmp") as tmp:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # discard port: refused
        yield tmp


def _env(ray_tmpdir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": ray_tmpdir, "PYTHONPATH": str(ROOT)}


def _fedsim(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a command
    )


def _rounds_written(out: Path) -> int:
    dirs = list(out.glob("*")) if out.exists() else []
    return api.completed_rounds(dirs[0]) if dirs else 0


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tables of the experiment run without a stop, for a backend (computed once, in this
    process, on the sequential backend: the Ray backend gives the same results,
    tests/engine/test_engine.py)."""
    done = {}

    def get(backend: str) -> dict[str, pd.DataFrame]:
        if backend not in done:
            cfg = config.parse(_experiment(backend))
            d = tmp_path_factory.mktemp(f"clean-{backend}")
            run_all(cfg, api.prepare(cfg), d)
            done[backend] = tables(d)
        return done[backend]

    return get


CASES = [
    pytest.param("ray", signal.SIGTERM, id="ray-SIGTERM"),
    pytest.param("sequential", signal.SIGINT, id="sequential-SIGINT"),
    pytest.param("ray", signal.SIGINT, id="ray-SIGINT", marks=pytest.mark.slow),
    pytest.param("sequential", signal.SIGTERM, id="sequential-SIGTERM", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend, sig", CASES)
def test_a_signal_to_the_process_group_stops_the_run_cleanly_and_resume_completes_it(
    backend, sig, tmp_path, ray_tmpdir, uninterrupted, ray_local
):
    cfg_file = tmp_path / "stop.yaml"
    cfg_file.write_text(yaml.safe_dump(_experiment(backend)))
    env = _env(ray_tmpdir)
    out = tmp_path / "runs"
    proc = _fedsim(["run", str(cfg_file), "--out", str(out), "--no-progress"], env)
    deadline = time.monotonic() + 300
    while _rounds_written(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    session = psutil.Process(proc.pid).children(recursive=True)  # Ray's GCS, raylet, workers...
    assert (backend == "ray") == any(p.name() == "raylet" for p in session)
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    stopped_in = time.monotonic() - t0

    assert proc.returncode == 128 + sig, stderr
    (run_dir,) = out.iterdir()
    resume = f"fedsim run --resume {run_dir}"
    lines = stderr.splitlines()
    assert lines[0].startswith("fedsim: experiment 'stop'"), stderr
    assert lines[1:] == [
        f"fedsim: stopped by {sig.name}; completed rounds are in {run_dir}; continue with '{resume}'"
    ], stderr
    assert stdout == ""
    assert stopped_in < 60, f"took {stopped_in:.1f} s to stop"
    runs = pd.read_parquet(run_dir / "runs.parquet")
    assert runs[["status", "message"]].values.tolist() == [
        ["interrupted", f"stopped by {sig.name}; continue with '{resume}'"]
    ]
    kept = pd.read_parquet(run_dir / "rounds.parquet")["round"].tolist()
    assert kept == list(range(len(kept))) and 2 <= len(kept) < ROUNDS
    time.sleep(0.5)  # a process killed a moment ago may still be reported as running
    assert _alive(session) == []

    from fedsim.cli import main

    assert main(["run", "--no-progress", "--resume", str(run_dir)]) == 0  # on the tests' Ray
    done = tables(run_dir)
    for name in ("runs", "rounds", "clients"):
        pd.testing.assert_frame_equal(done[name], uninterrupted(backend)[name], check_dtype=False, obj=name)


SECOND_SIGNAL = """
import os, signal, sys, time
from fedsim import interrupt
with interrupt.handled():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("cleaning up", flush=True)
        time.sleep(60)  # a clean-up that would take a minute
print("finished the clean-up", flush=True)
"""


def test_a_second_ctrl_c_exits_at_once_while_the_first_is_still_cleaning_up():
    proc = subprocess.Popen(
        [sys.executable, "-c", SECOND_SIGNAL],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "cleaning up\n"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130
    assert stdout == ""
    assert stderr == "fedsim: SIGINT again; exiting at once\n"


def test_a_stale_ray_address_is_one_line_and_exit_2_with_nothing_written(tmp_path, ray_tmpdir):
    cfg_file = tmp_path / "stop.yaml"
    cfg_file.write_text(yaml.safe_dump(_experiment("ray")))
    env = {**_env(ray_tmpdir), "RAY_ADDRESS": "127.0.0.1:9"}  # the discard port: refused
    proc = _fedsim(["run", str(cfg_file), "--out", str(tmp_path / "runs"), "--no-progress"], env)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.startswith("fedsim: error: nothing accepts connections at RAY_ADDRESS '127.0.0.1:9'")
    assert "unset RAY_ADDRESS" in stderr and len(stderr.splitlines()) == 1
    assert stdout == ""
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_engine_ray_address_auto_with_a_dead_clusters_record_is_one_line(tmp_path, ray_tmpdir, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", ray_tmpdir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raw = _experiment("ray")
    raw["engine"]["ray_address"] = "auto"
    with pytest.raises(api.FedsimError, match=r"^nothing accepts connections at engine.ray_address \('auto'"):
        api.check_ray_target(config.parse(raw))
