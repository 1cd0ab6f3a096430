"""MOON: its contrastive loss by hand, the frozen global and previous models, mu = 0 equals
FedAvg, and the frozen forward passes in the FLOPs."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedsim import config
from fedsim import params as P
from fedsim.accounting import thop_macs
from fedsim.algorithms import ClientContext
from fedsim.algorithms.moon import MOON, MoonClientState, contrastive_loss
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.models import build_model
from fedsim.rng import torch_rng
from tests.helpers import cfg_for, tiny_experiment, toy


def _tables(raw, ds, tmp, name):
    cfg = config.parse(raw)
    out = tmp / name
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    return pd.read_parquet(out / "rounds.parquet"), pd.read_parquet(out / "clients.parquet")


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
