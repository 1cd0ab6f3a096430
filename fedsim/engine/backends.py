"""Where client tasks run: in-process (sequential) or on a pool of Ray ClientWorker actors.

Both backends expose the same three calls, so the round loop and the algorithms cannot tell them
apart (docs/design.md decision 6):

* ``broadcast(received)`` -> a handle to the round's downlink tensors, made once per round (Ray:
  one ``ray.put``, which workers read zero-copy, or for a small model the tensors themselves, sent
  inline with each worker's call; see :func:`sends_inline`);
* ``put_state(value)`` -> a handle to one client's persistent state, ``get_state(handle)`` -> the
  value back (for checkpoints);
* ``submit(run, tasks, handle, states, extras)`` -> a round in flight, and ``collect(round)`` ->
  its :class:`ClientResult` s in task order (``extras[i]``: tensors sent to task i's client alone,
  or None); ``run_round(...)`` does both. The loop writes the previous round's rows and checkpoint
  between the two, while the workers train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedsim import params as P
from fedsim.algorithms import ClientResult, ClientTask
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.data.base import FederatedDataset
from fedsim.engine.client import ClientRunner, set_threads
from fedsim.engine.pool import (
    RAY_INLINE_BYTES,
    in_placement_group,
    make_worker_class,
    pool_size,
    room_for,
    spawn_worker,
    start_workers,
)
from fedsim.errors import FedsimError
from fedsim.wire import decode_broadcast, encode_results


def run_tasks(
    runner: ClientRunner,
    run: RunConfig,
    tasks: list[ClientTask],
    received: Any,
    states: list[Any],
    extras: list[Any],
) -> list[ClientResult]:
    """Run ``tasks`` on ``runner``: as one stacked model when they can be
    (:func:`fedsim.engine.vectorize.stackable`), else one after another; the
    :class:`ClientResult` s in task order, their uploads encoded by the run's uplink codec if
    it has one (:func:`fedsim.wire.encode_results`), so the encoded bytes travel back.

    Raises:
        FedsimError: as raised by the client code (bad input found during training).
        RuntimeError: a client's local training failed; the message names client, round and run.
    """
    from fedsim.engine import vectorize

    algo = runner.algorithm(run)
    sent, received = received, decode_broadcast(run, received)  # the downlink codec's messages, decoded
    out: list[ClientResult] = []
    if vectorize.stackable(runner, run, algo, tasks, states, extras):
        try:
            out = vectorize.train_stacked(runner, run, algo, tasks, received, states)
        except FedsimError:
            raise
        except Exception as err:
            raise RuntimeError(
                f"clients {[t.client_id for t in tasks]} failed in round {tasks[0].round} of run "
                f"{tasks[0].run_id!r} during stacked local training: {err!r}"
            ) from err
    else:
        for task, state, extra in zip(tasks, states, extras):
            try:
                out.append(runner.run(run, task, received, state, extra))
            except FedsimError:
                raise
            except Exception as err:  # name the client and stage, like FedJAX's debug backend
                raise RuntimeError(
                    f"client {task.client_id} failed in round {task.round} of run "
                    f"{task.run_id!r} during local training: {err!r}"
                ) from err
    return encode_results(
        run, runner.experiment.seed, tasks, received, states, out, algo.client_state_type(), sent
    )


class _RoundBackend:
    """What both backends share: :meth:`run_round`, a round submitted and collected at once."""

    def run_round(
        self, run: RunConfig, tasks: list[ClientTask], handle: Any, states: list[Any], extras: list[Any]
    ) -> list[ClientResult]:
        """The round's :class:`ClientResult` s in task order (``submit`` then ``collect``)."""
        return self.collect(self.submit(run, tasks, handle, states, extras))


