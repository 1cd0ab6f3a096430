"""The only round loop in fedsim (docs/design.md, "Data flow of one run").

For each run of an experiment and each communication round: sample the cohort (a pure function of
(seed, round), identical for every algorithm) -> ``plan_round`` -> ``downlink`` (stored once) ->
clients on the backend -> ``aggregate`` (in cohort order) -> evaluate the global model on the
global test set -> append Parquet rows and flush them atomically -> yield a progress event.

A round's global model is evaluated, and its rows and checkpoint written, right after the next
round's clients are submitted, so this work overlaps their training instead of adding to the
round's time (``wall_seconds`` covers sampling to aggregation). A completed round is still never
lost: it is written before the next round's results are awaited, and the round that ends a run is
written before the run's status changes. A test loss of NaN/Inf marks the run diverged at that
round; the round already submitted after it is abandoned.

:func:`_run_one` is the loop; its collaborators are named here: :func:`_start` (a new run's
row, or a resumed run's :class:`Progress` from its checkpoint), :class:`RoundRow` (one typed row
of rounds.parquet), :class:`Aggregated` (a round aggregated but not yet written), and
:class:`_Recorder` (evaluates an :class:`Aggregated`, writes its rows and checkpoint).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import fedsim
from fedsim import params as P
from fedsim.algorithms import Algorithm, ClientResult, ClientTask, ServerState
from fedsim.algorithms.base import from_plain, to_plain
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.data.base import FederatedDataset
from fedsim.engine import timing
from fedsim.engine.backends import RoundTimeout
from fedsim.engine.client import make_algorithm, trainable_count
from fedsim.engine.timing import RunClock
from fedsim.evaluation import evaluate, evaluate_probs  # noqa: F401  (re-exported)
from fedsim.io import checkpoint
from fedsim.io.runlog import RunLog
from fedsim.models import build_model
from fedsim.rng import numpy_rng, sample_cohort, torch_rng  # noqa: F401  (re-exported)
from fedsim.system import clock
from fedsim.system.world import World, build_world
from fedsim.wire import (
    decode_broadcast,
    decode_results,
    dropped,
    encode_broadcast,
    round_wire_columns,
    wire_columns,
)


def versions() -> dict[str, str]:
    """Versions recorded with every run."""
    import ray

    return {
        "fedsim": fedsim.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_experiment(
    cfg: ExperimentConfig, dataset: FederatedDataset, run_dir: str, backend: Any, resume: bool = False
) -> Iterator[dict]:
    """Run every run of ``cfg`` on ``backend``, writing Parquet rows to ``run_dir``.

    With ``resume``, the tables already in ``run_dir`` are read back: runs that ended are replayed
    as events and skipped, and a run that was interrupted continues from its last checkpoint
    (rows after the checkpoint's round are discarded and recomputed, so no round is missing or
    duplicated, and every column but the wall-clock ones comes out as in an uninterrupted run).

    Yields progress events (dicts): ``{"kind": "start", "run", "rounds"}``, one
    ``{"kind": "round", ...the rounds.parquet row}`` per round, and
    ``{"kind": "end", "run", "status", "message"}``.
    """
    log = RunLog.read(run_dir) if resume else RunLog(run_dir)
    world = None
    if cfg.system is not None:
        world = build_world(cfg.system, dataset.num_clients, cfg.seed)
        _write_devices(world, run_dir)
    for run in cfg.runs:
        yield from _run_one(cfg, run, dataset, backend, log, world)


def _write_devices(world: World, run_dir: str) -> None:
    """devices.parquet: one row per client (:data:`fedsim.system.world.DEVICES_COLUMNS`), written
    atomically; the same bytes on every write, so a resumed experiment rewrites it unchanged."""
    import pyarrow as pa

    from fedsim.io import storage
    from fedsim.io.runlog import write_atomic

    storage.make_dirs(run_dir)
    write_atomic(pa.table(world.table()), storage.join(run_dir, "devices.parquet"))


def _logged_rounds(log: RunLog, run: RunConfig, rounds: int) -> Iterator[dict]:
    """Progress events for the rounds of ``run`` already in the log (a resumed experiment)."""
    for r in log.rows["rounds"]:
        if r["run_id"] == run.label:
            yield {"kind": "round", **r, "rounds": rounds}


def _replay(log: RunLog, run: RunConfig, rounds: int) -> Iterator[dict]:
    row = log.run_row(run.label)
    yield {"kind": "start", "run": run.label, "rounds": rounds}
    yield from _logged_rounds(log, run, rounds)
    yield {"kind": "end", "run": run.label, "status": row["status"], "message": row["message"] or ""}


@dataclass
class Progress:
    """Where a run stands: the server state, the next round to run, the cumulative bytes, the
    client-state store (client id -> backend handle; stateful algorithms only), and the simulated
    time at which the next round may start (seconds; 0 without a ``system:`` section). An
    asynchronous run adds its event state (``events``: clients in flight, pending dispatches,
    the models they downloaded; :meth:`fedsim.engine.asynchronous.AsyncEngine.plain`)."""

    state: ServerState
    next_round: int = 0
    cum_up: int = 0
    cum_down: int = 0
    store: dict[int, Any] = field(default_factory=dict)
    sim_time: float = 0.0
    events: dict[str, Any] | None = None


@dataclass
class RoundRow:
    """One row of rounds.parquet (:data:`fedsim.io.runlog.ROUNDS_SCHEMA`, same names and order).

    Units: bytes (numel x element size), multiply-accumulates (``flops``), seconds; accuracy in
    [0, 1], losses in nats. ``global_params`` and ``trainable_params`` are parameter counts.
    ``sim_time_s``: simulated seconds at which the round's model is ready (None without a
    ``system:`` section). In an asynchronous run a row is a server step; ``clients`` counts the
    updates it consumed and ``staleness_mean`` / ``staleness_max`` their staleness (server steps).
    """

    run_id: str
    algorithm: str
    round: int
    phase: str
    layer: int | None
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float | None
    bytes_up: int
    bytes_down: int
    cum_bytes_up: int
    cum_bytes_down: int
    cum_bytes: int
    global_params: int
    trainable_params: int
    flops: int
    test_accuracy_clients_mean: float | None
    clients: int
    wall_seconds: float
    sim_time_s: float | None = None
    staleness_mean: float | None = None
    staleness_max: int | None = None
    bytes_up_raw: int = 0
    bytes_down_raw: int = 0
    bytes_secagg: int = 0


@dataclass
class Aggregated:
    """A round that is aggregated but not yet evaluated and written.

    Attributes:
        row: its rounds.parquet row, test columns still empty.
        results: every cohort client's result, dropped ones included, in cohort order.
        due: whether the global model is evaluated after this round.
        progress: the run's state after this round (what its checkpoint holds).
    """

    row: RoundRow
    results: list[ClientResult]
    due: bool
    progress: Progress


def _diverged(r: int) -> str:
    return (
        f"round {r}: the loss or the global weights became NaN/Inf; lower runs.lr "
        "or check the data; rounds before it are kept"
    )


def _start(
    cfg: ExperimentConfig,
    run: RunConfig,
    algo: Algorithm,
    dataset: FederatedDataset,
    backend: Any,
    log: RunLog,
    resumed: bool,
) -> Progress:
    """The run's starting point: round 0 from the global initialisation (the
    (seed, "init") stream) with the run's row added to the log, or, for a ``resumed`` run, the
    state of its last checkpoint (rows after the checkpoint's round are dropped; without a
    checkpoint the run restarts from round 0)."""
    model = build_model(
        cfg.model.name,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        widths=cfg.model.widths,
        generator=torch_rng(cfg.seed, "init"),
    )
    fresh = Progress(algo.init_state(P.clone(model.state_dict())))
    if resumed:
        ckpt = checkpoint.load(log.dir, run.label)
        log.truncate(run.label, after_round=-1 if ckpt is None else int(ckpt["round"]))
        if ckpt is None:
            return fresh
        client_state = algo.client_state_type()
        return Progress(
            state=ServerState(ckpt["params"], from_plain(algo.AlgoState, ckpt["algo_state"])),
            next_round=int(ckpt["round"]) + 1,
            cum_up=int(ckpt["cum_up"]),
            cum_down=int(ckpt["cum_down"]),
            store={int(c): backend.put_state(from_plain(client_state, v)) for c, v in ckpt["store"].items()},
            sim_time=float(ckpt.get("sim_time", 0.0)),
            events=ckpt.get("events"),
        )
    log.add(
        "runs",
        {
            "run_id": run.label,
            "experiment": cfg.name,
            "algorithm": run.algorithm,
            "config_json": json.dumps({**cfg.to_dict(), "runs": [run.to_dict()]}, sort_keys=True),
            "seed": cfg.seed,
            "fedsim_version": fedsim.__version__,
            "versions_json": json.dumps(versions(), sort_keys=True),
            "status": "running",
            "started_at": _now(),
        },
    )
    log.flush()
    return fresh


class _Recorder:
    """Evaluates an :class:`Aggregated` round's global model when due, and writes its client
    rows, its round row and (every ``engine.checkpoint_every`` rounds and at the run's last)
    its checkpoint."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run: RunConfig,
        algo: Algorithm,
        dataset: FederatedDataset,
        backend: Any,
        log: RunLog,
        rounds: int,
    ):
        self.cfg, self.run, self.algo, self.dataset = cfg, run, algo, dataset
        self.backend, self.log, self.rounds = backend, log, rounds

    def evaluate(self, done: Aggregated) -> tuple[float | None, float | None, float | None]:
        """(test accuracy, test loss, mean accuracy over the clients' own BatchNorm statistics
        or None) of the round's global model on the global test set."""
        algo, state = self.algo, done.progress.state
        model = algo.reference_model(algo.model_widths(state))
        if algo.keeps_bn_local:
            return _evaluate_bn_local(
                algo, state, model, self.dataset, done.progress.store, self.backend, self.cfg
            )
        acc, loss = algo.evaluate(state, model, self.dataset.test, self.cfg.engine.eval_batch_size)
        return acc, loss, None

    def commit(self, done: Aggregated) -> dict | None:
        """Evaluate ``done`` if due and write it; its progress event, or None when its test loss
        came out NaN/Inf (then nothing is written)."""
        row = done.row
        if done.due:
            acc, loss, acc_mean = self.evaluate(done)
            if loss is not None and not np.isfinite(loss):
                return None
            row = replace(row, test_accuracy=acc, test_loss=loss, test_accuracy_clients_mean=acc_mean)
        for x in done.results:
            self.log.add("clients", _client_row(self.run.label, row.round, x))
        record = asdict(row)
        self.log.add("rounds", record)
        self.log.flush()
        if (row.round + 1) % self.cfg.engine.checkpoint_every == 0 or row.round == self.rounds - 1:
            _save(self.log, self.run, row.round, done.progress, self.backend)
        return {"kind": "round", **record, "rounds": self.rounds}


