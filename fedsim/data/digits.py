"""scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes, no download needed.

Used as the small, offline image dataset for tests and laptop runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fedsim.data.base import Split
from fedsim.rng import numpy_rng

#: Fraction of every class held out as the fixed test set.
TEST_FRACTION = 0.2
#: Seed of the one-off ``"data"`` stream that fixes the split; independent of the run's seed.
SPLIT_SEED = 0
NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


def stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train/test split of the digits.

    For each class k (increasing), its indices are permuted with
    ``numpy_rng(SPLIT_SEED, "data", client=k)`` and the first ``round(TEST_FRACTION * n_k)`` go to
    test. The split depends on nothing but the labels, so it never changes between runs or seeds.

    Args:
        labels: ``(N,)`` int labels.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 index arrays that partition ``0..N-1``.
    """
    labels = np.asarray(labels)
    test = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        perm = numpy_rng(SPLIT_SEED, "data", client=int(k)).permutation(idx)
        test.append(perm[: round(TEST_FRACTION * idx.shape[0])])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(labels.shape[0], dtype=np.int64), test_idx)
    return train_idx, test_idx


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as scikit-learn ships them, without importing scikit-learn.

    scikit-learn keeps the UCI optical-digits data (Alpaydin and Kaynak 1998) in its package
    directory as ``datasets/data/digits.csv.gz``: 64 pixel values (0..16) then the label per line.
    Reading that file is fast; ``sklearn.datasets.load_digits`` returns the same arrays but first
    imports scikit-learn (and pandas), which every ``fedsim run`` on digits would pay before Ray
    could start. Where the file is not found (a scikit-learn that stores it
    elsewhere), ``load_digits`` is used.

    Returns:
        ``(images, labels)``: float64 ``(1797, 8, 8)`` pixel counts in 0..16 and int64 ``(1797,)``
        classes 0..9, equal to ``load_digits().images`` and ``load_digits().target``.

    Raises:
        ModuleNotFoundError: scikit-learn is not installed.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    roots = [] if spec is None else list(spec.submodule_search_locations or [])
    files = [Path(r) / "datasets" / "data" / "digits.csv.gz" for r in roots]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        from sklearn.datasets import load_digits  # local import: sklearn is slow to import

        bunch = load_digits()
        return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # (1797, 65)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_digits_splits() -> tuple[Split, Split]:
    """Train and test splits of the digits (tensor layout).

    Pixels (0..16 in scikit-learn) are divided by 16 to [0, 1], then standardised with the single
    scalar mean and std of the training pixels, so train inputs have mean 0 and std 1.

    Returns:
        ``(train, test)``: ``x`` float32 ``(N, 1, 8, 8)``, ``y`` int64 ``(N,)``; round(0.2 * n_k)
        test examples of each class k (359 test, 1,438 train). Fresh arrays on every call.
    """
    pixels, labels = bundled_digits()
    images = (pixels.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8)
    train_idx, test_idx = stratified_split(labels)
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    x = ((images - mean) / std).astype(np.float32)
    train = Split(x=x[train_idx], y=labels[train_idx])
    test = Split(x=x[test_idx], y=labels[test_idx])
    return train, test
