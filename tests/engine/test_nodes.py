"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head and more nodes, each
with its own raylet and object store, started in a subprocess with its own Ray temp directory):
the workers spread over the nodes, a node lost mid-run with every process on it, a node added
mid-run, the node holding the driver lost, and a sweep losing a node. Every run's tables must
equal the sequential backend's (which equals a single-node Ray run's:
``tests/engine/test_engine.py::test_ray_backend_equals_sequential_backend``), apart from the
``worker`` and ``attempt`` columns.

The placement test runs by default (27 s on 2 cores shared with other jobs at load average 4,
48 s at 10); the others are slow (deselected by default, run with ``pytest -m slow``; 3 minutes
together at load average 4, 4 at 10).
The fast stand-in for a lost node is
``tests/engine/test_faults.py::test_a_replacement_that_cannot_be_placed_never_holds_up_a_round``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from fedsim import config
from fedsim.engine import api
from tests.helpers import WIDTHS, run_all, tables

ROOT = Path(__file__).resolve().parents[2]


def experiment(rounds: int, epochs: int = 1, num_workers: int | str = 3) -> dict:
    """FedAvg on digits, 30 clients, 10 a round, over ``num_workers`` workers of 1 CPU."""
    return {
        "name": "nodes",
        "seed": 1,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 30},
        "model": {"name": "digits_cnn", "widths": WIDTHS},
        "engine": {"backend": "ray", "clients_per_round": 10, "num_workers": num_workers},
        "runs": [
            {"algorithm": "fedavg", "rounds": rounds, "local_epochs": epochs, "lr": 0.05, "batch_size": 10}
        ],
    }


# Runs an experiment on a local multi-node cluster. argv[1] is a JSON plan: "head" and "nodes"
# (CPUs of the head and of each other node), "experiment", "out" (the runs directory), and
# optionally "at_round" (a round, after its event arrives, or "pool": once the pool's workers are
# started, before the run's first round) with "action": "remove" (node 1 lost, its raylet and
# every process on it), "add" (a node of 1 CPU added, as an autoscaler would) or "lose_driver"
# (the node running the driver lost, with this process, which runs on it: exit 137). Prints one
# RESULT line.
SCRIPT = """
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from fedsim import config
from fedsim.engine import api, pool

plan = json.loads(sys.argv[1])
store = 80 << 20
lean = {"object_store_memory": store, "include_log_monitor": False}  # fewer processes: a faster start
cluster = Cluster(
    initialize_head=True, head_node_args={"num_cpus": plan["head"], "include_dashboard": False, **lean}
)
nodes = [cluster.add_node(num_cpus=n, **lean) for n in plan["nodes"]]
os.environ["RAY_ADDRESS"] = cluster.address  # never another cluster of this machine
cluster.connect()
cfg = config.parse(plan["experiment"])
run_dir = api.new_run_dir(plan["out"], cfg.name)
out = {"run_dir": str(run_dir), "driver": ray.get_runtime_context().get_node_id()}


def act():
    if plan["action"] == "remove":
        out["lost"] = nodes[0].node_id
        cluster.remove_node(nodes[0], allow_graceful=False)
    elif plan["action"] == "add":
        out["added"] = cluster.add_node(num_cpus=1, **lean).node_id
    elif plan["action"] == "lose_driver":
        print("RESULT", json.dumps(out), flush=True)
        lost = [n for n in cluster.list_all_nodes() if n.node_id == out["driver"]]
        rest = [n for n in cluster.list_all_nodes() if n.node_id != out["driver"]]
        for n in lost + rest:  # the driver's node; then the rest of this test's cluster
            n.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        os._exit(137)  # this process was on the lost node


started = []
start_workers = pool.start_workers


def start_then_act(*args):  # the pool's workers, kept to ask where they run
    started.extend(start_workers(*args))
    if plan.get("at_round") == "pool":
        act()
    return started


pool.start_workers = start_then_act
for e in api.execute(cfg, api.prepare(cfg), run_dir):
    if e["kind"] != "round":
        continue
    if "worker_nodes" not in out:
        out["worker_nodes"] = ray.get([w.node_id.remote() for w in started])
    if e["round"] == plan.get("at_round"):
        act()
print("RESULT", json.dumps(out), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def on_cluster(
    plan: dict, ray_tmp: str, expect_rc: int = 0, script: str = SCRIPT, timeout: int = 600
) -> dict:
    """Run ``script`` (:data:`SCRIPT`, or :data:`SWEEP_SCRIPT`) with ``plan`` in a subprocess
    whose Ray files go under ``ray_tmp``; its RESULT mapping."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(ROOT))  # Cluster records itself there
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(plan)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == expect_rc, r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]  # Ray prints too
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture
def ray_tmp():
    """A private Ray temp directory for a test's cluster (a short path: Ray's sockets live there)."""
    with tempfile.TemporaryDirectory(prefix="fs31n-", dir="/tmp") as d:
        yield d


