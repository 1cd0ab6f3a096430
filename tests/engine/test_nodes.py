"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head and two nodes of 1 CPU,
each with its own raylet and object store), and one of them lost mid-run with every process on
it. Slow (a minute on 2 cores): deselected by default, run with ``pytest -m slow``. The fast
stand-in for the same fault is
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
ROUNDS = 12
LOST_AFTER = 3  # the node goes once round 3's event arrives (a later round is in flight)

EXPERIMENT = {
    "name": "nodes",
    "seed": 1,
    "data": {"dataset": "digits", "partition": "iid", "num_clients": 30},
    "model": {"name": "digits_cnn", "widths": WIDTHS},
    "engine": {"backend": "ray", "clients_per_round": 10, "num_workers": 3},
    "runs": [{"algorithm": "fedavg", "rounds": ROUNDS, "local_epochs": 2, "lr": 0.05, "batch_size": 10}],
}

SCRIPT = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from fedsim import config
from fedsim.engine import api

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 << 20})
nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 << 20) for _ in range(2)]
cluster.connect()
cfg = config.parse(json.loads(sys.argv[1]))
run_dir = api.new_run_dir(sys.argv[2], cfg.name)
lost = None
for e in api.execute(cfg, api.prepare(cfg), run_dir):
    if e["kind"] == "round" and e["round"] == int(sys.argv[3]):
        lost = nodes[0].node_id
        cluster.remove_node(nodes[0], allow_graceful=False)  # its raylet and every process on it
print("RESULT", json.dumps({"run_dir": str(run_dir), "lost": lost}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_a_node_lost_mid_run_loses_no_round_and_gives_the_uninterrupted_tables(tmp_path):
    with tempfile.TemporaryDirectory(prefix="fs31n-", dir="/tmp") as ray_tmp:  # Ray's sockets: short path
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(ROOT))  # Cluster records itself there
        r = subprocess.run(
            [sys.executable, "-c", SCRIPT, json.dumps(EXPERIMENT), str(tmp_path / "runs"), str(LOST_AFTER)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]  # Ray prints too
    out = json.loads(line.removeprefix("RESULT "))
    assert out["lost"]  # the node was removed (its workers' clients are retried, below)
    lost = tables(Path(out["run_dir"]))

    cfg = config.parse(EXPERIMENT)
    run_all(cfg, api.prepare(cfg), tmp_path / "clean")  # the sequential backend: same results
    clean = tables(tmp_path / "clean")
    assert lost["rounds"]["round"].tolist() == list(range(ROUNDS))  # none lost, none twice
    for name in ("runs", "rounds"):
        pd.testing.assert_frame_equal(lost[name], clean[name], check_dtype=False, obj=name)
    pd.testing.assert_frame_equal(
        lost["clients"].drop(columns="attempt"), clean["clients"].drop(columns="attempt"), check_dtype=False
    )
    retried = lost["clients"][lost["clients"].attempt > 0]
    assert len(retried) > 0 and retried["round"].min() > LOST_AFTER  # retried on a surviving worker
