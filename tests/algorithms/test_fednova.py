"""FedNova (Wang et al., NeurIPS 2020): the local step count every client reports, FedAvg when
every client takes the same number of steps, and the normalised update by hand when they do not
(plain SGD and SGD with momentum)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim import config
from fedsim.algorithms import Algorithm, FedNova
from fedsim.errors import FedsimError
from tests.helpers import WIDTHS, dataset, digits_cnn, experiment, run_all, tiny_experiment


def _recording(monkeypatch, cls) -> list:
    """Record (state before, results) of every aggregate of ``cls``."""
    seen, aggregate = [], cls.aggregate

    def spy(self, state, plan, results):
        seen.append(({k: v.clone() for k, v in state.params.items()}, list(results), plan))
        return aggregate(self, state, plan, results)

    monkeypatch.setattr(cls, "aggregate", spy)
    return seen


@pytest.mark.parametrize("name", ["fedavg", "fednova", "moon"])
def test_every_client_reports_its_local_steps(name, monkeypatch, tmp_path):
    seen = _recording(
        monkeypatch, FedNova if name == "fednova" else Algorithm
    )  # FedAvg's and MOON's aggregate
    sizes, bs, epochs = (5, 12, 20), 4, 2
    cfg = experiment([{"algorithm": name, "rounds": 1, "batch_size": bs, "local_epochs": epochs}], clients=3)
    if name == "moon":
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": "digits_cnn+moon"})})
    run_all(cfg, dataset(sizes), tmp_path)
    (_, results, _), *_ = seen
    assert [r.local_steps for r in results] == [epochs * math.ceil(n / bs) for n in sizes]


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_equal_local_steps_give_fedavg(momentum, tmp_path):
    # sizes differ (so p_i matter) but every client takes ceil(n / 8) = 2 steps per epoch
    runs = [{"algorithm": a, "rounds": 2, "momentum": momentum} for a in ("fedavg", "fednova")]
    ckpt = run_all(experiment(runs, clients=3), dataset((9, 12, 16)), tmp_path)
    x0 = digits_cnn(2, widths=WIDTHS).state_dict()
    for k, v in ckpt["fedavg"]["params"].items():
        assert (v - x0[k]).abs().max() > 1e-3
        torch.testing.assert_close(ckpt["fednova"]["params"][k], v, rtol=0, atol=1e-6)


def _a(tau: int, rho: float) -> float:
    """||a_i||_1 written as the paper's sum over steps."""
    if rho == 0:
        return float(tau)
    return sum((1 - rho**k) / (1 - rho) for k in range(1, tau + 1))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unequal_local_steps_give_the_normalised_update_by_hand(momentum, monkeypatch, tmp_path):
    seen = _recording(monkeypatch, FedNova)
    sizes = (5, 12, 30)  # 2, 3 and 8 steps of batch 4
    keys = {"rounds": 1, "batch_size": 4, "momentum": momentum, "lr": 0.05}
    cfg = experiment([{"algorithm": "fednova", **keys}, {"algorithm": "fedavg", **keys}], clients=3)
    ckpt = run_all(cfg, dataset(sizes), tmp_path)
    ((x, results, _),) = seen
    assert [r.local_steps for r in results] == [2, 3, 8]
    p = np.array(sizes, dtype=np.float64) / sum(sizes)
    a = np.array([_a(r.local_steps, momentum) for r in results])
    tau_eff = float(p @ a)
    for k, xk in x.items():
        x64 = xk.numpy().astype(np.float64)
        d = [(x64 - r.upload[k].astype(np.float64)) / ai for r, ai in zip(results, a)]  # normalised updates
        hand = x64 - tau_eff * sum(pi * di for pi, di in zip(p, d))
        np.testing.assert_allclose(ckpt["fednova"]["params"][k].numpy(), hand, rtol=0, atol=1e-6)
        fedavg = sum(pi * r.upload[k].astype(np.float64) for pi, r in zip(p, results))
        assert np.abs(hand - fedavg).max() > 1e-3, k  # FedNova differs from FedAvg here
        np.testing.assert_allclose(ckpt["fedavg"]["params"][k].numpy(), fedavg, rtol=0, atol=1e-6)


def test_config_rejects_adam():
    with pytest.raises(FedsimError, match="optimizer"):
        config.parse(tiny_experiment(runs=[{"algorithm": "fednova", "optimizer": "adam"}]))
