"""Tests of fedsim.matching: the BBP-MAP matcher (bbp.py) and the layer <-> atom views (atoms.py).

Everything is offline and small (whole file well under a minute on 2 cores). Reference formulas
are written here independently, as plain loops, from docs/algorithms.md section 2.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from fedsim.matching import (
    MatchResult,
    atom_prior_mean,
    atoms_to_layer,
    bbp_map,
    layer_atoms,
    permute_next_input,
    permute_recurrent,
    permute_units,
    score_matrix,
    slice_to_client,
)
from fedsim.matching import bbp as bbp_mod
from fedsim.models.base import FedModel, MatchLayer

# ============================================================================================
# independent reference formulas (plain loops)


def ref_scores(w, G, counts, J, sigma2=1.0, sigma0_2=1.0, gamma=7.0, mu0=0.0, K=None):
    """docs/algorithms.md section 2, one entry at a time."""
    w = np.asarray(w, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64).reshape(-1, w.shape[1])
    L_j, D = w.shape
    L = G.shape[0]
    K = L_j if K is None else K
    s = np.ones(D) / np.asarray(sigma2, dtype=np.float64)
    p0 = np.ones(D) / np.asarray(sigma0_2, dtype=np.float64)
    m0 = np.asarray(mu0, dtype=np.float64) * p0
    C = np.zeros((L_j, L + K))
    for l in range(L_j):
        wp = w[l] * s
        for i in range(L):
            P = p0 + counts[i] * s
            c = min(counts[i], 10)
            val = 0.0
            for d in range(D):
                val += (wp[d] + G[i, d]) ** 2 / (s[d] + P[d]) - G[i, d] ** 2 / P[d]
            C[l, i] = val + math.log(c / (J - c))
        for k in range(1, K + 1):
            val = 0.0
            for d in range(D):
                val += (wp[d] + m0[d]) ** 2 / (p0[d] + s[d]) - m0[d] ** 2 / p0[d]
            C[l, L + k - 1] = val - 2 * math.log(k) + 2 * math.log(gamma / J)
    return C


def ref_theta(atoms, assignments, L, sigma2=1.0, sigma0_2=1.0, mu0=0.0):
    """theta_i = (m0 + sum of matched w s) / (p0 + n_i s), PFNM Proposition 1."""
    D = np.asarray(atoms[0]).shape[1]
    s = np.ones(D) / np.asarray(sigma2, dtype=np.float64)
    p0 = np.ones(D) / np.asarray(sigma0_2, dtype=np.float64)
    G = np.tile(np.asarray(mu0, dtype=np.float64) * p0, (L, 1))
    P = np.tile(p0, (L, 1))
    for w, a in zip(atoms, assignments):
        for l, i in enumerate(a):
            G[i] += np.asarray(w[l], dtype=np.float64) * s
            P[i] += s
    return G / P


def check_invariants(res: MatchResult, atoms, **prior):
    sizes = [np.asarray(a).shape[0] for a in atoms]
    L = res.n_global
    assert len(res.assignments) == len(atoms)
    for a, n in zip(res.assignments, sizes):
        assert a.dtype == np.int64 and a.shape == (n,)
        assert len(set(a.tolist())) == n  # injective
        assert n == 0 or (a.min() >= 0 and a.max() < L)
    assert max(sizes) <= L <= sum(sizes)
    assert res.counts.dtype == np.int64 and res.counts.shape == (L,)
    np.testing.assert_array_equal(res.counts, np.bincount(np.concatenate(res.assignments), minlength=L))
    assert L == 0 or res.counts.min() >= 1
    assert res.global_atoms.shape == (L, np.asarray(atoms[0]).shape[1])
    np.testing.assert_allclose(
        res.global_atoms, ref_theta(atoms, res.assignments, L, **prior), rtol=1e-5, atol=1e-6
    )


# ============================================================================================
# score matrix and single matching steps


@pytest.mark.parametrize("vector_sigma", [False, True])
def test_score_matrix_matches_reference_loop(vector_sigma):
    rng = np.random.default_rng(1)
    J, L_j, L, D = 5, 4, 6, 7
    w = rng.normal(size=(L_j, D))
    counts = rng.integers(1, J, size=L)
    sigma2 = rng.uniform(0.5, 2.0, size=D) if vector_sigma else 0.7
    sigma0_2 = rng.uniform(0.5, 2.0, size=D) if vector_sigma else 1.3
    mu0 = np.r_[np.zeros(D - 1), 0.1]
    s = 1 / np.broadcast_to(sigma2, (D,))
    p0 = 1 / np.broadcast_to(sigma0_2, (D,))
    G = mu0 * p0 + rng.normal(size=(L, D)) * counts[:, None] * s  # m0 + sums of w' of `counts` clients
    kw = dict(sigma2=sigma2, sigma0_2=sigma0_2, gamma=3.0)
    got = score_matrix(w, G, counts, n_clients=J, prior_mean=mu0, **kw)
    ref = ref_scores(w, G, counts, J, mu0=mu0, **kw)
    assert got.shape == (L_j, L + L_j) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-9)
    # fewer new columns (the cap's K) and float32 input
    got32 = score_matrix(w.astype(np.float32), G, counts, n_clients=J, prior_mean=mu0, n_new=2, **kw)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ref[:, : L + 2], rtol=1e-4, atol=1e-3)


def test_fast_and_general_score_paths_agree():
    rng = np.random.default_rng(2)
    wp = torch.as_tensor(rng.normal(size=(5, 9)))
    G = torch.as_tensor(rng.normal(size=(7, 9)))
    counts = rng.integers(1, 4, size=7)
    prior = bbp_mod._make_prior(wp, 9, 0.5, 2.0, 0.1, 4, 7.0)
    assert prior.scalar is not None
    fast = bbp_mod._existing_scores(wp, G, counts, prior)
    general = bbp_mod._existing_scores(wp, G, counts, dataclasses.replace(prior, scalar=None))
    np.testing.assert_allclose(fast.numpy(), general.numpy(), rtol=1e-12, atol=1e-10)


def _assignment_value(C, a, L_before):
    """Score of the matcher's assignment: new rows take new columns k = 1..n_new (optimal order)."""
    old = a < L_before
    val = C[np.flatnonzero(old), a[old]].sum()
    n_new = int((~old).sum())
    # new column k has score row_term(l) + col_term(k); col_term decreasing in k
    row_term = C[:, L_before]  # k = 1 column holds row_term + col_term(1)
    col_term = C[0, L_before:] - C[0, L_before]
    return val + row_term[~old].sum() + col_term[:n_new].sum()


