"""The simulated world of one experiment: every client's device and availability, the server's
speed, and the cohort sampler that draws only from clients online at a round's start.

Built once per experiment from ``system:`` (:func:`build_world`), identically on the driver,
in the dry run and in the checks before a run starts; a pure function of (seed, client) and the
configuration. Imports no torch and no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsim.config import SystemConfig
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng, sample_cohort
from fedsim.system.availability import Availability, build_availability
from fedsim.system.clock import Device
from fedsim.system.devices import DeviceTable, build_devices

DEVICES_COLUMNS = (
    "client_id",
    "device_id",
    "compute_macs_per_s",
    "uplink_bytes_per_s",
    "downlink_bytes_per_s",
    "latency_s",
    "availability",
    "availability_phase_s",
    "availability_on_fraction",
    "availability_period_s",
    "availability_trace",
)
"""Columns of devices.parquet, one row per client (units in their names; the availability columns
that do not apply to a client's kind are null)."""

_MAX_WAITS = 10_000  # offline gaps a client may wait through before it is judged never to fit


@dataclass(frozen=True)
class World:
    """Devices, availability and the server of one experiment.

    Attributes:
        devices: one device per client (:class:`fedsim.system.devices.DeviceTable`).
        availability: who is online when (:mod:`fedsim.system.availability`).
        server_macs_per_s: the server's throughput for aggregation and evaluation, or None (the
            server takes no simulated time).
    """

    devices: DeviceTable
    availability: Availability
    server_macs_per_s: float | None = None

    @property
    def num_clients(self) -> int:
        return len(self.devices)

    def device(self, client: int) -> Device:
        """Client ``client``'s device as the clock's :class:`fedsim.system.clock.Device`."""
        d = self.devices
        return Device(
            float(d.compute_macs_per_s[client]),
            float(d.uplink_bytes_per_s[client]),
            float(d.downlink_bytes_per_s[client]),
            float(d.latency_s[client]),
        )

    def table(self) -> dict[str, list]:
        """devices.parquet's columns (:data:`DEVICES_COLUMNS`) as lists."""
        cols = {k: list(v) for k, v in self.devices.columns().items()}
        described = [self.availability.describe(c) for c in range(self.num_clients)]
        for k in DEVICES_COLUMNS[6:]:
            cols[k] = [row[k] for row in described]
        return {k: cols[k] for k in DEVICES_COLUMNS}

    def sample_cohort(
        self, seed: int, round: int, start_s: float, size: int
    ) -> tuple[tuple[int, ...], float]:
        """(cohort, its start time): ``size`` distinct clients drawn uniformly without replacement
        from those online at ``start_s``, by the (seed, "cohort", round) stream, ascending. With
        every client online it is :func:`fedsim.rng.sample_cohort`'s cohort, so runs without
        availability see the cohorts of an ideal federation. Fewer online than ``size``: all of
        them. Nobody online: the round starts when the first client comes online.

        Raises:
            FedsimError: no client is ever online again.
        """
        j = self.num_clients
        online = self.availability.online_mask(start_s, j)
        if not online.any():
            start_s = min(self.availability.next_online(c, start_s) for c in range(j))
            if math.isinf(start_s):
                raise FedsimError(
                    "config key 'system.availability': no client is ever online again; check the trace"
                )
            online = self.availability.online_mask(start_s, j)
        ids = np.flatnonzero(online)
        if len(ids) == j:
            return sample_cohort(seed, round, j, size), start_s
        if size >= len(ids):
            return tuple(int(i) for i in ids), start_s
        pick = numpy_rng(seed, "cohort", round).choice(len(ids), size=size, replace=False)
        return tuple(int(i) for i in np.sort(ids[pick])), start_s

    def first_fit(self, client: int, start_s: float, duration_s: float) -> float:
        """The earliest time >= ``start_s`` at which ``client`` is online and stays online for
        ``duration_s`` seconds: when a round that waits for every client (FedMA) dispatches it.

        Raises:
            FedsimError: no online window of the client is long enough.
        """
        t = start_s
        for _ in range(_MAX_WAITS):
            t = self.availability.next_online(client, t)
            if math.isinf(t):
                break
            end = self.availability.offline_at(client, t)
            if end >= t + duration_s:
                return t
            t = end
        raise FedsimError(
            f"client {client} needs {duration_s:.1f} simulated seconds per round but is never online that "
            "long; raise system.availability.on_fraction or speed its device up"
        )


def build_world(cfg: SystemConfig, num_clients: int, seed: int) -> World:
    """The experiment's :class:`World`.

    Raises:
        FedsimError: an unreadable or malformed device or availability trace.
    """
    return World(
        devices=build_devices(cfg.devices, num_clients, seed),
        availability=build_availability(cfg.availability, num_clients, seed),
        server_macs_per_s=cfg.server_macs_per_s,
    )
