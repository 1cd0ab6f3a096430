"""Model differences for the algorithms whose server step is not FedAvg's plain average
(FedAvgM, FedAdam, FedYogi, FedAdagrad, SCAFFOLD, FedNova).

Their server steps act on the trainable weights only: a tensor is *stepped* when it is floating
point and not a BatchNorm buffer (for fedsim's models: exactly the ``nn.Parameter`` s). Every other
uploaded tensor (BatchNorm running means and variances, integer counters such as
``num_batches_tracked``) is set to FedAvg's example-weighted mean and never stepped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedsim import params as P
from fedsim.algorithms.base import BN_BUFFERS


def stepped(key: str, tensor: torch.Tensor | np.ndarray) -> bool:
    """Whether the server steps ``key`` (floating point, not a BatchNorm running statistic or
    counter) instead of setting it to the weighted mean."""
    if isinstance(tensor, torch.Tensor):
        floating = tensor.is_floating_point()
    else:
        floating = np.issubdtype(tensor.dtype, np.floating)
    return floating and key.rsplit(".", 1)[-1] not in BN_BUFFERS


def stepped_keys(params: Mapping[str, torch.Tensor | np.ndarray]) -> tuple[str, ...]:
    """The keys of ``params`` the server steps, in ``params``' order."""
    return tuple(k for k, v in params.items() if stepped(k, v))


def combine(
    uploads: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
    coefs: Sequence[float],
    keys: Sequence[str],
    origin: Mapping[str, torch.Tensor] | None = None,
) -> P.Params:
    """``sum_i coefs[i] * (uploads[i][k] - origin[k])`` for each key k (``origin`` None: 0).

    Accumulated in float64 in the uploads' order and rounded once to the dtype of ``origin[k]``
    (of the uploads' tensor without ``origin``), like :func:`fedsim.params.weighted_mean`, so
    the result depends only on the inputs and their order.

    Args:
        uploads: I mappings holding every key, numpy arrays (as uploads arrive) or tensors.
        coefs: I float coefficients (not normalised here).
        keys: the keys to combine; origin: name -> CPU tensor of the same shapes.

    Returns:
        Name -> CPU tensor of the key's shape and dtype.
    """
    out: P.Params = {}
    for k in keys:
        arrays = [u[k] if isinstance(u[k], np.ndarray) else u[k].detach().cpu().numpy() for u in uploads]
        x = None if origin is None else origin[k].detach().cpu().numpy()
        acc = np.zeros(arrays[0].shape, dtype=np.float64)
        for a, c in zip(arrays, coefs):
            acc += (a if x is None else a.astype(np.float64) - x) * np.float64(c)
        out[k] = torch.from_numpy(acc.astype(arrays[0].dtype if x is None else x.dtype))
    return out


def averaged(
    uploads: Sequence[Mapping[str, torch.Tensor | np.ndarray]], n_examples: Sequence[int], keys: Sequence[str]
) -> P.Params:
    """FedAvg's example-weighted mean (:func:`fedsim.params.weighted_mean`) of ``keys`` of the
    uploads; {} when there are none (e.g. a model without BatchNorm)."""
    if not keys:
        return {}
    return P.weighted_mean([{k: u[k] for k in keys} for u in uploads], n_examples)