@pytest.mark.parametrize("sizes,D", [((4, 3), 5), ((3, 3, 3), 4), ((6, 2, 5, 4), 3), ((2, 5), 8)])
def test_each_greedy_step_is_an_optimal_assignment(sizes, D):
    """iterations=0: every client's assignment maximises the reference score against the state
    built by the clients before it (order: decreasing L_j, stable), as scipy finds it."""
    rng = np.random.default_rng(sum(sizes) * D)
    J = len(sizes)
    protos = rng.normal(size=(max(sizes) + 2, D))
    atoms = [protos[rng.choice(len(protos), n, replace=False)] + 0.3 * rng.normal(size=(n, D)) for n in sizes]
    kw = dict(sigma2=0.5, sigma0_2=2.0, gamma=2.0)
    res = bbp_map(atoms, iterations=0, **kw)
    check_invariants(res, atoms, sigma2=0.5, sigma0_2=2.0)
    order = np.argsort(-np.asarray(sizes), kind="stable")
    s = 1 / 0.5  # m0 = 0 (prior_mean 0), so G = sum of matched w * s
    for step, j in enumerate(order[1:], start=1):
        before = order[:step]
        L_before = max(int(res.assignments[k].max()) + 1 for k in before)
        G = np.zeros((L_before, D))
        counts = np.zeros(L_before, dtype=int)
        for k in before:
            G[res.assignments[k]] += atoms[k] * s
            counts[res.assignments[k]] += 1
        C = ref_scores(atoms[j], G, counts, J, gamma=2.0, sigma2=0.5, sigma0_2=2.0)
        rows, cols = linear_sum_assignment(C, maximize=True)
        best = C[rows, cols].sum()
        got = _assignment_value(C, res.assignments[j], L_before)
        assert got == pytest.approx(best, rel=1e-9, abs=1e-9)
        # new neurons get ids in row order after the existing ones
        new_ids = res.assignments[j][res.assignments[j] >= L_before]
        np.testing.assert_array_equal(new_ids, np.arange(L_before, L_before + new_ids.size))


