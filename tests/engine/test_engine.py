"""The engine: Ray == sequential, determinism, shared cohorts, exact bytes, Parquet schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedsim import config
from fedsim.engine import api
from fedsim.engine.loop import sample_cohort
from fedsim.engine.pool import pool_size
from fedsim.io.runlog import CLIENTS_SCHEMA, ROUNDS_SCHEMA, RUNS_SCHEMA
from fedsim.models import build_model
from tests.helpers import digits_cnn, tiny_experiment

TWO_RUNS = [
    {"algorithm": "fedavg", "rounds": 3, "local_epochs": 1, "lr": 0.05, "batch_size": 16},
    {"algorithm": "fedprox", "rounds": 3, "local_epochs": 1, "lr": 0.05, "batch_size": 16, "mu": 0.01},
]


def run_tables(raw, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Path]:
    cfg = config.parse(raw)
    ds = api.prepare(cfg)
    run_dir = api.new_run_dir(out, cfg.name)
    events = list(api.execute(cfg, ds, run_dir))
    assert [e["kind"] for e in events].count("end") == len(cfg.runs)
    return (
        pd.read_parquet(run_dir / "runs.parquet"),
        pd.read_parquet(run_dir / "rounds.parquet"),
        pd.read_parquet(run_dir / "clients.parquet"),
        run_dir,
    )


VOLATILE = {"wall_seconds", "seconds", "worker"}


def _stable(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if c not in VOLATILE]].reset_index(drop=True)


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    return run_tables(tiny_experiment(runs=TWO_RUNS), tmp_path_factory.mktemp("seq"))


@pytest.mark.parametrize("broadcast", ["object_store", "inline"])
def test_ray_backend_equals_sequential_backend(sequential_run, ray_local, tmp_path, monkeypatch, broadcast):
    from fedsim.engine import pool

    # The digits CNN's broadcast (153 KB) goes through the object store under a 0-byte inline
    # limit and by value with every worker's call under an unbounded one: both give the same run.
    monkeypatch.setattr(pool, "RAY_INLINE_BYTES", 0 if broadcast == "object_store" else 1 << 40)
    _, rounds_s, clients_s, _ = sequential_run
    raw = tiny_experiment(runs=TWO_RUNS, engine={"backend": "ray", "clients_per_round": 3, "num_workers": 2})
    _, rounds_r, clients_r, _ = run_tables(raw, tmp_path)
    pd.testing.assert_frame_equal(_stable(rounds_s), _stable(rounds_r))
    pd.testing.assert_frame_equal(_stable(clients_s), _stable(clients_r))
    assert set(clients_r["worker"]) <= {"worker-0", "worker-1"}


def test_two_runs_of_the_same_config_are_identical(sequential_run, tmp_path):
    _, rounds_a, clients_a, _ = sequential_run
    _, rounds_b, clients_b, _ = run_tables(tiny_experiment(runs=TWO_RUNS), tmp_path)
    pd.testing.assert_frame_equal(_stable(rounds_a), _stable(rounds_b))
    pd.testing.assert_frame_equal(_stable(clients_a), _stable(clients_b))


def test_every_algorithm_sees_the_same_cohorts(sequential_run):
    clients = sequential_run[2]
    by_run = {
        r: sorted(map(tuple, g[["round", "client_id"]].to_numpy())) for r, g in clients.groupby("run_id")
    }
    assert by_run["fedavg"] == by_run["fedprox"]
    assert len(by_run["fedavg"]) == 3 * 3


def test_cohort_is_a_pure_function_of_seed_and_round():
    a = [sample_cohort(7, r, 100, 10) for r in range(5)]
    assert a == [sample_cohort(7, r, 100, 10) for r in range(5)]
    assert all(len(set(c)) == 10 and list(c) == sorted(c) for c in a)
    assert len(set(a)) > 1 and sample_cohort(8, 0, 100, 10) != a[0]


def test_bytes_are_numel_times_element_size_per_direction(sequential_run):
    _, rounds, clients, _ = sequential_run
    model = digits_cnn()
    model_bytes = 4 * sum(p.numel() for p in model.parameters())  # float32, no buffers
    assert (clients["bytes_down"] == model_bytes).all() and (clients["bytes_up"] == model_bytes).all()
    per_round = clients.groupby(["run_id", "round"])[["bytes_up", "bytes_down"]].sum().reset_index()
    merged = rounds.merge(per_round, on=["run_id", "round"], suffixes=("", "_clients"))
    assert (merged["bytes_up"] == merged["bytes_up_clients"]).all()
    assert (merged["bytes_down"] == merged["bytes_down_clients"]).all()
    for _, g in rounds.groupby("run_id"):
        assert g["cum_bytes"].tolist() == (g["bytes_up"] + g["bytes_down"]).cumsum().tolist()
        assert (g["global_params"] == model_bytes // 4).all()


def test_parquet_files_have_the_fixed_schema_and_no_temporaries(sequential_run):
    runs, rounds, _clients, run_dir = sequential_run
    for name, schema in (("runs", RUNS_SCHEMA), ("rounds", ROUNDS_SCHEMA), ("clients", CLIENTS_SCHEMA)):
        assert pq.read_schema(run_dir / f"{name}.parquet").names == schema.names
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "clients.parquet",
        "config.yaml",
        "partition.parquet",
        "rounds.parquet",
        "runs.parquet",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["fedavg.pt", "fedprox.pt"]
    assert runs["status"].tolist() == ["finished", "finished"]
    assert rounds.groupby("run_id")["round"].apply(list).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert rounds["test_accuracy"].between(0, 1).all()
    assert config.parse(__import__("json").loads(runs["config_json"][0])).runs[0].algorithm == "fedavg"


def test_nan_weights_stop_the_run_as_diverged_and_keep_other_runs(tmp_path):
    runs_cfg = [
        {"algorithm": "fedavg", "name": "boom", "rounds": 3, "lr": 1e38, "batch_size": 16},
        {"algorithm": "fedavg", "name": "fine", "rounds": 2, "lr": 0.05, "batch_size": 16},
    ]
    runs, rounds, _, _ = run_tables(tiny_experiment(runs=runs_cfg), tmp_path)
    status = dict(zip(runs["run_id"], runs["status"]))
    assert status == {"boom": "diverged", "fine": "finished"}
    assert "NaN" in runs.set_index("run_id").loc["boom", "message"]
    assert rounds[rounds.run_id == "fine"]["round"].tolist() == [0, 1]
    # lr 1e38 makes round 0's weights Inf: that round is not written, and the message names it
    assert runs.set_index("run_id").loc["boom", "message"].startswith("round 0:")
    assert (rounds.run_id == "boom").sum() == 0


def test_nan_test_loss_marks_that_round_diverged_and_keeps_the_rounds_before(tmp_path, monkeypatch):
    # Weights and training loss stay finite; only the evaluation of round 2's global model is
    # NaN (as an overflow in the logits would make it). Evaluation overlaps the next round.
    from fedsim.algorithms.fedavg import FedAvg

    real = FedAvg.evaluate
    seen = []

    def evaluate(self, state, model, split, batch_size):
        seen.append(len(seen))
        acc, loss = real(self, state, model, split, batch_size)
        return (acc, float("nan")) if len(seen) == 3 else (acc, loss)

    monkeypatch.setattr(FedAvg, "evaluate", evaluate)
    runs_cfg = [{"algorithm": "fedavg", "name": "late-nan", "rounds": 5, "lr": 0.05, "batch_size": 16}]
    runs, rounds, clients, _ = run_tables(tiny_experiment(runs=runs_cfg), tmp_path)
    row = runs.set_index("run_id").loc["late-nan"]
    assert row["status"] == "diverged" and row["message"].startswith("round 2:")
    assert rounds["round"].tolist() == [0, 1] and sorted(clients["round"].unique()) == [0, 1]
    assert np.isfinite(rounds["test_loss"]).all()


def test_pool_size_follows_resources_and_cohort():
    cfg = config.parse(tiny_experiment(engine={"clients_per_round": 3, "cpus_per_worker": 1.0}))
    assert pool_size(cfg, {"CPU": 2.0}) == 2
    assert pool_size(cfg, {"CPU": 16.0}) == 3  # never more workers than the cohort
    gpu = config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": 6},
            engine={"clients_per_round": 6, "cpus_per_worker": 1.0, "gpus_per_worker": 0.25},
        )
    )
    assert pool_size(gpu, {"CPU": 16.0, "GPU": 1.0}) == 4  # four workers share one GPU


def test_small_broadcasts_go_inline_and_no_round_sends_more_than_rays_inline_limit():
    from fedsim.engine.backends import sends_inline
    from fedsim.engine.pool import LOCAL_INLINE_BYTES, RAY_INLINE_BYTES
    from fedsim.params import nbytes

    def broadcast_bytes(name):
        return nbytes(
            build_model(
                name, num_classes=10, input_shape=(3, 32, 32) if name == "vgg9" else (1, 8, 8)
            ).state_dict()
        )

    cnn = broadcast_bytes("digits_cnn")
    assert sends_inline(cnn, 2, LOCAL_INLINE_BYTES)  # the local Ray fedsim starts: no object store
    assert not sends_inline(cnn, 2, RAY_INLINE_BYTES)  # Ray's default limit (e.g. a cluster)
    assert not sends_inline(cnn, 64, LOCAL_INLINE_BYTES)  # many workers: one ray.put beats 64 copies
    assert not sends_inline(broadcast_bytes("vgg9"), 1, LOCAL_INLINE_BYTES)
    rng = np.random.default_rng(0)
    for _ in range(1000):  # inline never asks Ray to carry more than its limit in a round's calls
        n, w, limit = int(rng.integers(0, 1 << 23)), int(rng.integers(1, 100)), int(rng.integers(1, 1 << 23))
        if sends_inline(n, w, limit):
            assert n * w <= limit
        assert sends_inline(n, w, limit) >= sends_inline(n + 1, w, limit) >= sends_inline(n + 1, w + 1, limit)


def test_packed_uploads_round_trip_exactly_with_mixed_dtypes_and_shapes():
    from fedsim.algorithms import ClientResult
    from fedsim.engine.backends import pack_uploads, unpack_uploads

    rng = np.random.default_rng(0)
    uploads = [
        {
            "w": rng.standard_normal((3, 5)).astype(np.float32),
            "steps": np.array(7, dtype=np.int64),
            "b": rng.standard_normal(3).astype(np.float64),
        },
        {"w": rng.standard_normal((2, 5)).astype(np.float32)},  # another width (FedMA)
        {},
    ]
    results = [
        ClientResult(
            client_id=i,
            round=0,
            upload=u,
            n_examples=i + 1,
            train_loss=0.5,
            bytes_up=0,
            bytes_down=0,
            seconds=0.0,
        )
        for i, u in enumerate(uploads)
    ]
    packed, buffer = pack_uploads(results)
    assert buffer.dtype == np.uint8 and buffer.ndim == 1
    back = unpack_uploads((packed, buffer))
    for before, after in zip(results, back):
        assert list(after.upload) == list(before.upload)
        for k, v in before.upload.items():
            got = after.upload[k]
            assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v)
        assert (after.client_id, after.n_examples) == (before.client_id, before.n_examples)


def test_balance_assigns_every_task_once_within_lpt_bound_of_the_best_split():
    import itertools

    from fedsim.engine.backends import balance

    rng = np.random.default_rng(0)
    for _ in range(200):
        n, bins = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        costs = rng.integers(1, 50, size=n).astype(float).tolist()
        batches = balance(costs, bins)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert len(batches) <= bins and all(b == sorted(b) and b for b in batches)
        best = min(
            max(sum(c for c, a in zip(costs, assign) if a == k) for k in range(bins))
            for assign in itertools.product(range(bins), repeat=n)
        )  # brute force
        # Graham (1969): LPT's largest load is at most (4/3 - 1/(3 bins)) x the optimum
        assert max(sum(costs[i] for i in b) for b in batches) <= (4 / 3 - 1 / (3 * bins)) * best + 1e-9


def test_eval_every_evaluates_every_nth_round_and_the_last(tmp_path):
    run = [{"algorithm": "fedavg", "rounds": 5, "local_epochs": 1, "lr": 0.05, "batch_size": 16}]
    _, rounds, _, _ = run_tables(
        tiny_experiment(runs=run, engine={"backend": "sequential", "clients_per_round": 3, "eval_every": 2}),
        tmp_path,
    )
    evaluated = rounds.loc[rounds["test_accuracy"].notna(), "round"].tolist()
    assert evaluated == [1, 3, 4]  # rounds 2 and 4 (counting from 1), and the last
    assert rounds.loc[rounds["test_loss"].notna(), "round"].tolist() == evaluated
    assert rounds["train_loss"].notna().all()


def test_round_train_loss_is_the_example_weighted_mean_of_its_clients(sequential_run):
    _, rounds, clients, _ = sequential_run
    unequal = 0
    for (run_id, r), c in clients.groupby(["run_id", "round"]):
        row = rounds[(rounds.run_id == run_id) & (rounds["round"] == r)].iloc[0]
        n, loss = c["n_examples"].to_numpy(float), c["train_loss"].to_numpy()
        assert row["train_loss"] == pytest.approx(float((n * loss).sum() / n.sum()), rel=1e-12)
        unequal += abs(row["train_loss"] - loss.mean()) > 1e-9 and n.min() != n.max()
    assert unequal > 0  # the Dirichlet clients differ in size, so the plain mean would differ


@pytest.mark.parametrize(
    "run",
    [
        {"algorithm": "fedavg", "momentum": 0.9, "weight_decay": 1e-3},
        {"algorithm": "fedavg", "optimizer": "adam"},
        {"algorithm": "fedprox", "mu": 0.1, "momentum": 0.9},
        {"algorithm": "moon", "mu": 1.0},
    ],
    ids=["sgd-momentum", "adam", "fedprox-momentum", "moon"],
)
def test_a_client_trains_the_same_on_a_worker_that_trained_others_before(run):
    # Workers keep their model and optimizer across clients; nothing of one client (momentum
    # buffers, Adam moments, MOON's models) may reach the next.
    import torch

    from fedsim import params as P
    from fedsim.algorithms import ClientTask
    from fedsim.engine.client import ClientRunner, make_algorithm

    raw = tiny_experiment(runs=[{"rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 8, **run}])
    if run["algorithm"] == "moon":
        raw["model"] = {"name": "digits_cnn+moon"}
    cfg = config.parse(raw)
    ds = api.prepare(cfg)
    algo = make_algorithm(cfg.runs[0], cfg, ds)
    globals_ = [
        algo.init_state(
            P.clone(
                build_model(
                    cfg.model.name,
                    num_classes=ds.num_classes,
                    input_shape=ds.input_shape,
                    generator=torch.Generator().manual_seed(r),
                ).state_dict()
            )
        )
        for r in range(2)
    ]  # a different global model each round
    states = {}  # client -> its state after its last round (MOON: its previous model)

    def train(runner, r, client):
        state = globals_[r]
        plan = algo.plan_round(state, r, (client,))
        received = P.to_numpy(algo.downlink(state, plan))
        extra = algo.client_downlink(state, plan, client)
        task = ClientTask(run_id=cfg.runs[0].label, round=r, client_id=client, plan=plan)
        return runner.run(
            cfg.runs[0], task, received, states.get(client), None if extra is None else P.to_numpy(extra)
        )

    used = ClientRunner(cfg, ds, device="cpu", worker_id="used")
    for r, c in ((0, 0), (0, 2), (0, 1), (1, 3), (1, 0)):
        states[c] = train(used, r, c).state
    after_others = train(used, 1, 2)
    alone = train(ClientRunner(cfg, ds, device="cpu", worker_id="fresh"), 1, 2)
    assert (states[2] is not None) == (run["algorithm"] == "moon")
    assert after_others.train_loss == alone.train_loss
    assert after_others.upload.keys() == alone.upload.keys()
    for k in alone.upload:
        assert np.array_equal(np.asarray(after_others.upload[k]), np.asarray(alone.upload[k])), k


def test_the_submitting_process_of_a_ray_run_imports_no_torch():
    """The process that loads the data, starts the workers and reads the driver's events never
    imports torch (a process holding torch starts Ray more slowly; fedsim.engine.pool)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fedsim import config\n"
        "from fedsim.engine import api, pool\n"
        "import fedsim.cli\n"
        "cfg = config.parse({'data': {'dataset': 'digits', 'num_clients': 10}, 'runs': [{'algorithm': 'fedavg'}]})\n"
        "ds = api.load_data(cfg)\n"
        "api.check_gpus(cfg)\n"
        "pool.make_worker_class()\n"
        "print(len(ds.client_indices), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["10", "False"]
