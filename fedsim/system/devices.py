"""Each client's device: compute speed, bandwidth each way and latency (docs/heterogeneity.md).

A device table is built once per experiment from ``system.devices`` and is a pure function of
(seed, client) and the configuration: client c's device comes from its own (seed, "devices", q,
client) streams, so it does not depend on how many clients there are, on the order of queries or
on the backend. It is kept as one numpy array per quantity (struct of arrays), so 10,000 clients
cost a few hundred kilobytes.

Sources (exactly one):

* distributions: each quantity constant, log-normal (median, sigma of the natural log) or uniform;
* tiers: named shares of identical devices; the counts are exact (largest remainder of
  fraction x J) and membership is a seeded permutation of the clients;
* a trace: a Parquet table of device profiles (:data:`TRACE_COLUMNS`), each client mapped to a
  profile by a seeded draw (FedScale maps by ``id % len``, which ties a client's device to its id).

Imports no torch and no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import DevicesConfig, Distribution
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng

QUANTITIES = ("compute_macs_per_s", "uplink_bytes_per_s", "downlink_bytes_per_s", "latency_s")
"""The device quantities, in the order of their draws. Units: multiply-accumulates per second,
bytes per second (client to server, server to client), seconds (one way, per message)."""

TRACE_COLUMNS = ("device_id",) + QUANTITIES
"""Columns of a device trace (Parquet): ``device_id`` (string), then the four quantities as
numbers in the units their names state."""

_OTHER_UNITS = {
    "computation": "FedScale's ms per sample",
    "communication": "FedScale's kbit/s",
    "compute_ms_per_sample": "ms per sample",
    "bandwidth_kbps": "kbit/s",
    "bandwidth_kbit_per_s": "kbit/s",
    "flops_per_s": "FLOP/s",
}

# the (seed, "devices", round, client) round slots of each draw
_SLOT_QUANTITIES, _SLOT_TIERS, _SLOT_TRACE = 0, 1, 2


@dataclass(frozen=True)
class DeviceTable:
    """One device per client, struct of arrays.

    Attributes:
        device_id: ``(J,)`` str, the device's name (a tier's or trace profile's name; for drawn
            devices ``"client-<id>"``, every client its own device).
        compute_macs_per_s: ``(J,)`` float64 multiply-accumulates per second of local training.
        uplink_bytes_per_s / downlink_bytes_per_s: ``(J,)`` float64 bytes per second.
        latency_s: ``(J,)`` float64 seconds, one way, added to every message.
    """

    device_id: np.ndarray
    compute_macs_per_s: np.ndarray
    uplink_bytes_per_s: np.ndarray
    downlink_bytes_per_s: np.ndarray
    latency_s: np.ndarray

    def __len__(self) -> int:
        return int(self.compute_macs_per_s.shape[0])

    def columns(self) -> dict[str, Any]:
        """The table's columns for devices.parquet, by name (``client_id`` first)."""
        return {
            "client_id": np.arange(len(self), dtype=np.int64),
            "device_id": self.device_id,
            **{q: getattr(self, q) for q in QUANTITIES},
        }


def _draw(d: Distribution, z: float, u: float) -> float:
    """One client's value of a distribution from its standard-normal ``z`` and uniform ``u``."""
    if d.distribution == "constant":
        return float(d.value)
    if d.distribution == "lognormal":
        return float(d.median * np.exp(d.sigma * z))
    return float(d.low + (d.high - d.low) * u)


def _drawn(cfg: DevicesConfig, num_clients: int, seed: int) -> dict[str, np.ndarray]:
    """Every quantity of every client from the distributions: client c draws z (4 standard normals)
    and u (4 uniforms) from its (seed, "devices", 0, c) stream, always in that order, and
    quantity q uses z[q] or u[q], so changing one quantity's distribution changes no other."""
    dists = [getattr(cfg, q) for q in QUANTITIES]
    if all(d.distribution == "constant" for d in dists):  # no draws needed
        return {q: np.full(num_clients, float(d.value)) for q, d in zip(QUANTITIES, dists)}
    out = {q: np.empty(num_clients) for q in QUANTITIES}
    for c in range(num_clients):
        rng = numpy_rng(seed, "devices", _SLOT_QUANTITIES, c)
        z, u = rng.standard_normal(len(QUANTITIES)), rng.random(len(QUANTITIES))
        for i, (q, d) in enumerate(zip(QUANTITIES, dists)):
            out[q][c] = _draw(d, z[i], u[i])
    return out


