"""FedMA's data-bias experiment partition: two clients, grey shares, half-grey test set."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import load_federated
from fedsim.data.bias import grey
from fedsim.data.vision import VISION
from fedsim.errors import FedsimError
from tests.helpers import make_cifar10


def _is_grey(x: np.ndarray, mean, std) -> np.ndarray:
    """(B,) whether each normalised image has equal raw R, G, B values (checked independently)."""
    raw = x * np.asarray(std)[None, :, None, None] + np.asarray(mean)[None, :, None, None]
    return np.isclose(raw[:, 0], raw[:, 1], atol=1e-5).all((1, 2)) & np.isclose(
        raw[:, 0], raw[:, 2], atol=1e-5
    ).all((1, 2))


def test_grey_copies_raw_red_into_green_and_blue():
    info = VISION["cifar10"]
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, size=(4, 3, 5, 5)).astype(np.float32)
    x = (raw - np.asarray(info.mean)[None, :, None, None]) / np.asarray(info.std)[None, :, None, None]
    g = grey(x.astype(np.float32), info.mean, info.std)
    back = g * np.asarray(info.std)[None, :, None, None] + np.asarray(info.mean)[None, :, None, None]
    for c in range(3):
        np.testing.assert_allclose(back[:, c], raw[:, 0], atol=1e-5)


def test_bias_partition_splits_classes_and_greys_95_5_and_half_the_test_set(tmp_path):
    make_cifar10(tmp_path, per_batch=40, n_test=40)
    ds = load_federated("cifar10", partition="bias", num_clients=2, alpha=None, data_dir=tmp_path, seed=1)
    info = VISION["cifar10"]
    c0, c1 = ds.client_indices
    classes0, classes1 = set(ds.train.y[c0]), set(ds.train.y[c1])
    assert not classes0 & classes1 and len(classes0) <= 5 and len(c0) + len(c1) == len(ds.train)
    grey0 = _is_grey(ds.train.x[c0], info.mean, info.std).mean()
    grey1 = _is_grey(ds.train.x[c1], info.mean, info.std).mean()
    assert abs(grey0 - 0.95) < 0.03 and abs(grey1 - 0.05) < 0.03
    for k in np.unique(ds.test.y):
        share = _is_grey(ds.test.x[ds.test.y == k], info.mean, info.std).mean()
        assert abs(share - 0.5) <= 0.5 / (ds.test.y == k).sum() + 1e-9


def test_bias_partition_needs_rgb_and_two_clients():
    with pytest.raises(FedsimError, match="num_clients 2"):
        load_federated("digits", partition="bias", num_clients=2, alpha=None, data_dir=None, seed=0)
    with pytest.raises(FedsimError, match="num_clients 2"):
        load_federated("cifar10", partition="bias", num_clients=3, alpha=None, data_dir=None, seed=0)
