"""Invariants of FedAvg and FedProx: one SGD step, example weighting, mu = 0, the
proximal gradient (alone and inside local training)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fedsim import config
from fedsim import params as P
from fedsim.algorithms import ClientResult, ClientTask, FedAvg, FedProx
from fedsim.algorithms.fedprox import proximal_term
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from tests.helpers import digits_cnn, tiny_experiment, toy


def test_proximal_term_is_squared_norm_with_gradient_mu_times_difference():
    g = torch.Generator().manual_seed(1)
    w = {
        "a": torch.randn(3, 4, generator=g, requires_grad=True),
        "b": torch.randn(5, generator=g, requires_grad=True),
    }
    anchor = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    mu = 0.37
    term = proximal_term(w.items(), anchor, mu)
    diff2 = sum(float(((w[k].detach() - anchor[k]) ** 2).sum()) for k in w)
    assert abs(float(term.detach()) - mu / 2 * diff2) < 1e-5
    term.backward()
    for k in w:
        torch.testing.assert_close(w[k].grad, mu * (w[k].detach() - anchor[k]))


def test_fedavg_with_one_client_and_one_step_is_one_sgd_step():
    ds = toy(n_clients=1, per_client=20, n_test=30)
    raw = tiny_experiment(
        data={"dataset": "digits", "num_clients": 1},
        engine={"backend": "sequential", "clients_per_round": 1},
        runs=[{"algorithm": "fedavg", "rounds": 1, "local_epochs": 1, "lr": 0.1, "batch_size": 64}],
    )
    cfg = config.parse(raw)
    run = cfg.runs[0]
    model = digits_cnn(0)
    w0 = P.clone(model.state_dict())
    algo = FedAvg(run, cfg)
    state = algo.init_state(w0)
    plan = algo.plan_round(state, 0, (0,))
    results = SequentialBackend(cfg, ds).run_round(
        run, [ClientTask("fedavg", 0, 0, plan)], P.to_numpy(w0), [None], [None]
    )
    new = algo.aggregate(state, plan, results).params
    # Independent reference: one full-batch gradient step on a fresh copy of the same weights.
    ref = digits_cnn()
    ref.load_state_dict(w0)
    loss = F.cross_entropy(ref(torch.from_numpy(ds.train.x)), torch.from_numpy(ds.train.y))
    loss.backward()
    for k, w in ref.named_parameters():
        torch.testing.assert_close(new[k], w.detach() - 0.1 * w.grad, rtol=1e-5, atol=1e-6)


def test_fedavg_weights_each_upload_by_its_examples():
    # McMahan et al. 2017, Algorithm 1: w = sum_j n_j / n * w_j. Clients with 1 and 3 examples:
    # (1 * [4, 8, -2] + 3 * [0, 4, 2]) / 4 = [1, 5, 1]; a plain mean would give [2, 6, 0].
    cfg = config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": 2},
            engine={"backend": "sequential", "clients_per_round": 2},
        )
    )
    algo = FedAvg(cfg.runs[0], cfg)
    state = algo.init_state({"w": torch.zeros(3)})
    plan = algo.plan_round(state, 0, (0, 1))
    uploads = [np.array([4.0, 8.0, -2.0], dtype=np.float32), np.array([0.0, 4.0, 2.0], dtype=np.float32)]
    results = [
        ClientResult(
            client_id=j,
            round=0,
            upload={"w": u},
            n_examples=n,
            train_loss=0.0,
            bytes_up=12,
            bytes_down=12,
            seconds=0.0,
        )
        for j, (u, n) in enumerate(zip(uploads, (1, 3)))
    ]
    new = algo.aggregate(state, plan, results).params["w"]
    assert new.dtype == torch.float32
    assert new.tolist() == [1.0, 5.0, 1.0]


def test_fedprox_local_steps_follow_the_cross_entropy_plus_proximal_gradient():
    # Two full-batch steps from the global weights w0: the first has no proximal pull (w = w0),
    # the second adds mu * (w1 - w0) to the cross-entropy gradient (Li et al. 2020, eq. 2).
    ds = toy(n_clients=1, per_client=20, n_test=30)
    mu, lr = 2.0, 0.1
    cfg = config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": 1},
            engine={"backend": "sequential", "clients_per_round": 1},
            runs=[
                {"algorithm": "fedprox", "mu": mu, "rounds": 1, "local_epochs": 2, "lr": lr, "batch_size": 64}
            ],
        )
    )
    w0 = digits_cnn(0).state_dict()
    algo = FedProx(cfg.runs[0], cfg)
    plan = algo.plan_round(algo.init_state(w0), 0, (0,))
    res = SequentialBackend(cfg, ds).run_round(
        cfg.runs[0], [ClientTask("fedprox", 0, 0, plan)], P.to_numpy(w0), [None], [None]
    )[0]
    ref = digits_cnn()
    ref.load_state_dict(w0)
    x, y = torch.from_numpy(ds.train.x), torch.from_numpy(ds.train.y)
    for _ in range(2):
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
        with torch.no_grad():
            for (k, w), g in zip(ref.named_parameters(), grads):
                w -= lr * (g + mu * (w - w0[k]))
    moved = 0.0
    for k, w in ref.named_parameters():
        torch.testing.assert_close(torch.from_numpy(res.upload[k]), w.detach(), rtol=1e-5, atol=1e-6)
        moved += float((w.detach() - w0[k]).abs().sum())
    assert moved > 0


def _run(raw, tmp_path, name):
    cfg = config.parse(raw)
    ds = toy(n_clients=4, per_client=25, n_test=30)
    out = tmp_path / name
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    return pd.read_parquet(out / "rounds.parquet"), pd.read_parquet(out / "clients.parquet")


def test_fedprox_with_mu_zero_equals_fedavg_exactly(tmp_path):
    common = {"rounds": 3, "local_epochs": 2, "lr": 0.05, "batch_size": 8}
    eng = {"backend": "sequential", "clients_per_round": 3}
    data = {"dataset": "digits", "num_clients": 4}
    a, ca = _run(
        tiny_experiment(engine=eng, data=data, runs=[{"algorithm": "fedavg", **common}]), tmp_path, "a"
    )
    b, cb = _run(
        tiny_experiment(engine=eng, data=data, runs=[{"algorithm": "fedprox", "mu": 0.0, **common}]),
        tmp_path,
        "b",
    )
    for col in ("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down"):
        assert a[col].tolist() == b[col].tolist(), col
    assert ca["train_loss"].tolist() == cb["train_loss"].tolist()


def test_fedprox_with_large_mu_keeps_local_weights_closer_to_global():
    ds = toy(n_clients=1, per_client=40, n_test=30)
    dist = {}
    for algo_cls, extra in ((FedAvg, {}), (FedProx, {"mu": 10.0})):
        raw = tiny_experiment(
            data={"dataset": "digits", "num_clients": 1},
            engine={"backend": "sequential", "clients_per_round": 1},
            runs=[
                {
                    "algorithm": algo_cls.name,
                    "rounds": 1,
                    "local_epochs": 5,
                    "lr": 0.05,
                    "batch_size": 8,
                    **extra,
                }
            ],
        )
        cfg = config.parse(raw)
        w0 = digits_cnn(0).state_dict()
        algo = algo_cls(cfg.runs[0], cfg)
        plan = algo.plan_round(algo.init_state(w0), 0, (0,))
        res = SequentialBackend(cfg, ds).run_round(
            cfg.runs[0], [ClientTask("r", 0, 0, plan)], P.to_numpy(w0), [None], [None]
        )[0]
        dist[algo_cls.name] = sum(float(((torch.from_numpy(res.upload[k]) - w0[k]) ** 2).sum()) for k in w0)
    assert dist["fedprox"] < 0.5 * dist["fedavg"]
