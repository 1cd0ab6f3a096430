"""Randomness as a pure function of (seed, stream, round, client) (docs/design.md decision 4).

No code in fedsim calls a global seeding function. Every random draw comes from a generator built
here, so cohorts, initialisation, shuffling, augmentation and matching sweeps do not depend on call
order, on which worker ran a client, or on which algorithm is running.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

STREAMS = (
    "partition",
    "init",
    "cohort",
    "shuffle",
    "augment",
    "dropout",
    "matching",
    "schedule",
    "data",
    "devices",
    "availability",
    "codec",
    "downlink",
)


def _stream_id(stream: str) -> int:
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known streams: {', '.join(STREAMS)}")
    return zlib.crc32(stream.encode())


def seed_for(seed: int, stream: str, round: int = 0, client: int = 0) -> int:
    """A 63-bit integer seed derived from (seed, stream, round, client) by numpy's SeedSequence.

    Raises:
        ValueError: ``stream`` is not one of :data:`STREAMS`.
    """
    ss = np.random.SeedSequence([int(seed), _stream_id(stream), int(round), int(client)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, stream: str, round: int = 0, client: int = 0) -> np.random.Generator:
    """A numpy Generator (PCG64) for one (seed, stream, round, client)."""
    return np.random.default_rng(seed_for(seed, stream, round, client))


def torch_rng(seed: int, stream: str, round: int = 0, client: int = 0) -> torch.Generator:
    """A CPU torch.Generator for one (seed, stream, round, client). (torch is imported here, not
    with the module, so loading data in a process that trains nothing imports no torch.)"""
    import torch

    g = torch.Generator()
    g.manual_seed(seed_for(seed, stream, round, client))
    return g


def sample_cohort(seed: int, round: int, num_clients: int, size: int) -> tuple[int, ...]:
    """``size`` distinct client ids drawn uniformly without replacement from the
    (seed, "cohort", round) stream, ascending. All clients when ``size == num_clients``."""
    if size >= num_clients:
        return tuple(range(num_clients))
    ids = numpy_rng(seed, "cohort", round).choice(num_clients, size=size, replace=False)
    return tuple(int(i) for i in np.sort(ids))
