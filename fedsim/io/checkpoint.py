"""Run checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the server state (global tensors and the algorithm's own state, such as
FedMA's assignments, as a dict of its dataclass's fields), the client-state store (each client's
state likewise), the cumulative byte counters and the index of the last
completed round. The random position needs nothing else: every draw is a pure function of
(seed, stream, round, client), so the round index is the RNG position.

Files are written with ``torch.save`` through a temporary file and an atomic rename, and read
with ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects: a run
directory can never execute code. numpy arrays are stored as tensors (weights_only admits only
tensors and plain containers), so algorithms must accept tensors where they stored arrays.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.io import storage

CHECKPOINT_DIR = "checkpoints"


def to_safe(x: Any) -> Any:
    """``x`` with every numpy array (and numpy scalar) turned into a torch tensor / Python number,
    recursively through dicts, lists and tuples, so that ``weights_only`` loading accepts it."""
    if isinstance(x, np.ndarray):
        return torch.tensor(x)  # a copy: arrays from Ray's object store are read-only
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: to_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_safe(v) for v in x)
    return x


def path_for(run_dir: str | Path, run_id: str) -> str | Path:
    """The checkpoint file of one run: ``<run_dir>/checkpoints/<run_id>.pt`` (path or URI)."""
    return storage.join(run_dir, CHECKPOINT_DIR, f"{run_id}.pt")


def save(run_dir: str | Path, run_id: str, payload: dict[str, Any]) -> str | Path:
    """Write ``payload`` (tensors, numbers, strings, containers, numpy arrays) atomically, to a
    local run directory or a URI (see :mod:`fedsim.io.storage`).

    Returns:
        The checkpoint's path or URI.
    """
    path = path_for(run_dir, run_id)
    storage.make_dirs(storage.join(run_dir, CHECKPOINT_DIR))
    buf = io.BytesIO()
    torch.save(to_safe(payload), buf)
    storage.write_bytes(path, buf.getbuffer())
    return path


def load(run_dir: str | Path, run_id: str) -> dict[str, Any] | None:
    """The run's checkpoint, or None when it has none.

    Raises:
        ValueError: the file exists but is not a checkpoint fedsim can load safely (corrupt,
            truncated, or holding objects other than tensors and plain containers).
    """
    path = path_for(run_dir, run_id)
    if not storage.exists(path):
        return None
    try:
        return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be loaded safely ({err.__class__.__name__})"
        ) from None
