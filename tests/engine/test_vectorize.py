"""Vectorised cohorts (fedsim.engine.vectorize): stacked local training equals the per-client path
up to floating-point reassociation for every algorithm that allows it, masks clients with fewer
steps (1, 7 and 40 examples, momentum and weight decay on), does not depend on how clients are
grouped or chunked, and falls back to one-by-one training where it cannot stack."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import config
from fedsim.algorithms import ALGORITHMS, ClientTask
from fedsim.engine import vectorize
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.client import ClientRunner
from fedsim.engine.loop import run_experiment
from fedsim.io import checkpoint
from fedsim.models import build_model
from tests.helpers import dataset, digits_cnn

SIZES = [1, 7, 40, 13]  # batch 10: 1, 1, 4 and 2 steps per epoch
STACKABLE = sorted(n for n, cls in ALGORITHMS.items() if cls.vectorizable)


def experiment(name: str, vectorize: str, **engine) -> config.ExperimentConfig:
    run = {
        "algorithm": name,
        "rounds": 2,
        "local_epochs": 2,
        "batch_size": 10,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-3,
    }
    if name == "fedprox":
        run["mu"] = 0.1
    return config.parse(
        {
            "name": "vec",
            "seed": 1,
            "data": {"dataset": "digits", "num_clients": len(SIZES)},
            "model": {"name": "digits_cnn"},
            "engine": {
                "backend": "sequential",
                "clients_per_round": len(SIZES),
                "vectorize": vectorize,
                **engine,
            },
            "runs": [run],
        }
    )


def run(cfg, tmp_path, tag):
    ds = dataset(SIZES)
    out = tmp_path / tag
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    return (
        pd.read_parquet(out / "clients.parquet"),
        pd.read_parquet(out / "rounds.parquet"),
        checkpoint.load(out, cfg.runs[0].label)["params"],
    )


def test_the_algorithms_that_stack_are_fedavgs_family():
    assert STACKABLE == [
        "fedadagrad",
        "fedadam",
        "fedavg",
        "fedavgm",
        "fedmedian",
        "fednova",
        "fedprox",
        "fedyogi",
    ]


@pytest.mark.parametrize("name", STACKABLE)
def test_stacked_training_equals_the_per_client_path(name, tmp_path, monkeypatch):
    calls = []
    real = vectorize.train_stacked
    monkeypatch.setattr(vectorize, "train_stacked", lambda *a: calls.append(1) or real(*a))
    c0, r0, w0 = run(experiment(name, "never"), tmp_path, "never")
    assert not calls
    c1, r1, w1 = run(experiment(name, "auto"), tmp_path, "auto")
    assert calls, "the stacked path was not taken"
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-5, atol=1e-6, msg=k)
    np.testing.assert_allclose(c1["train_loss"], c0["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(r1["test_loss"], r0["test_loss"], rtol=1e-5)
    same = ["client_id", "n_examples", "local_steps", "bytes_up", "bytes_down"]
    pd.testing.assert_frame_equal(c1[same], c0[same])
    assert (r1["flops"] == r0["flops"]).all()
    assert c1["local_steps"].tolist()[:4] == [2, 2, 8, 4]  # 2 epochs of 1, 1, 4, 2 steps


def _runner_and_tasks(cfg):
    ds = dataset(SIZES)
    runner = ClientRunner(cfg, ds)
    algo = runner.algorithm(cfg.runs[0])
    model = digits_cnn()
    state = algo.init_state({k: v.detach() for k, v in model.state_dict().items()})
    plan = algo.plan_round(state, 0, tuple(range(len(SIZES))))
    received = {k: v.numpy() for k, v in state.params.items()}
    tasks = [ClientTask("fedavg", 0, c, plan) for c in plan.cohort]
    return runner, algo, tasks, received


def test_a_client_with_fewer_steps_is_masked_not_moved_by_momentum_or_weight_decay():
    cfg = experiment("fedavg", "auto")
    runner, algo, tasks, received = _runner_and_tasks(cfg)
    stacked = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks, received)
    for task, res in zip(tasks, stacked):  # each against the client trained alone, one by one
        alone = runner.run(cfg.runs[0], task, received)
        assert res.local_steps == alone.local_steps and res.n_examples == alone.n_examples
        for k in alone.upload:
            np.testing.assert_allclose(res.upload[k], alone.upload[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_results_do_not_depend_on_how_clients_are_grouped_or_chunked():
    cfg = experiment("fedprox", "auto")
    runner, algo, tasks, received = _runner_and_tasks(cfg)
    together = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks, received)
    apart = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks[:1], received) + vectorize.train_stacked(
        runner, cfg.runs[0], algo, tasks[1:], received
    )
    chunked_cfg = experiment("fedprox", "auto", vectorize_max_clients=2)
    r2, a2, t2, rec2 = _runner_and_tasks(chunked_cfg)
    chunked = vectorize.train_stacked(r2, chunked_cfg.runs[0], a2, t2, rec2)
    for x, y, z in zip(together, apart, chunked):
        assert x.train_loss == y.train_loss == z.train_loss
        for k in x.upload:
            assert np.array_equal(x.upload[k], y.upload[k]) and np.array_equal(x.upload[k], z.upload[k]), k


def test_models_with_batchnorm_or_dropout_are_not_stacked():
    assert vectorize.model_stackable(digits_cnn())
    assert not vectorize.model_stackable(build_model("resnet8", num_classes=10, input_shape=(3, 32, 32)))
    assert not vectorize.model_stackable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)))


def test_always_on_an_algorithm_that_cannot_stack_says_so_once_and_trains_one_by_one(tmp_path, capsys):
    cfg = experiment("fedavg", "always")
    cfg = cfg.model_copy(
        update={"runs": (config.parse({"runs": [{"algorithm": "scaffold", "rounds": 2}]}).runs[0],)}
    )
    ds = dataset(SIZES)
    list(run_experiment(cfg, ds, str(tmp_path), SequentialBackend(cfg, ds)))
    err = capsys.readouterr().err
    assert err.count("engine.vectorize is always") == 1 and "one by one" in err


def test_ray_backend_gives_the_sequential_tables_with_stacking_on(ray_local, tmp_path):
    from fedsim.engine import api

    seq = experiment("fedavgm", "auto")
    _, r0, w0 = run(seq, tmp_path, "seq")
    ray_cfg = experiment("fedavgm", "auto", backend="ray", num_workers=2)
    ds = dataset(SIZES)
    (tmp_path / "ray").mkdir()
    list(api.execute(ray_cfg, ds, tmp_path / "ray"))
    r1 = pd.read_parquet(tmp_path / "ray" / "rounds.parquet")
    w1 = checkpoint.load(tmp_path / "ray", "fedavgm")["params"]
    cols = ["round", "test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down", "flops"]
    pd.testing.assert_frame_equal(r1[cols], r0[cols])
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_vectorize_is_off_unless_asked_for():
    assert config.parse({"runs": [{"algorithm": "fedavg"}]}).engine.vectorize == "never"


def test_vectorize_max_clients_must_be_positive():
    from fedsim.errors import FedsimError

    with pytest.raises(FedsimError, match="vectorize_max_clients must be >= 1"):
        experiment("fedavg", "auto", vectorize_max_clients=0)
