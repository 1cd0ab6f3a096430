"""The dataset registry: a name in ``data.dataset`` -> a function that returns the arrays.

Built-in datasets register here too (digits, mnist, fashion_mnist, cifar10, cifar100, hf);
Shakespeare and Synthetic build their own natural partition and are handled by
:func:`fedsim.data.load_federated` directly. A dataset of one's own is a function
``(data: DataConfig) -> DataArrays`` registered with :func:`register_dataset` (in the process
that runs the experiment), or published by an installed package under the entry-point group
``fedsim.datasets`` (so that ``fedsim run`` finds it by name). Every registered dataset gets the
same checks and the same partitioners (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from fedsim.data.base import Split
from fedsim.errors import FedsimError

#: Entry-point group under which installed packages publish dataset loaders.
ENTRY_POINT_GROUP = "fedsim.datasets"


@dataclass(frozen=True)
class DataArrays:
    """What a dataset loader returns: numpy arrays or torch tensors (converted with ``numpy()``).

    Attributes:
        x_train: ``(N, *input_shape)`` float inputs, already normalised (images channel-first
            ``(N, C, H, W)``), stored as float32; or ``(N, L)`` integer symbol ids in 0..255
            (text windows, stored in :class:`~fedsim.data.base.Split`'s window layout).
        y_train: ``(N,)`` integer class labels in ``[0, num_classes)``.
        x_test, y_test: the server's test set, ``(M, *input_shape)`` and ``(M,)``; None (both):
            each client keeps ``data.train_fraction`` of its examples for training and the rest
            forms the test set.
        client_ids: ``(N,)`` natural ids (integers or strings) for ``partition: natural``, or None.
        num_classes: K; None: one more than the largest label.
        augment: ``"cifar"`` for the workers' CIFAR crop-and-flip, else None.
    """

    x_train: Any
    y_train: Any
    x_test: Any = None
    y_test: Any = None
    client_ids: Any = None
    num_classes: int | None = None
    augment: str | None = None


#: A dataset loader: ``(data section) -> DataArrays``.
DatasetLoader = Callable[[Any], DataArrays]

#: Dataset name -> loader. Filled by :func:`register_dataset`.
DATASET_LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering a dataset loader under ``name`` (the value of ``data.dataset``).

    Example::

        from fedsim.data import DataArrays, register_dataset

        @register_dataset("my_data")
        def my_data(data):  # data: fedsim.config.DataConfig
            x, y = ...      # (N, C, H, W) float32, (N,) int64
            return DataArrays(x_train=x, y_train=y, client_ids=writer_of_each_example)

    Raises:
        ValueError: ``name`` is already registered, or is ``shakespeare`` or ``synthetic``.
    """

    def wrap(fn: DatasetLoader) -> DatasetLoader:
        if name in DATASET_LOADERS or name in ("shakespeare", "synthetic"):
            raise ValueError(f"dataset {name!r} is already registered")
        DATASET_LOADERS[name] = fn
        return fn

    return wrap


def find_loader(name: str, known: tuple[str, ...]) -> DatasetLoader:
    """The loader registered as ``name``, else the one an installed package publishes under the
    entry-point group :data:`ENTRY_POINT_GROUP`.

    Raises:
        FedsimError: no such dataset (the message lists ``known`` and the registered names).
    """
    if name in DATASET_LOADERS:
        return DATASET_LOADERS[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            fn = ep.load()
            DATASET_LOADERS.setdefault(name, fn)
            return DATASET_LOADERS[name]
    names = list(known) + [n for n in DATASET_LOADERS if n not in known]
    raise FedsimError(
        f"unknown data.dataset {name!r}; use one of {', '.join(names)}, or register your own with "
        "fedsim.data.register_dataset"
    )


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _labels(value: Any, name: str, where: str) -> np.ndarray:
    y = _numpy(value)
    if y.ndim != 1:
        raise FedsimError(f"{where}: {name} has shape {y.shape}; labels must be one integer per example")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise FedsimError(
            f"{where}: {name} holds {y.dtype} values; class labels must be integers (map them to "
            "0..K-1, or set data.label_column to an integer column)"
        )
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise FedsimError(f"{where}: {name} has a negative label ({y.min()}); labels must lie in 0..K-1")
    return y


def to_splits(
    arrays: DataArrays, where: str
) -> tuple[Split, Split | None, int, tuple[int, ...], np.ndarray | None]:
    """Check a loader's arrays and turn them into splits.

    Args:
        arrays: what the loader returned.
        where: the dataset's name, for messages.

    Returns:
        ``(train, test or None, num_classes, input_shape, client_ids or None)``; ``x`` float32
        (or the window layout for symbol ids), ``y`` int64.

    Raises:
        FedsimError: non-integer or negative labels, labels at or above ``num_classes``, inputs and
            labels of different lengths, train and test inputs of different shapes, only one of
            ``x_test``/``y_test``, or ``client_ids`` not one per training example.
    """
    if not isinstance(arrays, DataArrays):
        raise FedsimError(
            f"{where}: the dataset loader returned {type(arrays).__name__}; return fedsim.data.DataArrays"
        )
    x = _numpy(arrays.x_train)
    y = _labels(arrays.y_train, "y_train", where)
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise FedsimError(
            f"{where}: x_train has shape {x.shape} for {y.shape[0]} labels; pass (N, ...) inputs"
        )
    if x.shape[0] == 0:
        raise FedsimError(f"{where}: the training set is empty; check the dataset's train split")
    test = None
    if (arrays.x_test is None) != (arrays.y_test is None):
        raise FedsimError(
            f"{where}: pass both x_test and y_test, or neither (then clients hold out a test share)"
        )
    if arrays.x_test is not None:
        xt = _numpy(arrays.x_test)
        yt = _labels(arrays.y_test, "y_test", where)
        if xt.shape[1:] != x.shape[1:] or xt.shape[0] != yt.shape[0]:
            raise FedsimError(
                f"{where}: x_test has shape {xt.shape} for {yt.shape[0]} labels, x_train {x.shape}; "
                "pass test inputs shaped like the training inputs"
            )
        test = _split(xt, yt, where)
    top = max(int(y.max()), int(test.y.max()) if test is not None and len(test) else -1)
    k = top + 1 if arrays.num_classes is None else int(arrays.num_classes)
    if top >= k:
        raise FedsimError(f"{where}: a label ({top}) is >= num_classes ({k}); fix num_classes or the labels")
    ids = None
    if arrays.client_ids is not None:
        ids = _numpy(arrays.client_ids)
        if ids.shape != y.shape:
            raise FedsimError(
                f"{where}: client_ids has shape {ids.shape} for {y.shape[0]} training examples; pass one id each"
            )
    return _split(x, y, where), test, k, tuple(int(s) for s in x.shape[1:]), ids


def _split(x: np.ndarray, y: np.ndarray, where: str) -> Split:
    """Float inputs -> the tensor layout (float32); integer ``(N, L)`` symbol ids -> the window
    layout (one uint8 text of the N windows laid end to end)."""
    if not np.issubdtype(x.dtype, np.integer):
        return Split(x=x.astype(np.float32, copy=False), y=y)
    if x.ndim != 2 or (x.size and (x.min() < 0 or x.max() > 255)):
        raise FedsimError(
            f"{where}: integer inputs are symbol ids and must be (N, L) in 0..255 (got shape {x.shape}); "
            "pass images as normalised floats"
        )
    offsets = np.arange(x.shape[0], dtype=np.int64) * x.shape[1]
    return Split(x=offsets, y=y, text=np.ascontiguousarray(x, dtype=np.uint8).reshape(-1), seq_len=x.shape[1])