def _client_row(run_id: str, r: int, x: ClientResult) -> dict[str, Any]:
    """One row of clients.parquet (:data:`fedsim.io.runlog.CLIENTS_SCHEMA`)."""
    return {
        "run_id": run_id,
        "round": r,
        "client_id": x.client_id,
        "n_examples": x.n_examples,
        "local_steps": x.local_steps,
        "train_loss": None if x.dropped else x.train_loss,
        "bytes_up": x.bytes_up,
        "bytes_down": x.bytes_down,
        "seconds": x.seconds,
        "worker": x.worker,
        "attempt": x.attempt,
        "dropped": x.dropped,
        "macs": x.macs,
        "sim_dispatch_s": x.sim_dispatch_s,
        "sim_arrival_s": x.sim_arrival_s,
        "outcome": x.outcome,
        "model_version": x.model_version,
        "staleness": x.staleness,
        **wire_columns(x),
    }


def _save(log: RunLog, run: RunConfig, r: int, progress: Progress, backend: Any) -> None:
    checkpoint.save(
        log.dir,
        run.label,
        {
            "round": r,
            "params": progress.state.params,
            "algo_state": to_plain(progress.state.algo_state),
            "cum_up": progress.cum_up,
            "cum_down": progress.cum_down,
            "sim_time": progress.sim_time,
            "events": progress.events,
            "store": {c: to_plain(backend.get_state(h)) for c, h in progress.store.items()},
        },
    )


