"""The event order of an asynchronous run (FedBuff, FedAsync) on the virtual clock.

``concurrency`` (C) clients are in flight at all times. A freed slot is filled at the simulated
time it frees, from the clients online then and not in flight: the b-th dispatch draws its clients
with the (seed, "cohort", b) stream, as a synchronous round draws its cohort, so a run is a pure
function of the seed and the configuration. A client's arrival time comes from the clock
(:class:`fedsim.engine.timing.RunClock`): its bytes and MACs are known when it is dispatched. Events
are ordered by the total key (time, kind, client, dispatch): arrivals (and a dropped client's going
offline) before dispatches at the same instant, so updates that arrive together are consumed
before their slots are refilled.

Training is not serial: every client in flight trains from a model version the server already
has, so when the next event is the arrival of a client not yet trained, every untrained client in
flight is trained in one batch per model version on the worker pool (stacked under
``engine.vectorize``). Which clients train together changes no result: each trains from its own
version with its own (seed, stream, dispatch, client) generators.

:meth:`AsyncEngine.plain` and :meth:`AsyncEngine.restore` carry the event state through a
checkpoint (clients in flight, their versions and the models they downloaded, pending dispatches):
a resumed run retrains the clients in flight and continues to the same tables.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fedsim import params as P
from fedsim.algorithms import Algorithm, ClientResult, ClientTask, RoundPlan, ServerState
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.engine import timing
from fedsim.engine.timing import RunClock
from fedsim.rng import numpy_rng
from fedsim.system import clock

ARRIVE, DISPATCH = 0, 1  # event kinds, in their tie-break order


@dataclass
class Flight:
    """A client dispatched and not yet consumed.

    Attributes:
        client: its id; version: the server step its model came from; batch: the dispatch that
            sent it (its tasks' ``round``, which keys its random streams).
        dispatch_s / arrival_s: simulated seconds it received the model / its upload arrives;
            event_s: when the server learns of it (``arrival_s``, or the time its device goes
            offline when ``outcome`` is ``dropped_offline``).
        bytes_down: its download, bytes.
        result: its trained update, None until trained (never stored in a checkpoint).
    """

    client: int
    version: int
    batch: int
    dispatch_s: float
    arrival_s: float
    event_s: float
    outcome: str
    bytes_down: int
    result: ClientResult | None = None

    def key(self) -> tuple[float, int, int, int]:
        return (self.event_s, ARRIVE, self.client, self.batch)

    def plain(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("result")
        return d


class AsyncEngine:
    """The event state of one asynchronous run, on the driver.

    Args:
        cfg, run, algo: the experiment, the run and its algorithm (an AsyncAlgorithm).
        timer: the run's clock (devices, availability; its rule is ``sync``).
        num_clients: J.
    """

    def __init__(
        self, cfg: ExperimentConfig, run: RunConfig, algo: Algorithm, timer: RunClock, num_clients: int
    ):
        self.cfg, self.run, self.algo, self.timer, self.j = cfg, run, algo, timer, num_clients
        self.concurrency: int = run.concurrency
        self.flights: list[Flight] = []
        self.dispatch_at: list[float] = [0.0]  # simulated times at which freed slots wait to be filled
        self.batches = 0
        self.models: dict[int, P.Params] = {}
        self.plans: dict[int, RoundPlan] = {}

    # ---- events ---------------------------------------------------------------------------------
    def next_event(self) -> tuple[float, int, Flight | None] | None:
        """The earliest pending event: (time, kind, the flight for an arrival), or None."""
        keys = [(f.key(), f) for f in self.flights]
        keys += [((t, DISPATCH, -1, i), None) for i, t in enumerate(self.dispatch_at)]
        if not keys:
            return None
        k, f = min(keys, key=lambda kv: kv[0])
        return k[0], k[1], f

    def dispatch(self, t: float, state: ServerState, version: int, store: dict[int, Any]) -> list[Flight]:
        """Fill the free slots at time ``t`` (clearing every dispatch due at or before ``t``):
        clients online at ``t`` and not in flight, drawn by the (seed, "cohort", b) stream. With no
        client to draw, the slots wait for the first one to come online."""
        self.dispatch_at = [x for x in self.dispatch_at if x > t]
        free = self.concurrency - len(self.flights)
        if free <= 0:
            return []
        busy = {f.client for f in self.flights}
        online = self.timer.world.availability.online_mask(t, self.j)
        eligible = np.array([c for c in np.flatnonzero(online) if c not in busy], dtype=np.int64)
        if len(eligible) == 0:
            waiting = [c for c in range(self.j) if c not in busy]
            nxt = min((self.timer.world.availability.next_online(c, t) for c in waiting), default=math.inf)
            if not math.isinf(nxt):
                self.dispatch_at.append(nxt)
            return []
        b = self.batches
        self.batches += 1
        m = min(free, len(eligible))
        pick = numpy_rng(self.cfg.seed, "cohort", b).choice(len(eligible), size=m, replace=False)
        cohort = tuple(int(c) for c in np.sort(eligible[pick]))
        plan = self.algo.plan_round(state, b, cohort)
        self.plans[b] = plan
        self.models.setdefault(version, state.params)
        broadcast = P.to_numpy(state.params)
        downs = timing.bytes_down(plan, broadcast, [None] * len(cohort))
        sched = self.timer.project(state, plan, t, downs, [c in store for c in cohort])
        out = []
        for dec, down in zip(sched.times.decisions, downs):
            event = dec.arrival_s
            if dec.outcome == clock.DROPPED_OFFLINE:
                event = self.timer.world.availability.offline_at(dec.client_id, t)
            out.append(Flight(dec.client_id, version, b, t, dec.arrival_s, event, dec.outcome, down))
        self.flights += out
        return out

    def free_slot(self, t: float) -> None:
        """A client left the flight at ``t``: its slot is refilled at ``t``."""
        self.dispatch_at.append(t)

    def untrained(self) -> list[Flight]:
        """Flights still to train (dropped clients never train), in dispatch order."""
        return sorted(
            (f for f in self.flights if f.result is None and f.outcome != clock.DROPPED_OFFLINE),
            key=lambda f: (f.batch, f.client),
        )

    def train(self, backend: Any, store: dict[int, Any]) -> None:
        """Train every untrained flight: one backend call per (version, dispatch) group, all
        submitted before any is collected."""
        groups: dict[tuple[int, int], list[Flight]] = {}
        for f in self.untrained():
            groups.setdefault((f.version, f.batch), []).append(f)
        pending = []
        for (version, b), fs in groups.items():
            plan = self.plans[b]
            tasks = [ClientTask(run_id=self.run.label, round=b, client_id=f.client, plan=plan) for f in fs]
            handle = backend.broadcast(P.to_numpy(self.models[version]))
            states = [store.get(f.client) if self.algo.stateful else None for f in fs]
            pending.append((fs, backend.submit(self.run, tasks, handle, states, [None] * len(fs))))
        for fs, p in pending:
            for f, x in zip(fs, backend.collect(p)):
                f.result = x

    def consume(self, f: Flight) -> None:
        """``f`` arrived (or dropped out): it leaves the flight; models no flight needs are freed."""
        self.flights.remove(f)
        self.free_slot(f.event_s)

    def release(self, current: int) -> None:
        """Drop the models of versions no flight downloaded, except ``current``."""
        keep = {f.version for f in self.flights} | {current}
        self.models = {v: m for v, m in self.models.items() if v in keep}
        live = {f.batch for f in self.flights}
        self.plans = {b: p for b, p in self.plans.items() if b in live}

    def result_of(self, f: Flight, step: int) -> ClientResult:
        """The clients.parquet record of ``f``'s arrival, consumed in server step ``step``."""
        base = dict(
            model_version=f.version,
            sim_dispatch_s=f.dispatch_s,
            sim_arrival_s=f.arrival_s,
            outcome=f.outcome,
        )
        if f.result is None:  # dropped before it arrived: its download only
            return ClientResult(
                client_id=f.client,
                round=step,
                upload={},
                n_examples=self.timer.sizes[f.client],
                train_loss=float("nan"),
                bytes_up=0,
                bytes_down=f.bytes_down,
                seconds=0.0,
                dropped=True,
                **base,
            )
        return replace(f.result, round=step, **base)

    # ---- checkpoints ----------------------------------------------------------------------------
    def plain(self) -> dict[str, Any]:
        """The event state as plain containers and tensors (a checkpoint's ``async`` entry)."""
        return {
            "flights": [f.plain() for f in self.flights],
            "dispatch_at": list(self.dispatch_at),
            "batches": self.batches,
            "models": {int(v): m for v, m in self.models.items()},
            "plans": {int(b): p.cohort for b, p in self.plans.items()},
        }

    def restore(self, saved: dict[str, Any], state: ServerState) -> None:
        """Continue from :meth:`plain`'s state; the flights are retrained when their arrival comes."""
        self.flights = [Flight(**f) for f in saved["flights"]]
        self.dispatch_at = [float(t) for t in saved["dispatch_at"]]
        self.batches = int(saved["batches"])
        self.models = {int(v): P.from_numpy(m) for v, m in saved["models"].items()}
        self.plans = {
            int(b): self.algo.plan_round(state, int(b), tuple(int(c) for c in cohort))
            for b, cohort in saved["plans"].items()
        }
