"""The one-shot baselines of FedMA's Figure 1: the ensemble of the clients' models (uniform mean
of their softmax) and the local models (the mean of each model's own accuracy and loss)."""

from __future__ import annotations

import pytest
import torch

from fedsim import config
from fedsim import params as P
from fedsim.algorithms import ClientResult
from tests.helpers import digits_cnn, tiny_experiment, toy


def _evaluate_three_members(algorithm: str):
    """A one-shot baseline of three digits-CNN members from seeds 1, 2, 3, evaluated on a toy test
    set: (accuracy, loss, the members, x, y)."""
    from fedsim.algorithms import ALGORITHMS

    ds = toy(n_clients=3, per_client=5, n_test=30)
    cfg = config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": 3},
            engine={"backend": "sequential", "clients_per_round": 3},
            runs=[{"algorithm": algorithm}],
        )
    )
    algo = ALGORITHMS[algorithm](cfg.runs[0], cfg, 10, (1, 8, 8))
    members = [digits_cnn(s) for s in (1, 2, 3)]
    state0 = algo.init_state(P.clone(members[0].state_dict()))
    results = [
        ClientResult(
            client_id=j,
            round=0,
            upload=P.to_numpy(m.state_dict()),
            n_examples=5,
            train_loss=0.0,
            bytes_up=0,
            bytes_down=0,
            seconds=0.0,
        )
        for j, m in enumerate(members)
    ]
    state = algo.aggregate(state0, algo.plan_round(state0, 0, (0, 1, 2)), results)
    acc, loss = algo.evaluate(state, digits_cnn(), ds.test, 7)
    return acc, loss, members, torch.from_numpy(ds.test.x), torch.from_numpy(ds.test.y)


def test_ensemble_predicts_the_uniform_mean_of_its_members_softmax():
    # FedMA paper, Figure 1's ensemble: p(y|x) = (1/J) sum_j softmax(f_j(x)); accuracy and
    # cross-entropy of that mixture, computed here by hand from three members.
    acc, loss, members, x, y = _evaluate_three_members("ensemble")
    with torch.no_grad():
        probs = [torch.softmax(m.eval()(x), 1) for m in members]
    mix = (probs[0] + probs[1] + probs[2]) / 3
    assert acc == int((mix.argmax(1) == y).sum()) / len(y)
    assert loss == pytest.approx(float(-torch.log(mix[torch.arange(len(y)), y]).mean()), rel=1e-5)
    single = float(-torch.log(probs[0][torch.arange(len(y)), y]).mean())
    assert abs(loss - single) > 1e-3  # one member alone would not pass


def test_local_models_report_the_mean_of_each_members_own_accuracy_and_loss():
    # FedMA paper, Figure 1's "local models": every client's model on the global test set, averaged.
    acc, loss, members, x, y = _evaluate_three_members("local")
    with torch.no_grad():
        logits = [m.eval()(x) for m in members]
    accs = [float((z.argmax(1) == y).float().mean()) for z in logits]
    losses = [float(torch.nn.functional.cross_entropy(z, y)) for z in logits]
    assert acc == pytest.approx(sum(accs) / 3)
    assert loss == pytest.approx(sum(losses) / 3, rel=1e-5)
