"""Ray Jobs: every file in jobs/ parses strictly and builds a submission; a real local Ray head
(token auth on) running `fedsim submit`; ray_cluster.yaml.

The ``cluster`` tests start their own Ray head with ``ray start --head --block`` in a subprocess
(token authentication on, every port chosen free, its own temp dir and token file), so they never
touch the session's ``ray_local`` instance, the default /tmp/ray, or ~/.ray. The head is stopped
by signalling the process this file started (and then any of its descendants still alive), never
with ``ray stop``, which would stop every Ray instance on the machine. Nothing here calls
``ray.init``; all Ray clients run in subprocesses.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from fedsim import config
from fedsim.engine.api import completed_rounds
from fedsim.engine.pool import pool_size
from fedsim.errors import FedsimError
from fedsim.submit import EXCLUDES, build_submission, connect
from tests.helpers import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
TINY = [
    "--set",
    "runs=[{algorithm: fedavg, rounds: 2, local_epochs: 2, lr: 0.05, batch_size: 16}, {algorithm: fedprox, rounds: 1, local_epochs: 2, lr: 0.05, batch_size: 16, mu: 0.01}]",
    "--set",
    "data.num_clients=4",
    "--set",
    "engine.clients_per_round=2",
    "--set",
    "engine.worker_resources={fedsim_worker: 0.001}",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(head: subprocess.Popen, tmp: str) -> None:
    """SIGTERM the `ray start --block` process (it stops the processes it started), then kill any
    of its descendants, or any process naming our temp dir, that outlived it."""
    try:
        procs = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(tmp in a for a in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                procs.append(p)
        except psutil.Error:
            pass
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 with the job server, token auth on and 2 CPUs.

    Yields a dict: ``address`` (job server URL) and ``env`` (what a client needs: RAY_AUTH_MODE=token
    and RAY_AUTH_TOKEN_PATH of this head's token; PATH with this venv first).
    """
    tmp = tempfile.mkdtemp(prefix="fsjob", dir="/tmp")  # short: Ray's socket paths live under it
    token = Path(tmp, "auth_token")
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--resources",
        json.dumps({"fedsim_worker": 1}),
        "--temp-dir",
        tmp,
        "--disable-usage-stats",
    ]
    for flag, port in ports.items():
        cmd += [f"--{flag}", str(port)]
    log = open(Path(tmp, "head.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the job server is up once it answers, even 401 without a token
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head failed:\n{Path(tmp, 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"address": address, "env": env, "tmp": tmp}
    finally:
        _stop(head, tmp)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _fedsim(*args: str, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ray_state(address: str, env: dict[str, str], job_id: str) -> dict:
    """The job's driver and its ClientWorker actors' resource requests, from the cluster's state API."""
    script = f"""
import json
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors
info = JobSubmissionClient({address!r}).get_job_info({job_id!r})
driver = info.driver_info.id if info.driver_info else None
actors = [a for a in list_actors(address={address!r}, detail=True, limit=1000)
          if a.class_name.endswith("ClientWorker") and a.job_id == driver]
print(json.dumps({{"driver": driver, "resources": [a.required_resources for a in actors]}}))
"""
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.cluster
def test_submit_runs_the_digits_job_on_a_token_auth_cluster_and_writes_parquet(ray_head, tmp_path):
    out = tmp_path / "out"
    r = _fedsim(
        "submit",
        "jobs/digits.yaml",
        "--address",
        ray_head["address"],
        *TINY,
        "--out",
        str(out),
        env=ray_head["env"],
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert re.search(r"job \S+ SUCCEEDED", r.stderr), r.stderr
    run_dir = Path(re.findall(r"^results: (.+)$", r.stdout, re.MULTILINE)[-1])
    assert run_dir.parent == out
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert rounds.groupby("run_id")["round"].max().to_dict() == {"fedavg": 1, "fedprox": 0}
    assert pd.read_parquet(run_dir / "runs.parquet")["status"].tolist() == ["finished", "finished"]
    clients = pd.read_parquet(run_dir / "clients.parquet")
    assert (clients.groupby(["run_id", "round"]).size() == 2).all()
    # `fedsim run` inside the job joined this cluster (RAY_ADDRESS): the job has a Ray driver, and
    # that driver's ClientWorker actors asked for engine.worker_resources.
    job_id = re.search(r"submitted job (\S+)", r.stderr).group(1)
    state = _ray_state(ray_head["address"], ray_head["env"], job_id)
    assert state["driver"]
    assert state["resources"] and all(
        res.get("fedsim_worker") == pytest.approx(0.001) for res in state["resources"]
    )


@pytest.mark.cluster
def test_a_job_that_fails_on_the_cluster_exits_1_and_shows_its_error(ray_head, tmp_path):
    # Valid config, so it passes the local check; the cluster's node lacks the files -> exit 2 there.
    r = _fedsim(
        "submit",
        "jobs/digits.yaml",
        "--address",
        ray_head["address"],
        "--set",
        "data.dataset=mnist",
        "--set",
        "data.data_dir=/nonexistent/fedsim-data",
        "--out",
        str(tmp_path / "out"),
        env=ray_head["env"],
        timeout=120,
    )
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert re.search(r"job \S+ FAILED", r.stderr) and "exit code 2" in r.stderr
    assert "fedsim: error: data.data_dir /nonexistent/fedsim-data does not exist" in r.stdout  # the job's log
    assert not re.search(r"^results:", r.stdout, re.MULTILINE) and not (tmp_path / "out").exists()


@pytest.mark.cluster
def test_missing_token_is_one_line_naming_ray_auth_mode(ray_head, tmp_path):
    env = {k: v for k, v in ray_head["env"].items() if not k.startswith("RAY_AUTH")}
    r = _fedsim(
        "submit",
        "jobs/digits.yaml",
        "--address",
        ray_head["address"],
        "--out",
        str(tmp_path),
        env=env,
        timeout=120,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsim: error:"), r.stderr
    assert "RAY_AUTH_MODE=token" in lines[0] and ray_head["address"] in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.cluster
def test_ray_job_stop_marks_the_run_interrupted_and_its_log_names_the_resume_command(ray_head, tmp_path):
    out = tmp_path / "out"
    long = [
        a
        if a != TINY[1]
        else "runs=[{algorithm: fedavg, rounds: 300, local_epochs: 2, lr: 0.05, batch_size: 16}]"
        for a in TINY
    ]
    r = _fedsim(
        "submit",
        "jobs/digits.yaml",
        "--address",
        ray_head["address"],
        *long,
        "--out",
        str(out),
        "--no-follow",
        env=ray_head["env"],
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    job_id = re.search(r"submitted job (\S+)", r.stderr).group(1)
    deadline = time.monotonic() + 300
    while not any(completed_rounds(d) for d in out.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    (run_dir,) = out.iterdir()
    ray = [str(BIN / "ray"), "job"]
    stop = subprocess.run(
        [*ray, "stop", job_id, "--address", ray_head["address"]],
        env=ray_head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stderr
    logs = subprocess.run(
        [*ray, "logs", job_id, "--address", ray_head["address"]],
        env=ray_head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    resume = f"fedsim run --resume {run_dir}"
    assert f"fedsim: stopped by SIGTERM; completed rounds are in {run_dir}; continue with '{resume}'" in logs
    runs = pd.read_parquet(run_dir / "runs.parquet")
    assert runs[["status", "message"]].values.tolist() == [
        ["interrupted", f"stopped by SIGTERM; continue with '{resume}'"]
    ]
    assert 1 <= len(pd.read_parquet(run_dir / "rounds.parquet")) < 300


def test_unreachable_address_names_the_address_and_the_fix():
    address = f"http://127.0.0.1:{_free_ports(1)[0]}"
    with pytest.raises(FedsimError) as err:
        connect(address)
    text = str(err.value)
    assert address in text and "--address" in text and "\n" not in text


def test_submission_ships_the_project_and_runs_fedsim_run_with_the_overrides():
    sub = build_submission(
        str(ROOT / "jobs" / "digits.yaml"),
        overrides=["runs.0.rounds=2"],
        out="s3://bucket/runs?region=us-west-2",
        working_dir=str(ROOT),
    )
    assert sub.entrypoint == (
        "fedsim run jobs/digits.yaml --set runs.0.rounds=2 "
        "--out 's3://bucket/runs?region=us-west-2' --no-progress"
    )
    assert sub.runtime_env == {"working_dir": str(ROOT), "excludes": EXCLUDES}
    assert {"/.venv", "/.git", "/runs"} <= set(EXCLUDES) and sub.note is None
    pip = build_submission(str(ROOT / "jobs" / "digits.yaml"), pip=["pydantic>=2.6"], working_dir=str(ROOT))
    assert pip.entrypoint.startswith("python -m fedsim.cli run jobs/digits.yaml")
    assert pip.runtime_env["pip"] == ["pydantic>=2.6"]
    assert "relative" in pip.note  # output_dir: runs would stay in the job's scratch directory


def test_excludes_keep_the_package_and_jobs_and_drop_large_dirs():
    from ray._private.runtime_env.packaging import PathSpec  # the matcher Ray applies to excludes

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    for kept in ("fedsim/data/__init__.py", "fedsim/io/runlog.py", "jobs/digits.yaml", "pyproject.toml"):
        assert not spec.match_file(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/rounds.parquet",
        "data/MNIST/raw/a",
        "fedsim/__pycache__/cli.cpython-311.pyc",
        "fedsim_ray.egg-info/PKG-INFO",
    ):
        assert spec.match_file(dropped), dropped


JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_file_is_a_valid_experiment(path):  # parses strictly: unknown keys or values fail here
    cfg = config.load(path)
    assert cfg.runs and all(r.label for r in cfg.runs)


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_every_job_file_builds_a_submission_unchanged(job):
    sub = build_submission(str(ROOT / "jobs" / job), working_dir=str(ROOT))
    assert sub.entrypoint == f"fedsim run jobs/{job} --no-progress"


def test_config_outside_the_working_directory_is_bad_input(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump(tiny_experiment()))
    with pytest.raises(FedsimError, match="outside the working directory"):
        build_submission(str(cfg), working_dir=str(ROOT))


def test_worker_resources_cap_the_pool_and_reject_cpu_and_gpu():
    cfg = config.parse(
        tiny_experiment(engine={"clients_per_round": 3, "worker_resources": {"fedsim_worker": 0.5}})
    )
    assert pool_size(cfg, {"CPU": 16.0, "fedsim_worker": 1.0}) == 2  # 1 / 0.5 workers fit
    assert pool_size(cfg, {"CPU": 16.0, "fedsim_worker": 4.0}) == 3  # capped by the cohort
    for bad in ({"GPU": 0.5}, {"fedsim_worker": 0}):
        with pytest.raises(FedsimError, match="worker_resources"):
            config.parse(tiny_experiment(engine={"clients_per_round": 3, "worker_resources": bad}))


# ---- ray_cluster.yaml -------------------------------------------------------------------------


def _cluster_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before talking to the cloud
    validate_config(prepared)  # Ray's ray-schema.json plus the launcher's own checks
    return prepared


def test_ray_cluster_yaml_passes_rays_cluster_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster_config()
    assert cfg["provider"]["type"] == "aws"
    broken = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo the schema must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_ray_cluster_yaml_puts_client_workers_on_gpu_nodes_with_token_auth():
    cfg = _cluster_config()
    types = cfg["available_node_types"]
    head, workers = types[cfg["head_node_type"]], [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    assert workers and all(
        w["resources"].get("GPU", 0) >= 1 and w["resources"].get("fedsim_worker", 0) > 0 for w in workers
    )
    assert any(w["node_config"].get("InstanceType") == "p3.2xlarge" for w in workers)
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd
    mounts = cfg["file_mounts"]
    project = next(remote for remote, local in mounts.items() if local == ".")
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert f"pip install -e {project}" in cfg["setup_commands"]
