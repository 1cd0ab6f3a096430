"""The virtual clock: a client's time from its exact bytes and multiply-accumulates, and the round
rules that decide, from those times alone, whom a synchronous round aggregates and when it ends.

A client's duration in a round (simulated seconds) is

    latency + bytes_down / downlink_bytes_per_s      (the download; absent when nothing is sent)
    + macs / compute_macs_per_s                      (local training)
    + latency + bytes_up / uplink_bytes_per_s        (the upload; absent when nothing is sent)

with the bytes and multiply-accumulates fedsim counts for that client (numel x element size of
what crosses the wire; training MACs as :func:`fedsim.engine.client.training_macs`). A message
of 0 bytes is not sent and costs no latency. The terms are added in that order, left to right,
so a check that recomputes the formula from the logged columns gets the same float.

Everything here is a pure function of its arguments: no randomness, no state, no torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

AGGREGATED = "aggregated"
DROPPED_DEADLINE = "dropped_deadline"
DROPPED_OFFLINE = "dropped_offline"
OVERSELECTED_UNUSED = "overselected_unused"
DROPPED_TIMEOUT = "dropped_timeout"
OUTCOMES = (AGGREGATED, DROPPED_DEADLINE, DROPPED_OFFLINE, OVERSELECTED_UNUSED, DROPPED_TIMEOUT)
"""Values of clients.parquet's ``outcome``: aggregated; dropped by the round's deadline; dropped
because its device went offline before it arrived; sampled by over-selection but not among the
first k to arrive (not trained); dropped by the wall-clock ``engine.round_timeout_s``."""


@dataclass(frozen=True)
class Device:
    """One client's device. Units: multiply-accumulates per second, bytes per second, seconds."""

    compute_macs_per_s: float
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    latency_s: float


def duration(device: Device, bytes_down: int, macs: int, bytes_up: int) -> float:
    """Simulated seconds from dispatch to arrival of a client that receives ``bytes_down`` bytes,
    trains ``macs`` multiply-accumulates and sends ``bytes_up`` bytes (the module's formula; a
    direction with 0 bytes has no term)."""
    t = 0.0
    if bytes_down > 0:
        t = device.latency_s + bytes_down / device.downlink_bytes_per_s
    t = t + macs / device.compute_macs_per_s
    if bytes_up > 0:
        t = t + device.latency_s + bytes_up / device.uplink_bytes_per_s
    return t


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Minibatches in one pass over ``n_examples`` (the last one may be smaller)."""
    return -(-n_examples // batch_size)


def examples_in_steps(n_examples: int, batch_size: int, steps: int) -> int:
    """Examples processed by the first ``steps`` minibatches of local training: each epoch is
    ``n // B`` batches of B and one of ``n % B`` (when nonzero), as
    :meth:`fedsim.algorithms.Algorithm.local_update` batches them."""
    spe = steps_per_epoch(n_examples, batch_size)
    if spe == 0:
        return 0
    epochs, rest = divmod(steps, spe)
    return epochs * n_examples + rest * batch_size


def steps_that_fit(
    device: Device,
    budget_s: float,
    bytes_down: int,
    bytes_up: int,
    n_examples: int,
    batch_size: int,
    total_steps: int,
    macs_per_example: int,
) -> int:
    """The most local steps s <= ``total_steps`` whose duration (:func:`duration` with
    ``examples_in_steps(s) x macs_per_example`` MACs) is at most ``budget_s``: the partial work of
    a client under a deadline (FedProx's variable amount of local work, Li et al., MLSys 2020,
    section 3.2). 0 when not even the messages fit. Found by bisection on the exact formula, so
    the returned count's duration never exceeds the budget."""

    def fits(s: int) -> bool:
        macs = examples_in_steps(n_examples, batch_size, s) * macs_per_example
        return duration(device, bytes_down, macs, bytes_up) <= budget_s

    if not fits(0):
        return 0
    lo, hi = 0, total_steps  # fits(lo) holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Candidate:
    """A dispatched client as a round rule sees it: its projected duration and when its device
    goes offline.

    Attributes:
        client_id: the client. dispatch_s: when it receives the model (simulated seconds).
        duration_s: :func:`duration` of its full local work. offline_s: the first time >= dispatch
            at which its device is offline (inf: never).
        partial: (steps, duration) of the most local steps that fit the deadline, under
            ``partial_work``; None otherwise.
    """

    client_id: int
    dispatch_s: float
    duration_s: float
    offline_s: float
    partial: tuple[int, float] | None = None


