"""Fashion-MNIST from IDX files: Debian's dataset-fashion-mnist package (installed by .ci/run) and
small hand-written IDX files in ``data_dir``."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from fedsim.data import load_federated
from fedsim.data.fashion_mnist import DEBIAN_DIR, FILES, MEAN, STD, load_fashion_mnist
from fedsim.errors import FedsimError

HAVE_DEBIAN = all((DEBIAN_DIR / f"{name}.gz").is_file() for pair in FILES.values() for name in pair)


def _idx(magic: int, array: np.ndarray) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def _write(folder, n_train=12, n_test=5, gz=True, **replace):
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10),
        "test": (rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images_name, labels_name) in FILES.items():
        images, labels = arrays[split]
        for name, data in ((images_name, _idx(0x0803, images)), (labels_name, _idx(0x0801, labels))):
            data = replace.get(name, data)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return arrays


@pytest.mark.skipif(
    not HAVE_DEBIAN,
    reason="Debian's dataset-fashion-mnist package is not installed (apt-get install dataset-fashion-mnist)",
)
def test_the_debian_package_holds_the_full_balanced_set():
    train, test = load_fashion_mnist()
    assert train.x.shape == (60_000, 1, 28, 28) and test.x.shape == (10_000, 1, 28, 28)
    assert train.x.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(train.y), [6_000] * 10)
    np.testing.assert_array_equal(np.bincount(test.y), [1_000] * 10)
    assert abs(float(train.x.mean())) < 1e-3 and abs(float(train.x.std()) - 1.0) < 1e-3


@pytest.mark.parametrize("gz, sub", [(True, ""), (False, "FashionMNIST/raw")])
def test_data_dir_idx_files_are_read_and_normalised(tmp_path, gz, sub):
    arrays = _write(tmp_path / sub if sub else tmp_path, gz=gz)
    train, test = load_fashion_mnist(tmp_path)
    images, labels = arrays["train"]
    np.testing.assert_array_equal(train.y, labels)
    np.testing.assert_allclose(train.x[:, 0], (images / 255 - MEAN) / STD, rtol=1e-5, atol=1e-5)
    assert len(test) == 5


def test_load_federated_partitions_fashion_mnist(tmp_path):
    _write(tmp_path, n_train=40)
    ds = load_federated(
        "fashion_mnist", partition="iid", num_clients=4, alpha=None, data_dir=tmp_path, seed=0
    )
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert sorted(np.concatenate(ds.client_indices).tolist()) == list(range(40))


def test_bad_idx_files_are_one_line_errors(tmp_path):
    good = _idx(0x0803, np.zeros((12, 28, 28)))
    cases = {
        "magic": {"train-images-idx3-ubyte": _idx(0x0801, np.zeros(12))},
        "truncated": {"train-images-idx3-ubyte": good[:-10]},
        "labels": {"train-labels-idx1-ubyte": _idx(0x0801, np.zeros(11))},
        "shape": {"train-images-idx3-ubyte": _idx(0x0803, np.zeros((12, 27, 28)))},
    }
    for case, replace in cases.items():
        _write(tmp_path / case, **replace)
        with pytest.raises(FedsimError) as err:
            load_fashion_mnist(tmp_path / case)
        assert "\n" not in str(err.value) and "dataset-fashion-mnist" in str(err.value), case


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FedsimError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
