"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II): round 0 with zero control
variates is FedAvg's, a client's corrected steps and c_i+ against a hand-written SGD loop, the
server's update by hand, control variates surviving a resume, and bytes exactly twice FedAvg's
each way, equal to the dry run's projection."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedsim import config, dryrun
from fedsim import params as P
from fedsim.algorithms import ClientTask
from fedsim.algorithms.scaffold import C_PREFIX, DC_PREFIX, ScaffoldClientState, ScaffoldState
from fedsim.engine import api
from fedsim.engine.client import ClientRunner
from fedsim.errors import FedsimError
from fedsim.io.runlog import RunLog
from tests.helpers import (
    ACCOUNTING,
    WIDTHS,
    algorithm,
    dataset,
    digits_cnn,
    experiment,
    result,
    resumed_equals_uninterrupted,
    run_all,
)


def _init() -> dict[str, torch.Tensor]:
    return digits_cnn(2, widths=WIDTHS).state_dict()


def test_round_0_with_zero_control_variates_is_fedavgs_round_0(tmp_path):
    # equal client sizes: SCAFFOLD's unweighted mean and FedAvg's weighted one coincide
    cfg = experiment(
        [{"algorithm": "fedavg", "rounds": 1}, {"algorithm": "scaffold", "rounds": 1}], clients=3
    )
    ckpt = run_all(cfg, dataset((10, 10, 10)), tmp_path)
    x0 = _init()
    for k, v in ckpt["fedavg"]["params"].items():
        assert (v - x0[k]).abs().max() > 1e-3, k  # the round moved every tensor
        torch.testing.assert_close(ckpt["scaffold"]["params"][k], v, rtol=0, atol=1e-6)
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    losses = {r: clients[clients.run_id == r]["train_loss"].tolist() for r in ("fedavg", "scaffold")}
    assert losses["fedavg"] == losses["scaffold"]  # c - c_i = 0 adds exactly nothing to the gradients
    c = ckpt["scaffold"]["algo_state"]["c"]
    assert set(c) == set(x0) and all(bool(v.abs().max() > 0) for v in c.values())  # c moved after round 0


def test_a_client_takes_corrected_sgd_steps_and_sets_option_ii_control_variate(tmp_path):
    cfg = experiment(
        [{"algorithm": "scaffold", "rounds": 2, "local_epochs": 3, "batch_size": 64, "lr": 0.1}], clients=2
    )
    run = cfg.runs[0]
    ds = dataset((9, 7))
    x = _init()
    g = torch.Generator().manual_seed(0)
    c = {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in x.items()}
    c_i = {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in x.items()}
    runner = ClientRunner(cfg, ds)
    algo = runner.algorithm(run)
    state = algo.init_state(x)
    state.algo_state = ScaffoldState(c)
    plan = algo.plan_round(state, 1, (0, 1))
    received = P.to_numpy(algo.downlink(state, plan))
    assert set(received) == set(x) | {C_PREFIX + k for k in x}
    res = runner.run(
        run, ClientTask("scaffold", 1, 0, plan), received, state=ScaffoldClientState(c=P.to_numpy(c_i))
    )

    # by hand: one full batch per epoch, y = y - lr (g(y) - c_i + c), K = 3 steps
    model = digits_cnn(widths=WIDTHS)
    model.load_state_dict(x)
    xs, ys = (
        torch.from_numpy(ds.train.x[ds.client_indices[0]]),
        torch.from_numpy(ds.train.y[ds.client_indices[0]]),
    )
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        with torch.no_grad():
            for k, w in model.named_parameters():
                w -= 0.1 * (w.grad - c_i[k] + c[k])
    y = model.state_dict()
    c_new = {k: c_i[k] - c[k] + (x[k] - y[k]) / (3 * 0.1) for k in x}
    assert res.local_steps == 3
    for k in x:
        torch.testing.assert_close(torch.from_numpy(res.upload[k]), y[k], rtol=0, atol=2e-6)
        torch.testing.assert_close(torch.from_numpy(res.state.c[k]), c_new[k], rtol=0, atol=2e-5)
        torch.testing.assert_close(
            torch.from_numpy(res.upload[DC_PREFIX + k]), c_new[k] - c_i[k], rtol=0, atol=2e-5
        )
    model_bytes = P.nbytes(x)
    assert res.bytes_down == 2 * model_bytes and res.bytes_up == 2 * model_bytes