def _evaluate_bn_local(
    algo: Algorithm,
    state: Any,
    model: torch.nn.Module,
    dataset: FederatedDataset,
    store: dict,
    backend: Any,
    cfg: ExperimentConfig,
) -> tuple[Any, Any, Any]:
    """With ``bn_stats: local`` the global model has no BatchNorm statistics of its own: evaluate
    the global weights with each client's statistics. Returns (accuracy and loss of client 0's
    model, the paper's choice; the mean accuracy over every client that has trained so far)."""
    accs, first = [], (None, None)
    for c in sorted(store):
        bn = backend.get_state(store[c]).bn
        model.load_state_dict({**algo.global_weights(state), **P.from_numpy(bn)})
        acc, loss = evaluate(model, dataset.test, cfg.engine.eval_batch_size)
        accs.append(acc)
        if c == 0:
            first = (acc, loss)
    return first[0], first[1], (float(np.mean(accs)) if accs else None)


def _run_async(
    cfg: ExperimentConfig,
    run: RunConfig,
    algo: Any,
    dataset: FederatedDataset,
    backend: Any,
    log: RunLog,
    timer: RunClock | None,
    at: Progress,
    recorder: _Recorder,
    steps: int,
) -> Iterator[dict]:
    """An asynchronous run (FedBuff, FedAsync): events on the virtual clock
    (:mod:`fedsim.engine.asynchronous`) until ``steps`` server steps; each step is a row of
    rounds.parquet, each arrival a row of clients.parquet. ``timer``: the run's clock (its rule is
    sync, config.validate sees to it); None without a ``system:`` section, when every client gets
    the default device and is always online."""
    from fedsim.config import RoundRule, SystemConfig
    from fedsim.engine.asynchronous import AsyncEngine

    if timer is None:
        world = build_world(SystemConfig(), dataset.num_clients, cfg.seed)
        timer = RunClock.of(cfg, run, RoundRule(), algo, dataset, world)
    eng = AsyncEngine(cfg, run, algo, timer, dataset.num_clients)
    if at.events is not None:
        eng.restore(at.events)
    state, store, version = at.state, dict(at.store), at.next_round
    eng.keep(version, state.params)
    cum_up, cum_down, last_t = at.cum_up, at.cum_down, at.sim_time
    rows: list[ClientResult] = []  # arrivals since the last server step
    status, message = "finished", ""
    unwritten: Aggregated | None = None  # the last step, written while the next clients train
    t0 = time.perf_counter()
    while version < steps:
        f = eng.next_arrival(state)
        if f is None:
            status, message = "failed", "no client is ever online again; check system.availability"
            break
        if f.outcome != clock.DROPPED_OFFLINE and f.result is None:
            calls = eng.submit(backend, state, version, store)
            if unwritten is not None:  # evaluate and write the last step while they train
                event, unwritten = recorder.commit(unwritten), None
                if event is None:
                    status, message = "diverged", _diverged(version - 1)
                    break
                yield event
            eng.collect(backend, calls)
        eng.consume()
        x = eng.record(f, version)
        rows.append(x)
        if x.state is not None:  # the client's own state follows every update it trained
            store[x.client_id] = backend.put_state(x.state)
        if x.dropped:  # dropped offline, or discarded as too stale
            continue
        state, stepped = algo.arrive(state, x, eng.models[f.version], f.staleness)
        if stepped != f.steps:
            raise RuntimeError(
                f"{run.algorithm}: the server's step count departed from the event simulation's"
            )
        if not stepped:
            continue
        t = f.event_s
        version += 1
        eng.keep(version, state.params)
        used = [r for r in rows if r.outcome == clock.AGGREGATED]
        up, down = sum(r.bytes_up for r in rows), sum(r.bytes_down for r in rows)
        cum_up, cum_down = cum_up + up, cum_down + down
        every_s = run.eval_every_s
        due = version == steps or (
            version % cfg.engine.eval_every == 0
            if every_s is None
            else math.floor(t / every_s) > math.floor(last_t / every_s)
        )
        sim_time = t + timer.server_seconds(used, due)
        weights = np.array([r.n_examples for r in used], dtype=np.float64)
        train_loss = float(np.dot(weights, [r.train_loss for r in used]) / weights.sum())
        if not (P.all_finite(algo.global_weights(state)) and np.isfinite(train_loss)):
            status, message = "diverged", _diverged(version - 1)
            break
        model = algo.reference_model()
        stale = [r.staleness for r in used]
        row = RoundRow(
            run_id=run.label,
            algorithm=run.algorithm,
            round=version - 1,
            phase="async",
            layer=None,
            test_accuracy=None,
            test_loss=None,
            train_loss=train_loss,
            bytes_up=up,
            bytes_down=down,
            cum_bytes_up=cum_up,
            cum_bytes_down=cum_down,
            cum_bytes=cum_up + cum_down,
            global_params=algo.global_size(state, model),
            trainable_params=max(r.trainable_params for r in used),
            flops=int(sum(r.macs for r in used)),
            test_accuracy_clients_mean=None,
            clients=len(used),
            wall_seconds=time.perf_counter() - t0,
            sim_time_s=sim_time,
            staleness_mean=float(np.mean(stale)),
            staleness_max=int(max(stale)),
        )
        progress = Progress(state, version, cum_up, cum_down, dict(store), sim_time, eng.plain())
        if unwritten is not None:  # two steps without training in between: write the first now
            event, unwritten = recorder.commit(unwritten), None
            if event is None:
                status, message = "diverged", _diverged(version - 2)
                break
            yield event
        unwritten = Aggregated(row, rows, due, progress)
        rows, last_t, t0 = [], sim_time, time.perf_counter()
    yield from _finish(recorder, log, run, unwritten, status, message)


