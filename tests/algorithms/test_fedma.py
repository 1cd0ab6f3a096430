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
from fedsim.algorithms.fedma import CLASS_COUNTS, PFNM, FedMA, match_layer
from fedsim.engine import api
from fedsim.errors import FedsimError
from fedsim.matching import atom_prior_mean, layer_atoms, n_units, permute_next_input, permute_units
from fedsim.models import build_model
from fedsim.rng import torch_rng
from tests.helpers import digits_cnn, tiny_experiment

INPUT = (1, 8, 8)


def experiment(algorithm="pfnm", num_clients=3, **run):
    raw = tiny_experiment(
        data={"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": num_clients},
        engine={"backend": "sequential", "clients_per_round": num_clients},
        runs=[{"algorithm": algorithm, **run}],
    )
    return config.parse(raw)


def client_models(n: int, seed0: int = 10):
    return [digits_cnn(seed0 + j) for j in range(n)]


def pfnm_global(states, cfg, counts=None):
    """The server side of PFNM (FedMA's layer-wise matching recursion) over given client models."""
    algo = PFNM(cfg.runs[0], cfg, 10, INPUT)
    counts = counts or [np.full(10, 5, dtype=np.int64)] * len(states)
    results = [
        ClientResult(
            client_id=j,
            round=0,
            upload={**P.to_numpy(s), CLASS_COUNTS: c},
            n_examples=50,
            train_loss=0.0,
            bytes_up=0,
            bytes_down=0,
            seconds=0.0,
        )
        for j, (s, c) in enumerate(zip(states, counts))
    ]
    plan = algo.plan_round(algo.init_state(states[0]), 0, tuple(range(len(states))))
    state = algo.aggregate(algo.init_state(states[0]), plan, results)
    return algo, state


def random_perms(model, rng):
    return [torch.as_tensor(rng.permutation(model.widths[l.name])) for l in model.match_layers()]


def forward(params, widths, x):
    m = digits_cnn(widths=widths)
    m.load_state_dict(params)
    m.eval()
    with torch.no_grad():
        return m(x)


def test_permuting_a_clients_hidden_units_leaves_its_function_unchanged():
    m = client_models(1)[0]
    layers = m.match_layers()
    permuted = permute_units(m.state_dict(), layers, random_perms(m, np.random.default_rng(0)))
    x = torch.randn(16, *INPUT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        forward(permuted, m.widths, x), forward(m.state_dict(), m.widths, x), rtol=1e-5, atol=1e-5
    )
    assert not torch.equal(permuted["conv1.weight"], m.state_dict()["conv1.weight"])


@pytest.mark.parametrize("which", [0, 2])
def test_matched_global_model_is_unchanged_when_one_client_is_permuted(which):
    cfg = experiment(iterations=3)
    states = [m.state_dict() for m in client_models(3)]
    _, base = pfnm_global(states, cfg)
    layers = client_models(1)[0].match_layers()
    perm = permute_units(states[which], layers, random_perms(client_models(1)[0], np.random.default_rng(1)))
    _, other = pfnm_global([perm if j == which else s for j, s in enumerate(states)], cfg)
    assert base.algo_state.widths == other.algo_state.widths
    x = torch.randn(32, *INPUT, generator=torch.Generator().manual_seed(2))
    # The global neurons' order follows the first client's, so compare functions, not tensors.
    torch.testing.assert_close(
        forward(other.params, other.algo_state.widths, x),
        forward(base.params, base.algo_state.widths, x),
        rtol=1e-4,
        atol=1e-4,
    )


MODELS_IN = {"digits_cnn": (1, 8, 8), "lenet": (1, 28, 28), "vgg9": (3, 32, 32), "char_lstm": (80,)}


