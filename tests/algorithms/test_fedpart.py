"""FedPart: schedules, freezing, partial bytes, BatchNorm handling, FLOPs of partial rounds, and
its equivalence to FedAvg with every group active."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedsim import config
from fedsim import params as P
from fedsim.algorithms import ClientTask, FedAvg
from fedsim.algorithms.fedpart import FedPart
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.io import checkpoint
from fedsim.models import build_model
from fedsim.models.base import LayerGroup
from fedsim.rng import torch_rng
from tests.helpers import cfg_for, digits_cnn, tiny_experiment, toy


def fedpart(order="sequential", **kw):
    cfg = cfg_for(
        {"algorithm": "fedpart", "warmup_rounds": 2, "rounds_per_group": 1, "cycles": 2, "order": order, **kw}
    )
    return cfg, FedPart(cfg.runs[0], cfg, 10, (1, 8, 8))


@pytest.mark.parametrize("order,groups", [("sequential", [0, 1, 2, 3]), ("reverse", [3, 2, 1, 0])])
def test_schedule_maps_rounds_to_groups_for_each_order(order, groups):
    _, algo = fedpart(order)
    plans = [algo.plan_round(None, r, (0, 1)) for r in range(algo.num_rounds())]
    assert algo.num_rounds() == 2 * (2 + 4)
    assert [p.phase for p in plans] == (["full"] * 2 + ["partial"] * 4) * 2
    assert [p.layer for p in plans if p.phase == "partial"] == groups * 2
    names = [g.name for g in algo.groups]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    for p in plans:
        if p.phase == "partial":
            assert set(p.trainable) == {f"{names[p.layer]}.weight", f"{names[p.layer]}.bias"}


def test_random_order_is_a_fresh_permutation_per_cycle_fixed_by_the_seed():
    _, a = fedpart("random", cycles=6)
    _, b = fedpart("random", cycles=6)
    cycles = [
        [
            p.layer
            for p in (a.plan_round(None, r, (0,)) for r in range(c * 6, c * 6 + 6))
            if p.phase == "partial"
        ]
        for c in range(6)
    ]
    assert all(sorted(c) == [0, 1, 2, 3] for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1
    assert [b.plan_round(None, r, (0,)).layer for r in range(36)] == [
        a.plan_round(None, r, (0,)).layer for r in range(36)
    ]


def _one_client(algo, cfg, ds, plan, w0, state=None):
    res = SequentialBackend(cfg, ds).run_round(
        cfg.runs[0], [ClientTask("r", plan.round, 0, plan)], P.to_numpy(w0), [state], [None]
    )
    return res[0]


def test_partial_round_freezes_other_tensors_and_uploads_only_the_group():
    cfg, algo = fedpart(optimizer="sgd", lr=0.1)
    # the worker's model is read after training: the per-client path trains in it (the stacked
    # path trains copies, and tests/engine/test_vectorize.py checks it equals this path)
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"vectorize": "never"})})
    ds = toy()
    w0 = digits_cnn(1).state_dict()
    plan = algo.plan_round(None, 3, (0,))  # cycle 0, second partial round: group 1 (conv2)
    assert plan.layer == 1
    runner = SequentialBackend(cfg, ds)
    res = runner.run_round(cfg.runs[0], [ClientTask("r", 3, 0, plan)], P.to_numpy(w0), [None], [None])[0]
    assert set(res.upload) == {"conv2.weight", "conv2.bias"}
    assert res.bytes_up == 4 * (w0["conv2.weight"].numel() + w0["conv2.bias"].numel())
    after = runner.runner.model().state_dict()
    for k in w0:
        if k.startswith("conv2."):
            assert not torch.equal(after[k], w0[k]), k
        else:
            assert torch.equal(after[k], w0[k]), k  # frozen: bit-identical after local training


def test_fedpart_with_the_fedprox_objective_keeps_the_active_group_near_the_global_weights():
    # local_objective: fedprox adds (mu / 2) ||w - w_global||^2 over the trainable (active) tensors
    ds = toy()
    w0 = digits_cnn(1).state_dict()
    moved = {}
    for objective, mu in (("fedavg", None), ("fedprox", 5.0)):
        cfg, algo = fedpart(
            optimizer="sgd",
            lr=0.1,
            local_epochs=5,
            batch_size=4,
            local_objective=objective,
            **({} if mu is None else {"mu": mu}),
        )
        plan = algo.plan_round(None, 3, (0,))  # group 1 (conv2)
        res = SequentialBackend(cfg, ds).run_round(
            cfg.runs[0], [ClientTask("r", 3, 0, plan)], P.to_numpy(w0), [None], [None]
        )[0]
        assert set(res.upload) == {"conv2.weight", "conv2.bias"}
        moved[objective] = sum(
            float(((torch.from_numpy(res.upload[k]) - w0[k]) ** 2).sum()) for k in res.upload
        )
    assert 0 < moved["fedprox"] < 0.5 * moved["fedavg"]


@pytest.mark.parametrize("bn_stats", ["shared", "local"])
def test_batchnorm_statistics_cross_the_wire_only_when_shared(bn_stats):
    run = {"algorithm": "fedavg", "rounds": 1, "local_epochs": 1, "batch_size": 6, "bn_stats": bn_stats}
    cfg = cfg_for(run, model="resnet8")
    ds = toy(shape=(3, 32, 32), per_client=6)
    algo = FedAvg(cfg.runs[0], cfg, 10, (3, 32, 32))
    w0 = build_model(
        "resnet8", num_classes=10, input_shape=(3, 32, 32), generator=torch_rng(1, "init")
    ).state_dict()
    bn = [k for k in w0 if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    assert bn and set(algo.bn_keys) == set(bn)
    plan = algo.plan_round(algo.init_state(w0), 0, (0,))
    res = _one_client(algo, cfg, ds, plan, w0)
    if bn_stats == "shared":
        assert set(bn) <= set(res.upload) and res.state is None
    else:
        assert not set(bn) & set(res.upload)
        assert set(res.state.bn) == set(bn)  # kept by the client, for its next round
        bn_bytes = sum(w0[k].numel() * w0[k].element_size() for k in bn)
        assert res.bytes_up == P.nbytes(w0) - bn_bytes
        new = algo.aggregate(algo.init_state(w0), plan, [res]).params
        assert all(torch.equal(new[k], w0[k]) for k in bn)  # the server never saw them


def test_bn_local_run_reports_client0_and_mean_over_clients(tmp_path):
    # The last round's row against the global weights evaluated with each client's own BatchNorm
    # statistics, read back from the run's final checkpoint and evaluated here by hand.
    run = {"algorithm": "fedavg", "rounds": 2, "local_epochs": 1, "batch_size": 6, "bn_stats": "local"}
    cfg = cfg_for(run, model="resnet8", clients=3)
    ds = toy(shape=(3, 32, 32), n_clients=3, per_client=6, n_test=300)
    list(run_experiment(cfg, ds, str(tmp_path), SequentialBackend(cfg, ds)))
    last = pd.read_parquet(tmp_path / "rounds.parquet").iloc[-1]
    ckpt = checkpoint.load(tmp_path, "fedavg")
    assert sorted(ckpt["store"]) == [0, 1, 2]
    model = build_model("resnet8", num_classes=10, input_shape=(3, 32, 32))
    x, y = torch.from_numpy(ds.test.x), torch.from_numpy(ds.test.y)
    accs, losses = [], []
    for c in sorted(ckpt["store"]):
        model.load_state_dict({**ckpt["params"], **ckpt["store"][c]["bn"]})
        model.eval()
        with torch.no_grad():
            logits = model(x)
        accs.append(int((logits.argmax(1) == y).sum()) / len(y))
        losses.append(float(F.cross_entropy(logits, y)))
    assert len(set(losses)) == 3 and len(set(accs)) > 1  # so the choice of client and the mean show
    assert last["test_loss"] == pytest.approx(losses[0], rel=1e-5)
    assert last["test_accuracy"] == accs[0]
    assert last["test_accuracy_clients_mean"] == pytest.approx(np.mean(accs))


def test_fedpart_with_every_group_active_equals_fedavg_exactly():
    ds = toy(n_clients=2)
    cfg, algo = fedpart(optimizer="sgd", lr=0.05)
    algo.groups = [
        LayerGroup("all", tuple(k for g in algo.groups for k in g.tensors))
    ]  # one group: everything
    algo.schedule = tuple(s for s in algo.schedule if s.phase == "partial")[:3]
    algo.schedule = tuple(type(s)(i, 0, "partial", 0) for i, s in enumerate(algo.schedule))
    avg_cfg = cfg_for({"algorithm": "fedavg", "lr": 0.05, "local_epochs": 1, "batch_size": 32})
    avg = FedAvg(avg_cfg.runs[0], avg_cfg, 10, (1, 8, 8))
    w0 = digits_cnn(2).state_dict()
    sa, sb = avg.init_state(w0), algo.init_state(w0)
    for r in range(3):
        pa, pb = avg.plan_round(sa, r, (0, 1)), algo.plan_round(sb, r, (0, 1))
        assert pb.phase == "partial" and set(pb.trainable) == {k for k, _ in digits_cnn().named_parameters()}
        ra = SequentialBackend(avg_cfg, ds).run_round(
            avg_cfg.runs[0],
            [ClientTask("a", r, c, pa) for c in (0, 1)],
            P.to_numpy(sa.params),
            [None, None],
            [None, None],
        )
        rb = SequentialBackend(cfg, ds).run_round(
            cfg.runs[0],
            [ClientTask("b", r, c, pb) for c in (0, 1)],
            P.to_numpy(sb.params),
            [None, None],
            [None, None],
        )
        sa, sb = avg.aggregate(sa, pa, ra), algo.aggregate(sb, pb, rb)
        assert all(torch.equal(sa.params[k], sb.params[k]) for k in w0)


def test_flops_count_3f_per_example_in_full_rounds_and_2f_in_partial_ones(tmp_path):
    raw = tiny_experiment(
        data={"dataset": "digits", "num_clients": 2},
        engine={"backend": "sequential", "clients_per_round": 2},
        runs=[
            {
                "algorithm": "fedpart",
                "warmup_rounds": 1,
                "rounds_per_group": 1,
                "local_epochs": 2,
                "batch_size": 32,
            }
        ],
    )
    cfg = config.parse(raw)
    ds = toy(n_clients=2)
    list(run_experiment(cfg, ds, str(tmp_path), SequentialBackend(cfg, ds)))
    r = pd.read_parquet(tmp_path / "rounds.parquet")
    full, partial = r[r.phase == "full"]["flops"], r[r.phase == "partial"]["flops"]
    examples = 2 * 12 * 2  # clients x examples x local epochs
    assert full.iloc[0] % (3 * examples) == 0
    forward = full.iloc[0] // (3 * examples)  # F, multiply-accumulates of one forward pass
    assert forward > 0 and (partial == 2 * examples * forward).all()