def sequential_tables(raw: dict, out: Path) -> dict[str, pd.DataFrame]:
    """The tables of ``raw`` run on the sequential backend."""
    cfg = config.parse({**raw, "engine": {**raw["engine"], "backend": "sequential"}})
    run_all(cfg, api.prepare(cfg), out)
    return tables(out)


def assert_same_tables(got: dict, want: dict) -> None:
    """The runs, rounds and clients tables agree, apart from ``worker`` (dropped by
    :func:`tests.helpers.tables`) and ``attempt``."""
    assert got["rounds"]["round"].tolist() == want["rounds"]["round"].tolist()  # none lost, none twice
    for name in ("runs", "rounds", "clients"):
        a, b = (t[name].drop(columns=["attempt", "config_json"], errors="ignore") for t in (got, want))
        pd.testing.assert_frame_equal(a, b, check_dtype=False, obj=name)


def test_workers_spread_over_the_nodes_and_the_tables_equal_a_single_node_run(tmp_path, ray_tmp):
    # Three nodes of 3 CPUs: Ray's default policy would put two workers on the head (the local
    # node takes work until half its CPUs are in use); SPREAD puts one on each.
    raw = experiment(rounds=3)
    out = on_cluster({"head": 3, "nodes": [3, 3], "experiment": raw, "out": str(tmp_path / "runs")}, ray_tmp)
    assert len(set(out["worker_nodes"])) == 3, out
    assert_same_tables(tables(Path(out["run_dir"])), sequential_tables(raw, tmp_path / "seq"))


LOST_AFTER = 3  # the node goes once round 3's event arrives (a later round is in flight)


@pytest.mark.slow
def test_a_node_lost_mid_run_loses_no_round_and_gives_the_uninterrupted_tables(tmp_path, ray_tmp):
    # A head and two nodes of 1 CPU, a worker on each. Enough rounds that the run is still going
    # when the node is gone: the driver streams events ahead of this process, and on a quiet
    # machine 12 rounds ended before the removal took effect (nothing was left to retry).
    raw = experiment(rounds=60, epochs=2)
    plan = {"head": 1, "nodes": [1, 1], "experiment": raw, "out": str(tmp_path / "runs")}
    out = on_cluster({**plan, "at_round": LOST_AFTER, "action": "remove"}, ray_tmp)
    assert out["lost"] in out["worker_nodes"]  # the node was removed with a worker on it
    lost = tables(Path(out["run_dir"]))
    assert_same_tables(lost, sequential_tables(raw, tmp_path / "seq"))
    retried = lost["clients"][lost["clients"].attempt > 0]
    assert len(retried) > 0 and retried["round"].min() > LOST_AFTER  # retried on a surviving worker


@pytest.mark.slow
def test_a_node_added_mid_run_grows_an_auto_pool_and_changes_no_result(tmp_path, ray_tmp):
    # A head and a node of 1 CPU: 2 workers; a node of 1 CPU added once they are started.
    # Rounds of a few tens of milliseconds, enough of them for the node to register and a third
    # worker to start (seconds) long before the end (it joined at round 96 of 300 here).
    raw = experiment(rounds=300, num_workers="auto")
    raw["engine"].update(eval_every=50, checkpoint_every=50)
    plan = {"head": 1, "nodes": [1], "experiment": raw, "out": str(tmp_path / "runs")}
    out = on_cluster({**plan, "at_round": "pool", "action": "add"}, ray_tmp)
    assert len(out["worker_nodes"]) == 2 and out["added"]
    workers = pd.read_parquet(Path(out["run_dir"]) / "clients.parquet").groupby("round")["worker"].unique()
    assert set(workers.iloc[0]) == {"worker-0", "worker-1"}
    assert "worker-2" in set(workers.iloc[-1])  # a third worker: it needs the added node's CPU
    assert_same_tables(tables(Path(out["run_dir"])), sequential_tables(raw, tmp_path / "seq"))


