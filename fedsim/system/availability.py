"""When each client is online: a pure function of (client, simulated time).

Every query is answered from the client's parameters and the time alone, never from a cursor
that earlier queries moved (FedScale's ``is_active`` keeps such a cursor, so its answers depend on
the order of the queries), so the answers are the same in any query order, after a resume and
on any backend. Three kinds:

* :class:`AlwaysOnline`: every client, all the time (the default);
* :class:`DailyCycle`: online for ``on_fraction`` of every ``period_s``, from a per-client phase
  drawn from the (seed, "availability", 0, client) stream;
* :class:`TraceAvailability`: online intervals of a Parquet table (:data:`TRACE_COLUMNS`), each
  client mapped to a trace by a seeded draw; a trace with ``period_s`` repeats.

Times are simulated seconds from the start of the run (t = 0). Imports no torch and no Ray.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedsim.config import AvailabilityConfig
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng

TRACE_COLUMNS = ("trace_id", "start_s", "end_s", "period_s")
"""Columns of an availability trace (Parquet): ``trace_id`` (string), ``start_s`` and ``end_s``
(an online interval [start, end) in simulated seconds) and ``period_s`` (the trace's cycle: the
intervals repeat every ``period_s`` seconds; null or 0 for a trace that does not repeat; one value
per trace)."""

_INF = math.inf


class Availability:
    """Online intervals of every client. Subclasses answer three queries; all are pure."""

    kind = "always"

    def online(self, client: int, t: float) -> bool:
        """Whether ``client`` is online at simulated time ``t`` (seconds)."""
        return True

    def online_mask(self, t: float, num_clients: int) -> np.ndarray:
        """``(J,)`` bool: which clients are online at ``t``."""
        return np.array([self.online(c, t) for c in range(num_clients)], dtype=bool)

    def offline_at(self, client: int, t: float) -> float:
        """The first time >= ``t`` at which ``client`` is offline (``t`` when it is offline now;
        ``inf`` when it never goes offline)."""
        return _INF

    def next_online(self, client: int, t: float) -> float:
        """The first time >= ``t`` at which ``client`` is online (``t`` when it is online now;
        ``inf`` when it never comes online again)."""
        return t

    def describe(self, client: int) -> dict[str, object]:
        """What devices.parquet records of ``client``'s availability: ``availability`` (the kind),
        ``availability_phase_s``, ``availability_on_fraction``, ``availability_period_s`` (daily) and
        ``availability_trace`` (trace); the keys that do not apply are None."""
        return {
            "availability": self.kind,
            "availability_phase_s": None,
            "availability_on_fraction": None,
            "availability_period_s": None,
            "availability_trace": None,
        }


def _settle(av: Availability, client: int, t: float, online: bool) -> float:
    """``t`` moved up by the fewest float steps after which ``av.online(client, t) == online``: a
    boundary computed in floating point can land a rounding step before the instant at which the
    modular lookup flips, and the queries must agree with one another exactly."""
    for _ in range(64):
        if av.online(client, t) == online:
            return t
        t = math.nextafter(t, _INF)
    return t


class AlwaysOnline(Availability):
    """Every client is online all the time."""

    def online_mask(self, t: float, num_clients: int) -> np.ndarray:
        return np.ones(num_clients, dtype=bool)


class DailyCycle(Availability):
    """Client c is online while ``(t + phase_c) mod period < on_fraction x period``.

    Args:
        phases: ``(J,)`` float64 seconds in [0, period), one per client.
        on_fraction: share of each period a client is online, in (0, 1].
        period_s: the cycle's length, simulated seconds (86,400: a day).
    """

    kind = "daily"

    def __init__(self, phases: np.ndarray, on_fraction: float, period_s: float):
        self.phases = np.asarray(phases, dtype=np.float64)
        self.on_fraction, self.period = float(on_fraction), float(period_s)
        self.on = self.on_fraction * self.period

    def _pos(self, client: int, t: float) -> float:
        return math.fmod(t + self.phases[client], self.period)

    def online(self, client: int, t: float) -> bool:
        return self.on_fraction >= 1 or self._pos(client, t) < self.on

    def online_mask(self, t: float, num_clients: int) -> np.ndarray:
        if self.on_fraction >= 1:
            return np.ones(num_clients, dtype=bool)
        return np.fmod(t + self.phases[:num_clients], self.period) < self.on

    def offline_at(self, client: int, t: float) -> float:
        if self.on_fraction >= 1:
            return _INF
        pos = self._pos(client, t)
        return _settle(self, client, t + (self.on - pos), False) if pos < self.on else t

    def next_online(self, client: int, t: float) -> float:
        pos = self._pos(client, t)
        if self.on_fraction >= 1 or pos < self.on:
            return t
        return _settle(self, client, t + (self.period - pos), True)

    def describe(self, client: int) -> dict[str, object]:
        return {
            **super().describe(client),
            "availability_phase_s": float(self.phases[client]),
            "availability_on_fraction": self.on_fraction,
            "availability_period_s": self.period,
        }


class TraceAvailability(Availability):
    """Online intervals from a trace; client c follows trace ``assignment[c]``.

    Args:
        names: ``(T,)`` trace ids; starts / ends: per trace, ``(n_i,)`` float64 sorted,
            non-overlapping [start, end) intervals in seconds; periods: ``(T,)`` float64 cycle
            lengths (``inf``: no repetition); assignment: ``(J,)`` int64 trace index per client.
    """

    kind = "trace"

    def __init__(
        self,
        names: list[str],
        starts: list[np.ndarray],
        ends: list[np.ndarray],
        periods: np.ndarray,
        assignment: np.ndarray,
    ):
        self.names, self.starts, self.ends = names, starts, ends
        self.periods, self.assignment = np.asarray(periods, dtype=np.float64), np.asarray(assignment)

    def _local(self, i: int, t: float) -> tuple[float, float]:
        """(time within trace i's cycle, start time of that cycle)."""
        p = self.periods[i]
        if math.isinf(p):
            return t, 0.0
        base = math.floor(t / p) * p
        return t - base, base

    def _interval(self, i: int, tt: float) -> int:
        """Index of the interval of trace i holding cycle time ``tt``, or -1."""
        j = int(np.searchsorted(self.starts[i], tt, side="right")) - 1
        return j if j >= 0 and tt < self.ends[i][j] else -1

    def online(self, client: int, t: float) -> bool:
        i = int(self.assignment[client])
        return self._interval(i, self._local(i, t)[0]) >= 0

    def online_mask(self, t: float, num_clients: int) -> np.ndarray:
        per_trace = np.array([self._interval(i, self._local(i, t)[0]) >= 0 for i in range(len(self.names))])
        return per_trace[self.assignment[:num_clients]]

    def offline_at(self, client: int, t: float) -> float:
        i = int(self.assignment[client])
        tt, base = self._local(i, t)
        j = self._interval(i, tt)
        if j < 0:
            return t
        end = base + self.ends[i][j]
        # an interval that reaches the cycle's end continues into the next cycle's first interval
        p = self.periods[i]
        if not math.isinf(p) and self.ends[i][j] >= p and self.starts[i][0] <= 0:
            return self.offline_at(client, base + p) if self.ends[i][0] < p else _INF
        return _settle(self, client, end, False)

    def next_online(self, client: int, t: float) -> float:
        i = int(self.assignment[client])
        tt, base = self._local(i, t)
        if self._interval(i, tt) >= 0:
            return t
        j = int(np.searchsorted(self.starts[i], tt, side="right"))
        if j < len(self.starts[i]):
            return _settle(self, client, base + self.starts[i][j], True)
        p = self.periods[i]
        return _INF if math.isinf(p) else _settle(self, client, base + p + self.starts[i][0], True)

    def describe(self, client: int) -> dict[str, object]:
        i = int(self.assignment[client])
        p = self.periods[i]
        return {
            **super().describe(client),
            "availability_period_s": None if math.isinf(p) else float(p),
            "availability_trace": self.names[i],
        }


def read_trace(path: str | Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray], np.ndarray]:
    """An availability trace: (trace ids, starts per trace, ends per trace, ``(T,)`` periods).

    Raises:
        FedsimError: the file is missing or not Parquet, a column is missing, an interval is
            empty, negative, overlaps another or outruns its period, or a trace has two periods.
    """
    import pyarrow.parquet as pq

    key = "config key 'system.availability.trace'"
    p = Path(path)
    if not p.is_file():
        raise FedsimError(f"{key}: {str(p)!r} does not exist; give the path of a Parquet table of intervals")
    try:
        df = pq.read_table(p).to_pandas()
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise FedsimError(
            f"{key}: {str(p)!r} is not a readable Parquet file ({type(err).__name__})"
        ) from None
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise FedsimError(
            f"{key}: {str(p)!r} lacks column(s) {', '.join(missing)}; an availability trace has "
            f"{', '.join(TRACE_COLUMNS)} (docs/heterogeneity.md)"
        )
    if df.empty:
        raise FedsimError(f"{key}: {str(p)!r} has no intervals")
    names, starts, ends, periods = [], [], [], []
    for tid, g in df.groupby(df["trace_id"].astype(str), sort=True):
        g = g.sort_values("start_s")
        s, e = g["start_s"].to_numpy(np.float64), g["end_s"].to_numpy(np.float64)
        per = g["period_s"].fillna(0).to_numpy(np.float64)
        if len(set(per.tolist())) != 1:
            raise FedsimError(f"{key}: trace {tid!r} has several period_s values; give one per trace")
        period = _INF if per[0] <= 0 else float(per[0])
        if not (np.isfinite(s).all() and np.isfinite(e).all()) or (s < 0).any() or (e <= s).any():
            raise FedsimError(f"{key}: trace {tid!r} has an interval with end <= start or a negative time")
        if (s[1:] < e[:-1]).any():
            raise FedsimError(f"{key}: trace {tid!r} has overlapping intervals; merge them")
        if e[-1] > period:
            raise FedsimError(f"{key}: trace {tid!r} has an interval past its period_s ({period:g} s)")
        names.append(str(tid))
        starts.append(s)
        ends.append(e)
        periods.append(period)
    return names, starts, ends, np.array(periods)


def build_availability(cfg: AvailabilityConfig, num_clients: int, seed: int) -> Availability:
    """The experiment's availability, a pure function of (seed, client) and ``cfg``.

    Raises:
        FedsimError: an unreadable or malformed trace (:func:`read_trace`).
    """
    if cfg.kind == "always":
        return AlwaysOnline()
    if cfg.kind == "daily":
        phases = np.array(
            [numpy_rng(seed, "availability", 0, c).random() * cfg.period_s for c in range(num_clients)]
        )
        return DailyCycle(phases, cfg.on_fraction, cfg.period_s)
    names, starts, ends, periods = read_trace(cfg.trace)
    pick = np.array(
        [int(numpy_rng(seed, "availability", 1, c).integers(len(names))) for c in range(num_clients)],
        dtype=np.int64,
    )
    return TraceAvailability(names, starts, ends, periods, pick)
