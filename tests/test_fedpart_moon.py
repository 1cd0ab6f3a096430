"""FedPart and MOON: schedules, freezing, partial bytes, BatchNorm handling, MOON's loss, the
FedAvg invariants, and a contract test over every registered algorithm."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from fedsim import config
from fedsim import params as P
from fedsim.accounting import thop_macs
from fedsim.algorithms import ALGORITHMS, ClientContext, ClientTask, FedAvg
from fedsim.algorithms.fedpart import FedPart
from fedsim.algorithms.moon import MOON, MoonClientState, contrastive_loss
from fedsim.data.base import FederatedDataset, Split
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.io import checkpoint
from fedsim.io.runlog import CLIENTS_SCHEMA, ROUNDS_SCHEMA, RUNS_SCHEMA
from fedsim.models import build_model
from fedsim.models.base import LayerGroup
from fedsim.rng import torch_rng
from tests.conftest import tiny_experiment


def toy(shape=(1, 8, 8), n_clients=2, per_client=12, seed=0, n_test=16) -> FederatedDataset:
    rng = np.random.default_rng(seed)
    n = n_clients * per_client
    train = Split(
        x=rng.normal(size=(n, *shape)).astype(np.float32), y=rng.integers(0, 10, n).astype(np.int64)
    )
    test = Split(
        x=rng.normal(size=(n_test, *shape)).astype(np.float32), y=rng.integers(0, 10, n_test).astype(np.int64)
    )
    idx = [np.arange(i * per_client, (i + 1) * per_client) for i in range(n_clients)]
    return FederatedDataset(
        "toy", train, test, 10, shape, idx, np.stack([np.bincount(train.y[i], minlength=10) for i in idx])
    )


def cfg_for(run: dict, model="digits_cnn", clients=2):
    return config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": clients},
            model={"name": model},
            engine={"backend": "sequential", "clients_per_round": clients},
            runs=[run],
        )
    )


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
    ds = toy()
    w0 = build_model(
        "digits_cnn", num_classes=10, input_shape=(1, 8, 8), generator=torch_rng(1, "init")
    ).state_dict()
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
    w0 = build_model(
        "digits_cnn", num_classes=10, input_shape=(1, 8, 8), generator=torch_rng(1, "init")
    ).state_dict()
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


def test_moon_loss_on_a_hand_computable_case():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_glob = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cos 1 and 1/sqrt(2)
    z_prev = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # cos 0 and 1
    tau = 0.5
    l1 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0 / tau)))
    l2 = -math.log(math.exp(2**-0.5 / tau) / (math.exp(2**-0.5 / tau) + math.exp(1 / tau)))
    assert abs(float(contrastive_loss(z, z_glob, z_prev, tau)) - (l1 + l2) / 2) < 1e-6


@pytest.mark.parametrize(
    "model_name,shape",
    [("digits_cnn+moon", (1, 8, 8)), ("resnet8+moon", (3, 32, 32))],
    ids=["digits_cnn", "resnet8-batchnorm"],
)
def test_moon_step_contrasts_with_the_received_global_and_the_previous_local_model(model_name, shape):
    # One full-batch SGD step of a returning client, against an independent computation of
    # CE + mu * l_con(z, z_glob, z_prev) (Li et al. 2021, eq. 3): z_glob from the received global
    # weights, z_prev from the client's stored previous model, both frozen models in eval mode
    # (with BatchNorm, ResNet-8's z then comes from the running statistics, not the batch's).
    # Swapping the two, dropping the term, or the frozen models in train mode moves the step by
    # far more than the tolerance.
    mu, tau, lr = 5.0, 0.5, 0.1
    cfg = cfg_for(
        {"algorithm": "moon", "mu": mu, "tau": tau, "lr": lr, "batch_size": 64, "local_epochs": 1},
        model=model_name,
        clients=1,
    )
    algo = MOON(cfg.runs[0], cfg, 10, shape)

    def net(seed):
        return build_model(model_name, num_classes=10, input_shape=shape, generator=torch_rng(seed, "init"))

    glob, prev = net(1).state_dict(), net(2).state_dict()
    ds = toy(shape=shape, n_clients=1, per_client=12)
    x, y = torch.from_numpy(ds.train.x), torch.from_numpy(ds.train.y)
    model = net(3)
    model.load_state_dict(glob)
    plan = algo.plan_round(algo.init_state(P.clone(glob)), 1, (0,))
    ctx = ClientContext(
        model=model,
        received=glob,
        x=x,
        y=y,
        plan=plan,
        generator=torch_rng(0, "shuffle", 1, 0),
        augment=lambda b: b,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        state=MoonClientState(prev=P.to_numpy(prev)),
    )
    upload, _ = algo.local_update(ctx)

    def step(positive, negative, frozen_in_eval=True):
        ref, a, b = net(4), net(5), net(6)
        for m, weights in ((ref, glob), (a, positive), (b, negative)):
            m.load_state_dict(weights)
        for frozen in (a, b):
            frozen.train(not frozen_in_eval)
        logits, z = ref(x, return_projection=True)
        with torch.no_grad():
            za, zb = a(x, return_projection=True)[1], b(x, return_projection=True)[1]
        loss = F.cross_entropy(logits, y) + mu * contrastive_loss(z, za, zb, tau)
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        return {k: w.detach() - lr * g for (k, w), g in zip(ref.named_parameters(), grads)}

    expected, swapped = step(glob, prev), step(prev, glob)
    for k in expected:
        torch.testing.assert_close(upload[k], expected[k], rtol=1e-5, atol=1e-6)
    assert max(float((expected[k] - swapped[k]).abs().max()) for k in expected) > 1e-3
    if model_name.startswith("resnet8"):  # train and eval mode differ only with BatchNorm
        in_train = step(glob, prev, frozen_in_eval=False)
        assert max(float((expected[k] - in_train[k]).abs().max()) for k in expected) > 1e-3
    assert ctx.frozen_forwards == 2


def _tables(raw, ds, tmp, name):
    cfg = config.parse(raw)
    out = tmp / name
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    return pd.read_parquet(out / "rounds.parquet"), pd.read_parquet(out / "clients.parquet")


def test_moon_with_mu_zero_equals_fedavg_exactly(tmp_path):
    ds = toy(n_clients=3)
    common = {"rounds": 3, "local_epochs": 2, "lr": 0.05, "batch_size": 4}
    base = dict(
        data={"dataset": "digits", "num_clients": 3},
        model={"name": "digits_cnn+moon"},
        engine={"backend": "sequential", "clients_per_round": 2},
    )
    a, ca = _tables(tiny_experiment(**base, runs=[{"algorithm": "fedavg", **common}]), ds, tmp_path, "a")
    b, cb = _tables(
        tiny_experiment(**base, runs=[{"algorithm": "moon", "mu": 0.0, **common}]), ds, tmp_path, "b"
    )
    for col in ("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down"):
        assert a[col].tolist() == b[col].tolist(), col
    assert ca["train_loss"].tolist() == cb["train_loss"].tolist()


def test_moon_with_mu_changes_training_after_the_first_participation(tmp_path):
    ds = toy(n_clients=2)
    common = {"rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 4}
    base = dict(
        data={"dataset": "digits", "num_clients": 2},
        model={"name": "digits_cnn+moon"},
        engine={"backend": "sequential", "clients_per_round": 2},
    )
    _, ca = _tables(tiny_experiment(**base, runs=[{"algorithm": "fedavg", **common}]), ds, tmp_path, "a")
    _, cb = _tables(
        tiny_experiment(**base, runs=[{"algorithm": "moon", "mu": 5.0, **common}]), ds, tmp_path, "b"
    )
    first = ca["round"] == 0
    assert ca[first]["train_loss"].tolist() == cb[first]["train_loss"].tolist()  # no negative yet: l_con = 0
    assert ca[~first]["train_loss"].tolist() != cb[~first]["train_loss"].tolist()


@pytest.mark.parametrize(
    "run",
    [
        {"algorithm": "moon", "mu": 1.0, "rounds": 4},
        {"algorithm": "fedpart", "local_objective": "moon", "warmup_rounds": 2, "rounds_per_group": 1},
    ],
    ids=["moon", "fedpart_moon"],
)
def test_moon_flops_add_two_frozen_forwards_per_example_for_returning_clients(tmp_path, run):
    ds = toy(n_clients=4)
    cfg = config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": 4},
            model={"name": "digits_cnn+moon"},
            engine={"backend": "sequential", "clients_per_round": 2},
            runs=[{**run, "local_epochs": 2, "batch_size": 8}],
        )
    )
    list(run_experiment(cfg, ds, str(tmp_path), SequentialBackend(cfg, ds)))
    rounds, clients = (
        pd.read_parquet(tmp_path / "rounds.parquet"),
        pd.read_parquet(tmp_path / "clients.parquet"),
    )
    forward = thop_macs(build_model("digits_cnn+moon", num_classes=10, input_shape=(1, 8, 8)), (1, 8, 8))
    seen, returning_rounds = set(), 0
    for _, r in rounds.sort_values("round").iterrows():
        cohort = clients[clients["round"] == r["round"]]
        train = 3 if r["phase"] == "full" else 2
        # l_con needs the previous model: z_glob and z_prev cost one forward pass F each
        passes = [train + (2 if c in seen else 0) for c in cohort["client_id"]]
        returning_rounds += any(c in seen for c in cohort["client_id"])
        assert r["flops"] == sum(n * 2 * p * forward for n, p in zip(cohort["n_examples"], passes)), r[
            "round"
        ]
        seen.update(cohort["client_id"])
    assert returning_rounds >= 1
    assert set(rounds["phase"]) == ({"full"} if run["algorithm"] == "moon" else {"full", "partial"})


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
    w0 = build_model(
        "digits_cnn", num_classes=10, input_shape=(1, 8, 8), generator=torch_rng(2, "init")
    ).state_dict()
    sa, sb = avg.init_state(w0), algo.init_state(w0)
    for r in range(3):
        pa, pb = avg.plan_round(sa, r, (0, 1)), algo.plan_round(sb, r, (0, 1))
        assert pb.phase == "partial" and set(pb.trainable) == {
            k for k, _ in build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8)).named_parameters()
        }
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


CONTRACT = {
    "fedavg": ({"rounds": 2}, "digits_cnn"),
    "fedprox": ({"rounds": 2, "mu": 0.01}, "digits_cnn"),
    "moon": ({"rounds": 2, "mu": 1.0}, "digits_cnn+moon"),
    "fedpart": ({"warmup_rounds": 1, "rounds_per_group": 1, "cycles": 1}, "digits_cnn"),
    "fedma": ({"rounds": 1, "iterations": 1}, "digits_cnn"),
    "pfnm": ({"iterations": 1}, "digits_cnn"),
    "ensemble": ({}, "digits_cnn"),
    "local": ({}, "digits_cnn"),
    "entire_data": ({"rounds": 2}, "digits_cnn"),
    "fedavgm": ({"rounds": 2}, "digits_cnn"),
    "fedadam": ({"rounds": 2}, "digits_cnn"),
    "fedyogi": ({"rounds": 2}, "digits_cnn"),
    "fedadagrad": ({"rounds": 2}, "digits_cnn"),
    "scaffold": ({"rounds": 2}, "digits_cnn"),
    "fednova": ({"rounds": 2}, "digits_cnn"),
}


def test_the_contract_covers_every_registered_algorithm():
    assert set(CONTRACT) == set(ALGORITHMS)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_every_algorithm_runs_with_finite_metrics_and_the_fixed_schema(name, tmp_path):
    extra, model = CONTRACT[name]
    raw = tiny_experiment(
        data={"dataset": "digits", "num_clients": 3},
        model={"name": model},
        engine={"backend": "sequential", "clients_per_round": 3},
        runs=[{"algorithm": name, "local_epochs": 1, "batch_size": 32, **extra}],
    )
    cfg = config.parse(raw)
    ds = toy(n_clients=3)
    events = list(run_experiment(cfg, ds, str(tmp_path), SequentialBackend(cfg, ds)))
    assert events[-1]["status"] == "finished"
    for table, schema in (("runs", RUNS_SCHEMA), ("rounds", ROUNDS_SCHEMA), ("clients", CLIENTS_SCHEMA)):
        assert pq.read_schema(tmp_path / f"{table}.parquet").names == schema.names
    r = pd.read_parquet(tmp_path / "rounds.parquet")
    last = r.iloc[-1]
    assert np.isfinite(last["test_accuracy"]) and np.isfinite(last["test_loss"]) and last["flops"] > 0
    assert (r["bytes_up"] >= 0).all() and (r["cum_bytes"].diff().fillna(0) >= 0).all()


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