def _improvement_left(atoms, res, j, **kw):
    """How much client j's score could still rise if it alone were re-matched against the global
    neurons of every other client (reference scores, scipy's optimum); 0 when it is optimal."""
    s = 1 / kw["sigma2"]
    used = sorted({int(g) for k, a in enumerate(res.assignments) if k != j for g in a})
    index = {g: i for i, g in enumerate(used)}
    G, counts = np.zeros((len(used), atoms[0].shape[1])), np.zeros(len(used), dtype=int)
    for k, a in enumerate(res.assignments):
        if k != j:
            for l, g in enumerate(a):
                G[index[int(g)]] += atoms[k][l] * s
                counts[index[int(g)]] += 1
    C = ref_scores(atoms[j], G, counts, len(atoms), **kw)
    rows, cols = linear_sum_assignment(C, maximize=True)
    mine = np.array([index.get(int(g), len(used) + 10**6) for g in res.assignments[j]])  # absent: new
    return C[rows, cols].sum() - _assignment_value(C, mine, len(used))


def test_refinement_sweeps_rematch_a_client_the_greedy_pass_left_suboptimal():
    """The greedy pass matches client 0 (the second largest) before clients 1 and 3 exist, and
    here it could then gain 1.26 by being re-matched against all others; the sweeps (remove a
    client, match it against the rest) leave no client with anything to gain."""
    rng = np.random.default_rng(2)
    protos = rng.normal(size=(7, 3))
    atoms = [protos[rng.choice(7, n, replace=False)] + 0.6 * rng.normal(size=(n, 3)) for n in (5, 4, 6, 3)]
    kw = dict(sigma2=0.5, sigma0_2=2.0, gamma=2.0)
    greedy = bbp_map(atoms, iterations=0, **kw)
    assert _improvement_left(atoms, greedy, 0, **kw) > 1.0
    swept = bbp_map(atoms, iterations=5, seed=7, **kw)
    check_invariants(swept, atoms, sigma2=0.5, sigma0_2=2.0)
    for j in range(4):
        assert _improvement_left(atoms, swept, j, **kw) == pytest.approx(0.0, abs=1e-9), j


def test_scipy_agrees_with_brute_force_on_tiny_score_matrices():
    rng = np.random.default_rng(3)
    for _ in range(5):
        C = ref_scores(rng.normal(size=(3, 2)), rng.normal(size=(2, 2)), [1, 2], 3)
        rows, cols = linear_sum_assignment(C, maximize=True)
        injections = itertools.permutations(range(C.shape[1]), 3)
        brute = max(sum(C[r, c] for r, c in enumerate(p)) for p in injections)
        assert C[rows, cols].sum() == pytest.approx(brute)


# ============================================================================================
# bbp_map contract


GRID = [
    (1,),
    (5,),
    (3, 3),
    (4, 1),
    (2, 6, 3),
    (5, 5, 5, 5),
    (7, 2, 4, 4, 1),
    (3, 0, 2),
]


@pytest.mark.parametrize("sizes", GRID)
@pytest.mark.parametrize("D", [1, 6])
@pytest.mark.parametrize("iterations", [0, 3])
def test_contract_over_grid(sizes, D, iterations):
    rng = np.random.default_rng(len(sizes) * 100 + D + iterations)
    atoms = [rng.normal(size=(n, D)) for n in sizes]
    res = bbp_map(atoms, iterations=iterations, seed=5)
    check_invariants(res, atoms)
    assert res.global_atoms.dtype == np.float64


def test_vector_variances_and_prior_mean():
    rng = np.random.default_rng(4)
    D = 5
    atoms = [rng.normal(size=(n, D)) for n in (4, 3, 5)]
    sigma2 = rng.uniform(0.2, 2, size=D)
    sigma0_2 = rng.uniform(0.2, 2, size=D)
    mu0 = np.r_[np.zeros(D - 1), 0.1]
    res = bbp_map(atoms, sigma2=sigma2, sigma0_2=sigma0_2, prior_mean=mu0, iterations=2)
    check_invariants(res, atoms, sigma2=sigma2, sigma0_2=sigma0_2, mu0=mu0)


@pytest.mark.parametrize("iterations", [0, 4])
def test_single_client_is_prior_shrunk_identity(iterations):
    w = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0], [0.2, 0.2, 0.2], [-4.0, 1.0, 2.0]])
    res = bbp_map([w], iterations=iterations)
    np.testing.assert_array_equal(res.assignments[0], np.arange(4))
    np.testing.assert_allclose(res.global_atoms, (0.0 + w) / 2)  # (mu0 + w) / 2 with defaults
    np.testing.assert_array_equal(res.counts, np.ones(4, dtype=np.int64))
    res = bbp_map([w], prior_mean=0.1, iterations=iterations)
    np.testing.assert_allclose(res.global_atoms, (0.1 + w) / 2)