def test_server_steps_x_by_the_unweighted_mean_and_c_by_s_over_n():
    algo = algorithm("scaffold", server_lr=0.5)  # tiny_experiment: N = 6 clients
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}
    state = algo.init_state(x)
    c0 = {k: torch.randn(v.shape, generator=g) for k, v in x.items()}
    state.algo_state = ScaffoldState(c0)
    ys = [{k: v + torch.randn(v.shape, generator=g) for k, v in x.items()} for _ in range(2)]
    dcs = [{k: torch.randn(v.shape, generator=g) for k, v in x.items()} for _ in range(2)]
    results = [
        result(j, {**ys[j], **{DC_PREFIX + k: v for k, v in dcs[j].items()}}, n) for j, n in enumerate((1, 9))
    ]
    new = algo.aggregate(state, algo.plan_round(state, 1, (0, 1)), results)
    for k in x:
        mean_dy = (
            (ys[0][k].double() - x[k].double()) + (ys[1][k].double() - x[k].double())
        ) / 2  # unweighted
        torch.testing.assert_close(new.params[k].double(), x[k].double() + 0.5 * mean_dy, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            new.algo_state.c[k].double(),
            c0[k].double() + (2 / 6) * (dcs[0][k].double() + dcs[1][k].double()) / 2,
            rtol=0,
            atol=1e-6,
        )


def test_control_variates_survive_resume(tmp_path):
    # 2 of 4 clients per round: returning clients read their c_i from the restored store
    cfg = experiment([{"algorithm": "scaffold", "rounds": 3}], clients=4, per_round=2, checkpoint_every=1)
    clean, resumed = resumed_equals_uninterrupted(cfg, dataset((6, 10, 14, 8)), tmp_path)
    assert sorted(clean["store"]) == sorted(resumed["store"]) and len(clean["store"]) >= 3
    for k, v in clean["algo_state"]["c"].items():
        assert v.abs().max() > 0 and torch.equal(v, resumed["algo_state"]["c"][k]), k
    for cid, s in clean["store"].items():
        for k, v in s["c"].items():
            assert torch.equal(v, resumed["store"][cid]["c"][k]), (cid, k)
    for k, v in clean["params"].items():
        assert torch.equal(v, resumed["params"][k]), k


COMPARED = ["run_id", "round", *ACCOUNTING]


def test_bytes_are_twice_fedavgs_each_way_and_equal_the_dry_run(tmp_path):
    raw = {
        "name": "bytes",
        "seed": 1,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 4},
        "model": {"name": "digits_cnn", "widths": WIDTHS},
        "engine": {"backend": "sequential", "clients_per_round": 2},
        "runs": [
            {"algorithm": "fedavg", "rounds": 2, "batch_size": 64},
            {"algorithm": "scaffold", "rounds": 2, "batch_size": 64},
            {
                "algorithm": "scaffold",
                "name": "scaffold-ind",
                "rounds": 2,
                "batch_size": 64,
                "init": "independent",
            },
            # FedAvg's bytes: the dry run projects them like fedavg's
            *(
                {"algorithm": a, "rounds": 2, "batch_size": 64}
                for a in ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova")
            ),
        ],
    }
    cfg = config.parse(raw)
    _, projected = dryrun.project_experiment(cfg)
    dryrun.write_run_dir(cfg, projected, tmp_path / "dry")
    (tmp_path / "real").mkdir()
    for _ in api.execute(cfg, api.prepare(cfg), tmp_path / "real"):
        pass
    dry, real = (
        pd.DataFrame(RunLog.read(d).rows["rounds"])[COMPARED] for d in (tmp_path / "dry", tmp_path / "real")
    )
    pd.testing.assert_frame_equal(dry, real)
    by = {r: real[real.run_id == r].reset_index(drop=True) for r in ("fedavg", "scaffold", "scaffold-ind")}
    per_client = P.nbytes(_init())
    assert by["fedavg"]["bytes_up"].tolist() == by["fedavg"]["bytes_down"].tolist() == [2 * per_client] * 2
    for col in ("bytes_up", "bytes_down"):
        assert by["scaffold"][col].tolist() == [2 * b for b in by["fedavg"][col]]
    # init: independent: round 0 sends nothing down and only the models up; round 1 as SCAFFOLD
    assert by["scaffold-ind"]["bytes_down"].tolist() == [0, 2 * by["fedavg"]["bytes_down"][1]]
    assert by["scaffold-ind"]["bytes_up"].tolist() == [
        by["fedavg"]["bytes_up"][0],
        2 * by["fedavg"]["bytes_up"][1],
    ]
    for other in ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova"):
        rows = real[real.run_id == other].reset_index(drop=True)
        assert rows[["bytes_up", "bytes_down"]].equals(by["fedavg"][["bytes_up", "bytes_down"]]), other


@pytest.mark.parametrize(
    "keys,match", [({"optimizer": "adam"}, "optimizer"), ({"server_lr": 0.0}, "server_lr")]
)
def test_config_rejects_what_scaffold_cannot_run(keys, match):
    from tests.helpers import tiny_experiment

    with pytest.raises(FedsimError, match=match):
        config.parse(tiny_experiment(runs=[{"algorithm": "scaffold", **keys}]))