def _finish(
    recorder: _Recorder, log: RunLog, run: RunConfig, unwritten: Aggregated | None, status: str, message: str
) -> Iterator[dict]:
    """End a run: write its last round (or server step), which is never lost, then its status;
    yields that round's event and the run's end event."""
    if unwritten is not None:
        event = recorder.commit(unwritten)
        if event is None:
            status, message = "diverged", _diverged(unwritten.row.round)
        else:
            yield event
    log.update_run(run.label, status=status, message=message, finished_at=_now())
    log.flush()
    yield {"kind": "end", "run": run.label, "status": status, "message": message}


def _run_one(
    cfg: ExperimentConfig,
    run: RunConfig,
    dataset: FederatedDataset,
    backend: Any,
    log: RunLog,
    world: World | None = None,
) -> Iterator[dict]:
    """One run of the experiment, round by round; yields its progress events. With a ``world``
    (a ``system:`` section), the run's round rule and the virtual clock (:mod:`fedsim.engine.timing`)
    choose whom each round trains and when it ends."""
    algo: Algorithm = make_algorithm(run, cfg, dataset)
    rule = cfg.round_rule(run)
    timer = (
        RunClock.of(cfg, run, rule, algo, dataset, world) if world is not None and rule is not None else None
    )
    rounds = algo.num_rounds()
    previous = log.run_row(run.label)
    if previous is not None and previous["status"] != "running":  # ended before: replay it
        yield from _replay(log, run, rounds)
        return
    if cfg.engine.vectorize == "always":
        from fedsim.engine.vectorize import model_stackable

        why = (
            f"{run.algorithm}'s clients cannot be stacked"
            if not algo.vectorizable
            else f"model {cfg.model.name!r} has a recurrent or alpha-dropout layer"
            if not model_stackable(algo.reference_model())
            else None
        )
        if why:
            print(
                f"fedsim: run {run.label!r}: engine.vectorize is always, but {why} "
                "(see fedsim.engine.vectorize); they train one by one",
                file=sys.stderr,
            )
    at = _start(cfg, run, algo, dataset, backend, log, resumed=previous is not None)
    yield {"kind": "start", "run": run.label, "rounds": rounds}
    yield from _logged_rounds(log, run, rounds)
    recorder = _Recorder(cfg, run, algo, dataset, backend, log, rounds)
    if getattr(algo, "asynchronous", False):
        yield from _run_async(cfg, run, algo, dataset, backend, log, timer, at, recorder, rounds)
        return
    status, message = "finished", ""
    unwritten: Aggregated | None = None  # the previous round, written while this one trains
    for r in range(at.next_round, rounds):
        t0 = time.perf_counter()
        start = at.sim_time
        if timer is not None:
            cohort, start = timer.cohort(r, start)
        else:
            cohort = sample_cohort(cfg.seed, r, dataset.num_clients, cfg.engine.clients_per_round)
        plan = algo.plan_round(at.state, r, cohort)
        broadcast, own = timing.downlinks(algo, at.state, plan)  # own: per-client extras
        sent = encode_broadcast(run, cfg.seed, r, broadcast)  # broadcast itself without a downlink codec
        timed = timer is not None and not plan.pooled  # pooled training crosses no wire: no time
        schedule = None
        if timed and timer.projects:  # times known before training: train only whom the rule keeps
            schedule = timer.project(
                at.state, plan, start, broadcast, own, [c in at.store for c in plan.cohort]
            )
            steps = {d.client_id: d.max_steps for d in schedule.trained}
            picked = [i for i, c in enumerate(plan.cohort) if c in steps]
        else:
            steps, picked = {}, list(range(len(plan.cohort)))
        tasks = [
            ClientTask(
                run_id=run.label,
                round=r,
                client_id=plan.cohort[i],
                plan=plan,
                max_steps=steps.get(plan.cohort[i]),
            )
            for i in picked
        ]
        own = [own[i] for i in picked]
        pending = (
            backend.submit(
                run,
                tasks,
                backend.broadcast(sent),
                [at.store.get(t.client_id) if algo.stateful else None for t in tasks],
                own,
            )
            if tasks
            else None
        )
        if unwritten is not None:
            event, unwritten = recorder.commit(unwritten), None
            if event is None:  # round r - 1's test loss is NaN/Inf: round r is abandoned
                status, message = "diverged", _diverged(r - 1)
                break
            yield event
        try:
            results = backend.collect(pending) if pending is not None else []
        except RoundTimeout as err:
            status, message = "failed", str(err)
            break
        results = [  # a dropped client was still sent the round's tensors
            x if not x.dropped else dropped(x, plan.pooled, broadcast, sent, d) for x, d in zip(results, own)
        ]
        end = None
        if schedule is not None:
            results, end = timer.complete(schedule, plan, results), schedule.times.end_s
        elif timed:
            results, end = timer.time_logged(start, results)
        kept = [x for x in results if not x.dropped]
        store = (
            {**at.store, **{x.client_id: backend.put_state(x.state) for x in kept}}
            if algo.stateful
            else at.store
        )
        kept = decode_results(run, decode_broadcast(run, sent), kept)  # the uplink codec's bytes, decoded
        state = algo.aggregate(at.state, plan, kept) if kept else at.state
        up, down = sum(x.bytes_up for x in results), sum(x.bytes_down for x in results)
        due = plan.evaluate and ((r + 1) % cfg.engine.eval_every == 0 or r == rounds - 1)
        sim_time = None if end is None else end + timer.server_seconds(kept, due)
        at = Progress(
            state,
            r + 1,
            at.cum_up + up,
            at.cum_down + down,
            store,
            at.sim_time if sim_time is None else sim_time,
        )
        weights = np.array([x.n_examples for x in kept], dtype=np.float64)
        train_loss = float(np.dot(weights, [x.train_loss for x in kept]) / weights.sum()) if kept else None
        if not (P.all_finite(algo.global_weights(state)) and (train_loss is None or np.isfinite(train_loss))):
            status, message = "diverged", _diverged(r)
            break
        model = algo.reference_model(algo.model_widths(state))  # global widths (FedMA's grow)
        row = RoundRow(
            run_id=run.label,
            algorithm=run.algorithm,
            round=r,
            phase=plan.phase,
            layer=plan.layer,
            test_accuracy=None,
            test_loss=None,
            train_loss=train_loss,
            bytes_up=up,
            bytes_down=down,
            cum_bytes_up=at.cum_up,
            cum_bytes_down=at.cum_down,
            cum_bytes=at.cum_up + at.cum_down,
            global_params=algo.global_size(state, model),
            # what a client trained, on its own model (FedMA's local widths differ from the global)
            trainable_params=(
                max(x.trainable_params for x in kept) if kept else trainable_count(model, plan.trainable)
            ),
            clients=len(kept),
            flops=int(sum(x.macs for x in kept)),
            test_accuracy_clients_mean=None,
            wall_seconds=time.perf_counter() - t0,
            sim_time_s=sim_time,
            **round_wire_columns(results),
        )
        unwritten = Aggregated(row, results, due, at)
    yield from _finish(recorder, log, run, unwritten, status, message)