class SequentialBackend(_RoundBackend):
    """Runs every client in this process, one after another (for debugging and tests).

    torch threads are set to ``engine.cpus_per_worker``, as on a Ray worker, so both backends
    compute with the same thread count and give bit-identical results on CPU.
    """

    name = "sequential"

    def __init__(self, experiment: ExperimentConfig, dataset: FederatedDataset):
        set_threads(experiment.engine.cpus_per_worker)
        device = "cuda" if experiment.engine.gpus_per_worker > 0 else "cpu"
        self.runner = ClientRunner(experiment, dataset, device=device, worker_id="local")
        self.num_workers = 1

    def broadcast(self, received: dict[str, Any]) -> Any:
        return received

    def put_state(self, value: Any) -> Any:
        return value

    def get_state(self, handle: Any) -> Any:
        return handle

    def submit(
        self, run: RunConfig, tasks: list[ClientTask], handle: Any, states: list[Any], extras: list[Any]
    ) -> Any:
        return (run, tasks, handle, states, extras)  # nothing runs until collect

    def collect(self, pending: Any) -> list[ClientResult]:
        return run_tasks(self.runner, *pending)

    def close(self) -> None:
        pass


def pack_uploads(results: list[ClientResult]) -> tuple[list[ClientResult], np.ndarray]:
    """The results with every upload moved into one byte buffer, as a worker returns them.

    One buffer serialises in a single copy where a dict of arrays per client costs a buffer each,
    on the path between a round's last client and the aggregation. Each result's
    ``upload`` becomes its layout: (name, dtype string, shape, byte offset) per tensor, offsets
    8-byte aligned. :func:`unpack_uploads` inverts it.
    """
    parts: list[np.ndarray] = []
    layouts, offset = [], 0
    for x in results:
        layout = []
        for name, value in x.upload.items():
            a = np.asarray(value)
            a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
            layout.append((name, a.dtype.str, a.shape, offset))
            parts.append(a.reshape(-1).view(np.uint8))
            pad = -a.nbytes % 8
            parts.append(np.zeros(pad, dtype=np.uint8))
            offset += a.nbytes + pad
        layouts.append(layout)
    buffer = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return [replace(x, upload=layout) for x, layout in zip(results, layouts)], buffer


def unpack_uploads(packed: tuple[list[ClientResult], np.ndarray]) -> list[ClientResult]:
    """The results of :func:`pack_uploads` with their uploads as arrays again: views of the
    buffer (no copies), which the aggregation only reads."""
    results, buffer = packed
    out = []
    for x in results:
        upload = {}
        for name, dtype, shape, offset in x.upload:
            dt = np.dtype(dtype)
            n = math.prod(shape) * dt.itemsize
            upload[name] = buffer[offset : offset + n].view(dt).reshape(shape)
        out.append(replace(x, upload=upload))
    return out


def balance(costs: Sequence[float], bins: int) -> list[list[int]]:
    """Split task indices into at most ``bins`` batches of near-equal total cost.

    Longest-processing-time-first (Graham 1969): tasks in decreasing cost (ties: lower index
    first) go to the batch with the least cost so far (ties: lower batch); the result is within
    4/3 of the best possible largest batch. Each batch lists its indices in ascending order;
    empty batches are left out. Deterministic.

    Args:
        costs: one non-negative cost per task (fedsim uses the client's training examples).
        bins: number of batches wanted (the worker count), >= 1.
    """
    loads = [0.0] * max(1, bins)
    batches: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(len(loads)), key=lambda b: (loads[b], b))
        loads[b] += costs[i]
        batches[b].append(i)
    return [sorted(b) for b in batches if b]


def sends_inline(nbytes: int, calls: int, inline_bytes: int) -> bool:
    """Whether a round's broadcast of ``nbytes`` bytes goes inline with each of the round's
    ``calls`` (one per worker; one per client under ``timeout_policy: drop``) instead of into the
    object store once.

    Inline when the copies of one round, ``nbytes`` x ``calls``, take at most half of
    ``inline_bytes`` (the Ray instance's ``max_direct_call_object_size``; the half leaves room for
    pickling overhead, so Ray never falls back to storing each call's copy). For a small model the
    object store's put, gets and release cost more CPU than pickling a copy per call (figures in
    docs/performance.md). Larger models, or many workers, keep the single ``ray.put`` per round,
    which every worker on a node reads without a copy.
    """
    return nbytes * max(1, calls) <= inline_bytes // 2


