"""The event order of an asynchronous run (FedBuff, FedAsync) on the virtual clock.

``concurrency`` (C) clients are in flight at all times. A freed slot is filled at the simulated
time it frees, from the clients online then and not in flight: the b-th dispatch draws its clients
with the (seed, "cohort", b) stream, as a synchronous round draws its cohort, so a run is a pure
function of the seed and the configuration. A client's arrival time comes from the clock
(:class:`fedsim.engine.timing.RunClock`): its bytes and MACs are known when it is dispatched. Events
are ordered by the total key (time, kind, client, dispatch): arrivals (and a dropped client's going
offline) before dispatches at the same instant, so updates that arrive together are consumed
before their slots are refilled.

None of this depends on the models' values: who is dispatched when, with which model version,
when each update arrives, its staleness, and which arrival completes a server step (every
``updates_per_step``-th consumed update) follow from the clock alone. :class:`AsyncEngine`
therefore simulates the events ahead of the server (:meth:`AsyncEngine.advance`), and the server
consumes the simulated arrivals in order (:meth:`AsyncEngine.next_arrival`), folding each trained
update into its state. Training is not serial: when an update that is not trained yet is consumed
at server version v, the simulation is run on until its step v + 1, so that every client that
will ever download a version up to v is known, and all of those are trained at once, one backend
call per model version, stacked under ``engine.vectorize``. For FedBuff that is about K clients a
call, as a synchronous round's cohort. Which clients train together changes no result: each trains
from its own version with its own (seed, stream, dispatch, client) generators.

:meth:`AsyncEngine.plain` and :meth:`AsyncEngine.restore` carry the event state through a
checkpoint (the simulation's clients in flight, its pending arrivals, dispatches and counters, and
the models those clients downloaded); a resumed run retrains what it had trained and not yet
consumed, and continues to the same tables.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fedsim import params as P
from fedsim.algorithms import Algorithm, ClientResult, ClientTask, ServerState
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.engine import timing
from fedsim.engine.timing import RunClock
from fedsim.rng import numpy_rng
from fedsim.system import clock

ARRIVE, DISPATCH = 0, 1  # event kinds, in their tie-break order
DISCARDED_STALE = "discarded_stale"


@dataclass
class Flight:
    """One dispatched client update.

    Attributes:
        client: its id; version: the server step its model came from; batch: the dispatch that
            sent it (its task's ``round``, which keys its random streams).
        dispatch_s / arrival_s: simulated seconds it received the model / its upload arrives;
            event_s: when the server learns of it (``arrival_s``, or the time its device goes
            offline when ``outcome`` is ``dropped_offline``).
        outcome: ``aggregated`` (it will arrive), ``dropped_offline``, or ``discarded_stale`` once
            the simulation found it too stale.
        bytes_down / bytes_up / macs: its projected download and upload (bytes) and training
            multiply-accumulates, which its logged figures must equal. staleness: server steps
            between its download and its arrival, set when the simulation reaches its arrival.
            steps: whether consuming it completes a server step (set likewise).
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
    bytes_up: int
    macs: int
    staleness: int | None = None
    steps: bool = False
    result: ClientResult | None = None

    def plain(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("result")
        return d


class AsyncEngine:
    """The event simulation of one asynchronous run, ahead of its server, on the driver.

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
        self.per_step: int = algo.updates_per_step()
        # the simulation
        self.flights: list[Flight] = []  # in flight in the simulation
        self.arrived: deque[Flight] = deque()  # arrived in the simulation, not yet consumed by the server
        self.dispatch_at: list[float] = [0.0]  # times at which freed slots wait to be filled
        self.batches = 0
        self.sim_version = 0  # server steps the simulation has taken
        self.sim_count = 0  # updates in the simulated buffer
        self.has_state: set[int] = set()  # clients with stored state in the simulation (MOON)
        # the server side
        self.models: dict[int, P.Params] = {}

    # ---- the simulation -------------------------------------------------------------------------
    def _next_event(self) -> tuple[float, int, Flight | None] | None:
        keys = [((f.event_s, ARRIVE, f.client, f.batch), f) for f in self.flights]
        keys += [((t, DISPATCH, -1, i), None) for i, t in enumerate(self.dispatch_at)]
        if not keys:
            return None
        k, f = min(keys, key=lambda kv: kv[0])
        return k[0], k[1], f

    def _dispatch(self, t: float, state: ServerState) -> None:
        """Fill the free slots at ``t`` (clearing every dispatch due then): clients online at
        ``t`` and not in flight, drawn by the (seed, "cohort", b) stream, with the simulation's
        current version. With nobody to draw, the slots wait for the first client to come online."""
        self.dispatch_at = [x for x in self.dispatch_at if x > t]
        free = self.concurrency - len(self.flights)
        if free <= 0:
            return
        busy = {f.client for f in self.flights}
        online = self.timer.world.availability.online_mask(t, self.j)
        eligible = np.array([c for c in np.flatnonzero(online) if c not in busy], dtype=np.int64)
        if len(eligible) == 0:
            waiting = [c for c in range(self.j) if c not in busy]
            nxt = min((self.timer.world.availability.next_online(c, t) for c in waiting), default=math.inf)
            if not math.isinf(nxt):
                self.dispatch_at.append(nxt)
            return
        b = self.batches
        self.batches += 1
        pick = numpy_rng(self.cfg.seed, "cohort", b).choice(
            len(eligible), size=min(free, len(eligible)), replace=False
        )
        cohort = tuple(int(c) for c in np.sort(eligible[pick]))
        # the plan and the projection depend on the model's shapes only, not on its values
        plan = self.algo.plan_round(state, self.sim_version, cohort)
        broadcast, own = timing.downlinks(self.algo, state, plan)
        sched = self.timer.project(state, plan, t, broadcast, own, [c in self.has_state for c in cohort])
        for dec in sched.times.decisions:
            event = dec.arrival_s
            if dec.outcome == clock.DROPPED_OFFLINE:
                event = self.timer.world.availability.offline_at(dec.client_id, t)
            p = sched.projections[dec.client_id]
            self.flights.append(
                Flight(
                    dec.client_id,
                    self.sim_version,
                    b,
                    t,
                    dec.arrival_s,
                    event,
                    dec.outcome,
                    p.bytes_down,
                    p.bytes_up,
                    p.macs,
                )
            )

    def _arrive(self, f: Flight) -> None:
        """``f`` arrives in the simulation: its staleness, whether it is discarded, and whether
        it completes a server step."""
        self.flights.remove(f)
        self.dispatch_at.append(f.event_s)
        if f.outcome == clock.AGGREGATED:
            if self.algo.stateful:  # it trained: its next dispatch starts from its stored state
                self.has_state.add(f.client)
            f.staleness = self.sim_version - f.version
            limit = self.run.max_staleness
            if limit is not None and f.staleness > limit:
                f.outcome = DISCARDED_STALE
            else:
                self.sim_count += 1
                if self.sim_count >= self.per_step:
                    f.steps = True
                    self.sim_version += 1
                    self.sim_count = 0
        self.arrived.append(f)

    def advance(self, state: ServerState) -> bool:
        """Simulate one event; False when nothing can happen any more."""
        ev = self._next_event()
        if ev is None:
            return False
        t, kind, f = ev
        if kind == DISPATCH:
            self._dispatch(t, state)
        else:
            self._arrive(f)
        return True

    def next_arrival(self, state: ServerState) -> Flight | None:
        """The next simulated arrival for the server to consume, in event order (it stays pending
        until :meth:`consume`); None when no client will ever arrive again."""
        while not self.arrived:
            if not self.advance(state):
                return None
        return self.arrived[0]

    def consume(self) -> Flight:
        """The server consumed the next arrival: it is no longer pending."""
        return self.arrived.popleft()

    # ---- training -------------------------------------------------------------------------------
    def pending(self) -> list[Flight]:
        """Every update the server has not consumed: arrived in the simulation, then in flight."""
        return list(self.arrived) + self.flights

    def submit(self, backend: Any, state: ServerState, version: int, store: dict[int, Any]) -> list:
        """Train every pending update whose model version the server has (<= ``version``): first
        run the simulation on until it has taken step ``version + 1``, so that every client that
        will download a version up to ``version`` is dispatched; then one backend call per version,
        all submitted before any is collected. Updates that will be discarded as stale train too
        (the device did the work; a client's stored state follows it). For an algorithm with
        client state, an update waits while an earlier update of its client is unconsumed: it
        starts from the state that update leaves. Returns the calls for :meth:`collect`."""
        while self.sim_version <= version and self.advance(state):
            pass
        todo: dict[int, list[Flight]] = {}
        earlier: set[int] = set()
        for f in sorted(self.pending(), key=lambda f: f.batch):
            trainable = f.outcome != clock.DROPPED_OFFLINE and f.version <= version
            if f.result is None and trainable and not (self.algo.stateful and f.client in earlier):
                todo.setdefault(f.version, []).append(f)
            earlier.add(f.client)
        calls = []
        for v, fs in sorted(todo.items()):
            fs.sort(key=lambda f: (f.batch, f.client))
            plan = self.algo.plan_round(state, v, tuple(sorted(f.client for f in fs)))
            tasks = [
                ClientTask(run_id=self.run.label, round=f.batch, client_id=f.client, plan=plan) for f in fs
            ]
            handle = backend.broadcast(P.to_numpy(self.models[v]))
            states = [store.get(f.client) if self.algo.stateful else None for f in fs]
            calls.append((fs, backend.submit(self.run, tasks, handle, states, [None] * len(fs))))
        return calls

    def collect(self, backend: Any, calls: list) -> None:
        """Wait for :meth:`submit`'s calls and keep each update's result."""
        for fs, call in calls:
            for f, x in zip(fs, backend.collect(call)):
                f.result = x

    def keep(self, version: int, params: P.Params) -> None:
        """Hold version ``version``'s model, and drop those no pending update downloaded."""
        self.models[version] = params
        need = {f.version for f in self.pending()} | {version}
        self.models = {v: m for v, m in self.models.items() if v in need}

    def record(self, f: Flight, step: int) -> ClientResult:
        """The clients.parquet record of ``f``, consumed in server step ``step``.

        Raises:
            RuntimeError: its logged bytes or MACs differ from the projection its times came from
                (a fedsim bug).
        """
        base = dict(
            model_version=f.version,
            staleness=f.staleness,
            sim_dispatch_s=f.dispatch_s,
            sim_arrival_s=f.arrival_s,
            outcome=f.outcome,
            dropped=f.outcome != clock.AGGREGATED,
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
                **base,
            )
        x = f.result
        if (x.bytes_down, x.bytes_up, x.macs) != (f.bytes_down, f.bytes_up, f.macs):
            raise RuntimeError(
                f"client {x.client_id} logged (bytes down, bytes up, MACs) = {(x.bytes_down, x.bytes_up, x.macs)} "
                f"but the clock projected {(f.bytes_down, f.bytes_up, f.macs)} for {self.run.algorithm}; "
                "this is a fedsim bug"
            )
        return replace(x, round=step, **base)

    # ---- checkpoints ----------------------------------------------------------------------------
    def plain(self) -> dict[str, Any]:
        """The event state as plain containers and tensors (a checkpoint's ``events`` entry)."""
        return {
            "flights": [f.plain() for f in self.flights],
            "arrived": [f.plain() for f in self.arrived],
            "dispatch_at": list(self.dispatch_at),
            "batches": self.batches,
            "sim_version": self.sim_version,
            "sim_count": self.sim_count,
            "has_state": sorted(self.has_state),
            "models": {int(v): m for v, m in self.models.items()},
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from :meth:`plain`'s state; updates are retrained when they are consumed."""
        self.flights = [Flight(**f) for f in saved["flights"]]
        self.arrived = deque(Flight(**f) for f in saved["arrived"])
        self.dispatch_at = [float(t) for t in saved["dispatch_at"]]
        self.batches = int(saved["batches"])
        self.sim_version, self.sim_count = int(saved["sim_version"]), int(saved["sim_count"])
        self.has_state = {int(c) for c in saved["has_state"]}
        self.models = {int(v): P.from_numpy(m) for v, m in saved["models"].items()}
