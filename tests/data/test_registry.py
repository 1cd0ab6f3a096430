"""Datasets of one's own: registered loaders get the built-in checks and partitioners."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch

from fedsim.config import DataConfig
from fedsim.data import DataArrays, load_federated, register_dataset
from fedsim.data import registry as R
from fedsim.errors import FedsimError

N = 60


def ep_loader(data):
    """A loader published through the ``fedsim.datasets`` entry-point group (see the test below)."""
    return DataArrays(np.zeros((N, 3)), np.arange(N) % 3)


@pytest.fixture
def register():
    added = []

    def add(name, fn):
        register_dataset(name)(fn)
        added.append(name)

    yield add
    for name in added:
        R.DATASET_LOADERS.pop(name, None)


def _load(name, partition="iid", num_clients=3, **keys):
    d = DataConfig(dataset=name, partition=partition, num_clients=num_clients, **keys)
    return load_federated(
        name,
        partition=partition,
        num_clients=num_clients,
        alpha=d.alpha,
        data_dir=None,
        seed=0,
        train_fraction=d.train_fraction,
        options=d,
    )


def test_a_registered_dataset_of_tensors_with_client_ids_is_partitioned_by_them(register):
    x = torch.arange(N * 4, dtype=torch.float64).reshape(N, 4)
    y = torch.arange(N) % 5
    ids = np.array(["u2", "u0", "u1"] * (N // 3))
    register("toy_tensors", lambda data: DataArrays(x_train=x, y_train=y, client_ids=ids))
    ds = _load("toy_tensors", partition="natural", num_clients=None, partition_by="user", train_fraction=0.5)
    assert ds.client_names == ["u0", "u1", "u2"] and ds.num_classes == 5 and ds.input_shape == (4,)
    assert ds.train.x.dtype == np.float32
    # no test arrays: each client keeps half of its 20 examples, the other half is the test set
    assert [p.shape[0] for p in ds.client_indices] == [10, 10, 10] and len(ds.test) == 30
    # client 0 is u0, whose examples are rows 1, 4, 7, ... (inputs 4 * row .. 4 * row + 3)
    rows = ds.train.x[ds.client_indices[0], 0] / 4
    assert set(rows.astype(int).tolist()) <= set(range(1, N, 3))


def test_a_registered_dataset_gets_the_label_partitioners(register):
    register(
        "toy_shard",
        lambda data: DataArrays(np.zeros((N, 2)), np.arange(N) % 6, np.zeros((6, 2)), np.arange(6)),
    )
    ds = _load(
        "toy_shard", partition="pathological", classes_per_client=2, class_assignment_mode="deterministic"
    )
    assert ((ds.class_counts > 0).sum(axis=1) == 2).all()
    assert len(ds.test) == 6


@pytest.mark.parametrize(
    "arrays, match",
    [
        (DataArrays(np.zeros((N, 2)), np.linspace(0, 1, N)), "class labels must be integers"),
        (DataArrays(np.zeros((N, 2)), np.arange(N) - 1), "negative label"),
        (DataArrays(np.zeros((N - 1, 2)), np.arange(N) % 3), "x_train has shape"),
        (DataArrays(np.zeros((N, 2)), np.arange(N) % 3, np.zeros((4, 2)), None), "both x_test and y_test"),
        (DataArrays(np.zeros((N, 2)), np.arange(N) % 3, num_classes=2), "num_classes"),
        (DataArrays(np.zeros((N, 2)), np.arange(N) % 3, client_ids=np.arange(3)), "client_ids"),
        ((np.zeros((N, 2)), np.arange(N)), "return fedsim.data.DataArrays"),
    ],
)
def test_bad_arrays_from_a_loader_are_one_line_errors(register, arrays, match):
    register("toy_bad", lambda data: arrays)
    with pytest.raises(FedsimError, match=match) as err:
        _load("toy_bad")
    assert "\n" not in str(err.value)


def test_a_partition_that_leaves_a_client_empty_is_refused(register):
    register(
        "toy_small", lambda data: DataArrays(np.zeros((N, 2)), np.arange(N) % 3, client_ids=np.arange(N) % 3)
    )
    with pytest.raises(FedsimError, match="at most 3 clients"):
        _load("toy_small", partition="natural", num_clients=4, partition_by="id")


def test_unknown_and_taken_names(register):
    with pytest.raises(FedsimError, match="register_dataset"):
        _load("nobody_registered_this")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(ep_loader)


def test_an_installed_packages_entry_point_is_found_by_name(monkeypatch):
    ep = EntryPoint(name="ep_toy", value=f"{__name__}:ep_loader", group=R.ENTRY_POINT_GROUP)
    monkeypatch.setattr(R, "entry_points", lambda group: [ep] if group == R.ENTRY_POINT_GROUP else [])
    try:
        ds = _load("ep_toy")
        assert len(ds.train) + len(ds.test) == N and ds.num_classes == 3
    finally:
        R.DATASET_LOADERS.pop("ep_toy", None)