@pytest.mark.parametrize("name", list(MODELS_IN))
def test_permuted_copies_of_one_network_match_back_to_that_network(name):
    # Sharp likelihood (sigma2 small) so the MAP estimate is the shared neuron, not a prior-shrunk one,
    # and a small IBP mass (the paper's Shakespeare gamma): for identical atoms the data term favours
    # joining an existing neuron by only ||w||^2, which gamma = 7's new-neuron bonus would outweigh.
    shape = MODELS_IN[name]
    k = 80 if name == "char_lstm" else 10
    raw = tiny_experiment(
        data={"dataset": "digits", "num_clients": 3},
        model={"name": name},
        engine={"backend": "sequential", "clients_per_round": 3},
        runs=[{"algorithm": "pfnm", "sigma2": 1e-6, "gamma": 1e-3, "iterations": 1}],
    )
    cfg = config.parse(raw)
    m = build_model(name, num_classes=k, input_shape=shape, generator=torch_rng(4, "init"))
    rng = np.random.default_rng(5)
    copies = [permute_units(m.state_dict(), m.match_layers(), random_perms(m, rng)) for _ in range(3)]
    algo = PFNM(cfg.runs[0], cfg, k, shape)
    results = [
        ClientResult(
            client_id=j,
            round=0,
            upload={**P.to_numpy(c), CLASS_COUNTS: np.ones(k, np.int64)},
            n_examples=10,
            train_loss=0.0,
            bytes_up=0,
            bytes_down=0,
            seconds=0.0,
        )
        for j, c in enumerate(copies)
    ]
    state = algo.aggregate(algo.init_state(copies[0]), algo.plan_round(None, 0, (0, 1, 2)), results)
    assert state.algo_state.widths == m.widths  # one global neuron per original neuron
    g = torch.Generator().manual_seed(3)
    x = (
        torch.randint(0, k, (8, 80), generator=g)
        if name == "char_lstm"
        else torch.randn(8, *shape, generator=g)
    )
    glob = build_model(name, num_classes=k, input_shape=shape, widths=state.algo_state.widths)
    glob.load_state_dict(state.params)
    m.eval(), glob.eval()
    with torch.no_grad():
        torch.testing.assert_close(glob(x), m(x), rtol=1e-3, atol=1e-3)


def test_classifier_is_weighted_by_class_proportions():
    cfg = experiment()
    states = [m.state_dict() for m in client_models(2)]
    counts = [np.array([3, 0] + [1] * 8), np.array([1, 0] + [1] * 8)]
    algo, state = pfnm_global(
        [states[0], states[0]], cfg, counts
    )  # identical clients: rows must be unchanged
    _w, b = algo.classifier_keys
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

    for layer in algo.layers:
        tensors, a = match_layer(uploads, layer, cfg.runs[0], 0)
        for j in range(3):
            assigns[j].append(a[j])
        uploads = [permute_next_input(u, layer, aj, n_units(tensors, layer)) for u, aj in zip(uploads, a)]
    state.algo_state.prev_assign = assigns
    plan = fedma.plan_round(state, 0, (0, 1, 2))
    for j in range(3):
        sliced = fedma.client_downlink(state, plan, j)
        assert {k: tuple(v.shape) for k, v in sliced.items()} == {
            k: tuple(v.shape) for k, v in copies[j].items()
        }
        for k in sliced:
            torch.testing.assert_close(sliced[k], copies[j][k], rtol=1e-4, atol=1e-5)


def test_two_fedma_rounds_on_digits_log_phases_exact_bytes_and_a_growing_model(tmp_path):
    cfg = experiment(
        algorithm="fedma",
        num_clients=3,
        rounds=2,
        local_epochs=1,
        retrain_epochs=1,
        lr=0.05,
        batch_size=32,
        iterations=2,
    )
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
    assert r["trainable_params"].tolist()[:4] == [
        38282,
        (32 * L1 * 9 + 32) + (64 * 32 * 16 + 64) + (10 * 64 + 10),
        (64 * L2 * 16 + 64) + (10 * 64 + 10),
        10 * L3 + 10,
    ]
    assert r["global_params"].iloc[3] == grown
    assert 16 <= L1 <= 3 * 16 and 32 <= L2 <= 3 * 32 and 64 <= L3 <= 3 * 64  # max_j L_j <= L <= sum_j L_j
    assert grown > 38282
    # FedMA round 2 starts from the global model sliced back to every client's original widths
    assert r["bytes_down"].iloc[4] == J * 38282 * 4
    assert (r["cum_bytes"] == (r["bytes_up"] + r["bytes_down"]).cumsum()).all()
    assert r["test_accuracy"].iloc[-1] > 0.5