TASKS_IN_FLIGHT = 2  # per worker, when every client is its own call (timeout_policy: drop)
GROW_CHECK_S = 1.0
"""Seconds between two looks at the cluster's resources for nodes added mid-run (``num_workers:
auto``; :meth:`RayBackend._grow`): a look (``ray.cluster_resources()``) took 0.3 ms on a local Ray."""


@dataclass
class _RoundInFlight:
    """A round submitted to the Ray pool: its calls in flight and what is still to dispatch."""

    run: RunConfig  # sent inline with each call: cheaper than an object-store get
    tasks: list[ClientTask]
    handle: Any
    states: list[Any]
    extras: list[Any]
    queue: list[list[int]]  # batches of task indices not yet dispatched
    idle: list[Any]  # free call slots (a worker appears once per slot)
    results: list[ClientResult | None]
    deadline: float | None
    pending: dict[Any, tuple[Any, list[int], float]] = field(
        default_factory=dict
    )  # ref -> (worker, batch, t0)


class RoundTimeout(RuntimeError):
    """A round passed ``engine.round_timeout_s`` under ``timeout_policy: fail``."""


def dropped_result(task: ClientTask, worker: str, seconds: float) -> ClientResult:
    """The record of a client dropped for lateness: nothing uploaded, recorded in clients.parquet."""
    return ClientResult(
        client_id=task.client_id,
        round=task.round,
        upload={},
        n_examples=0,
        train_loss=float("nan"),
        bytes_up=0,
        bytes_down=0,
        seconds=seconds,
        worker=worker,
        attempt=task.attempt,
        dropped=True,
        outcome="dropped_timeout",
    )


