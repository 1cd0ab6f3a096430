"""Synthetic(alpha, beta) (FedProx) and the logreg model: generation, laziness, engine runs.

Expected values come from the paper's recipe (sizes floor(LogNormal(4, 2)) + 50 with a 90% train
share, x ~ N(v_k, diag(d^-1.2)), y = argmax(x W_k + b_k)), checked against the generator's
parameters, never recomputed with the generator's own code paths.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import config
from fedsim.data import load_federated
from fedsim.data import synthetic as S
from fedsim.engine import api
from fedsim.engine.loop import evaluate
from fedsim.errors import FedsimError
from fedsim.models import build_model
from fedsim.rng import torch_rng


def _load(num_clients=12, seed=0, **kw):
    return S.load_synthetic(num_clients, seed=seed, **kw)


def _rows(ds, k):
    return ds.train.inputs(ds.client_indices[k]), ds.train.y[ds.client_indices[k]]


@pytest.fixture(scope="module")
def small():
    return _load(12)


# ---------------------------------------------------------------- generation


def test_client_data_depends_only_on_seed_and_client(small):
    more = _load(40)
    for k in range(12):
        x_a, y_a = _rows(small, k)
        x_b, y_b = _rows(more, k)
        assert np.array_equal(x_a, x_b) and np.array_equal(y_a, y_b)
    other = _load(12, seed=1)
    assert not np.array_equal(_rows(other, 0)[0][:5], _rows(small, 0)[0][:5])


def test_regenerated_features_reproduce_the_stored_labels(small):
    for k in range(12):
        x, y = _rows(small, k)
        m = S.client_model(0, k)
        assert x.shape == (len(y), 60) and x.dtype == np.float32 and y.dtype == np.int64
        assert np.array_equal(np.argmax(x.astype(np.float64) @ m.w + m.b, axis=1), y)


def test_features_are_gaussian_around_the_client_mean_with_fedprox_covariance():
    n = 20_000
    ds = _load(1, seed=3, examples_per_client=n)
    x = ds.train.inputs(ds.client_indices[0]).astype(np.float64)
    std = np.arange(1, 61) ** -0.6  # Sigma_dd = d^-1.2
    m = S.client_model(3, 0, examples_per_client=n)
    v = m.v
    assert np.all(np.abs(x.mean(0) - v) < 5 * std / math.sqrt(n))
    # built in several chunks, still the features the stored labels were drawn for
    assert n > S._CHUNK and np.array_equal(np.argmax(x @ m.w + m.b, axis=1), ds.train.y)
    assert np.allclose(x.std(0), std, rtol=0.03)
    corr = np.corrcoef(x, rowvar=False)
    assert np.max(np.abs(corr - np.eye(60))) < 0.05


def test_sizes_are_lognormal_4_2_plus_50_with_a_90_percent_train_share():
    n = S.client_sizes(0, 4000)
    assert n.dtype == np.int64 and n.min() >= int(0.9 * 50)
    # median of floor(LogNormal(4, 2)) is floor(e^4) = 54: int(0.9 * (54 + 50)) = 93
    assert 85 <= np.median(n) <= 101
    # P(LogNormal(4, 2) > e^6) = P(Z > 1) = 0.1587
    assert 0.13 < np.mean(n > 0.9 * (math.exp(6) + 50)) < 0.19
    assert np.array_equal(S.client_sizes(0, 7, examples_per_client=33), np.full(7, 33))


def test_beta_moves_each_clients_feature_mean():
    def spread(beta):  # std across clients of a client's mean feature value, mean(v_k) ~ B_k + N(0, 1/60)
        ds = _load(300, seed=5, beta=beta, examples_per_client=20)
        means = [ds.train.inputs(ds.client_indices[k]).mean() for k in range(300)]
        return float(np.std(means))

    assert spread(0.0) < 0.25
    assert 0.8 < spread(1.0) < 1.25


def test_alpha_is_the_std_of_a_shift_shared_by_every_entry_of_w_and_b(small):
    shifts = []
    for k in range(2000):
        base, moved = S.client_model(0, k, alpha=0.0), S.client_model(0, k, alpha=2.0)
        dw, db = moved.w - base.w, moved.b - base.b
        assert np.allclose(dw, dw[0, 0]) and np.allclose(db, dw[0, 0])
        shifts.append(dw[0, 0])
    assert 1.85 < np.std(shifts) < 2.15
    # ... which moves all ten logits alike, so the label rule is unchanged (as in the original)
    x, y = _rows(small, 0)
    m2 = S.client_model(0, 0, alpha=2.0)
    assert np.array_equal(np.argmax(x.astype(np.float64) @ m2.w + m2.b, axis=1), y)


def test_clients_have_skewed_label_distributions(small):
    p = small.class_counts / small.class_counts.sum(1, keepdims=True)
    overall = small.class_counts.sum(0) / small.class_counts.sum()
    tv = 0.5 * np.abs(p - overall).sum(1)  # total variation from the pooled distribution
    assert np.median(tv) > 0.3


def test_dataset_layout_and_class_counts(small):
    ds = small
    assert ds.name == "synthetic" and ds.num_classes == 10 and ds.input_shape == (60,)
    assert ds.num_clients == 12 and ds.augment is None
    idx = np.concatenate(ds.client_indices)
    assert np.array_equal(idx, np.arange(len(ds.train)))  # contiguous, disjoint, covering
    for k, ix in enumerate(ds.client_indices):
        assert ix.dtype == np.int64
        assert np.array_equal(ds.class_counts[k], np.bincount(ds.train.y[ix], minlength=10))
    assert np.array_equal([len(i) for i in ds.client_indices], S.client_sizes(0, 12))


def test_test_set_has_fixed_size_and_follows_the_pooled_label_distribution():
    ds = _load(200, seed=2)
    assert len(ds.test) == S.TEST_EXAMPLES and ds.test.x.shape == (S.TEST_EXAMPLES, 60)
    assert ds.test.x.dtype == np.float32 and ds.test.y.dtype == np.int64
    train_p = np.bincount(ds.train.y, minlength=10) / len(ds.train)
    test_p = np.bincount(ds.test.y, minlength=10) / len(ds.test)
    assert 0.5 * np.abs(train_p - test_p).sum() < 0.05
    assert len(_load(3, test_examples=500).test) == 500


def test_train_features_are_not_materialised(small):
    ds = _load(300, seed=4)
    n = len(ds.train)
    assert ds.train.x.size == 0
    with pytest.raises(IndexError):
        ds.train.x[np.array([0])]
    # labels + indices + the fixed-size test set; features would add 240 bytes per example
    assert len(pickle.dumps(ds, protocol=5)) < 20 * n + 60 * 4 * S.TEST_EXAMPLES * 1.1 + 200_000


def test_inputs_of_mixed_unordered_indices_are_the_owning_clients_rows(small):
    ds = small
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds.train))[:300]
    got = ds.train.inputs(idx)
    whole = np.concatenate([ds.train.inputs(ix) for ix in ds.client_indices])
    assert np.array_equal(got, whole[idx])
    assert ds.train.inputs(np.array([], dtype=np.int64)).shape == (0, 60)
    with pytest.raises(IndexError):
        ds.train.inputs(np.array([len(ds.train)]))


def test_ten_thousand_clients_load_with_flat_per_client_cost():
    ds = _load(10_000, seed=0, examples_per_client=2)
    assert ds.num_clients == 10_000 and ds.class_counts.shape == (10_000, 10)
    assert len(ds.train) == 20_000 and ds.class_counts.sum() == 20_000


# ---------------------------------------------------------------- wiring and errors


def test_load_federated_builds_synthetic_with_natural_partition_only():
    ds = load_federated(
        "synthetic",
        partition="natural",
        num_clients=5,
        alpha=None,
        data_dir=None,
        seed=0,
        synthetic_alpha=0.5,
        synthetic_beta=0.5,
    )
    assert ds.num_clients == 5 and ds.train.alpha == 0.5 and ds.train.beta == 0.5
    with pytest.raises(FedsimError, match="natural"):
        load_federated("synthetic", partition="dirichlet", num_clients=5, alpha=0.5, data_dir=None, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"alpha": -1.0}, "synthetic_alpha"),
        ({"beta": float("nan")}, "synthetic_beta"),
        ({"examples_per_client": 0}, "examples_per_client"),
        ({"num_clients": 0}, "num_clients"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, pattern):
    args = {"num_clients": 3, "seed": 0, **kwargs}
    with pytest.raises(FedsimError, match=pattern) as err:
        S.load_synthetic(args.pop("num_clients"), **args)
    assert "\n" not in str(err.value)


def test_config_accepts_the_synthetic_keys():
    raw = {
        "data": {
            "dataset": "synthetic",
            "partition": "natural",
            "num_clients": 20,
            "synthetic_alpha": 0.5,
            "synthetic_beta": 1,
        },
        "model": {"name": "logreg"},
        "runs": [{"algorithm": "fedavg"}],
    }
    cfg = config.parse(raw)
    assert cfg.data.synthetic_alpha == 0.5 and cfg.data.synthetic_beta == 1.0
    with pytest.raises(FedsimError, match="synthetic_alpha"):
        config.parse({**raw, "data": {**raw["data"], "synthetic_alpha": "big"}})


# ---------------------------------------------------------------- logreg


def test_logreg_is_a_60_to_10_linear_model_with_structure_metadata():
    model = build_model("logreg", num_classes=10, input_shape=(60,), generator=torch_rng(0, "init"))
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"fc.weight": (10, 60), "fc.bias": (10,)}
    assert [g.tensors for g in model.layer_groups()] == [("fc.weight", "fc.bias")]
    assert model.match_layers() == [] and model.classifier() == ("fc.weight", "fc.bias")
    x = torch.randn(4, 60, generator=torch_rng(0, "data"))
    torch.testing.assert_close(model(x), x @ sd["fc.weight"].T + sd["fc.bias"])
    bound = 1 / math.sqrt(60)
    assert all(float(v.abs().max()) <= bound for v in sd.values())
    with pytest.raises(FedsimError, match="logreg"):
        build_model("logreg", num_classes=10, input_shape=(1, 8, 8))


# ---------------------------------------------------------------- end to end


def _experiment(backend: str, rounds: int = 2) -> config.ExperimentConfig:
    return config.parse(
        {
            "name": "syn",
            "seed": 1,
            "data": {"dataset": "synthetic", "partition": "natural", "num_clients": 10},
            "model": {"name": "logreg"},
            "engine": {"backend": backend, "clients_per_round": 4, "num_workers": 2},
            "runs": [
                {"algorithm": "fedavg", "rounds": rounds, "local_epochs": 1, "lr": 0.01, "batch_size": 10}
            ],
        }
    )


def _run(cfg, out):
    ds = load_federated(
        "synthetic",
        partition="natural",
        num_clients=cfg.data.num_clients,
        alpha=None,
        data_dir=None,
        seed=cfg.seed,
        synthetic_alpha=cfg.data.synthetic_alpha,
        synthetic_beta=cfg.data.synthetic_beta,
    )
    run_dir = api.new_run_dir(out, cfg.name)
    list(api.execute(cfg, ds, run_dir))
    return ds, pd.read_parquet(run_dir / "rounds.parquet"), pd.read_parquet(run_dir / "clients.parquet")


def test_fedavg_with_logreg_learns_synthetic(tmp_path):
    cfg = _experiment("sequential", rounds=6)
    ds, rounds, _ = _run(cfg, tmp_path)
    init = build_model("logreg", num_classes=10, input_shape=(60,), generator=torch_rng(cfg.seed, "init"))
    acc0, _ = evaluate(init, ds.test)
    assert rounds["test_accuracy"].iloc[-1] > acc0 + 0.15


def test_ray_workers_regenerate_the_same_clients_as_the_sequential_backend(ray_local, tmp_path):
    _, rounds_s, clients_s = _run(_experiment("sequential"), tmp_path / "s")
    _, rounds_r, clients_r = _run(_experiment("ray"), tmp_path / "r")
    keep = ["round", "test_accuracy", "test_loss", "train_loss"]
    pd.testing.assert_frame_equal(rounds_s[keep], rounds_r[keep])
    keep = ["round", "client_id", "n_examples", "train_loss"]
    pd.testing.assert_frame_equal(clients_s[keep], clients_r[keep])
