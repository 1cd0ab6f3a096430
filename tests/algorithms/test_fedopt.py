"""Server optimisers (FedAvgM; FedAdagrad, FedAdam, FedYogi of Reddi et al., ICLR 2021, Algorithm 2):
FedAvgM without momentum is FedAvg, first and second steps against hand computations written
here in numpy (not by calling the code under test), BatchNorm statistics averaged not stepped,
the optimiser state surviving a resume, and every new algorithm on the Ray backend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import config
from fedsim.engine import api
from fedsim.models import build_model
from fedsim.rng import torch_rng
from tests.helpers import (
    WIDTHS,
    algorithm,
    dataset,
    digits_cnn,
    experiment,
    result,
    resumed_equals_uninterrupted,
    run_all,
    tables,
    tiny_experiment,
)

NEW = ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova"]


def test_fedavgm_without_momentum_and_unit_lr_gives_fedavgs_global_weights(tmp_path):
    # unequal clients, so that a plain (unweighted) mean would differ from FedAvg's
    cfg = experiment(
        [
            {"algorithm": "fedavg", "rounds": 3},
            {"algorithm": "fedavgm", "rounds": 3, "server_momentum": 0.0, "server_lr": 1.0},
        ],
        clients=4,
    )
    ckpt = run_all(cfg, dataset((5, 12, 20, 9)), tmp_path)
    fedavg, fedavgm = ckpt["fedavg"]["params"], ckpt["fedavgm"]["params"]
    moved = max(float((fedavg[k] - digits_cnn(2, widths=WIDTHS).state_dict()[k]).abs().max()) for k in fedavg)
    assert moved > 1e-2  # training moved the weights, so the comparison is not vacuous
    for k in fedavg:
        torch.testing.assert_close(fedavgm[k], fedavg[k], rtol=0, atol=1e-6)
    r = pd.read_parquet(tmp_path / "rounds.parquet")
    np.testing.assert_allclose(
        r[r.run_id == "fedavgm"]["test_loss"], r[r.run_id == "fedavg"]["test_loss"], rtol=1e-5
    )


def _step(algo, state, round, uploads, n):
    """One aggregate of ``uploads`` (client j holding n[j] examples) from ``state``."""
    plan = algo.plan_round(state, round, tuple(range(len(n))))
    return algo.aggregate(state, plan, [result(j, u, n[j]) for j, u in enumerate(uploads)])


def _toy_weights(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": scale * torch.randn(3, 4, generator=g), "b": scale * torch.randn(4, generator=g)}


def _clients(x: dict, seed: int, n_clients: int = 3) -> list[dict]:
    """Client models x + noise of mixed magnitudes, so |Delta| falls on both sides of tau = 1e-3."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n_clients):
        noise = {k: g.normal(size=v.shape) * 10.0 ** g.integers(-5, -1, v.shape) for k, v in x.items()}
        out.append({k: v + torch.from_numpy(noise[k].astype(np.float32)) for k, v in x.items()})
    return out


def _delta(x: dict, uploads: list[dict], n: list[int]) -> dict[str, np.ndarray]:
    """Delta = sum_i n_i / sum n (y_i - x), in float64."""
    p = np.array(n, dtype=np.float64) / sum(n)
    return {
        k: sum(
            pi * (u[k].numpy().astype(np.float64) - x[k].numpy().astype(np.float64))
            for pi, u in zip(p, uploads)
        )
        for k in x
    }


