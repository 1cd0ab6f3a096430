"""FedMA and PFNM on the engine: invariance to unit permutations, recovery of permuted copies,
slicing back to a client's widths, and the Parquet rows of a 2-round FedMA run on digits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import config
from fedsim import params as P
from fedsim.algorithms import ClientResult
from fedsim.algorithms.fedma import CLASS_COUNTS, PFNM, FedMA
from fedsim.engine import api
from fedsim.errors import FedsimError
from fedsim.matching import permute_units
from fedsim.models import build_model
from fedsim.rng import torch_rng
from tests.conftest import tiny_experiment

INPUT = (1, 8, 8)


def experiment(algorithm="pfnm", num_clients=3, **run):
    raw = tiny_experiment(data={"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": num_clients},
                          engine={"backend": "sequential", "clients_per_round": num_clients},
                          runs=[{"algorithm": algorithm, **run}])
    return config.parse(raw)


def client_models(n: int, seed0: int = 10):
    return [build_model("digits_cnn", num_classes=10, input_shape=INPUT, generator=torch_rng(seed0 + j, "init"))
            for j in range(n)]


def pfnm_global(states, cfg, counts=None):
    """The server side of PFNM (FedMA's layer-wise matching recursion) over given client models."""
    algo = PFNM(cfg.runs[0], cfg, 10, INPUT)
    counts = counts or [np.full(10, 5, dtype=np.int64)] * len(states)
    results = [ClientResult(client_id=j, round=0, upload={**P.to_numpy(s), CLASS_COUNTS: c}, n_examples=50,
                            train_loss=0.0, bytes_up=0, bytes_down=0, seconds=0.0)
               for j, (s, c) in enumerate(zip(states, counts))]
    plan = algo.plan_round(algo.init_state(states[0]), 0, tuple(range(len(states))))
    state = algo.aggregate(algo.init_state(states[0]), plan, results)
    return algo, state


def random_perms(model, rng):
    return [torch.as_tensor(rng.permutation(model.widths[l.name])) for l in model.match_layers()]


def forward(params, widths, x):
    m = build_model("digits_cnn", num_classes=10, input_shape=INPUT, widths=widths)
    m.load_state_dict(params)
    m.eval()
    with torch.no_grad():
        return m(x)


def test_permuting_a_clients_hidden_units_leaves_its_function_unchanged():
    m = client_models(1)[0]
    layers = m.match_layers()
    permuted = permute_units(m.state_dict(), layers, random_perms(m, np.random.default_rng(0)))
    x = torch.randn(16, *INPUT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(forward(permuted, m.widths, x), forward(m.state_dict(), m.widths, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(permuted["conv1.weight"], m.state_dict()["conv1.weight"])


@pytest.mark.parametrize("which", [0, 2])
def test_matched_global_model_is_unchanged_when_one_client_is_permuted(which):
    cfg = experiment(iterations=3)
    states = [m.state_dict() for m in client_models(3)]
    _, base = pfnm_global(states, cfg)
    layers = client_models(1)[0].match_layers()
    perm = permute_units(states[which], layers, random_perms(client_models(1)[0], np.random.default_rng(1)))
    _, other = pfnm_global([perm if j == which else s for j, s in enumerate(states)], cfg)
    assert base.extra["widths"] == other.extra["widths"]
    x = torch.randn(32, *INPUT, generator=torch.Generator().manual_seed(2))
    # The global neurons' order follows the first client's, so compare functions, not tensors.
    torch.testing.assert_close(forward(other.params, other.extra["widths"], x),
                               forward(base.params, base.extra["widths"], x), rtol=1e-4, atol=1e-4)


MODELS_IN = {"digits_cnn": (1, 8, 8), "lenet": (1, 28, 28), "vgg9": (3, 32, 32), "char_lstm": (80,)}


@pytest.mark.parametrize("name", list(MODELS_IN))
def test_permuted_copies_of_one_network_match_back_to_that_network(name):
    # Sharp likelihood (sigma2 small) so the MAP estimate is the shared neuron, not a prior-shrunk one,
    # and a small IBP mass (the paper's Shakespeare gamma): for identical atoms the data term favours
    # joining an existing neuron by only ||w||^2, which gamma = 7's new-neuron bonus would outweigh.
    shape = MODELS_IN[name]
    k = 80 if name == "char_lstm" else 10
    raw = tiny_experiment(data={"dataset": "digits", "num_clients": 3}, model={"name": name},
                          engine={"backend": "sequential", "clients_per_round": 3},
                          runs=[{"algorithm": "pfnm", "sigma2": 1e-6, "gamma": 1e-3, "iterations": 1}])
    cfg = config.parse(raw)
    m = build_model(name, num_classes=k, input_shape=shape, generator=torch_rng(4, "init"))
    rng = np.random.default_rng(5)
    copies = [permute_units(m.state_dict(), m.match_layers(), random_perms(m, rng)) for _ in range(3)]
    algo = PFNM(cfg.runs[0], cfg, k, shape)
    results = [ClientResult(client_id=j, round=0, upload={**P.to_numpy(c), CLASS_COUNTS: np.ones(k, np.int64)},
                            n_examples=10, train_loss=0.0, bytes_up=0, bytes_down=0, seconds=0.0)
               for j, c in enumerate(copies)]
    state = algo.aggregate(algo.init_state(copies[0]), algo.plan_round(None, 0, (0, 1, 2)), results)
    assert state.extra["widths"] == m.widths  # one global neuron per original neuron
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, k, (8, 80), generator=g) if name == "char_lstm" else torch.randn(8, *shape, generator=g)
    glob = build_model(name, num_classes=k, input_shape=shape, widths=state.extra["widths"])
    glob.load_state_dict(state.params)
    m.eval(), glob.eval()
    with torch.no_grad():
        torch.testing.assert_close(glob(x), m(x), rtol=1e-3, atol=1e-3)


def test_classifier_is_weighted_by_class_proportions():
    cfg = experiment()
    states = [m.state_dict() for m in client_models(2)]
    counts = [np.array([3, 0] + [1] * 8), np.array([1, 0] + [1] * 8)]
    algo, state = pfnm_global([states[0], states[0]], cfg, counts)  # identical clients: rows must be unchanged
    w, b = algo.classifier_keys
    torch.testing.assert_close(state.params[b], states[0][b])
    algo, state = pfnm_global(states, cfg, counts)
    # class 0: 3/4 of client 0 + 1/4 of client 1 on the bias, which no permutation moves
    torch.testing.assert_close(state.params[b][0], 0.75 * states[0][b][0] + 0.25 * states[1][b][0])
    # class 1 is absent everywhere: plain mean
    torch.testing.assert_close(state.params[b][1], 0.5 * (states[0][b][1] + states[1][b][1]))


def test_slicing_the_global_model_back_gives_each_client_its_original_architecture_and_weights():
    cfg = experiment(algorithm="fedma", sigma2=1e-6, gamma=1e-3, iterations=0)
    m = client_models(1)[0]
    rng = np.random.default_rng(7)
    perms = [random_perms(m, rng) for _ in range(3)]
    copies = [permute_units(m.state_dict(), m.match_layers(), p) for p in perms]
    _, state = pfnm_global(copies, cfg)
    fedma = FedMA(cfg.runs[0], cfg, 10, INPUT)
    # PFNM's assignments of client j per layer, as FedMA keeps them between rounds
    algo = PFNM(cfg.runs[0], cfg, 10, INPUT)
    uploads = [dict(c) for c in copies]
    assigns = {j: [] for j in range(3)}
    from fedsim.algorithms.fedma import match_layer
    from fedsim.matching import n_units, permute_next_input
    for k, layer in enumerate(algo.layers):
        tensors, a = match_layer(uploads, layer, cfg.runs[0], 0)
        for j in range(3):
            assigns[j].append(a[j])
        uploads = [permute_next_input(u, layer, aj, n_units(tensors, layer)) for u, aj in zip(uploads, a)]
    state.extra["prev_assign"] = assigns
    plan = fedma.plan_round(state, 0, (0, 1, 2))
    for j in range(3):
        sliced = fedma.client_downlink(state, plan, j)
        assert {k: tuple(v.shape) for k, v in sliced.items()} == {k: tuple(v.shape) for k, v in copies[j].items()}
        for k in sliced:
            torch.testing.assert_close(sliced[k], copies[j][k], rtol=1e-4, atol=1e-5)


def test_two_fedma_rounds_on_digits_log_phases_exact_bytes_and_a_growing_model(tmp_path):
    cfg = experiment(algorithm="fedma", num_clients=3, rounds=2, local_epochs=1, retrain_epochs=1,
                     lr=0.05, batch_size=32, iterations=2)
    ds = api.prepare(cfg)
    run_dir = api.new_run_dir(tmp_path, "fedma")
    list(api.execute(cfg, ds, run_dir))
    r = pd.read_parquet(run_dir / "rounds.parquet").sort_values("round")
    J = 3
    assert r["phase"].tolist() == ["match", "match", "match", "classifier"] * 2
    assert r["layer"].tolist() == [0, 1, 2, 3] * 2
    assert r["test_accuracy"].isna().tolist() == [True, True, True, False] * 2
    # uplink of round k: layer k's tensors of every client (float32) at the client's widths
    assert r["bytes_up"].iloc[0] == J * (16 * 1 * 3 * 3 + 16) * 4
    # downlink of round 1: global conv1 (L1 x 1 x 3 x 3 + L1, float32) + 16 int32 assignments each
    L1 = (r["bytes_down"].iloc[1] // J - 16 * 4) // 4 // 10
    assert r["bytes_down"].iloc[1] == J * ((L1 * 9 + L1) * 4 + 16 * 4)
    # uplink of round 1: conv2 with its input axis padded to L1: (32 x L1 x 3 x 3 + 32) float32
    assert r["bytes_up"].iloc[1] == J * (32 * L1 * 9 + 32) * 4
    L2 = (r["bytes_down"].iloc[2] // J - 32 * 4) // 4 // (L1 * 9 + 1)
    L3 = (r["bytes_down"].iloc[3] // J - 64 * 4) // 4 // (L2 * 16 + 1)
    assert r["bytes_up"].iloc[3] == J * ((10 * L3 + 10) * 4 + 10 * 8)  # classifier + int64 class counts
    grown = (L1 * 9 + L1) + (L2 * L1 * 9 + L2) + (L3 * L2 * 16 + L3) + (10 * L3 + 10)
    # a layer step trains the client's local model from layer k on: layer k's input axis is the
    # matched width of layer k - 1, its output and later layers keep the client's widths
    assert r["trainable_params"].tolist()[:4] == [38282, (32 * L1 * 9 + 32) + (64 * 32 * 16 + 64) + (10 * 64 + 10),
                                                  (64 * L2 * 16 + 64) + (10 * 64 + 10), 10 * L3 + 10]
    assert r["global_params"].iloc[3] == grown
    assert 16 <= L1 <= 3 * 16 and 32 <= L2 <= 3 * 32 and 64 <= L3 <= 3 * 64  # max_j L_j <= L <= sum_j L_j
    assert grown > 38282
    # FedMA round 2 starts from the global model sliced back to every client's original widths
    assert r["bytes_down"].iloc[4] == J * 38282 * 4
    assert (r["cum_bytes"] == (r["bytes_up"] + r["bytes_down"]).cumsum()).all()
    assert r["test_accuracy"].iloc[-1] > 0.5


def test_layer_wise_retraining_has_no_weight_decay_and_the_classifier_round_follows_appendix_a():
    # ALGORITHMS.md section 4 (paper App. A): the first round of a pass trains the whole model with
    # the run's settings; retraining after a matched layer uses no weight decay; the classifier
    # round uses lr / 10, weight decay 1e-4 and 3x the retraining epochs.
    cfg = experiment("fedma", lr=0.05, weight_decay=5e-4, local_epochs=2, retrain_epochs=3)
    algo = FedMA(cfg.runs[0], cfg, 10, INPUT)
    state = algo.init_state(P.clone(build_model("digits_cnn", num_classes=10, input_shape=INPUT).state_dict()))
    plans = [algo.plan_round(state, r, (0, 1, 2)) for r in range(algo.N)]
    assert algo.N >= 3
    first, *retrain, last = plans
    assert (first.local_epochs, first.lr, first.weight_decay, first.trainable) == (2, 0.05, 5e-4, None)
    for p in retrain:
        assert (p.phase, p.local_epochs, p.lr, p.weight_decay, p.momentum) == ("match", 3, 0.05, 0.0, 0.9)
    assert (last.phase, last.local_epochs, last.weight_decay) == ("classifier", 9, 1e-4)
    assert last.lr == pytest.approx(0.005)


@pytest.mark.parametrize("algorithm", ["fedma", "pfnm"])
def test_matching_algorithms_refuse_a_timeout_policy_that_drops_clients(algorithm):
    raw = tiny_experiment(data={"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 3},
                          engine={"backend": "ray", "clients_per_round": 3, "round_timeout_s": 60},
                          runs=[{"algorithm": algorithm}])
    with pytest.raises(FedsimError, match="timeout_policy to wait or fail"):
        config.parse(raw)  # timeout_policy defaults to drop
    for policy in ("wait", "fail"):
        raw["engine"]["timeout_policy"] = policy
        assert config.parse(raw).engine.timeout_policy == policy