@dataclass(frozen=True)
class Decision:
    """What a round rule decided for one client.

    Attributes:
        client_id, dispatch_s, arrival_s: simulated seconds (``arrival_s`` is when its upload would
            arrive, also for a client that is dropped); outcome: one of :data:`OUTCOMES`;
            max_steps: the local steps it may take (partial work), None for all of them.
    """

    client_id: int
    dispatch_s: float
    arrival_s: float
    outcome: str
    max_steps: int | None = None


@dataclass(frozen=True)
class RoundTimes:
    """A round rule's result: one :class:`Decision` per candidate (in the candidates' order) and
    ``end_s``, when the server has every upload it will aggregate (before server time)."""

    decisions: tuple[Decision, ...]
    end_s: float


def _end(start: float, decisions: Sequence[Decision], offline: dict[int, float]) -> float:
    """When the server stops waiting: the last aggregated arrival, or a dropped client's going
    offline if later (that is when the server learns it will not come)."""
    times = [d.arrival_s for d in decisions if d.outcome == AGGREGATED]
    times += [offline[d.client_id] for d in decisions if d.outcome == DROPPED_OFFLINE]
    return max(times, default=start)


def sync_round(start: float, cands: Sequence[Candidate]) -> RoundTimes:
    """``sync``: every candidate trains; one whose device goes offline before it arrives is
    dropped; the round ends with the last arrival (or the last dropout, if later)."""
    out = []
    for c in cands:
        arrival = c.dispatch_s + c.duration_s
        outcome = DROPPED_OFFLINE if c.offline_s < arrival else AGGREGATED
        out.append(Decision(c.client_id, c.dispatch_s, arrival, outcome))
    return RoundTimes(tuple(out), _end(start, out, {c.client_id: c.offline_s for c in cands}))


def deadline_round(start: float, deadline_s: float, cands: Sequence[Candidate]) -> RoundTimes:
    """``deadline``: the round lasts at most ``deadline_s``. A candidate arriving after
    ``start + deadline_s`` is dropped (``dropped_deadline``) unless it has a partial plan of at
    least one step, which it then follows; one going offline before it arrives is dropped
    (``dropped_offline``). The round ends at the last arrival when every candidate is
    aggregated, else at the deadline (the server cannot know that a late client will not come)."""
    limit = start + deadline_s
    out = []
    for c in cands:
        arrival, steps = c.dispatch_s + c.duration_s, None
        if arrival > limit and c.partial is not None and c.partial[0] >= 1:
            steps, arrival = c.partial[0], c.dispatch_s + c.partial[1]
        if arrival > limit:
            out.append(Decision(c.client_id, c.dispatch_s, arrival, DROPPED_DEADLINE))
        elif c.offline_s < arrival:
            out.append(Decision(c.client_id, c.dispatch_s, arrival, DROPPED_OFFLINE))
        else:
            out.append(Decision(c.client_id, c.dispatch_s, arrival, AGGREGATED, steps))
    done = all(d.outcome == AGGREGATED for d in out)
    return RoundTimes(tuple(out), max((d.arrival_s for d in out), default=start) if done else limit)


def overselect_round(start: float, k: int, cands: Sequence[Candidate]) -> RoundTimes:
    """``overselect``: the first ``k`` candidates to arrive (ties by client id) are aggregated; a
    candidate going offline before it arrives is dropped; the others are ``overselected_unused``
    (not trained). The round ends at the k-th arrival, or, with fewer than k arrivals, when the
    last arrival or dropout happens (Bonawitz et al., SysML 2019, section 2.2)."""
    arrivals = {c.client_id: c.dispatch_s + c.duration_s for c in cands}
    alive = sorted(
        (c for c in cands if not c.offline_s < arrivals[c.client_id]),
        key=lambda c: (arrivals[c.client_id], c.client_id),
    )
    chosen = {c.client_id for c in alive[:k]}
    out = []
    for c in cands:
        a = arrivals[c.client_id]
        outcome = (
            AGGREGATED
            if c.client_id in chosen
            else DROPPED_OFFLINE
            if c.offline_s < a
            else OVERSELECTED_UNUSED
        )
        out.append(Decision(c.client_id, c.dispatch_s, a, outcome))
    if len(chosen) >= k:
        end = max(arrivals[c] for c in chosen) if chosen else start
    else:
        end = _end(start, out, {c.client_id: c.offline_s for c in cands})
    return RoundTimes(tuple(out), end)


def overselected(k: int, factor: float) -> int:
    """Clients sampled under over-selection: ceil(``factor`` x k)."""
    return math.ceil(factor * k - 1e-9)