def test_fedavgm_takes_two_momentum_steps_as_written_by_hand():
    eta, beta, n = 0.7, 0.9, [2, 3, 5]
    x0 = _toy_weights(0)
    first = _clients(x0, 1)
    algo = algorithm("fedavgm", server_lr=eta, server_momentum=beta)
    s1 = _step(algo, algo.init_state(x0), 0, first, n)
    second = _clients(s1.params, 2)
    s2 = _step(algo, s1, 1, second, n)
    d1, d2 = _delta(x0, first, n), _delta(s1.params, second, n)
    for k in x0:
        v1 = -d1[k]  # v = beta * 0 + (-Delta)
        x1 = x0[k].numpy() - eta * v1
        v2 = beta * v1 - d2[k]
        x2 = s1.params[k].numpy().astype(np.float64) - eta * v2
        np.testing.assert_allclose(s1.params[k].numpy(), x1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s2.params[k].numpy(), x2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_first_and_second_steps_equal_algorithm_2_by_hand(name):
    # Reddi et al. 2021, Algorithm 2: m_0 = 0, v_0 = tau^2, no bias correction
    eta, b1, b2, tau, n = 0.05, 0.9, 0.99, 1e-3, [4, 1, 7]
    keys = {"server_lr": eta, "beta1": b1, "epsilon": tau, **({} if name == "fedadagrad" else {"beta2": b2})}
    algo = algorithm(name, **keys)
    x0 = _toy_weights(3)
    first = _clients(x0, 4)
    s1 = _step(algo, algo.init_state(x0), 0, first, n)
    second = _clients(s1.params, 5)
    s2 = _step(algo, s1, 1, second, n)
    d1, d2 = _delta(x0, first, n), _delta(s1.params, second, n)

    def v_next(v, d):
        if name == "fedadagrad":
            return v + d * d
        if name == "fedadam":
            return b2 * v + (1 - b2) * d * d
        return v - (1 - b2) * d * d * np.sign(v - d * d)

    every = np.abs(np.concatenate([d.ravel() for d in (*d1.values(), *d2.values())]))
    assert (every > tau).sum() > 3 and (every < tau).sum() > 3  # both branches of Yogi's sign
    for k in x0:
        m1 = (1 - b1) * d1[k]
        v1 = v_next(np.full_like(d1[k], tau**2), d1[k])
        x1 = x0[k].numpy().astype(np.float64) + eta * m1 / (np.sqrt(v1) + tau)
        m2 = b1 * m1 + (1 - b1) * d2[k]
        v2 = v_next(v1, d2[k])
        x2 = s1.params[k].numpy().astype(np.float64) + eta * m2 / (np.sqrt(v2) + tau)
        np.testing.assert_allclose(
            s1.params[k].numpy() - x0[k].numpy(), x1 - x0[k].numpy(), rtol=1e-4, atol=2e-7
        )
        np.testing.assert_allclose(
            s2.params[k].numpy() - s1.params[k].numpy(), x2 - s1.params[k].numpy(), rtol=1e-4, atol=2e-7
        )


def test_batchnorm_statistics_are_averaged_not_stepped_under_fedadam():
    w0 = build_model(
        "resnet8",
        num_classes=10,
        input_shape=(3, 32, 32),
        widths={"layer1": 4, "layer2": 4, "layer3": 4},
        generator=torch_rng(0, "init"),
    ).state_dict()
    stats = [k for k in w0 if k.endswith(("running_mean", "running_var"))]
    counters = [k for k in w0 if k.endswith("num_batches_tracked")]
    assert stats and counters
    g = torch.Generator().manual_seed(1)
    uploads = []
    for j, steps in enumerate((3, 8)):
        u = {
            k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in w0.items()
        }
        u.update({k: torch.rand(w0[k].shape, generator=g) + j for k in stats})
        u.update({k: torch.tensor(steps) for k in counters})
        uploads.append(u)
    n = [1, 3]
    algo = algorithm("fedadam")
    state = algo.aggregate(
        algo.init_state(w0),
        algo.plan_round(None, 0, (0, 1)),
        [result(j, u, n[j]) for j, u in enumerate(uploads)],
    )
    for k in stats:  # FedAvg's weighted mean (1 * a + 3 * b) / 4
        hand = (uploads[0][k].double() * 0.25 + uploads[1][k].double() * 0.75).float()
        torch.testing.assert_close(state.params[k], hand, rtol=1e-6, atol=1e-7)
    for k in counters:  # floor of (1 * 3 + 3 * 8) / 4 = 6.75, an integer tensor as before
        assert state.params[k].dtype == torch.int64 and int(state.params[k]) == 6
    opt = state.algo_state  # a ServerOptState
    assert not set(opt.m) & set(stats + counters) and not set(opt.v) & set(stats + counters)
    conv = "conv1.weight"
    assert conv in opt.m
    mean = uploads[0][conv] * 0.25 + uploads[1][conv] * 0.75
    assert (state.params[conv] - mean).abs().max() > 1e-3  # weights are stepped, not averaged


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_server_optimiser_state_survives_resume(name, tmp_path):
    cfg = experiment(
        [{"algorithm": name, "rounds": 3, **({"server_lr": 0.05} if name == "fedadam" else {})}],
        clients=3,
        checkpoint_every=1,
    )
    clean, resumed = resumed_equals_uninterrupted(cfg, dataset((6, 10, 14)), tmp_path)
    assert clean["algo_state"]["step"] == resumed["algo_state"]["step"] == 3
    for part in ("m", "v"):
        for k, v in clean["algo_state"][part].items():
            assert torch.equal(v, resumed["algo_state"][part][k]), (part, k)
    for k, v in clean["params"].items():
        assert torch.equal(v, resumed["params"][k]), k


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "scaffold", "fednova"])
def test_round_0_under_init_independent_is_fedavgs_mean_of_the_own_inits(name, tmp_path):
    # no common x to difference from: FedAvg's weighted mean (FedMA App. A), no server step yet
    cfg = experiment(
        [
            {"algorithm": "fedavg", "rounds": 1, "init": "independent"},
            {"algorithm": name, "rounds": 1, "init": "independent"},
        ],
        clients=3,
    )
    ckpt = run_all(cfg, dataset((5, 12, 20)), tmp_path)
    for k, v in ckpt["fedavg"]["params"].items():
        assert torch.equal(ckpt[name]["params"][k], v), k
    if name in ("fedavgm", "fedadam"):
        assert ckpt[name]["algo_state"] is None  # the optimiser has taken no step
    if name == "scaffold":
        assert all(bool((c == 0).all()) for c in ckpt[name]["algo_state"]["c"].values())


