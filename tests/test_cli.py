"""The real ``fedsim`` CLI in a subprocess: the main job (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import only_dir

ROOT = Path(__file__).resolve().parents[1]


def fedsim(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_default_experiment_reaches_90_percent_and_prints_the_summary(tmp_path):
    # The built-in main job's FedAvg run, unchanged except for the in-process backend
    # (tests/engine/test_engine.py proves both backends give identical results); its FedProx, FedPart and
    # FedMA runs, whose accuracy is not asserted here, are cut short to keep the suite short.
    r = fedsim(
        "run",
        "--set",
        "engine.backend=sequential",
        "--set",
        "runs.1.rounds=1",
        "--set",
        "runs.2.cycles=1",
        "--set",
        "runs.3.rounds=1",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    for col in ("run", "final_acc", "best_acc", "MB_up", "MB_down", "wall_s"):
        assert col in r.stdout
    run_dir = only_dir(tmp_path)
    assert f"results: {run_dir}" in r.stdout
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    final = rounds[rounds.run_id == "fedavg"].sort_values("round")["test_accuracy"].iloc[-1]
    assert final >= 0.90
    assert set(pd.read_parquet(run_dir / "runs.parquet")["algorithm"]) == {
        "fedavg",
        "fedprox",
        "fedpart",
        "fedma",
    }


def test_run_with_ray_backend_and_overrides_writes_three_tables_without_torch_in_its_process(tmp_path):
    # the command's own process never imports torch (the driver actor checks the model's fit);
    # it is run as main(argv), so that the process can say what it imported once the run ended
    argv = [
        "run",
        "jobs/digits.yaml",
        "--set",
        "runs=[{algorithm: fedavg, rounds: 2, local_epochs: 2, lr: 0.05, batch_size: 16}, {algorithm: fedprox, rounds: 1, local_epochs: 2, lr: 0.05, batch_size: 16, mu: 0.01}]",
        "--set",
        "data.num_clients=4",
        "--set",
        "engine.clients_per_round=2",
        "--out",
        str(tmp_path),
    ]
    code = (
        "import sys\n"
        "from fedsim.cli import main\n"
        f"code = main({argv!r})\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "torch imported: False" in r.stdout
    run_dir = only_dir(tmp_path)
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert rounds.groupby("run_id")["round"].max().to_dict() == {"fedavg": 1, "fedprox": 0}
    clients = pd.read_parquet(run_dir / "clients.parquet")
    assert (
        clients["worker"].str.startswith("worker-").all()
        and (clients.groupby(["run_id", "round"]).size() == 2).all()
    )
    assert "fedavg" in r.stdout and "|" in r.stderr  # a progress bar was drawn


# --- Failing fast and leaving nothing half-made (in-process where nothing can hang) ---------------

TINY = [
    "--no-progress",
    "--set",
    "engine.backend=sequential",
    "--set",
    "data.num_clients=3",
    "--set",
    "engine.clients_per_round=3",
    "--set",
    "runs=[{algorithm: fedavg, rounds: 2, local_epochs: 2, lr: 0.05, batch_size: 16}, {algorithm: fedprox, rounds: 1, local_epochs: 2, lr: 0.05, batch_size: 16, mu: 0.01}]",
]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port the OS just handed out and nothing listens on any more
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "setting,key",
    [
        ("engine.num_workers=10000", "engine.num_workers"),
        ("engine.cpus_per_worker=100000", "engine.cpus_per_worker"),
        ("engine.ray_address=127.0.0.1:{port}", "engine.ray_address"),
    ],
    ids=["too-many-workers", "worker-bigger-than-machine", "nothing-at-ray-address"],
)
def test_unplaceable_pool_or_dead_ray_address_fails_fast_with_one_line_and_no_run_dir(tmp_path, setting, key):
    out = tmp_path / "out"
    try:  # without the checks Ray waits forever for the actors (or retries the GCS for minutes)
        r = fedsim("run", "--set", setting.format(port=_closed_port()), "--out", str(out), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("fedsim run hung instead of failing fast")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("fedsim: error:"), r.stderr
    assert key in lines[0] and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_local_pool_check_refuses_exactly_the_pools_that_do_not_fit():
    from fedsim import config
    from fedsim.engine import api
    from fedsim.errors import FedsimError
    from tests.helpers import tiny_experiment

    def check(resources, **engine):
        cfg = config.parse(tiny_experiment(engine={"backend": "ray", "clients_per_round": 3, **engine}))
        try:
            api.check_local_pool(cfg, resources)
            return True
        except FedsimError:
            return False

    assert check({"CPU": 4.0}, num_workers=4) and not check({"CPU": 4.0}, num_workers=5)
    assert check({"CPU": 4.0}, num_workers=8, cpus_per_worker=0.5)
    assert check({"CPU": 4.0}, cpus_per_worker=4) and not check({"CPU": 4.0}, cpus_per_worker=4.5)
    assert check({"CPU": 4.0, "GPU": 1.0}, num_workers=4, gpus_per_worker=0.25)
    assert not check({"CPU": 8.0, "GPU": 1.0}, num_workers=5, gpus_per_worker=0.25)
    assert not check({"CPU": 8.0, "GPU": 1.0}, gpus_per_worker=2)


def test_a_bad_output_location_or_resume_directory_fails_before_torch_is_imported(tmp_path):
    # torch takes seconds to import; these mistakes are reported without it
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = (
        "import sys\n"
        "from fedsim.cli import main\n"
        f"codes = [main(['run', '--out', {str(afile)!r}]), main(['run', '--resume', {str(tmp_path)!r}])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split("\n")[0] == "[2, 2] False", r.stdout + r.stderr
    assert "exists and is not a directory" in r.stderr and "not a fedsim run directory" in r.stderr


def _interrupt_after(monkeypatch, n_rounds: int) -> None:
    """Make api.execute raise KeyboardInterrupt (as Ctrl-C does) once n_rounds round events passed."""
    from fedsim.engine import api

    real = api.execute

    def execute(*a, **k):
        seen = 0
        for e in real(*a, **k):
            if e["kind"] == "round" or (n_rounds == 0 and e["kind"] == "start"):
                if seen == n_rounds:
                    raise KeyboardInterrupt
                seen += 1
            yield e

    monkeypatch.setattr(api, "execute", execute)


def test_ctrl_c_before_the_first_round_removes_the_run_directory_and_says_so(tmp_path, monkeypatch, capsys):
    from fedsim.cli import main

    _interrupt_after(monkeypatch, 0)  # config.yaml and the "running" runs row are already written
    assert main(["run", *TINY, "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "before any round completed; removed" in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_a_round_keeps_the_directory_names_resume_and_resume_finishes(
    tmp_path, monkeypatch, capsys
):
    from fedsim.cli import main
    from fedsim.engine import api

    real = api.execute
    _interrupt_after(monkeypatch, 1)
    assert main(["run", *TINY, "--out", str(tmp_path)]) == 130
    run_dir = only_dir(tmp_path)
    assert f"'fedsim run --resume {run_dir}'" in capsys.readouterr().err
    monkeypatch.setattr(api, "execute", real)
    assert main(["run", "--no-progress", "--resume", str(run_dir)]) == 0
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert sorted(zip(rounds.run_id, rounds["round"])) == [("fedavg", 0), ("fedavg", 1), ("fedprox", 0)]


def test_resume_of_a_directory_stopped_before_its_first_round_says_there_is_nothing_to_resume(tmp_path):
    from fedsim.engine import api
    from fedsim.errors import FedsimError

    (tmp_path / "config.yaml").write_text("name: digits\n")
    with pytest.raises(FedsimError, match="no completed round"):
        api.open_for_resume(str(tmp_path), None, [])


def test_resume_when_every_run_ended_says_so_and_starts_nothing(tmp_path, monkeypatch, capsys):
    from fedsim.cli import main
    from fedsim.engine import api

    assert main(["run", *TINY, "--out", str(tmp_path)]) == 0
    run_dir = only_dir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    capsys.readouterr()

    def boom(*a, **k):
        raise AssertionError("nothing should be loaded or started")

    monkeypatch.setattr(api, "prepare", boom)
    monkeypatch.setattr(api, "start_ray", boom)
    assert main(["run", "--resume", str(run_dir)]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "nothing to resume" in err[0]
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}


def test_resume_of_a_dry_run_directory_says_dry_runs_cannot_be_resumed(tmp_path, capsys):
    from fedsim.cli import main

    assert main(["run", "--dry-run", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(only_dir(tmp_path))]) == 2
    assert "dry-run projection" in capsys.readouterr().err


def test_dry_run_checks_the_output_location_before_printing_the_projection(tmp_path, capsys):
    from fedsim.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "--dry-run", "--out", str(afile)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "exists and is not a directory" in cap.err
    assert afile.read_text() == "x"


@pytest.mark.parametrize(
    "argv,hint",
    [
        ([], "'fedsim --help'"),
        (["bogus"], "'fedsim --help'"),
        (["run", "--bogus"], "'fedsim run --help'"),
        (["run", "a", "b"], "'fedsim run --help'"),
        (["report", "a", "--bogus"], "'fedsim report --help'"),
    ],
)
def test_usage_errors_name_the_help_of_the_command_given(argv, hint, capsys):
    from fedsim.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].endswith(f"; see {hint}"), err


def test_submit_finds_a_relative_config_inside_the_working_directory(tmp_path, monkeypatch):
    from fedsim.errors import FedsimError
    from fedsim.submit import build_submission

    monkeypatch.chdir(tmp_path)  # jobs/digits.yaml is not here, but under --working-dir
    sub = build_submission("jobs/digits.yaml", working_dir=str(ROOT))
    assert sub.entrypoint == "fedsim run jobs/digits.yaml --no-progress" and sub.experiment == "digits"
    with pytest.raises(
        FedsimError,
        match=f"neither in the current directory '{tmp_path}' nor in the working directory '{ROOT}'",
    ):
        build_submission("jobs/missing.yaml", working_dir=str(ROOT))