@pytest.mark.slow
def test_the_driver_node_lost_then_fedsim_run_resume_gives_the_uninterrupted_tables(tmp_path, ray_tmp):
    raw = experiment(rounds=8, num_workers="auto")  # 3 workers here, 2 on the resuming machine
    raw["engine"]["checkpoint_every"] = 2
    plan = {"head": 1, "nodes": [1, 1], "experiment": raw, "out": str(tmp_path / "runs")}
    out = on_cluster({**plan, "at_round": 4, "action": "lose_driver"}, ray_tmp, expect_rc=137)
    run_dir = Path(out["run_dir"])
    assert pd.read_parquet(run_dir / "rounds.parquet")["round"].max() < 7  # it stopped mid-run
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(ROOT))  # a new local Ray, on another machine
    r = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "--resume", str(run_dir), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_tables(tables(run_dir), sequential_tables(raw, tmp_path / "seq"))


# Runs `fedsim sweep` (the CLI, in a subprocess) on a local cluster of a head and two nodes of 1
# CPU: argv[1] is a JSON plan, "experiment", "grid" (one --grid value) and "out". Once a trial
# has written 2 rounds, a node holding a bundle of a trial's placement group is removed with its
# raylet and every process on it. Prints one RESULT line: the sweep's exit code, its stderr's tail
# and the lost node.
SWEEP_SCRIPT = """
import glob, json, os, subprocess, sys, time
import pandas as pd
import ray
import yaml
from ray.cluster_utils import Cluster

plan = json.loads(sys.argv[1])
lean = {"object_store_memory": 80 << 20, "include_log_monitor": False}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **lean})
nodes = [cluster.add_node(num_cpus=1, **lean) for _ in range(2)]
os.environ["RAY_ADDRESS"] = cluster.address  # the sweep joins this cluster
cluster.connect()
cfg_file = os.path.join(plan["out"], "sweep.yaml")
os.makedirs(plan["out"], exist_ok=True)
with open(cfg_file, "w") as f:
    yaml.safe_dump(plan["experiment"], f)
sweep = subprocess.Popen(
    [sys.executable, "-m", "fedsim.cli", "sweep", cfg_file, "--grid", plan["grid"], "--out", plan["out"],
     "--no-progress"],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
)
out = {"lost": None}
deadline = time.monotonic() + 300
while out["lost"] is None and sweep.poll() is None and time.monotonic() < deadline:
    written = 0
    for f in glob.glob(os.path.join(plan["out"], "*", "trial-*", "rounds.parquet")):
        try:
            written = max(written, len(pd.read_parquet(f)))
        except Exception:  # replaced atomically, but may vanish between two looks
            pass
    if written >= 2:
        used = {n for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"
                for n in g["bundles_to_node_id"].values()}
        lost = next((n for n in nodes if n.node_id in used), None)
        if lost is not None:
            out["lost"] = lost.node_id
            cluster.remove_node(lost, allow_graceful=False)
    time.sleep(0.05)
stdout, stderr = sweep.communicate(timeout=600)
out.update(rc=sweep.returncode, stderr=stderr[-3000:], stdout=stdout[-3000:])
print("RESULT", json.dumps(out), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_a_sweep_whose_trials_span_the_nodes_survives_a_node_lost(tmp_path, ray_tmp):
    raw = experiment(rounds=12, epochs=2, num_workers=1)  # trials of one worker: two at a time,
    # on two of the three nodes of 1 CPU
    plan = {"experiment": raw, "grid": "runs.0.lr=0.05,0.1", "out": str(tmp_path / "out")}
    out = on_cluster(plan, ray_tmp, script=SWEEP_SCRIPT, timeout=900)
    assert out["lost"], out
    assert out["rc"] == 0, out["stderr"]
    # A trial's trainable (and its driver) runs in bundle 0 of its placement group, the first
    # worker bundle (its driver bundle is empty; ray/air/execution/resources/request.py), so the
    # lost node took a trial's process with its worker: Ray Tune started that trial again.
    assert "process died; starting it again from its checkpoints" in out["stderr"], out["stderr"]
    (sweep_dir,) = (tmp_path / "out").glob("*-sweep-*")
    index = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert index["status"].tolist() == ["finished", "finished"], index["message"].tolist()
    for trial, lr in zip(index["experiment_dir"], (0.05, 0.1)):
        want = experiment(rounds=12, epochs=2, num_workers=1)
        want["runs"][0]["lr"] = lr
        assert_same_tables(tables(sweep_dir / trial), sequential_tables(want, tmp_path / f"seq-{lr}"))
