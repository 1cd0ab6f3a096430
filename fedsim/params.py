"""Named-tensor arithmetic with torch ``state_dict`` semantics.

A :data:`Params` is an ordered ``name -> tensor`` mapping (a model's ``state_dict`` or a subset of
it). Everything here is pure: inputs are never modified in place. Transport between processes uses
numpy arrays (:func:`to_numpy` / :func:`from_numpy`) because Ray shares numpy buffers zero-copy
through its object store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

Params = dict[str, torch.Tensor]
NumpyParams = dict[str, np.ndarray]


def clone(p: Mapping[str, torch.Tensor]) -> Params:
    """Detached copies of every tensor, in the same order."""
    return {k: v.detach().clone() for k, v in p.items()}


def subset(p: Mapping[str, torch.Tensor], names: Iterable[str]) -> Params:
    """The tensors named in ``names``, in ``p``'s order.

    Raises:
        KeyError: a name is not in ``p``.
    """
    wanted = set(names)
    missing = wanted.difference(p)
    if missing:
        raise KeyError(f"no tensors named {sorted(missing)}")
    return {k: v for k, v in p.items() if k in wanted}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    """Elementwise a + b over the keys of ``a`` (``b`` must hold the same keys)."""
    return {k: a[k] + b[k] for k in a}


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    """Elementwise a - b over the keys of ``a``."""
    return {k: a[k] - b[k] for k in a}


def scale(a: Mapping[str, torch.Tensor], c: float) -> Params:
    """Every tensor multiplied by the scalar ``c``."""
    return {k: v * c for k, v in a.items()}


def weighted_mean(ps: Sequence[Mapping[str, torch.Tensor | np.ndarray]], weights: Sequence[float]) -> Params:
    """sum_j (w_j / sum w) p_j, FedAvg's aggregation (McMahan et al. 2017, Algorithm 1).

    Summation runs in the given order and in float64 for floating tensors (each term is
    ``float64(p_j) * (w_j / sum w)``, rounded once), then casts back to each tensor's dtype, so the
    result depends only on the inputs and their order, never on which process computed it.
    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) take the weighted mean rounded down.

    Args:
        ps: J mappings with identical keys and shapes, of torch tensors or numpy arrays (uploads
            as they arrive from workers; numpy is summed in place, without copies).
        weights: J non-negative weights, typically n_j (examples), with a positive sum.

    Returns:
        Name -> CPU torch tensor of the inputs' shape and dtype.

    Raises:
        ValueError: no inputs, lengths differ, or the weights do not sum to a positive number.
    """
    if not ps or len(ps) != len(weights):
        raise ValueError(f"weighted_mean needs as many weights as inputs (got {len(ps)} and {len(weights)})")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number (got {total})")
    coef = [np.float64(float(w) / total) for w in weights]  # float64 scalars: the products are float64
    out: Params = {}
    for k in ps[0]:
        arrays = [p[k] if isinstance(p[k], np.ndarray) else p[k].detach().cpu().numpy() for p in ps]
        acc = np.zeros(arrays[0].shape, dtype=np.float64)
        for a, c in zip(arrays, coef):
            acc += a * c
        dtype = arrays[0].dtype
        out[k] = torch.from_numpy(
            np.asarray(acc if np.issubdtype(dtype, np.floating) else np.floor(acc)).astype(dtype)
        )
    return out


def nbytes(p: Mapping[str, torch.Tensor | np.ndarray]) -> int:
    """Bytes on the wire: sum of numel x element size over every tensor (docs/algorithms.md section 6)."""
    total = 0
    for v in p.values():
        total += int(v.nbytes) if isinstance(v, np.ndarray) else v.numel() * v.element_size()
    return total


def numel(p: Mapping[str, torch.Tensor | np.ndarray]) -> int:
    """Number of scalar entries over every tensor."""
    return int(sum(int(v.size) if isinstance(v, np.ndarray) else v.numel() for v in p.values()))


def to_numpy(p: Mapping[str, torch.Tensor]) -> NumpyParams:
    """CPU numpy copies (never views: a view of a model's tensor would change when the model
    trains on, e.g. a worker's model serving its next client)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in p.items()}


def from_numpy(p: Mapping[str, np.ndarray | torch.Tensor]) -> Params:
    """Torch tensors that own their memory (object-store buffers are read-only, so we copy).
    Tensors are cloned as they are: client state restored from a checkpoint holds tensors where
    it stored arrays (see :mod:`fedsim.io.checkpoint`)."""
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True))
        for k, v in p.items()
    }


def all_finite(p: Mapping[str, torch.Tensor]) -> bool:
    """True when no floating tensor holds NaN or Inf."""
    return all(bool(torch.isfinite(v).all()) for v in p.values() if v.is_floating_point())