@pytest.mark.parametrize("iterations", [0, 5])
def test_identical_permuted_clients_recover_permutations(iterations):
    rng = np.random.default_rng(6)
    L, D, J = 12, 10, 4
    base = 5.0 * rng.normal(size=(L, D))  # well separated
    perms = [rng.permutation(L) for _ in range(J)]
    atoms = [base[p] for p in perms]
    res = bbp_map(atoms, iterations=iterations, seed=1)
    check_invariants(res, atoms)
    assert res.n_global == L
    np.testing.assert_array_equal(res.counts, np.full(L, J))
    orig_of_global = np.empty(L, dtype=int)
    orig_of_global[res.assignments[0]] = perms[0]
    for p, a in zip(perms, res.assignments):
        np.testing.assert_array_equal(orig_of_global[a], p)
    # theta = J w / (J + 1): the prior-shrunk mean
    np.testing.assert_allclose(res.global_atoms, J * base[orig_of_global] / (J + 1))


def test_determinism_and_seeds():
    rng = np.random.default_rng(7)
    atoms = [rng.normal(size=(n, 4)) for n in (6, 6, 5, 4)]
    a, b = bbp_map(atoms, iterations=0, seed=1), bbp_map(atoms, iterations=0, seed=2)
    for x, y in zip(a.assignments, b.assignments):
        np.testing.assert_array_equal(x, y)  # no randomness without sweeps
    np.testing.assert_array_equal(a.global_atoms, b.global_atoms)
    c, d = bbp_map(atoms, iterations=3, seed=11), bbp_map(atoms, iterations=3, seed=11)
    for x, y in zip(c.assignments, d.assignments):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(c.global_atoms, d.global_atoms)
    e = bbp_map(atoms, iterations=3, seed=np.random.default_rng(11))
    for x, y in zip(c.assignments, e.assignments):
        np.testing.assert_array_equal(x, y)


def test_order_is_decreasing_size_stable():
    """The largest client initialises: its neurons are global 0..L_j-1 in row order."""
    rng = np.random.default_rng(8)
    atoms = [rng.normal(size=(n, 3)) for n in (2, 5, 5, 3)]
    res = bbp_map(atoms, iterations=0)
    np.testing.assert_array_equal(res.assignments[1], np.arange(5))