def test_layer_wise_retraining_has_no_weight_decay_and_the_classifier_round_follows_appendix_a():
    # docs/algorithms.md section 4 (paper App. A): the first round of a pass trains the whole model with
    # the run's settings; retraining after a matched layer uses no weight decay; the classifier
    # round uses lr / 10, weight decay 1e-4 and 3x the retraining epochs.
    cfg = experiment("fedma", lr=0.05, weight_decay=5e-4, local_epochs=2, retrain_epochs=3)
    algo = FedMA(cfg.runs[0], cfg, 10, INPUT)
    state = algo.init_state(P.clone(digits_cnn().state_dict()))
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
    raw = tiny_experiment(
        data={"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 3},
        engine={"backend": "ray", "clients_per_round": 3, "round_timeout_s": 60},
        runs=[{"algorithm": algorithm}],
    )
    with pytest.raises(FedsimError, match="timeout_policy to wait or fail"):
        config.parse(raw)  # timeout_policy defaults to drop
    for policy in ("wait", "fail"):
        raw["engine"]["timeout_policy"] = policy
        assert config.parse(raw).engine.timeout_policy == policy


def _char_lstm_experiment(**run):
    raw = tiny_experiment(
        data={"dataset": "digits", "num_clients": 2},
        model={"name": "char_lstm"},
        engine={"backend": "sequential", "clients_per_round": 2},
        runs=[{"algorithm": "fedma", **run}],
    )
    return config.parse(raw)


def test_the_lstm_decoder_retrains_at_the_runs_lr_and_cnns_keep_appendix_a():
    # docs/algorithms.md section 4: the authors' LSTM code retrains the decoder at the run's lr, momentum
    # 0.9, weight decay 1e-4 for the retrain epochs; their CNN code uses lr / 10 and 3x the epochs.
    cfg = _char_lstm_experiment(lr=0.25, retrain_epochs=5, local_epochs=10)
    algo = FedMA(cfg.runs[0], cfg, 80, (80,))
    last = algo.plan_round(None, algo.N - 1, (0, 1))
    assert (last.phase, last.lr, last.local_epochs, last.weight_decay, last.momentum) == (
        "classifier",
        0.25,
        5,
        1e-4,
        0.9,
    )
    # the Appendix A rule stays one setting away, and a CNN can take the LSTM's rule
    cfg = _char_lstm_experiment(lr=0.25, retrain_epochs=5, classifier_retrain="appendix_a")
    algo = FedMA(cfg.runs[0], cfg, 80, (80,))
    last = algo.plan_round(None, algo.N - 1, (0, 1))
    assert (last.lr, last.local_epochs) == (pytest.approx(0.025), 15)
    cfg = experiment("fedma", lr=0.05, retrain_epochs=3, classifier_retrain="plain")
    algo = FedMA(cfg.runs[0], cfg, 10, INPUT)
    assert (
        algo.plan_round(None, algo.N - 1, (0, 1, 2)).lr,
        algo.plan_round(None, algo.N - 1, (0, 1, 2)).local_epochs,
    ) == (0.05, 3)


@pytest.mark.parametrize("estimate", ["mean", "map"])
def test_lstm_embedding_and_input_weights_are_the_plain_mean_of_matched_clients(estimate):
    # Authors' LSTM code (lstm_fedma_with_comm.py): the global embedding and input-to-hidden weights and
    # biases are sum / count over the matched clients, not the prior-shrunk (mu0 + sum w) / (n + 1).
    cfg = _char_lstm_experiment(gamma=1e-3, lstm_estimate=estimate)
    m = build_model(
        "char_lstm",
        num_classes=80,
        input_shape=(80,),
        widths={"embedding": 6, "lstm": 5},
        generator=torch_rng(7, "init"),
    )
    other = build_model(
        "char_lstm",
        num_classes=80,
        input_shape=(80,),
        widths={"embedding": 6, "lstm": 5},
        generator=torch_rng(8, "init"),
    )
    a = m.state_dict()
    # client 1: client 0's units permuted plus a small perturbation, so each unit has one clear partner
    rng = np.random.default_rng(0)
    b = permute_units(a, m.match_layers(), random_perms(m, rng))
    b = {k: v + 0.01 * other.state_dict()[k] for k, v in b.items()}
    uploads = [a, b]
    for layer in m.match_layers():
        tensors, (a0, a1) = match_layer(uploads, layer, cfg.runs[0], seed=0)
        assert len(set(a0.tolist()) & set(a1.tolist())) == len(a0)  # every unit matched across the two
        atoms0, atoms1 = layer_atoms(uploads[0], layer), layer_atoms(uploads[1], layer)
        want = torch.zeros_like(atoms0)
        want[torch.as_tensor(a0)] += atoms0
        want[torch.as_tensor(a1)] += atoms1
        prior = torch.as_tensor(atom_prior_mean(layer, atoms0.shape[1]), dtype=want.dtype)
        want = want / 2 if estimate == "mean" else (want + prior) / 3  # sigma2 = sigma0_2 = 1: n + 1 = 3
        torch.testing.assert_close(layer_atoms(tensors, layer), want, rtol=1e-5, atol=1e-6)
        L = n_units(tensors, layer)
        uploads = [permute_next_input(u, layer, aa, L) for u, aa in zip(uploads, (a0, a1))]


def test_pfnm_keeps_apart_last_hidden_neurons_that_feed_different_classes():
    # The root cause of PFNM's 0.29 on digits (docs/reproductions.md): matched on their incoming weights
    # alone, fc1 neurons of different clients that vote for different classes were merged. Two clients
    # share conv1, conv2 and fc1's incoming weights exactly, but client 1's classifier sends every fc1
    # unit to other classes: with the outgoing weights in the atom (almost) no fc1 unit may be merged.
    cfg = experiment(num_clients=2, sigma2=0.05, gamma=1.0)
    m = client_models(1)[0]
    a = m.state_dict()
    b = dict(a)
    w = a["fc2.weight"]
    b["fc2.weight"] = torch.roll(w, shifts=5, dims=0) * -1.0  # each unit now votes against its old classes
    scale = 3.0 / w.abs().mean()
    a = {**a, "fc2.weight": w * scale}
    b = {**b, "fc2.weight": b["fc2.weight"] * scale}
    _, state = pfnm_global([a, b], cfg)
    assert state.algo_state.widths["fc1"] >= 1.9 * m.widths["fc1"]  # (almost) no fc1 unit merged
    assert state.algo_state.widths["conv1"] == m.widths["conv1"]  # identical conv units still merged
    cfg = experiment(num_clients=2, sigma2=0.05, gamma=1.0, match_outgoing=False)
    _, state = pfnm_global([a, b], cfg)
    assert state.algo_state.widths["fc1"] == m.widths["fc1"]  # the old behaviour merges them all


def test_pfnm_and_the_ensemble_train_locally_with_the_authors_momentum():
    # IBM/FedMA main.py, train_net: SGD momentum 0.9 for the local models of PFNM and the ensemble.
    for algorithm in ("pfnm", "ensemble"):
        assert experiment(algorithm).runs[0].momentum == 0.9
        algo_cls = PFNM if algorithm == "pfnm" else None
        if algo_cls:
            cfg = experiment(algorithm)
            assert algo_cls(cfg.runs[0], cfg, 10, INPUT).plan_round(None, 0, (0, 1, 2)).momentum == 0.9


def test_pfnm_one_shot_on_digits_beats_one_round_of_fedavg_from_independent_inits(tmp_path):
    # Figure 1 of the FedMA paper, on digits: PFNM one-shot well above one round of coordinate-wise
    # averaging of independently initialised local models (which lands near chance).
    raw = tiny_experiment(
        data={"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 8},
        seed=1,
        engine={"backend": "sequential", "clients_per_round": 8},
        runs=[
            {"algorithm": "pfnm", "local_epochs": 10, "lr": 0.05, "batch_size": 32},
            {
                "algorithm": "fedavg",
                "init": "independent",
                "rounds": 1,
                "local_epochs": 10,
                "lr": 0.05,
                "batch_size": 32,
                "momentum": 0.9,
            },
        ],
    )
    cfg = config.parse(raw)
    dataset = api.prepare(cfg)
    for _ in api.execute(cfg, dataset, str(tmp_path)):
        pass
    r = pd.read_parquet(tmp_path / "rounds.parquet")
    acc = r.dropna(subset=["test_accuracy"]).groupby("run_id")["test_accuracy"].last()
    assert acc["pfnm"] > 0.7
    assert acc["fedavg"] < 0.3