@pytest.mark.parametrize(
    "name,keys,match",
    [
        ("fedavgm", {"server_lr": 0.0}, "server_lr"),
        ("fedavgm", {"server_momentum": 1.0}, "server_momentum"),
        ("fedadam", {"beta1": 1.0}, "beta1"),
        ("fedyogi", {"beta2": -0.1}, "beta2"),
        ("fedadagrad", {"epsilon": 0.0}, "epsilon"),
        ("fedadagrad", {"beta2": 0.99}, "unknown config key 'runs.0.beta2'"),
    ],
)
def test_config_range_checks_name_the_key(name, keys, match):
    from fedsim.errors import FedsimError

    with pytest.raises(FedsimError, match=match):
        config.parse(tiny_experiment(runs=[{"algorithm": name, **keys}]))


def test_every_new_algorithm_runs_on_ray_as_on_the_sequential_backend(ray_local, tmp_path):
    runs = [{"algorithm": a, "rounds": 2, "local_epochs": 1, "batch_size": 8} for a in NEW]
    ds = dataset((6, 10, 14))
    logged = {}
    for backend in ("sequential", "ray"):
        cfg = (
            experiment(runs, clients=3, per_round=2, num_workers=2)
            if backend == "ray"
            else experiment(runs, 3, 2)
        )
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"backend": backend})})
        out = tmp_path / backend
        out.mkdir()
        events = list(api.execute(cfg, ds, out))
        assert [e["status"] for e in events if e["kind"] == "end"] == ["finished"] * len(NEW)
        logged[backend] = tables(out)
    for name in ("rounds", "clients"):
        pd.testing.assert_frame_equal(logged["sequential"][name], logged["ray"][name], obj=name)
    assert set(logged["ray"]["rounds"]["run_id"]) == set(NEW)
