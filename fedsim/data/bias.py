"""FedMA's data-bias experiment (Wang et al., ICLR 2020, section 3; docs/algorithms.md section 7).

Two clients. Five classes are drawn at random; client 0 gets all their training images, 95% of
them made grey; client 1 gets the other five classes, 5% of them grey. In the test set 50% of every
class is grey. "Grey" copies the red channel into green and blue. Images arrive normalised per
channel ((x - mean_c) / std_c), so greying maps the normalised red value back to the pixel scale
and renormalises it with the green and blue statistics: the result is exactly the normalisation of
the greyed raw image.
"""

from __future__ import annotations

import numpy as np

from fedsim.data.base import Split
from fedsim.errors import FedsimError

GREY_SHARE = (0.95, 0.05)  # client 0, client 1
TEST_GREY_SHARE = 0.5


def grey(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Grey copies of normalised RGB images: the red channel copied into green and blue.

    Args:
        x: ``(B, 3, H, W)`` float32 images normalised with per-channel ``mean`` and ``std``.

    Returns:
        ``(B, 3, H, W)`` float32, normalised the same way.
    """
    raw_red = x[:, 0] * std[0] + mean[0]  # (B, H, W) on the [0, 1] scale
    out = np.empty_like(x)
    for c in range(3):
        out[:, c] = (raw_red - mean[c]) / std[c]
    return out


def _grey_some(
    split: Split, idx: np.ndarray, share: float, rng: np.random.Generator, mean, std
) -> np.ndarray:
    chosen = rng.permutation(idx)[: round(share * idx.shape[0])]
    split.x[chosen] = grey(split.x[chosen], mean, std)
    return chosen


def bias_partition(
    train: Split,
    test: Split,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    rng: np.random.Generator,
) -> tuple[Split, Split, list[np.ndarray]]:
    """Build the two biased clients and the half-grey test set.

    Args:
        train, test: RGB splits in the tensor layout, ``x`` ``(N, 3, H, W)`` normalised float32.
        num_classes: K (even); client 0 gets K/2 classes drawn from ``rng``.
        rng: the experiment's ``"partition"`` stream.

    Returns:
        (train copy with greyed images, test copy with greyed images, [client 0 indices,
        client 1 indices]).

    Raises:
        FedsimError: the images are not RGB.
    """
    if train.text is not None or train.x.ndim != 4 or train.x.shape[1] != 3:
        raise FedsimError(
            "data.partition=bias needs RGB images (cifar10 or cifar100); set data.dataset: cifar10"
        )
    train = Split(x=train.x.copy(), y=train.y)
    test = Split(x=test.x.copy(), y=test.y)
    classes0 = np.sort(rng.choice(num_classes, size=num_classes // 2, replace=False))
    mask0 = np.isin(train.y, classes0)
    parts = [np.flatnonzero(mask0).astype(np.int64), np.flatnonzero(~mask0).astype(np.int64)]
    for idx, share in zip(parts, GREY_SHARE):
        _grey_some(train, idx, share, rng, mean, std)
    for k in range(num_classes):
        _grey_some(test, np.flatnonzero(test.y == k), TEST_GREY_SHARE, rng, mean, std)
    return train, test, parts