class RayBackend(_RoundBackend):
    """A pool of ClientWorker actors sized from the cluster's resources, never one per client.

    Each actor requests ``engine.cpus_per_worker`` CPUs and ``engine.gpus_per_worker`` GPUs
    (fractional: 0.25 puts four workers on one GPU). Each round, every worker gets one call with
    its share of the cohort, balanced on the clients' example counts (:func:`balance`), and
    returns its clients' results together: one Ray round trip per worker and round instead of one
    per client (see :meth:`_batches`).

    Faults: when a worker process dies (preemption, OOM kill, its node lost), its clients are
    retried on the first worker free, up to ``engine.max_attempts`` attempts per client and
    round; the result is identical because a client's work depends only on (seed, round, client)
    and what it received. A replacement worker is started, and joins the pool once it has
    started (:meth:`_replace`), so a run never waits for resources that a lost node took with it. A round
    that passes ``engine.round_timeout_s`` follows ``engine.timeout_policy``: ``wait`` (keep
    waiting), ``drop`` (aggregate the clients that finished; late ones are recorded as dropped and
    their workers replaced) or ``fail`` (stop the run with a message). A round's deadline counts
    from when every worker of the pool has started, and moves back by the time a worker that
    replaces a dead one takes to start: a worker's start (importing torch, reading the dataset)
    takes seconds, and counting it would drop, or fail, the first round's clients, those retried
    after a worker died, and those of each round after a replacement. A replacement whose
    resources the cluster no longer has (its node lost) is not waited for: the deadline counts
    again once the resources for the pool are gone (:meth:`_wait_joining`).

    Placement and growth: the workers are spread over the nodes (:func:`fedsim.engine.pool.spawn_worker`).
    With ``engine.num_workers: auto`` (outside a sweep trial's placement group) the pool grows
    when the cluster does, as when an autoscaler adds a node mid-run: before a round, at most
    every :data:`GROW_CHECK_S` seconds, the workers that the cluster's resources fit now
    (:func:`fedsim.engine.pool.pool_size`) and the pool lacks are started, and each joins the
    pool once it has started, like a replacement. The pool never shrinks: a lost node's workers
    are replaced, and their replacements wait for resources. Which worker trains a client changes
    no result.
    """

    name = "ray"

    def __init__(
        self,
        experiment: ExperimentConfig,
        dataset_ref: Any,
        workers: list[Any] | None = None,
        client_sizes: Sequence[int] | None = None,
        inline_bytes: int = RAY_INLINE_BYTES,
    ):
        """Args: the experiment; the object-store ref of the dataset; optionally the pool's actors,
        already started by :func:`fedsim.engine.pool.start_workers` (so they start while the driver does); the
        training examples of every client (indexed by client id), to balance the workers' loads
        (equal loads assumed without it); the Ray instance's ``max_direct_call_object_size``
        (bytes; Ray's default unless fedsim started the instance), for :func:`sends_inline`."""
        import ray

        self._ray = ray
        self.experiment = experiment
        self._dataset_ref = dataset_ref
        self._spawned = 0
        self._names: dict[str, str] = {}
        self._replaced: dict[str, Any] = {}
        self._started: set[str] = set()  # actor ids of workers known to have finished starting
        # replacements not yet known to have started (actor id -> the ref of their pid() call):
        # no call is sent to one until it has, see _dispatch
        self._joining: dict[str, Any] = {}
        e = experiment.engine
        self._may_grow = e.num_workers == "auto" and not in_placement_group()
        self._grown_at = time.monotonic()  # the pool was sized from the cluster's resources just now
        self._worker_cls = make_worker_class()
        self._sizes = None if client_sizes is None else list(client_sizes)
        self._inline_bytes = int(inline_bytes)
        if workers is None:
            workers = start_workers(experiment, dataset_ref)
        self.workers = list(workers)
        for w in self.workers:
            self._names[w._actor_id.hex()] = f"worker-{self._spawned}"
            self._spawned += 1
        self.num_workers = len(self.workers)

    def _spawn(self) -> Any:
        name = f"worker-{self._spawned}"
        self._spawned += 1
        w = spawn_worker(self._worker_cls, self.experiment, self._dataset_ref, name)
        self._names[w._actor_id.hex()] = name
        return w

    def _wait_started(self) -> None:
        """Block until every worker of the first pool has finished starting (its constructor
        returned, or it died: a dead worker's calls then fail and are retried as usual).
        Replacements and added workers are not waited for: they get no call before they have
        started (:meth:`_joined`)."""
        new = [
            w
            for w in self.workers
            if w._actor_id.hex() not in self._started and w._actor_id.hex() not in self._joining
        ]
        if new:
            self._ray.wait([w.pid.remote() for w in new], num_returns=len(new))
            self._started.update(w._actor_id.hex() for w in new)

    def _replace(self, worker: Any) -> Any:
        """A fresh worker in place of ``worker`` (the same one for every call about one worker).

        The replacement asks for the same resources, which may never come: the lost worker's node
        may be gone with its CPUs (a spot instance) while the other workers hold the rest. So it
        joins the pool only once it has started (:meth:`_dispatch`); until then the surviving
        workers take its share of the work, and a run never waits on it."""
        key = worker._actor_id.hex()
        if key not in self._replaced:
            self._ray.kill(worker, no_restart=True)
            self.workers = [w for w in self.workers if w._actor_id.hex() != key]
            new = self._replaced[key] = self._spawn()
            self._joining[new._actor_id.hex()] = new.pid.remote()
            self.workers.append(new)
        return self._replaced[key]

    def _wait_joining(self, worker: Any, poll_s: float = 1.0) -> None:
        """Block until ``worker``, a replacement, has started, but only while the resources for
        the whole pool are there (:func:`fedsim.engine.pool.room_for`): once they are not (its
        node lost, and Ray has noticed), it may never start, and the caller goes on. Checked
        every ``poll_s`` seconds."""
        ref = self._joining.get(worker._actor_id.hex())
        while ref is not None and not self._ray.wait([ref], timeout=poll_s)[0]:
            if not room_for(self.experiment, len(self.workers)):
                return

    def _grow(self) -> None:
        """Start the workers that the cluster fits now and the pool lacks (``num_workers: auto``;
        a node added mid-run); each joins the pool once it has started (:meth:`_joined`). Looks
        at most every :data:`GROW_CHECK_S` seconds."""
        if not self._may_grow or time.monotonic() - self._grown_at < GROW_CHECK_S:
            return
        self._grown_at = time.monotonic()
        for _ in range(pool_size(self.experiment, self._ray.cluster_resources()) - len(self.workers)):
            new = self._spawn()
            self._joining[new._actor_id.hex()] = new.pid.remote()
            self.workers.append(new)

    def _joined(self, worker: Any) -> bool:
        """Whether ``worker`` may be sent calls: a worker of the first pool (its calls wait in its
        queue while it starts), or a replacement that has started (or died trying)."""
        ref = self._joining.get(worker._actor_id.hex())
        if ref is None:
            return True
        if not self._ray.wait([ref], timeout=0)[0]:
            return False
        del self._joining[worker._actor_id.hex()]
        return True

    def broadcast(self, received: dict[str, Any]) -> Any:
        """The round's downlink as the round's calls carry it: the arrays themselves when
        :func:`sends_inline` allows, else one ``ray.put`` for the round."""
        calls = self.experiment.engine.clients_per_round if self._call_per_client() else len(self.workers)
        if sends_inline(P.nbytes(received), calls, self._inline_bytes):
            return received
        return self._ray.put(received)

    def put_state(self, value: Any) -> Any:
        return None if value is None else self._ray.put(value)

    def get_state(self, handle: Any) -> Any:
        return None if handle is None else self._ray.get(handle)

    def _call_per_client(self) -> bool:
        """Whether every client is its own call (``timeout_policy: drop`` with a round timeout)."""
        e = self.experiment.engine
        return e.round_timeout_s is not None and e.timeout_policy == "drop"

    def _batches(self, tasks: list[ClientTask]) -> tuple[list[list[int]], int]:
        """(batches of task indices, calls in flight per worker) for one round.

        Normally one call per worker per round, the cohort split by :func:`balance` on the
        clients' example counts: a Ray call costs milliseconds of driver, raylet and worker time,
        as much as training a small client, so a call per client would double a round's time.
        Under ``timeout_policy: drop`` every client is its own call (two in flight per worker), so
        the clients that finished before the deadline are kept.
        """
        if self._call_per_client():
            return [[i] for i in range(len(tasks))], TASKS_IN_FLIGHT
        costs = [float(self._sizes[t.client_id]) if self._sizes is not None else 1.0 for t in tasks]
        return balance(costs, sum(self._joined(w) for w in self.workers)), 1

    def submit(
        self, run: RunConfig, tasks: list[ClientTask], handle: Any, states: list[Any], extras: list[Any]
    ) -> _RoundInFlight:
        """Start a round's calls on the pool; :meth:`collect` waits for them."""
        self._grow()
        queue, slots = self._batches(tasks)
        e = self.experiment.engine
        if e.round_timeout_s is not None:  # the deadline is for training, not for workers starting
            self._wait_started()
        live = _RoundInFlight(
            run=run,
            tasks=list(tasks),
            handle=handle,
            states=states,
            extras=extras,
            queue=queue,
            idle=[w for _ in range(slots) for w in self.workers],
            results=[None] * len(tasks),
            deadline=None if e.round_timeout_s is None else time.monotonic() + e.round_timeout_s,
        )
        self._dispatch(live)
        return live

    def _dispatch(self, live: _RoundInFlight) -> None:
        """Send queued batches to free call slots, first come first served, skipping replacements
        that have not started (:meth:`_joined`)."""
        while live.queue:
            slot = next((i for i, w in enumerate(live.idle) if self._joined(w)), None)
            if slot is None:
                return
            worker, batch = live.idle.pop(slot), live.queue.pop(0)
            ref = worker.run.remote(
                live.run,
                [live.tasks[i] for i in batch],
                live.handle,
                [live.states[i] for i in batch],
                [live.extras[i] for i in batch],
            )
            live.pending[ref] = (worker, batch, time.monotonic())

    def collect(self, live: _RoundInFlight) -> list[ClientResult]:
        """The round's results in task order, once every client has finished (or was dropped).

        Raises:
            RoundTimeout: past ``engine.round_timeout_s`` under ``timeout_policy: fail``.
            FedsimError, RuntimeError: a client's training failed (the message names it), or a
                client lost its worker ``engine.max_attempts`` times.
        """
        ray, e = self._ray, self.experiment.engine
        tasks, results, queue, pending = live.tasks, live.results, live.queue, live.pending
        while queue or pending:
            self._dispatch(live)
            wait_s = (
                None
                if live.deadline is None or e.timeout_policy == "wait"
                else max(0.0, live.deadline - time.monotonic())
            )
            # a replacement that starts while batches wait for a free slot can take one
            starting = {
                self._joining[k]: k for k in {w._actor_id.hex() for w in live.idle} & set(self._joining)
            }
            done, _ = ray.wait([*pending, *(starting if queue else ())], num_returns=1, timeout=wait_s)
            if done and done[0] in starting:
                continue  # _dispatch sends it a batch
            if not done:  # past the round's deadline
                late = sorted(
                    {tasks[i].client_id for _, b, _ in pending.values() for i in b}
                    | {tasks[i].client_id for b in queue for i in b}
                )
                if e.timeout_policy == "fail":
                    raise RoundTimeout(
                        f"round {tasks[0].round} of run {tasks[0].run_id!r} passed "
                        f"engine.round_timeout_s={e.round_timeout_s} with clients {late} unfinished; "
                        "raise the timeout or use engine.timeout_policy: drop"
                    )
                for worker, batch, t0 in pending.values():
                    for i in batch:
                        results[i] = dropped_result(
                            tasks[i], self._names.get(worker._actor_id.hex(), "?"), time.monotonic() - t0
                        )
                    self._replace(worker)
                for i in (i for b in queue for i in b):
                    results[i] = dropped_result(tasks[i], "", 0.0)
                break
            for ref in done:
                worker, batch, _ = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                    # the worker died (its process, or its node with the results it held): retry
                    # the batch on the first worker free, the replacement or a surviving one
                    t = tasks[batch[0]]
                    if t.attempt + 1 >= e.max_attempts:
                        raise RuntimeError(
                            f"client {t.client_id} of round {t.round} (run {t.run_id!r}) lost its "
                            f"worker {e.max_attempts} times; check the workers' memory and logs "
                            "or raise engine.max_attempts"
                        ) from None
                    for i in batch:
                        tasks[i] = replace(tasks[i], attempt=tasks[i].attempt + 1)
                    queue.insert(0, batch)
                    live.idle = [w for w in live.idle if w is not worker]  # its other call slots
                    live.idle.insert(0, self._replace(worker))
                    if live.deadline is not None:  # the replacement's start does not make its clients late
                        t0 = time.monotonic()
                        self._wait_joining(live.idle[0])
                        live.deadline += time.monotonic() - t0
                    continue
                except ray.exceptions.RayTaskError as err:
                    if isinstance(err.cause, (FedsimError, RuntimeError)):
                        raise err.cause from None
                    raise RuntimeError(
                        f"a worker failed in round {tasks[0].round} of run {tasks[0].run_id!r}: {err.cause!r}"
                    ) from None
                for i, x in zip(batch, unpack_uploads(out)):
                    results[i] = x
                live.idle.append(worker)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for w in self.workers:
            self._ray.kill(w)
        self.workers = []
