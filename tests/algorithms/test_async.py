"""FedBuff and FedAsync on the virtual clock: the staleness functions and server steps by hand,
the invariants that tie them to synchronous FedAvg and to sequential SGD, staleness and
concurrency as logged, and bad settings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import config
from fedsim.algorithms.asynchronous import staleness_weight
from fedsim.algorithms.base import ServerState
from fedsim.engine import api
from fedsim.errors import FedsimError
from tests.helpers import WIDTHS, algorithm, result, run_all

pytestmark = pytest.mark.usefixtures("one_thread")


def test_staleness_functions_by_hand():
    assert staleness_weight("constant", 7, 0.5, 4) == 1.0
    assert staleness_weight("polynomial", 3, 0.5, 4) == pytest.approx(0.5)  # 1 / sqrt(1 + 3)
    assert staleness_weight("polynomial", 0, 2.0, 4) == 1.0
    assert staleness_weight("hinge", 4, 0.5, 4) == 1.0
    assert staleness_weight("hinge", 6, 0.5, 4) == pytest.approx(1 / (0.5 * 2 + 1))
    with pytest.raises(ValueError):
        staleness_weight("exponential", 1, 0.5, 4)


X = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}


def test_fedbuff_buffers_staleness_weighted_deltas_and_steps_after_k():
    algo = algorithm("fedbuff", concurrency=2, buffer_size=2, server_lr=0.5)
    state = algo.init_state(X)
    y1 = {"w": torch.tensor([3.0, 2.0]), "b": torch.tensor([1.5])}  # Delta = (2, 0), 1
    y2 = {"w": torch.tensor([1.0, 6.0]), "b": torch.tensor([0.5])}  # Delta = (0, 4), 0
    state, stepped = algo.arrive(state, result(0, y1, 10), X, staleness=0)
    assert not stepped and torch.equal(state.params["w"], X["w"])
    state, stepped = algo.arrive(state, result(1, y2, 30), X, staleness=3)  # s(3) = 1/2
    assert stepped
    # buffer = 1 * (2, 0, 1) + 0.5 * (0, 4, 0) = (2, 2, 1); mean over K = 2: (1, 1, 0.5); x + 0.5 mean
    assert torch.allclose(state.params["w"], torch.tensor([1.5, 2.5]))
    assert torch.allclose(state.params["b"], torch.tensor([0.75]))
    assert state.algo_state.count == 0 and state.algo_state.step == 1


def test_fedbuff_example_weighting_divides_by_the_examples():
    algo = algorithm("fedbuff", concurrency=2, buffer_size=2, weighting="examples", staleness="constant")
    state = algo.init_state(X)
    y1 = {"w": torch.tensor([3.0, 2.0]), "b": torch.tensor([0.5])}
    y2 = {"w": torch.tensor([1.0, 6.0]), "b": torch.tensor([0.5])}
    state, _ = algo.arrive(state, result(0, y1, 10), X, 0)
    state, _ = algo.arrive(state, result(1, y2, 30), X, 0)
    # (10 (2, 0) + 30 (0, 4)) / 40 = (0.5, 3)
    assert torch.allclose(state.params["w"], torch.tensor([1.5, 5.0]))


def test_fedasync_mixes_with_the_staleness_weighted_alpha():
    algo = algorithm("fedasync", concurrency=1, alpha=0.5)
    state = ServerState(X, None)
    y = {"w": torch.tensor([5.0, 2.0]), "b": torch.tensor([0.5])}
    state, stepped = algo.arrive(state, result(0, y, 10), X, staleness=3)  # alpha_t = 0.5 x 0.5
    assert stepped and torch.allclose(state.params["w"], torch.tensor([2.0, 2.0]))


def experiment(runs, clients=4, system=None, **data):
    raw = {
        "name": "async",
        "seed": 4,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": clients, **data},
        "model": {"name": "digits_cnn", "widths": WIDTHS},
        "engine": {"backend": "sequential", "clients_per_round": clients},
        "runs": [{"local_epochs": 1, "batch_size": 32, "lr": 0.1, **r} for r in runs],
    }
    if system is not None:
        raw["system"] = system
    return config.parse(raw)


def test_fedbuff_with_c_equal_k_equal_the_cohort_is_fedavg_with_equal_weights(tmp_path):
    cfg = experiment(
        [
            {"algorithm": "fedavg", "rounds": 3},
            {
                "algorithm": "fedbuff",
                "rounds": 3,
                "concurrency": 4,
                "buffer_size": 4,
                "staleness": "constant",
            },
        ],
        system={},  # identical devices: every update of a step arrives together, staleness 0
        examples_per_client=150,  # equal sizes: FedAvg's example weights are equal weights
    )
    ckpt = run_all(cfg, api.prepare(cfg), tmp_path)
    for k, v in ckpt["fedavg"]["params"].items():
        torch.testing.assert_close(ckpt["fedbuff"]["params"][k], v, rtol=0, atol=2e-6)
    c = pd.read_parquet(tmp_path / "clients.parquet")
    buff, avg = c[c.run_id == "fedbuff"], c[c.run_id == "fedavg"]
    assert (buff["staleness"] == 0).all()
    assert sorted(map(tuple, buff[["round", "client_id"]].to_numpy())) == sorted(
        map(tuple, avg[["round", "client_id"]].to_numpy())
    )


def test_fedasync_with_alpha_1_and_one_client_in_flight_is_sequential_sgd_over_clients(tmp_path):
    cfg = experiment(
        [
            {"algorithm": "fedavg", "rounds": 5},
            {
                "algorithm": "fedasync",
                "rounds": 5,
                "concurrency": 1,
                "alpha": 1.0,
                "local_objective": "fedavg",
            },
        ],
        clients=6,
    )
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"clients_per_round": 1})})
    ckpt = run_all(cfg, api.prepare(cfg), tmp_path)
    for k, v in ckpt["fedavg"]["params"].items():
        assert torch.equal(ckpt["fedasync"]["params"][k], v), k
    c = pd.read_parquet(tmp_path / "clients.parquet")
    order = {r: g.sort_values("round")["client_id"].tolist() for r, g in c.groupby("run_id")}
    assert order["fedasync"] == order["fedavg"]


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    world = {
        "devices": {
            "compute_macs_per_s": {"distribution": "lognormal", "median": 2e7, "sigma": 1.0},
            "uplink_bytes_per_s": {"distribution": "lognormal", "median": 1e5, "sigma": 1.0},
        }
    }
    cfg = experiment(
        [
            {"algorithm": "fedbuff", "rounds": 6, "concurrency": 4, "buffer_size": 2},
            {"algorithm": "fedasync", "name": "stale0", "rounds": 8, "concurrency": 3, "max_staleness": 0},
        ],
        clients=8,
        system=world,
    )
    out = tmp_path_factory.mktemp("hetero")
    run_all(cfg, api.prepare(cfg), out)
    return pd.read_parquet(out / "clients.parquet"), pd.read_parquet(out / "rounds.parquet")


def test_staleness_is_the_version_difference_in_every_row(hetero):
    c, r = hetero
    used = c[c["outcome"] == "aggregated"]
    assert (used["staleness"] == used["round"] - used["model_version"]).all()
    assert (used["staleness"] > 0).any()  # heterogeneous devices do make updates stale
    for run_id, g in r.groupby("run_id"):
        by_step = used[used.run_id == run_id].groupby("round")["staleness"]
        np.testing.assert_allclose(g.set_index("round")["staleness_mean"], by_step.mean())
        assert (g.set_index("round")["staleness_max"] == by_step.max()).all()


def test_at_most_c_clients_are_in_flight_at_any_simulated_time(hetero):
    c, _ = hetero
    for run_id, cap in (("fedbuff", 4), ("stale0", 3)):
        g = c[c.run_id == run_id]
        for t in g["sim_dispatch_s"].unique():
            in_flight = ((g["sim_dispatch_s"] <= t) & (g["sim_arrival_s"] > t)).sum()
            assert in_flight <= cap, (run_id, t)


def test_updates_staler_than_max_staleness_are_discarded_and_logged(hetero):
    c, r = hetero
    g = c[c.run_id == "stale0"]
    stale = g[g["outcome"] == "discarded_stale"]
    assert len(stale) > 0 and (stale["staleness"] > 0).all() and (stale["bytes_up"] > 0).all()
    assert (g.loc[g["outcome"] == "aggregated", "staleness"] == 0).all()
    assert (r.loc[r.run_id == "stale0", "clients"] == 1).all()  # FedAsync: one update a step


@pytest.mark.parametrize(
    "run,match",
    [
        ({"algorithm": "fedbuff", "concurrency": 0}, "concurrency' must be >= 1"),
        ({"algorithm": "fedbuff", "concurrency": 2, "buffer_size": 3}, "allow_buffer_above_concurrency"),
        ({"algorithm": "fedasync", "staleness": "exponential"}, "staleness"),
        ({"algorithm": "fedbuff", "local_objective": "scaffold"}, "scaffold cannot run asynchronously"),
        ({"algorithm": "fedasync", "local_objective": "fedma"}, "fedma cannot run asynchronously"),
        (
            {
                "algorithm": "fedbuff",
                "concurrency": 2,
                "buffer_size": 2,
                "system": {"mode": "deadline", "deadline_s": 3},
            },
            "is asynchronous",
        ),
    ],
)
def test_bad_asynchronous_settings_are_one_clear_error(run, match):
    with pytest.raises(FedsimError, match=match):
        experiment([{"rounds": 2, **run}], clients=4, system={})


def test_buffer_above_concurrency_runs_when_allowed(tmp_path):
    cfg = experiment(
        [
            {
                "algorithm": "fedbuff",
                "rounds": 2,
                "concurrency": 2,
                "buffer_size": 3,
                "allow_buffer_above_concurrency": True,
            }
        ]
    )
    run_all(cfg, api.prepare(cfg), tmp_path)
    r = pd.read_parquet(tmp_path / "rounds.parquet")
    assert (r["clients"] == 3).all()


def test_stacked_training_and_worker_count_change_no_event_of_an_asynchronous_run(
    tmp_path, hetero, ray_local
):
    """The same FedBuff run with stacked training on two Ray workers: the same events (who, when,
    which version, staleness) as the sequential one-by-one run of the module fixture, and the same
    accuracy up to float rounding."""
    world = {
        "devices": {
            "compute_macs_per_s": {"distribution": "lognormal", "median": 2e7, "sigma": 1.0},
            "uplink_bytes_per_s": {"distribution": "lognormal", "median": 1e5, "sigma": 1.0},
        }
    }
    cfg = experiment(
        [{"algorithm": "fedbuff", "rounds": 6, "concurrency": 4, "buffer_size": 2}], clients=8, system=world
    )
    cfg = cfg.model_copy(
        update={
            "engine": cfg.engine.model_copy(
                update={"backend": "ray", "num_workers": 2, "vectorize": "always"}
            )
        }
    )
    run_dir = api.new_run_dir(tmp_path, cfg.name)
    list(api.execute(cfg, api.prepare(cfg), run_dir))
    c = pd.read_parquet(run_dir / "clients.parquet")
    ref = hetero[0][hetero[0].run_id == "fedbuff"]
    keys = [
        "round",
        "client_id",
        "model_version",
        "staleness",
        "sim_dispatch_s",
        "sim_arrival_s",
        "outcome",
        "local_steps",
        "macs",
    ]
    pd.testing.assert_frame_equal(
        c[keys].reset_index(drop=True), ref[keys].reset_index(drop=True), check_exact=True
    )
    r = pd.read_parquet(run_dir / "rounds.parquet")
    ref_r = hetero[1][hetero[1].run_id == "fedbuff"]
    np.testing.assert_allclose(r["test_accuracy"], ref_r["test_accuracy"], atol=3 / 359)


def test_eval_every_s_evaluates_when_a_step_crosses_a_multiple_of_it(tmp_path):
    cfg = experiment(
        [{"algorithm": "fedasync", "rounds": 12, "concurrency": 2, "eval_every_s": 1.0}],
        clients=6,
        system={"devices": {"compute_macs_per_s": 2e7}},
    )
    run_all(cfg, api.prepare(cfg), tmp_path)
    r = pd.read_parquet(tmp_path / "rounds.parquet")
    t = r["sim_time_s"].to_numpy()
    crossed = np.floor(t) > np.floor(np.concatenate(([0.0], t[:-1])))
    crossed[-1] = True  # the last step is always evaluated
    assert (r["test_accuracy"].notna().to_numpy() == crossed).all()
    assert 1 < crossed.sum() < len(r)
