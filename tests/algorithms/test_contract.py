"""The contract every registered algorithm meets, checked for each one by registering alone.

In the style of optax's test over all its optimisers: every class in
:data:`fedsim.algorithms.ALGORITHMS` runs its short run (its ``quick`` keys: 3 rounds or its
shortest schedule) on 3 digits clients (every one in every round: FedMA matches them all), and must

* write the fixed schema with finite metrics and non-decreasing cumulative bytes;
* be deterministic: a second run gives the same tables;
* give the same tables on the Ray backend (2 workers) as on the sequential one;
* resume from a checkpoint taken after its round 1 to the uninterrupted tables;
* log per round exactly the bytes the dry run projects from the config alone (an algorithm that
  declares itself not projectable is exempt, and says why);
* import nothing from the engine (the algorithms are a layer below it).

The experiments run once per module (all algorithms of one model in one experiment); each test
then checks one algorithm, so a failure names it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedsim import config, dryrun
from fedsim.algorithms import ALGORITHMS
from fedsim.engine import api
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.io.runlog import CLIENTS_SCHEMA, ROUNDS_SCHEMA, RUNS_SCHEMA
from tests.helpers import WIDTHS, tables

NAMES = sorted(ALGORITHMS)


def experiment(suffix: str, backend: str = "sequential") -> config.ExperimentConfig:
    """Every registered algorithm whose ``model_suffix`` is ``suffix``, as runs of one experiment."""
    runs = [
        {"algorithm": n, "local_epochs": 1, "batch_size": 32, **ALGORITHMS[n].quick}
        for n in NAMES
        if ALGORITHMS[n].model_suffix == suffix
    ]
    return config.parse(
        {
            "name": "contract",
            "seed": 5,
            "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 3},
            "model": {"name": "digits_cnn" + suffix, "widths": WIDTHS},
            "engine": {"backend": backend, "clients_per_round": 3, "num_workers": 2},
            "runs": runs,
        }
    )


def of(logged: dict[str, pd.DataFrame], name: str) -> dict[str, pd.DataFrame]:
    """The rows of run ``name`` (runs are named after their algorithm)."""
    return {t: df[df["run_id"] == name].reset_index(drop=True) for t, df in logged.items()}


def assert_same(a: dict, b: dict, name: str, drop: tuple[str, ...] = ()) -> None:
    for t in a:
        x, y = of(a, name)[t], of(b, name)[t]
        cols = [c for c in x.columns if c not in drop]
        pd.testing.assert_frame_equal(x[cols], y[cols], obj=f"{name}: {t}.parquet")


def sequential(cfg, run_dir, resume: bool = False, stop_after: tuple[str, int] | None = None) -> None:
    """Run ``cfg`` on the sequential backend; with ``stop_after=(run, r)``, stop once run's round
    ``r`` is logged (its checkpoint is then on disk)."""
    ds = api.prepare(cfg)
    events = run_experiment(cfg, ds, str(run_dir), SequentialBackend(cfg, ds), resume=resume)
    for e in events:
        if stop_after and e["kind"] == "round" and (e["run_id"], e["round"]) == stop_after:
            events.close()
            return


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local) -> dict[str, dict[str, dict[str, pd.DataFrame]]]:
    """Tables of every algorithm: "first" and "again" (sequential, twice), "ray", and "resumed"
    (interrupted after round 1 of every run in turn, then resumed each time); "dirs": the
    directory of a sequential run."""
    out: dict[str, dict] = {"first": {}, "again": {}, "ray": {}, "resumed": {}, "dirs": {}}
    for suffix in sorted({cls.model_suffix for cls in ALGORITHMS.values()}):
        cfg = experiment(suffix)
        for key in ("first", "again"):
            d = tmp_path_factory.mktemp(key)
            sequential(cfg, d)
            out[key][suffix] = tables(d)
        out["dirs"][suffix] = d
        ray_cfg = experiment(suffix, backend="ray")
        d = tmp_path_factory.mktemp("ray")
        list(api.execute(ray_cfg, api.prepare(ray_cfg), d))
        out["ray"][suffix] = tables(d)
        d = tmp_path_factory.mktemp("resumed")
        first = True
        for run in cfg.runs:
            sequential(cfg, d, resume=not first, stop_after=(run.label, 1))
            first = False
        sequential(cfg, d, resume=True)
        out["resumed"][suffix] = tables(d)
    return {k: {n: v[ALGORITHMS[n].model_suffix] for n in NAMES} for k, v in out.items()}


def test_the_contract_covers_every_registered_algorithm(runs):
    for key, by_name in runs.items():
        assert set(by_name) == set(ALGORITHMS), key
        if key == "dirs":
            continue
        for name, t in by_name.items():
            assert name in set(t["runs"]["run_id"]), (key, name)


@pytest.mark.parametrize("name", NAMES)
def test_finishes_with_finite_metrics_in_the_fixed_schema(runs, name):
    t = of(runs["first"][name], name)
    assert (t["runs"]["status"] == "finished").all(), t["runs"]["message"].tolist()
    r = t["rounds"]
    assert len(r) >= 1
    last = r[r["test_accuracy"].notna()].iloc[-1]
    assert np.isfinite(last["test_accuracy"]) and np.isfinite(last["test_loss"]) and last["flops"] > 0
    assert (r["bytes_up"] >= 0).all() and (r["cum_bytes"].diff().fillna(0) >= 0).all()
    run_dir = runs["dirs"][name]
    for table, schema in (("runs", RUNS_SCHEMA), ("rounds", ROUNDS_SCHEMA), ("clients", CLIENTS_SCHEMA)):
        assert pq.read_schema(run_dir / f"{table}.parquet").names == schema.names, table


@pytest.mark.parametrize("name", NAMES)
def test_two_runs_give_the_same_tables(runs, name):
    assert_same(runs["first"][name], runs["again"][name], name)


@pytest.mark.parametrize("name", NAMES)
def test_ray_backend_gives_the_sequential_tables(runs, name):
    assert_same(runs["first"][name], runs["ray"][name], name, drop=("config_json",))


@pytest.mark.parametrize("name", NAMES)
def test_resuming_after_round_1_gives_the_uninterrupted_tables(runs, name):
    assert_same(runs["first"][name], runs["resumed"][name], name)


@pytest.mark.parametrize("name", NAMES)
def test_logged_bytes_equal_the_dry_runs_projection(runs, name):
    cls = ALGORITHMS[name]
    if cls.not_projectable:
        pytest.skip(f"{name}: {cls.not_projectable}")
    cfg = experiment(cls.model_suffix)
    _, projected = dryrun.project_experiment(cfg)
    (proj,) = [p for p in projected if p.run_id == name]
    rounds = of(runs["first"][name], name)["rounds"]
    want = pd.DataFrame(
        [(r.round, r.phase, r.bytes_up, r.bytes_down, r.flops) for r in proj.rounds],
        columns=["round", "phase", "bytes_up", "bytes_down", "flops"],
    )
    got = rounds[want.columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False, obj=f"{name}: rounds vs dry run")


def test_the_algorithms_import_nothing_from_the_engine():
    code = (
        "import sys, fedsim.algorithms; "
        "bad = sorted(m for m in sys.modules if m.startswith('fedsim.engine')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"fedsim.algorithms imports {done.stdout.strip()}"


@pytest.mark.parametrize("name", [n for n in NAMES if ALGORITHMS[n].full_network])
def test_clients_table_reports_one_local_step_per_minibatch(runs, name):
    c = of(runs["first"][name], name)["clients"]
    batches = -(-c["n_examples"] // 32)  # ceil: the last, smaller batch is a step too
    assert len(c) and (c["local_steps"] == batches).all()  # one local epoch (experiment())


def test_the_loops_round_row_has_the_rounds_tables_columns_in_order():
    from dataclasses import fields

    from fedsim.engine.loop import RoundRow

    assert [f.name for f in fields(RoundRow)] == ROUNDS_SCHEMA.names