def tier_counts(fractions: list[float], num_clients: int) -> np.ndarray:
    """Clients per tier: floor(fraction x J) each, and the clients left over go one each to the
    tiers with the largest remainders (ties to the earlier tier). Returns ``(T,)`` int64 summing
    to J."""
    exact = np.asarray(fractions, dtype=np.float64) * num_clients
    counts = np.floor(exact).astype(np.int64)
    left = num_clients - int(counts.sum())
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def _tiers(cfg: DevicesConfig, num_clients: int, seed: int) -> dict[str, np.ndarray]:
    tiers = cfg.tiers or []
    counts = tier_counts([t.fraction for t in tiers], num_clients)
    which = np.repeat(np.arange(len(tiers)), counts)
    which = which[numpy_rng(seed, "devices", _SLOT_TIERS).permutation(num_clients)]
    out: dict[str, np.ndarray] = {"device_id": np.array([tiers[i].name for i in which], dtype=object)}
    for q in QUANTITIES:
        out[q] = np.array([getattr(t, q) for t in tiers], dtype=np.float64)[which]
    return out


def read_trace(path: str | Path) -> dict[str, np.ndarray]:
    """A device trace's columns (:data:`TRACE_COLUMNS`), checked.

    Raises:
        FedsimError: the file is missing or not Parquet, a column is missing, a column carries
            another unit (FedScale's ms per sample or kbit/s: convert it with
            ``python -m fedsim.system.fedscale``), a value is not a positive finite number (a
            latency may be 0), or the table is empty.
    """
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise FedsimError(
            f"config key 'system.devices.trace': {str(p)!r} does not exist; give the path of a Parquet "
            "table of device profiles (docs/heterogeneity.md)"
        )
    try:
        table = pq.read_table(p)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise FedsimError(
            f"config key 'system.devices.trace': {str(p)!r} is not a readable Parquet file "
            f"({type(err).__name__}); write it with pandas.DataFrame.to_parquet"
        ) from None
    names = set(table.column_names)
    for col, unit in _OTHER_UNITS.items():
        if col in names:
            raise FedsimError(
                f"config key 'system.devices.trace': column {col!r} is in {unit}, but fedsim reads "
                "compute_macs_per_s and bytes per second; convert the trace with "
                "'python -m fedsim.system.fedscale' (docs/heterogeneity.md)"
            )
    missing = [c for c in TRACE_COLUMNS if c not in names]
    if missing:
        raise FedsimError(
            f"config key 'system.devices.trace': {str(p)!r} lacks column(s) {', '.join(missing)}; a "
            f"device trace has {', '.join(TRACE_COLUMNS)} (docs/heterogeneity.md)"
        )
    if table.num_rows == 0:
        raise FedsimError(f"config key 'system.devices.trace': {str(p)!r} has no rows; add device profiles")
    out: dict[str, np.ndarray] = {
        "device_id": np.array([str(x) for x in table["device_id"].to_pylist()], dtype=object)
    }
    for q in QUANTITIES:
        try:
            v = np.asarray(table[q].to_numpy(zero_copy_only=False), dtype=np.float64)
        except (TypeError, ValueError):
            raise FedsimError(
                f"config key 'system.devices.trace': column {q!r} must hold numbers; fix the trace"
            ) from None
        ok = np.isfinite(v) & ((v >= 0) if q == "latency_s" else (v > 0))
        if not ok.all():
            bad = float(v[~ok][0])
            raise FedsimError(
                f"config key 'system.devices.trace': column {q!r} has {bad}; speeds and bandwidths must "
                "be > 0 and latencies >= 0 (check the units: multiply-accumulates and bytes per second)"
            )
        out[q] = v
    return out


def _traced(cfg: DevicesConfig, num_clients: int, seed: int) -> dict[str, np.ndarray]:
    profiles = read_trace(cfg.trace)
    n = len(profiles["device_id"])
    pick = np.array(
        [int(numpy_rng(seed, "devices", _SLOT_TRACE, c).integers(n)) for c in range(num_clients)],
        dtype=np.int64,
    )
    return {k: v[pick] for k, v in profiles.items()}


def build_devices(cfg: DevicesConfig, num_clients: int, seed: int) -> DeviceTable:
    """The experiment's device table: one device per client, a pure function of (seed, client)
    and ``cfg``.

    Raises:
        FedsimError: an unreadable or malformed trace (:func:`read_trace`).
    """
    if cfg.trace is not None:
        cols = _traced(cfg, num_clients, seed)
    elif cfg.tiers is not None:
        cols = _tiers(cfg, num_clients, seed)
    else:
        cols = _drawn(cfg, num_clients, seed)
        cols["device_id"] = np.array([f"client-{c}" for c in range(num_clients)], dtype=object)
    return DeviceTable(**cols)