def test_max_global_neurons_caps_growth():
    rng = np.random.default_rng(9)
    sizes = (5, 4, 5)
    atoms = [30.0 * rng.normal(size=(n, 6)) for n in sizes]  # unrelated: each wants new neurons
    free = bbp_map(atoms, iterations=2)
    check_invariants(free, atoms)
    assert free.n_global > 7
    for cap in (5, 6, 7):
        res = bbp_map(atoms, iterations=2, max_global_neurons=cap)
        check_invariants(res, atoms)
        assert res.n_global <= cap
    with pytest.raises(ValueError, match="max_global_neurons"):
        bbp_map(atoms, max_global_neurons=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_inputs_keep_their_dtype(dtype):
    rng = np.random.default_rng(10)
    base = 4.0 * rng.normal(size=(8, 6))
    atoms = [
        torch.as_tensor(base[rng.permutation(8)] + 0.01 * rng.normal(size=(8, 6)), dtype=dtype)
        for _ in range(3)
    ]
    res = bbp_map(atoms, iterations=2)
    assert res.global_atoms.dtype == (np.float32 if dtype == torch.float32 else np.float64)
    assert res.n_global == 8
    check_invariants(res, [a.double().numpy() for a in atoms])
    ref = bbp_map([a.double() for a in atoms], iterations=2)
    for x, y in zip(res.assignments, ref.assignments):
        np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu():
    rng = np.random.default_rng(13)
    atoms = [torch.as_tensor(rng.normal(size=(n, 5))) for n in (6, 4, 5)]
    cpu = bbp_map(atoms, iterations=2)
    gpu = bbp_map([a.cuda() for a in atoms], iterations=2)
    for x, y in zip(cpu.assignments, gpu.assignments):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(gpu.global_atoms, cpu.global_atoms, rtol=1e-10, atol=1e-12)


def test_input_validation():
    ok = [np.zeros((2, 3)), np.ones((1, 3))]
    with pytest.raises(ValueError, match="at least one client"):
        bbp_map([])
    with pytest.raises(ValueError, match="same D"):
        bbp_map([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="2-D"):
        bbp_map([np.zeros(3)])
    with pytest.raises(ValueError, match="NaN or infinite"):
        bbp_map([np.array([[0.0, np.nan]])])
    with pytest.raises(ValueError, match="NaN or infinite"):
        bbp_map([np.array([[0.0, np.inf]])])
    with pytest.raises(ValueError, match="sigma2"):
        bbp_map(ok, sigma2=0.0)
    with pytest.raises(ValueError, match="sigma0_2"):
        bbp_map(ok, sigma0_2=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        bbp_map(ok, gamma=0.0)
    with pytest.raises(ValueError, match="prior_mean"):
        bbp_map(ok, prior_mean=[0.0, 0.1])
    with pytest.raises(ValueError, match="iterations"):
        bbp_map(ok, iterations=-1)
    with pytest.raises(ValueError, match="sequence"):
        bbp_map(np.zeros((2, 2, 3)))
    # huge but finite values pass the input check (whose fast sum overflows, so it falls back to
    # the elementwise check), then scores overflowing float32 are reported, not fed to scipy
    big = np.full((2, 2), 3e38, dtype=np.float32)
    assert bbp_mod._prepare_atoms([big])[0].dtype == torch.float32
    with pytest.raises(ValueError, match="overflow"):
        bbp_map([big, big], iterations=0)
    assert bbp_map([big.astype(np.float64)] * 2, iterations=0).n_global == 2


def test_popularity_term_stays_finite_for_two_clients():
    """J = 2: n_i = 1 = J - 1 while matching, so log(c / (J - c)) = 0, never log(1/0)."""
    rng = np.random.default_rng(12)
    atoms = [rng.normal(size=(4, 3)) for _ in range(2)]
    res = bbp_map(atoms, iterations=5)
    check_invariants(res, atoms)
    assert np.all(np.isfinite(res.global_atoms))


# ============================================================================================
# small FedModels for the atom views


class MLP(FedModel):
    NAME = "test_mlp"
    DEFAULT_WIDTHS = {"fc1": 4, "fc2": 5}

    def __init__(self, widths=None):
        super().__init__(num_classes=3, widths=widths)

    def build(self, generator):
        self.fc1 = nn.Linear(5, self.widths["fc1"])
        self.fc2 = nn.Linear(self.widths["fc1"], self.widths["fc2"])
        self.fc3 = nn.Linear(self.widths["fc2"], 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def match_layers(self):
        return [
            MatchLayer("fc1", "linear", "fc1.weight", "fc1.bias", "fc2.weight"),
            MatchLayer("fc2", "linear", "fc2.weight", "fc2.bias", "fc3.weight"),
        ]

    def classifier(self):
        return ("fc3.weight", "fc3.bias")

    @staticmethod
    def inputs(rng):
        return torch.as_tensor(rng.normal(size=(6, 5)))


class ConvNet(FedModel):
    """conv -> conv -> flatten (4x4, channel-major) -> linear."""

    NAME = "test_convnet"
    DEFAULT_WIDTHS = {"conv1": 3, "conv2": 4}

    def __init__(self, widths=None):
        super().__init__(num_classes=3, widths=widths)

    def build(self, generator):
        self.conv1 = nn.Conv2d(2, self.widths["conv1"], 3, padding=1)
        self.conv2 = nn.Conv2d(self.widths["conv1"], self.widths["conv2"], 3, padding=1)
        self.fc = nn.Linear(self.widths["conv2"] * 16, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.flatten(1))

    def match_layers(self):
        return [
            MatchLayer("conv1", "conv2d", "conv1.weight", "conv1.bias", "conv2.weight", 1),
            MatchLayer("conv2", "conv2d", "conv2.weight", "conv2.bias", "fc.weight", 16),
        ]

    def classifier(self):
        return ("fc.weight", "fc.bias")

    @staticmethod
    def inputs(rng):
        return torch.as_tensor(rng.normal(size=(3, 2, 4, 4)))


class CharModel(FedModel):
    """embedding -> LSTM -> linear decoder on the last step."""

    VOCAB = 7
    NAME = "test_char"
    DEFAULT_WIDTHS = {"emb": 3, "lstm": 4}

    def __init__(self, widths=None):
        super().__init__(num_classes=self.VOCAB, widths=widths)

    def build(self, generator):
        self.emb = nn.Embedding(self.VOCAB, self.widths["emb"])
        self.lstm = nn.LSTM(self.widths["emb"], self.widths["lstm"], batch_first=True)
        self.dec = nn.Linear(self.widths["lstm"], self.VOCAB)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.dec(out[:, -1])

    def match_layers(self):
        return [
            MatchLayer("emb", "embedding", "emb.weight", None, "lstm.weight_ih_l0"),
            MatchLayer(
                "lstm",
                "lstm",
                "lstm.weight_ih_l0",
                "lstm.bias_ih_l0",
                "dec.weight",
                recurrent=("lstm.weight_hh_l0", "lstm.bias_hh_l0"),
            ),
        ]

    def classifier(self):
        return ("dec.weight", "dec.bias")

    @staticmethod
    def inputs(rng):
        return torch.as_tensor(rng.integers(0, CharModel.VOCAB, size=(4, 5)))


MODELS = [MLP, ConvNet, CharModel]


def build(cls, seed, widths=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    m = cls(widths).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


def run(cls, state, x):
    widths = {}
    probe = cls()
    for layer in probe.match_layers():
        w = state[layer.weight]
        widths[layer.name] = {"embedding": w.shape[1], "lstm": w.shape[0] // 4}.get(layer.kind, w.shape[0])
    m = cls(widths).double()
    m.load_state_dict(state)
    with torch.no_grad():
        return m(x)


def random_perms(model, rng):
    return [rng.permutation(model.widths[l.name]) for l in model.match_layers()]


# ============================================================================================
# atom views


@pytest.mark.parametrize("cls", MODELS)
def test_permuting_hidden_units_keeps_the_function(cls):
    rng = np.random.default_rng(20)
    m = build(cls, 0)
    x = cls.inputs(rng)
    state = m.state_dict()
    perms = [np.roll(np.arange(m.widths[l.name]), 1) for l in m.match_layers()]  # never identity
    new = permute_units(state, m.match_layers(), perms)
    assert set(new) == set(state)
    assert any(not torch.equal(new[k], state[k]) for k in state)
    for k in state:
        assert new[k].shape == state[k].shape
    torch.testing.assert_close(run(cls, new, x), run(cls, state, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", MODELS)
def test_atoms_round_trip(cls):
    m = build(cls, 1)
    state = m.state_dict()
    for layer in m.match_layers():
        A = layer_atoms(state, layer)
        back = atoms_to_layer(A, layer, state)
        for k, v in back.items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        back_np = atoms_to_layer(A.numpy(), layer, state)
        for k, v in back_np.items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_atom_layouts_by_hand():
    mlp = build(MLP, 2).state_dict()
    A = layer_atoms(mlp, MLP().match_layers()[0])
    torch.testing.assert_close(A[2], torch.cat([mlp["fc1.weight"][2], mlp["fc1.bias"][2:3]]))
    conv = build(ConvNet, 2).state_dict()
    A = layer_atoms(conv, ConvNet().match_layers()[1])
    assert A.shape == (4, 3 * 9 + 1)
    torch.testing.assert_close(A[1], torch.cat([conv["conv2.weight"][1].flatten(), conv["conv2.bias"][1:2]]))
    char = build(CharModel, 2).state_dict()
    emb, lstm = CharModel().match_layers()
    A = layer_atoms(char, emb)
    assert A.shape == (3, CharModel.VOCAB)
    torch.testing.assert_close(A[1], char["emb.weight"][:, 1])
    A = layer_atoms(char, lstm)
    H, E = 4, 3
    assert A.shape == (H, 4 * E + 4)
    W, b = char["lstm.weight_ih_l0"], char["lstm.bias_ih_l0"]
    h = 2
    expect = torch.cat([W[h], W[H + h], W[2 * H + h], W[3 * H + h], b[[h, H + h, 2 * H + h, 3 * H + h]]])
    torch.testing.assert_close(A[h], expect)
    mu = atom_prior_mean(lstm, A.shape[1])
    assert mu.shape == (4 * E + 4,) and np.all(mu[:-4] == 0) and np.all(mu[-4:] == 0.1)
    assert np.all(atom_prior_mean(emb, 7) == 0.0)


@pytest.mark.parametrize("cls", MODELS)
def test_placing_a_client_layer_into_a_wider_global_layer_keeps_its_function(cls):
    """Global layer = client's units at positions a (others random); next input axis moved and
    zero-padded by permute_next_input (and recurrent tensors by permute_recurrent)."""
    rng = np.random.default_rng(21)
    m = build(cls, 3)
    x = cls.inputs(rng)
    state = m.state_dict()
    want = run(cls, state, x)
    for layer in m.match_layers():
        L_j = m.widths[layer.name]
        L = L_j + 3
        a = rng.choice(L, L_j, replace=False)
        A = layer_atoms(state, layer)
        G = torch.as_tensor(rng.normal(size=(L, A.shape[1])))
        G[torch.as_tensor(a)] = A
        new = permute_next_input(state, layer, a, L)
        new.update(atoms_to_layer(G, layer, state))
        if layer.recurrent:
            rec = permute_recurrent(state, layer, a, L)
            new.update({k: rec[k] for k in layer.recurrent})
        assert new[layer.next_weight].shape[1] == L * layer.next_block
        torch.testing.assert_close(run(cls, new, x), want, rtol=1e-10, atol=1e-10)
        # and slicing that global model back with a returns the client exactly
        back = slice_to_client(new, [layer], [a])
        for k in state:
            torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)


def test_permute_recurrent_is_pi_h_pi_transpose_per_gate():
    state = build(CharModel, 4).state_dict()
    layer = CharModel().match_layers()[1]
    H, L = 4, 6
    a = np.array([5, 0, 3, 1])
    out = permute_recurrent(state, layer, a, L)
    Pi = torch.zeros(L, H, dtype=torch.float64)
    Pi[torch.as_tensor(a), torch.arange(H)] = 1.0
    Whh, bhh = state["lstm.weight_hh_l0"], state["lstm.bias_hh_l0"]
    for gate in range(4):
        blk = Whh[gate * H : (gate + 1) * H]
        rows = slice(gate * L, (gate + 1) * L)
        torch.testing.assert_close(out["lstm.weight_hh_l0"][rows], Pi @ blk @ Pi.T)
        torch.testing.assert_close(out["lstm.bias_hh_l0"][rows], Pi @ bhh[gate * H : (gate + 1) * H])


def test_bad_assignments_are_rejected():
    state = build(MLP, 5).state_dict()
    layer = MLP().match_layers()[0]
    with pytest.raises(ValueError, match="injective"):
        permute_next_input(state, layer, [0, 0, 1, 2], 5)
    with pytest.raises(ValueError, match="lie in"):
        permute_next_input(state, layer, [0, 1, 2, 5], 5)
    with pytest.raises(ValueError, match="length"):
        permute_next_input(state, layer, [0, 1, 2], 5)
    with pytest.raises(ValueError, match="permutation"):
        permute_units(state, MLP().match_layers(), [np.arange(3), np.arange(5)])
    with pytest.raises(ValueError, match="lstm"):
        permute_recurrent(state, layer, [0, 1, 2, 3], 4)


# ============================================================================================
# layer-wise matching of whole networks (PFNM one-shot recursion, FedMA section 2 without retraining)

# Small observation variance and a tight prior make the matching unambiguous: a wrong match
# costs about s |w - v|^2 (huge), joining the right neuron beats opening a new one by about
# p0 |w - mu0|^2 / 2 (>> the log terms), and the MAP shrinkage towards mu0 is ~ p0 / (J s).
PRIOR = dict(sigma2=1e-6, sigma0_2=1e-2)


def match_network(states, layers, classifier, **kw):
    """Match layer by layer; return (MAP global state, un-shrunk global state, results)."""
    J = len(states)
    states = [dict(s) for s in states]
    glob, unshrunk, results = {}, {}, []
    for layer in layers:
        atoms = [layer_atoms(s, layer) for s in states]
        mu0 = atom_prior_mean(layer, atoms[0].shape[1])
        res = bbp_map(atoms, prior_mean=mu0, iterations=3, seed=0, **kw)
        L = res.n_global
        # undo the shrinkage exactly: mean of the matched atoms = (theta P - m0) / (n s)
        s, p0 = 1 / kw["sigma2"], 1 / kw["sigma0_2"]
        n = res.counts[:, None].astype(np.float64)
        mean = (res.global_atoms * (p0 + n * s) - mu0 * p0) / (n * s)
        glob.update(atoms_to_layer(res.global_atoms, layer, states[0]))
        unshrunk.update(atoms_to_layer(mean, layer, states[0]))
        if layer.recurrent:
            placed = [permute_recurrent(st, layer, a, L) for st, a in zip(states, res.assignments)]
            for k in layer.recurrent:
                glob[k] = unshrunk[k] = sum(p[k] for p in placed) / J
        states = [permute_next_input(st, layer, a, L) for st, a in zip(states, res.assignments)]
        results.append(res)
    for k in classifier:
        glob[k] = unshrunk[k] = sum(st[k] for st in states) / J
    return glob, unshrunk, results


@pytest.mark.parametrize("cls", MODELS)
def test_matching_permuted_copies_recovers_the_network(cls):
    rng = np.random.default_rng(30)
    m = build(cls, 6)
    layers, classifier = m.match_layers(), m.classifier()
    x = cls.inputs(rng)
    orig = m.state_dict()
    J = 3
    perms = [random_perms(m, rng) for _ in range(J)]
    clients = [permute_units(orig, layers, p) for p in perms]
    glob, unshrunk, results = match_network(clients, layers, classifier, **PRIOR)
    # 1. assignments: one global neuron per original unit, consistent across clients
    for n, (layer, res) in enumerate(zip(layers, results)):
        assert res.n_global == m.widths[layer.name]
        np.testing.assert_array_equal(res.counts, np.full(res.n_global, J))
        orig_of_global = np.empty(res.n_global, dtype=int)
        orig_of_global[res.assignments[0]] = perms[0][n]
        for j in range(J):
            np.testing.assert_array_equal(orig_of_global[res.assignments[j]], perms[j][n])
    # 2. the un-shrunk global network is the original up to a permutation: same function
    want = run(cls, orig, x)
    torch.testing.assert_close(run(cls, unshrunk, x), want, rtol=1e-8, atol=1e-8)
    # 3. the MAP network itself is the original shrunk by ~p0/(J s) = 3e-4: nearly the function
    torch.testing.assert_close(run(cls, glob, x), want, rtol=1e-2, atol=1e-2)
    # 4. slicing the global model back with client j's assignments gives client j exactly
    for j in range(J):
        back = slice_to_client(unshrunk, layers, [res.assignments[j] for res in results])
        assert set(back) == set(clients[j])
        for k in clients[j]:
            assert back[k].shape == clients[j][k].shape
            torch.testing.assert_close(back[k], clients[j][k], rtol=1e-9, atol=1e-9)
        named = {layer.name: r.assignments[j] for layer, r in zip(layers, results)}
        by_name = slice_to_client(unshrunk, layers, named)
        for k in back:
            assert torch.equal(back[k], by_name[k])


@pytest.mark.parametrize("cls", MODELS)
def test_slicing_heterogeneous_clients_restores_their_architectures(cls):
    rng = np.random.default_rng(31)
    base = cls()
    names = [l.name for l in base.match_layers()]
    widths = [{n: int(w) for n, w in zip(names, rng.integers(2, 6, size=len(names)))} for _ in range(3)]
    models = [build(cls, 10 + j, widths=w) for j, w in enumerate(widths)]
    states = [mm.state_dict() for mm in models]
    layers, classifier = base.match_layers(), base.classifier()
    glob, _, results = match_network(states, layers, classifier, sigma2=1.0, sigma0_2=1.0)
    for layer, res in zip(layers, results):
        sizes = [w[layer.name] for w in widths]
        assert max(sizes) <= res.n_global <= sum(sizes)
    x = cls.inputs(rng)
    out = run(cls, glob, x)  # the global model is a valid network of the global widths
    assert out.shape[0] == x.shape[0]
    for j, st in enumerate(states):
        back = slice_to_client(glob, layers, [res.assignments[j] for res in results])
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in st.items()}
        run(cls, back, x)  # loads into a model of the client's own widths


def test_growth_budget_follows_the_authors_rule():
    # IBM/FedMA matching/pfnm.py, compute_cost: a client is offered min(L_j, max(B - L, 1)) new neurons.
    # Three clients of 5 mutually orthogonal atoms each and a huge IBP mass, so every offered new column is
    # taken: the first opens 5 (L = 5), the second is offered min(5, max(7 - 5, 1)) = 2 (L = 7), the third
    # min(5, max(0, 1)) = 1 (L = 8). Without the budget every atom opens a neuron (L = 15).
    eye = np.eye(15)
    atoms = [eye[0:5] * 3, eye[5:10] * 3, eye[10:15] * 3]
    kw = dict(sigma2=0.01, sigma0_2=1.0, gamma=1e6, iterations=0)
    assert bbp_map(atoms, **kw).n_global == 15
    res = bbp_map(atoms, growth_budget=7, **kw)
    assert res.n_global == 8
    assert [int((a >= L).sum()) for a, L in zip(res.assignments[1:], (5, 7))] == [2, 1]  # new neurons opened
    # a client with more neurons than L + 1 columns still gets one column per neuron
    big = [eye[0:2] * 3, eye[2:8] * 3]
    res = bbp_map(big, growth_budget=1, **kw)
    assert sorted(res.assignments[1].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="growth_budget"):
        bbp_map(atoms, growth_budget=0, **kw)
